"""SPM: the membrane against a dense reference, Facilitated Transport, the official layout in stock diffusers, and a
short erasure on the toy model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from studio.adapters import spm

from studio import plugin
from studio.artifact import fingerprint, save_artifact
from studio.convert import to_kohya
from studio.testing import perturb_trainable, tiny_sd_pipeline


@pytest.mark.parametrize("layer", [torch.nn.Linear(12, 6), torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.Conv2d(6, 4, 1)])
def test_the_membrane_is_its_dense_update(layer):
    membrane = spm.Membrane(layer, rank=1, alpha=1.0)
    perturb_trainable(membrane)
    x = torch.randn(2, 12) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 6, 5, 5)
    down, up = membrane.factors()
    dense = layer.weight + spm.delta(down, up)
    expected = torch.nn.functional.linear(x, dense, layer.bias) if isinstance(layer, torch.nn.Linear) else \
        torch.nn.functional.conv2d(x, dense, layer.bias, layer.stride, layer.padding)
    assert torch.allclose(layer(x) + membrane(x), expected, atol=1e-5)


def _artifact(path, pipe, concept=("dog",), transport=True):
    """An SPM file as if trained on `pipe`: membranes injected and perturbed, written with the studio header."""
    config = spm.SPMConfig(concept=list(concept), transport=transport)
    names = spm.inject(pipe.unet, config)
    perturb_trainable(pipe.unet, std=0.2)
    save_artifact(path, spm.state_dict(pipe.unet), "spm", dataclasses.asdict(config), fingerprint(pipe.unet, names),
                  extra_metadata=spm.file_metadata(config))
    spm.set_membranes(pipe.unet, True)
    return path


def _unet_output(pipe, prompts):
    text = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    sample = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(sample, 10, text).sample


def test_applied_at_full_strength_it_is_the_trained_model_and_remove_restores(tmp_path):
    trained = tiny_sd_pipeline()
    path = _artifact(tmp_path / "spm.safetensors", trained)
    pipe = tiny_sd_pipeline()
    original = _unet_output(pipe, ["a dog", "a cat"])
    name = plugin.apply(pipe, path)
    assert torch.allclose(_unet_output(pipe, ["a dog", "a cat"]), _unet_output(trained, ["a dog", "a cat"]), atol=1e-5)
    plugin.remove(pipe, name)
    assert torch.equal(_unet_output(pipe, ["a dog", "a cat"]), original)


def test_facilitated_transport_gates_each_prompt_of_a_batch(tmp_path):
    """γ = 1 for a prompt naming the concept; an unrelated prompt gets its own, smaller γ², in the same batch."""
    trained = tiny_sd_pipeline()
    path = _artifact(tmp_path / "spm.safetensors", trained)
    pipe = tiny_sd_pipeline()
    plain = _unet_output(pipe, ["a dog", "a cat"])
    plugin.apply(pipe, path)
    gates = spm.transport_gates(pipe, ["a dog", "a cat"], ["dog"])
    assert gates[0] == 1 and gates[1] < 1
    plugin.set_prompts(pipe, ["a dog", "a cat"])
    gated = _unet_output(pipe, ["a dog", "a cat"])
    full = _unet_output(trained, ["a dog", "a cat"])
    assert torch.allclose(gated[0], full[0], atol=1e-5)
    # the second sample: the base output plus γ² of the membranes' effect (each layer scaled by γ², not the output)
    assert not torch.allclose(gated[1], full[1], atol=1e-5) and not torch.allclose(gated[1], plain[1], atol=1e-5)
    plugin.set_prompts(pipe, None)
    assert torch.allclose(_unet_output(pipe, ["a dog", "a cat"]), full, atol=1e-5)


def test_a_synonym_opens_the_membrane_fully_and_other_words_do_not():
    """On the toy model "disk" / "round shape" encode like "circle", so they gate as the concept's own word does; a
    neighbouring shape ("square") keeps the reference's partial gate, and threshold 1 counts exact words only."""
    from studio.pipeline import load

    pipe = load("toy")
    prompts = ["a blue striped disk", "a blue round shape on a white background", "a blue striped square"]
    gates = spm.transport_gates(pipe, prompts, ["circle"])
    assert gates[:2].tolist() == [1.0, 1.0] and gates[2] < 0.6
    exact = spm.transport_gates(pipe, prompts, ["circle"], synonym_threshold=1.0)
    assert (exact[:2] < 0.8).all() and exact[2] == gates[2]


