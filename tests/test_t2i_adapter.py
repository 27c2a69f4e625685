"""T2I-Adapter: trained on the loop contract beside the UNet, saved as a save_pretrained folder that stock diffusers
loads, applied by our plugin through a UNet pre-hook that computes what the stock adapter pipeline computes."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
from PIL import Image

from studio import plugin
from studio.adapters import t2i_adapter
from studio.cli import main
from studio.data import condition_image
from studio.errors import StudioError
from studio.pipeline import load
from studio.toy.render import ShapeSpec, render
from studio.trainers.base import TrainConfig, train

CAPTION = "caption=a {{color}} {{shape}}"
DATA = "shapesworld:shape=seen,count=8,condition={kind},place=random," + CAPTION


def _train(folder, kind="mask", steps=3, **options):
    return train(TrainConfig(method="t2i-adapter", data=DATA.format(kind=kind), output_dir=str(folder), max_train_steps=steps,
                             train_batch_size=4, learning_rate=1e-2, method_options={"condition": kind, **options}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("t2i-mask"))


@pytest.fixture(scope="module")
def trained_edge(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("t2i-edge"), kind="edge")


@pytest.fixture(scope="module")
def mask():
    return condition_image(render(ShapeSpec("circle", "red", position="top left"), 32, 32).mask, "mask")


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def _stock_adapter_pipeline(adapter):
    components = load("toy").components
    pipe = StableDiffusionAdapterPipeline(
        **{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}, adapter=adapter,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def test_only_the_adapter_trains_and_the_folder_is_save_pretrained(trained):
    pipe = load("toy")
    assert trained.artifact.name == "diffusion_pytorch_model.safetensors"
    folder = trained.artifact.parent
    assert folder.name == "t2i-adapter" and json.loads((folder / "config.json").read_text())["adapter_type"] == "full_adapter_xl"
    assert trained.trainable_params == t2i_adapter.parameter_count(pipe.unet, pipe.vae_scale_factor)
    network = T2IAdapter.from_pretrained(folder)  # the stock loader
    assert network.config.in_channels == 1
    assert plugin.artifact_methods([folder]) == {"t2i-adapter": "t2i-adapter"}


def test_stock_adapter_pipeline_matches_our_plugin(trained, mask):
    """The stock StableDiffusionAdapterPipeline with our folder draws what our hook on a plain pipeline draws."""
    stock = _stock_adapter_pipeline(T2IAdapter.from_pretrained(trained.artifact.parent))
    expected = _sample(stock, image=mask, adapter_conditioning_scale=0.7)
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact.parent, scale=0.7)
    inputs = plugin.call_inputs(pipe, control=[(mask, None)])
    assert np.abs(_sample(pipe, **inputs) - expected).max() < 1e-5


def test_the_control_changes_the_sample_and_remove_restores(trained, mask):
    pipe = load("toy")
    base = _sample(pipe)
    name = plugin.apply(pipe, trained.artifact)
    plugin.call_inputs(pipe, control=[(mask, "mask")])
    controlled = _sample(pipe)
    assert np.abs(controlled - base).max() > 1e-3
    plugin.set_enabled(pipe, name, False)
    assert np.array_equal(_sample(pipe), base)
    plugin.set_enabled(pipe, name, True)
    plugin.remove(pipe, name)
    assert np.array_equal(_sample(pipe), base)
    assert not pipe.unet._forward_pre_hooks


def test_two_adapters_add_their_weighted_features(trained, trained_edge, mask):
    """Several at once: each adds scale x its features; the same as the stock pipeline given their weighted sum."""
    edge = condition_image(np.array(mask) > 0, "edge")
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact.parent, scale=0.6)
    plugin.apply(pipe, trained_edge.artifact.parent, scale=0.3)
    with pytest.raises(StudioError, match="2 control images without a kind"):
        plugin.call_inputs(pipe, control=[(mask, None), (edge, None)])
    with pytest.raises(StudioError, match="no applied T2I-Adapter reads 'depth'"):
        plugin.call_inputs(pipe, control=[(mask, "depth")])
    plugin.call_inputs(pipe, control=[(edge, "edge"), (mask, "mask")])
    ours = _sample(pipe)

    networks = [T2IAdapter.from_pretrained(t.artifact.parent) for t in (trained, trained_edge)]
    with torch.no_grad():
        summed = [0.6 * a + 0.3 * b for a, b in zip(networks[0](t2i_adapter.control_tensor([mask])),
                                                     networks[1](t2i_adapter.control_tensor([edge])))]
    stock = load("toy")
    stock.unet.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "down_intrablock_additional_residuals": [f.repeat(2, 1, 1, 1) for f in summed]}),
        with_kwargs=True)
    assert np.abs(ours - _sample(stock)).max() < 1e-5


def test_composes_with_a_weight_method(trained, mask, tmp_path):
    lora = train(TrainConfig(method="lora", data="shapesworld:shape=seen,count=8", output_dir=str(tmp_path / "lora"),
                             max_train_steps=2, train_batch_size=4, learning_rate=1e-1)).artifact
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact)
    plugin.call_inputs(pipe, control=[(mask, None)])
    controlled = _sample(pipe)
    plugin.apply(pipe, lora)
    assert not np.array_equal(_sample(pipe), controlled)
    plugin.remove(pipe, "lora")
    assert np.array_equal(_sample(pipe), controlled)


def test_a_control_image_of_another_size_keeps_its_aspect():
    wide = Image.new("L", (64, 32), 0)
    wide.paste(255, (16, 0, 48, 32))  # a 32x32 square in the middle
    with pytest.warns(UserWarning, match="64x32; fitted into 32x32 with its aspect kept"):
        fitted = t2i_adapter.fit_control(wide, 32, 32)
    box = fitted.point(lambda v: 255 if v > 127 else 0).getbbox()  # past the resampling's faint ringing
    assert (box[2] - box[0], box[3] - box[1]) == (16, 16)  # still a square, not squashed to 16x32


@pytest.mark.parametrize("mode, message", [
    ("LA", "has 2 channels (LA); a control image has 1 (grayscale) or 3 (RGB)"),
    ("CMYK", "has 4 channels (CMYK)"),
    ("RGB-colour", "is in colour, but this T2I-Adapter reads a one-channel image"),
])
def test_unusable_channel_counts_are_refused(mode, message):
    if mode == "RGB-colour":
        image = Image.fromarray(render(ShapeSpec("circle", "red"), 32, 32).image)
    else:
        image = Image.new(mode, (32, 32))
    with pytest.raises(StudioError, match=re.escape(message)):
        t2i_adapter.control_pixels(image, False, "--control x.png")
    gray = Image.new("RGB", (8, 8), (255, 255, 255))
    assert t2i_adapter.control_pixels(gray, False, "x").mode == "L"  # a mask saved as RGB is fine


def test_sample_cli_with_a_control_image(trained, mask, tmp_path, capsys):
    mask.resize((64, 64)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sample", "a red circle", "--adapter", str(trained.artifact.parent), "--control",
                     f"{tmp_path / 'mask.png'}:mask", "--steps", "2", "--output-dir", str(out)]) == 0
    assert (out / "0000-seed0.png").is_file()
    assert any("aspect kept" in str(w.message) for w in caught)
    assert json.loads((out / "settings.json").read_text())["control"] == [f"{tmp_path / 'mask.png'}:mask"]


@pytest.mark.parametrize("argv, message", [
    (["--control", "{tmp}/missing.png"], "--control '{tmp}/missing.png': no such file"),
    (["--control", "{tmp}/notes.txt"], "is not an image"),
    (["--control", "{tmp}/la.png"], "has 2 channels (LA)"),
    (["--control", "{tmp}/photo.png"], "is in colour, but this T2I-Adapter reads a one-channel image"),
    (["--control", "{tmp}/mask.png:depth"], "no applied T2I-Adapter reads 'depth'"),
    (["--control", "{tmp}/mask.png", "--no-adapter"], "--control is given but no applied artifact uses it"),
    (["--no-control"], "is applied and needs --control"),
])
def test_sample_cli_bad_control_images(trained, mask, tmp_path, capsys, argv, message):
    mask.save(tmp_path / "mask.png")
    Image.new("LA", (32, 32)).save(tmp_path / "la.png")
    Image.fromarray(render(ShapeSpec("circle", "red"), 32, 32).image).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("hello")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv if not a.startswith("--no-")]
    adapter = [] if "--no-adapter" in argv else ["--adapter", str(trained.artifact.parent)]
    code = main(["sample", "a red circle", *adapter, *args, "--steps", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, options, message", [
    ("shapesworld:shape=seen,count=4", {}, "add condition=mask to the ShapesWorld spec"),
    ("shapesworld:shape=seen,count=4,condition=edge", {}, "draws edge conditions but --condition is mask"),
    ("shapesworld:shape=seen,count=4,condition=mask", {"condition": "Bad Kind"}, "--condition 'Bad Kind': must be a short"),
    ("shapesworld:shape=seen,count=4,condition=mask", {"adapter_type": "light"}, "fits only the full T2I-Adapter"),
])
def test_training_refuses_data_without_the_right_conditions(tmp_path, data, options, message):
    with pytest.raises(StudioError, match=message):
        train(TrainConfig(method="t2i-adapter", data=data, output_dir=str(tmp_path / "o"), max_train_steps=1,
                          method_options=options))
    assert not (tmp_path / "o" / "t2i-adapter").exists()


def test_trains_on_a_folder_of_images_conditions_and_captions(tmp_path):
    folder = tmp_path / "data"
    (folder / "conditions").mkdir(parents=True)
    for i, shape in enumerate(["circle", "square", "cross", "diamond"]):
        drawn = render(ShapeSpec(shape, "blue"), 32, 32)
        Image.fromarray(drawn.image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a blue {shape}")
        condition_image(drawn.mask, "mask").save(folder / "conditions" / f"{i}.png")
    result = train(TrainConfig(method="t2i-adapter", data=str(folder), output_dir=str(tmp_path / "o"), max_train_steps=2,
                               train_batch_size=2))
    assert result.data_summary["images"] == 4  # the conditions folder holds no training images
    (folder / "conditions" / "3.png").unlink()
    with pytest.raises(StudioError, match="1 have none .first: .*3.png.; put each one's mask at conditions/"):
        train(TrainConfig(method="t2i-adapter", data=str(folder), output_dir=str(tmp_path / "o2"), max_train_steps=1))


def test_on_the_tiny_sdxl_and_sd15_fixtures():
    """SDXL's layout takes the XL adapter (its fourth feature goes to the mid block), SD1.5's the full or light one;
    on each, our hook changes the UNet's output exactly as passing the features to the UNet does."""
    from studio.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    for pipe, kinds in ((tiny_sdxl_pipeline(), ["full"]), (tiny_sd_pipeline(), ["full", "light"])):
        for kind in kinds:
            network = t2i_adapter.build(pipe, t2i_adapter.T2IAdapterConfig(adapter_type=kind))
            unet = pipe.unet
            generator = torch.Generator().manual_seed(0)
            side = network.total_downscale_factor * 2
            control = torch.rand(1, 1, side, side, generator=generator)
            sample = torch.randn(1, 4, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor, generator=generator)
            text = torch.randn(1, 6, unet.config.cross_attention_dim, generator=generator)
            added = None
            if unet.config.addition_embed_type == "text_time":
                added = {"text_embeds": torch.randn(1, 16, generator=generator),
                         "time_ids": torch.tensor([[side, side, 0, 0, side, side]]).float()}
            with torch.no_grad():
                for p in network.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)
                features = network(control)
                direct = unet(sample, 10, text, added_cond_kwargs=added,
                              down_intrablock_additional_residuals=[f.clone() for f in features]).sample
                hook = t2i_adapter.ControlHook(1.0)
                hook.features = lambda s: features
                handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
                hooked = unet(sample, 10, text, added_cond_kwargs=added).sample
                handle.remove()
                plain = unet(sample, 10, text, added_cond_kwargs=added).sample
            assert torch.allclose(direct, hooked) and not torch.allclose(direct, plain)


