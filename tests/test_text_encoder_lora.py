"""Text-encoder LoRA (`studio train --train-text-encoder`): training, the file, stock diffusers, the plugin, kohya."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from studio.adapters import lora
from studio.trainers.base import LiveText, TrainConfig, text_encoder_names, train

from studio import plugin
from studio.artifact import fingerprint, read_header, save_artifact
from studio.cli import build_parser, main, train_config_from_args
from studio.convert import from_kohya, to_kohya
from studio.errors import StudioError
from studio.pipeline import load
from studio.testing import perturb_trainable, tiny_sd_pipeline, tiny_sdxl_pipeline

STAR = "shapesworld:shape=star,count=4,colors=red|blue,caption=a {color} sks"
PROMPT = "a red sks"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD and SDXL model folders."""
    root = tmp_path_factory.mktemp("te-models")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    return {"sd": str(root / "sd"), "sdxl": str(root / "sdxl")}


def _encode(pipe, prompt=PROMPT):
    """What the pipeline feeds the UNet for `prompt`: the text embeddings (and SDXL's pooled one)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0], (out[2] if len(out) == 4 else None)


def _latents(pipe, size=32):
    """Two sampling steps end to end (text encoders, UNet, scheduler), the latents they end on."""
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=2, height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def _lora_artifact(kind, tmp_path, model_dir=None):
    """A UNet + text-encoder LoRA written by the adapter's own code on a tiny pipeline, its parameters
    perturbed as training would move them; returns (path, the trained pipeline)."""
    pipe = load(model_dir, device="cpu", dtype="fp32") if model_dir else (tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline())
    config = lora.LoRAConfig(rank=2, alpha=6.0)
    base_fingerprint = fingerprint(pipe.unet, lora.inject(pipe.unet, config))
    tensors = {}
    for name in text_encoder_names(pipe):
        base_fingerprint[name] = fingerprint(getattr(pipe, name), lora.inject_text_encoder(getattr(pipe, name), config))
    for i, name in enumerate(["unet", *text_encoder_names(pipe)]):
        perturb_trainable(getattr(pipe, name), seed=i)
        tensors.update(lora.state_dict(getattr(pipe, name), name))
    metadata = lora.file_metadata(config, text_encoders=tuple(text_encoder_names(pipe)))
    path = save_artifact(tmp_path / "lora.safetensors", tensors, "lora", asdict(config), base_fingerprint, metadata)
    return path, pipe


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_live_text_is_what_the_pipeline_encodes(kind):
    """The captions' embeddings computed at each step are `pipe.encode_prompt`'s (and so the cache's)."""
    pipe = tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline()
    encoders = [getattr(pipe, name) for name in text_encoder_names(pipe)]
    with torch.no_grad():
        text, pooled = LiveText(pipe, encoders)([PROMPT, ""], "cpu")
    for i, caption in enumerate([PROMPT, ""]):
        expected, expected_pooled = _encode(pipe, caption)
        assert torch.allclose(text[i], expected[0], atol=1e-6)  # a batch of two vs one: float rounding only
        if kind == "sdxl":
            assert torch.allclose(pooled[i], expected_pooled[0], atol=1e-6)
    assert (pooled is None) == (kind == "sd")


def test_toy_text_encoder_lora_loads_in_stock_diffusers_like_our_plugin(tmp_path):
    """Trained on the toy model: the file holds unet. and text_encoder. keys; the text encoder learned
    (so its embeddings were computed live, not read from the cache); stock `load_lora_weights` and
    `plugin.apply` give the same text embeddings and the same latents."""
    from diffusers import StableDiffusionPipeline

    from studio.pipeline import toy_model_path

    result = train(TrainConfig(method="lora", data=STAR, output_dir=str(tmp_path), max_train_steps=3, train_batch_size=2,
                               learning_rate=1e-2, train_text_encoder=True, text_encoder_lr=2e-2, caption_dropout=0.3,
                               method_options={"rank": 2, "alpha": 4}))
    tensors = load_file(str(result.artifact))
    te_keys = [k for k in tensors if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    assert any(k.startswith("unet.") for k in tensors) and not any(k.startswith("text_encoder_2.") for k in tensors)
    assert any(tensors[k].abs().sum() > 0 for k in te_keys if k.endswith("lora_B.weight"))  # B starts at zero
    header = read_header(result.artifact)
    assert header.fingerprint["text_encoder"]["model"] == "CLIPTextModel"
    meta = json.loads(header.extra[lora.LORA_METADATA_KEY])
    assert meta["text_encoder.lora_alpha"] == 4 and meta["text_encoder.target_modules"] == sorted(lora.TEXT_ENCODER_TARGETS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["train_text_encoder"] is True and summary["trainable_params"] == result.trainable_params

    stock = StableDiffusionPipeline.from_pretrained(str(toy_model_path()))
    ours = load("toy", device="cpu", dtype="fp32")
    base_text, _ = _encode(ours)
    stock.load_lora_weights(str(result.artifact))
    plugin.apply(ours, result.artifact)
    stock_text, ours_text = _encode(stock)[0], _encode(ours)[0]
    assert not torch.allclose(ours_text, base_text, atol=1e-4)
    assert torch.allclose(stock_text, ours_text, atol=1e-5)
    assert torch.allclose(_latents(stock), _latents(ours), atol=1e-4)


def test_resume_with_text_encoder_equals_uninterrupted_run(tmp_path):
    """The resume test's pattern with the text encoder trained (its LoRA dropout and caption dropout on)."""
    def run(folder, steps, resume=None):
        return train(TrainConfig(method="lora", data=STAR, output_dir=str(folder), max_train_steps=steps,
                                 train_batch_size=2, learning_rate=1e-3, checkpointing_steps=3, resume=resume,
                                 train_text_encoder=True, text_encoder_lr=5e-4, caption_dropout=0.3,
                                 method_options={"rank": 2, "dropout": 0.1}))

    straight = load_file(str(run(tmp_path / "a", 6).artifact))
    run(tmp_path / "b", 3)
    with pytest.raises(StudioError, match="was saved with --train-text-encoder; resume with the setting"):
        train(TrainConfig(method="lora", data=STAR, output_dir=str(tmp_path / "b"), max_train_steps=6, train_batch_size=2,
                          resume="latest", method_options={"rank": 2}))
    resumed = load_file(str(run(tmp_path / "b", 6, resume="latest").artifact))
    assert straight.keys() == resumed.keys() and any(k.startswith("text_encoder.") for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_gradient_checkpointing_gives_the_same_weights(models, tmp_path):
    def run(folder, checkpointing):
        return load_file(str(train(TrainConfig(
            method="lora", model=models["sd"], data=STAR, output_dir=str(folder), resolution=32, max_train_steps=2,
            train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=checkpointing, train_text_encoder=True,
            method_options={"rank": 2})).artifact))

    plain, checkpointed = run(tmp_path / "a", False), run(tmp_path / "b", True)
    assert any(k.startswith("text_encoder.") and v.abs().sum() > 0 for k, v in plain.items() if k.endswith("lora_B.weight"))
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


@pytest.fixture(scope="module")
def sdxl_run(models, tmp_path_factory):
    """One SDXL training through the CLI with both text encoders, bf16 autocast, gradient checkpointing,
    caption dropout and validation images."""
    out = tmp_path_factory.mktemp("sdxl-run")
    code = main(["train", "--model", models["sdxl"], "--method", "lora", "--data", STAR, "--resolution", "32",
                 "--max-train-steps", "2", "--train-batch-size", "2", "--learning-rate", "1e-2", "--rank", "2",
                 "--train-text-encoder", "--text-encoder-lr", "1e-2", "--mixed-precision", "bf16",
                 "--gradient-checkpointing", "--caption-dropout", "0.5", "--validation-prompt", PROMPT,
                 "--validation-steps", "2", "--output-dir", str(out)])
    assert code == 0
    return out


def test_sdxl_trains_both_text_encoders_and_loads_in_stock_diffusers(sdxl_run, models):
    from diffusers import StableDiffusionXLPipeline

    artifact = sdxl_run / "lora.safetensors"
    tensors = load_file(str(artifact))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    assert len(list((sdxl_run / "validation" / "step-2").glob("*.png"))) == 4

    stock = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    ours = load(models["sdxl"], device="cpu", dtype="fp32")
    base = _latents(ours)
    stock.load_lora_weights(str(artifact))
    plugin.apply(ours, artifact)
    for stock_part, ours_part in zip(_encode(stock), _encode(ours)):
        assert torch.allclose(stock_part, ours_part, atol=1e-5)
    assert not torch.allclose(_latents(ours), base, atol=1e-4)
    assert torch.allclose(_latents(stock), _latents(ours), atol=1e-4)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--train-text-encoder", "--text-encoder-lr", "0"], "--text-encoder-lr 0: must be a number > 0 and <= 1"),
    (["--train-text-encoder", "--text-encoder-lr", "-0.0001"], "--text-encoder-lr -0.0001: must be a number > 0"),
    (["--train-text-encoder", "--text-encoder-lr=-1e-4"], "--text-encoder-lr -0.0001: must be a number > 0"),
    (["--train-text-encoder", "--text-encoder-lr", "fast"], "--text-encoder-lr 'fast': must be a number > 0"),
    (["--text-encoder-lr", "1e-4"], "add --train-text-encoder, or drop --text-encoder-lr"),
    (["--method", "oft", "--train-text-encoder"], "--train-text-encoder works with --method lora only: oft"),
])
def test_bad_text_encoder_options_are_refused_in_one_line(flags, message, tmp_path, capsys):
    assert main(["train", "--data", STAR, "--output-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded


def test_toml_and_switch(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(f'data = "{STAR}"\ntrain-text-encoder = true\ntext-encoder-lr = 5e-5\n')
    config = train_config_from_args(build_parser().parse_args(["train", "--config", str(job)]))
    assert config.train_text_encoder is True and config.text_encoder_lr == 5e-5
    config = train_config_from_args(build_parser().parse_args(["train", "--config", str(job), "--text-encoder-lr", "1e-4"]))
    assert config.train_text_encoder is True and config.text_encoder_lr == 1e-4  # the flag wins over the file
    with pytest.raises(StudioError, match="add --train-text-encoder, or drop --text-encoder-lr"):  # a rate for nothing
        train_config_from_args(build_parser().parse_args(["train", "--config", str(job), "--no-train-text-encoder"]))
    job.write_text(f'data = "{STAR}"\ntrain-text-encoder = true\ntext-encoder-lr = 0\n')
    assert main(["train", "--config", str(job), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--text-encoder-lr 0: must be a number > 0 and <= 1" in capsys.readouterr().err


def test_the_train_form_has_the_switch_and_the_rate():
    """The app's Train form is built from TrainConfig: a checkbox and an optional number, as flags."""
    from studio.ui.app import config_fields

    common = {f.name: f for f in config_fields("common", TrainConfig)}
    assert common["train_text_encoder"].argv(True) == ["--train-text-encoder"]
    assert common["train_text_encoder"].argv(False) == []
    assert common["text_encoder_lr"].argv("") == [] and common["text_encoder_lr"].argv("5e-5") == ["--text-encoder-lr", "5e-05"]


# -- the plugin -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_plugin_applies_scales_fuses_and_removes_the_text_encoder_part(kind, tmp_path):
    path, trained = _lora_artifact(kind, tmp_path)
    trained_text = _encode(trained)
    pipe = tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline()
    parts = text_encoder_names(pipe)
    originals = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in parts}
    modules_before = {part: {n: type(m) for n, m in getattr(pipe, part).named_modules()} for part in parts}
    base_text = _encode(pipe)

    name = plugin.apply(pipe, path)
    touched = plugin.applied(pipe)[name]
    assert {t.split(".")[0] for t in touched} == {"unet", *parts}
    applied_text = _encode(pipe)
    for got, want, base in zip(applied_text, trained_text, base_text):
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-4)

    plugin.set_scale(pipe, name, 0.0)
    assert all(a is None or torch.equal(a, b) for a, b in zip(_encode(pipe), base_text))
    plugin.set_scale(pipe, name, 0.5)
    half = _encode(pipe)[0]
    assert 0 < (half - base_text[0]).abs().mean() < (applied_text[0] - base_text[0]).abs().mean()

    plugin.set_scale(pipe, name, 1.0)
    for _ in range(3):
        plugin.fuse(pipe)
        assert torch.allclose(_encode(pipe)[0], applied_text[0], atol=1e-5)
        plugin.unfuse(pipe)
    for part in parts:
        restored = {k.replace(".base_layer", ""): v for k, v in getattr(pipe, part).state_dict().items()}
        assert all(torch.equal(restored[k], v) for k, v in originals[part].items())

    plugin.remove(pipe, name)
    for part in parts:
        assert {n: type(m) for n, m in getattr(pipe, part).named_modules()} == modules_before[part]
        assert all(torch.equal(getattr(pipe, part).state_dict()[k], v) for k, v in originals[part].items())
    assert all(a is None or torch.equal(a, b) for a, b in zip(_encode(pipe), base_text))
    assert plugin.applied(pipe) == {}


def test_an_sdxl_text_encoder_lora_on_an_sd_pipeline_is_refused(tmp_path):
    path, _ = _lora_artifact("sdxl", tmp_path)
    with pytest.raises(Exception, match="text_encoder_2, which this pipeline|another base model"):
        plugin.apply(tiny_sd_pipeline(), path)


# -- kohya ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, te_prefixes", [("sd", {"lora_te_"}), ("sdxl", {"lora_te1_", "lora_te2_"})])
def test_kohya_text_encoder_keys_round_trip(kind, te_prefixes, models, tmp_path):
    path, trained = _lora_artifact(kind, tmp_path, model_dir=models[kind])
    assert main(["convert", str(path), "--to", "kohya", "--output", str(tmp_path / "kohya.safetensors")]) == 0
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    te_keys = [k for k in kohya if not k.startswith("lora_unet_")]
    assert {k.split("text_model")[0] for k in te_keys} == te_prefixes
    first = sorted(te_prefixes)[0]
    stem = f"{first}text_model_encoder_layers_0_self_attn_q_proj"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= kohya.keys()
    assert float(kohya[f"{stem}.alpha"]) == 6.0

    assert main(["convert", str(tmp_path / "kohya.safetensors"), "--to", "diffusers", "--output",
                 str(tmp_path / "back.safetensors"), "--model", models[kind]]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == load_file(str(path)).keys()
    pipe = load(models[kind], device="cpu", dtype="fp32")
    plugin.apply(pipe, tmp_path / "back.safetensors")
    for got, want in zip(_encode(pipe), _encode(trained)):
        assert got is None or torch.allclose(got, want, atol=1e-5)


def test_a_kohya_file_with_text_encoder_mlp_layers_imports_and_matches_stock(models, tmp_path):
    """kohya trains CLIP's MLP (fc1, fc2) too: such a file imports, and our plugin and stock
    `load_lora_weights` (reading the kohya file itself) give the same text embeddings."""
    from diffusers import StableDiffusionPipeline

    path, _ = _lora_artifact("sd", tmp_path, model_dir=models["sd"])
    kohya = load_file(str(to_kohya(path, tmp_path / "kohya.safetensors")))
    generator = torch.Generator().manual_seed(3)
    stem = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    kohya[f"{stem}.lora_down.weight"] = torch.randn(2, 32, generator=generator) * 0.3
    kohya[f"{stem}.lora_up.weight"] = torch.randn(64, 2, generator=generator) * 0.3
    # The file's one alpha: diffusers ignores a per-module alpha of the flattened CLIPTextModel of transformers 5
    # (its alpha_pattern keys keep "text_model."), which our import folds in.
    kohya[f"{stem}.alpha"] = torch.tensor(6.0)
    save_file(kohya, str(tmp_path / "mlp.safetensors"))
    ours = load(models["sd"], device="cpu", dtype="fp32")
    plugin.apply(ours, from_kohya(tmp_path / "mlp.safetensors", tmp_path / "mlp-ours.safetensors", model=models["sd"]))
    stock = StableDiffusionPipeline.from_pretrained(models["sd"])
    stock.load_lora_weights(str(tmp_path / "mlp.safetensors"))
    assert torch.allclose(_encode(stock)[0], _encode(ours)[0], atol=1e-5)
    also = StableDiffusionPipeline.from_pretrained(models["sd"])
    also.load_lora_weights(str(tmp_path / "mlp-ours.safetensors"))  # and our import, the stock way
    assert torch.allclose(_encode(also)[0], _encode(ours)[0], atol=1e-5)