def test_phrases_seen_before_are_not_encoded_again():
    from studio.pipeline import load

    pipe, texts = load("toy"), []

    def encoded(batch):
        texts.extend(batch)
        return pipe.encode_prompt(batch, "cpu", 1, False)[0].flatten(1)

    memo = {}
    first = spm.synonym_phrases(encoded, ["a blue disk"], ["circle"], 0.9, memo)
    assert set(memo) == {"a", "blue", "disk", "a blue", "blue disk", "a blue disk"}
    encoded_once = len(texts)
    again = spm.synonym_phrases(encoded, ["a blue disk", "a disk"], ["circle"], 0.9, memo)
    assert first.tolist() == [[1.0]] and again.tolist() == [[1.0], [1.0]]
    assert texts[encoded_once:] == ["", "a disk", "circle"]  # only the new phrase (with the two it is measured by)


def test_the_official_layout_loads_as_a_plain_lora_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    trained = tiny_sd_pipeline()
    path = _artifact(tmp_path / "spm.safetensors", trained)
    official = to_kohya(path, tmp_path / "spm-official.safetensors")
    keys = load_file(str(official))
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"))
    stock.load_lora_weights(str(official))
    assert torch.allclose(_unet_output(stock, ["a dog"]), _unet_output(trained, ["a dog"]), atol=1e-4)


def test_a_file_for_another_model_is_refused_and_nothing_is_attached(tmp_path):
    from studio.errors import StudioError
    from studio.testing import tiny_sdxl_pipeline

    path = _artifact(tmp_path / "spm.safetensors", tiny_sd_pipeline())
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(StudioError, match="another"):
        plugin.apply(pipe, path)
    assert plugin.applied(pipe) == {}


@pytest.mark.slow
def test_a_short_run_erases_circle_and_keeps_the_rest(tmp_path):
    """A small version of `studio bench erase` (its recipe: 300 steps, the toy defaults); about two minutes."""
    from studio.trainers.base import TrainConfig, train

    from studio.bench.erase import RECIPES, quick_check

    result = train(TrainConfig(method="spm", output_dir=str(tmp_path), validation_steps=0,
                               method_options={"concept": ["circle"]}, **RECIPES["spm"]))
    measured = quick_check(result.artifact, ["circle"])
    assert measured["before"]["circle"] >= 0.9
    assert measured["after"]["circle"] <= 0.1
    assert measured["preservation"] >= -0.05


def test_convert_writes_only_the_official_layout(tmp_path, capsys):
    from studio.cli import main

    path = _artifact(tmp_path / "spm.safetensors", tiny_sd_pipeline())
    assert main(["convert", str(path), "--to", "peft", "--output", str(tmp_path / "out")]) == 2
    assert "holds spm, which converts only --to kohya (the official SPM layout" in capsys.readouterr().err
    assert main(["convert", str(path), "--to", "kohya", "--output", str(tmp_path / "official.safetensors")]) == 0
    assert load_file(str(tmp_path / "official.safetensors"))


def test_on_the_tiny_sdxl_fixture_it_trains_and_touches_only_its_layers(tiny_sdxl_folder, tmp_path):
    from studio.trainers.base import TrainConfig, train

    from studio.testing import tiny_sdxl_pipeline

    model = tiny_sdxl_folder
    result = train(TrainConfig(method="spm", model=str(model), output_dir=str(tmp_path / "out"), max_train_steps=2,
                               method_options={"concept": ["dog"], "denoising_steps": 4, "anchors_per_step": 1}))
    pipe = tiny_sdxl_pipeline()
    targeted = {f"unet.{name}" for name in spm.target_layers(pipe.unet)}
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    name = plugin.apply(pipe, result.artifact)
    assert set(plugin.applied(pipe)[name]) == targeted
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # hooks: no weight changed