def test_an_adapter_for_another_base_model_is_refused(trained, tmp_path):
    from studio.testing import tiny_sd_pipeline

    with pytest.raises(StudioError, match="made on another base model|do not fit this UNet"):
        plugin.apply(tiny_sd_pipeline(), trained.artifact.parent)


def test_gradient_checkpointing_reaches_the_frozen_unet(tmp_path):
    """The adapter's gradient flows through the frozen UNet, whose activations --gradient-checkpointing saves; the
    same seed gives the same loss with it."""
    from unittest import mock

    from diffusers import UNet2DConditionModel

    plain = _train(tmp_path / "plain", steps=2)
    enable = UNet2DConditionModel.enable_gradient_checkpointing
    with mock.patch.object(UNet2DConditionModel, "enable_gradient_checkpointing", autospec=True, side_effect=enable) as spy:
        checkpointed = train(TrainConfig(method="t2i-adapter", data=DATA.format(kind="mask"), output_dir=str(tmp_path / "gc"),
                                         max_train_steps=2, train_batch_size=4, learning_rate=1e-2,
                                         gradient_checkpointing=True, method_options={"condition": "mask"}))
    assert spy.call_count == 1
    assert abs(checkpointed.final_loss - plain.final_loss) < 1e-5
    # Only the adapter is a trained part: checkpoints and the optimizer hold no copy of the frozen UNet.
    assert checkpointed.trainable_params == plain.trainable_params


def test_prior_data_is_refused_not_ignored(tmp_path, capsys):
    code = main(["train", "--method", "t2i-adapter", "--data", DATA.format(kind="mask"), "--prior-data",
                 "shapesworld:count=2", "--max-train-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "--prior-data is not used by --method t2i-adapter" in capsys.readouterr().err


@pytest.mark.parametrize("mode, message", [
    ("LA", "has 2 channels (LA)"),
    ("colour", "is in colour, but this T2I-Adapter reads a one-channel image"),
])
def test_page_refuses_bad_control_images(tmp_path, trained, mode, message):
    """The page checks a control image as the CLI does (through the same command check), before any job exists."""
    import gradio as gr

    from studio.ui.app import Studio

    studio_app = Studio(tmp_path / "studio", workers=0)
    studio_app.upload_dir.mkdir(parents=True, exist_ok=True)
    upload = studio_app.upload_dir / "control.png"
    if mode == "LA":
        Image.new("LA", (32, 32)).save(upload)
    else:
        Image.fromarray(render(ShapeSpec("circle", "red"), 32, 32).image).save(upload)
    folder = studio_app.data_dir / "t2i" / "t2i-adapter"
    shutil.copytree(trained.artifact.parent, folder)
    stack = [{"path": str(folder / trained.artifact.name), "name": "t2i-adapter", "scale": 1.0, "enabled": True}]
    with pytest.raises(gr.Error, match=re.escape(message)):
        studio_app.sample(studio_app.default_model, stack, "a red circle", "", "0", 2, 5.0, "model default", 0, 0, None,
                          str(upload), "mask")
    assert studio_app.queue.list() == []
