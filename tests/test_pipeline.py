from pathlib import Path

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.pipeline import check_safetensors, load, toy_model_path
from studio.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_stock_diffusers_loads_and_samples_the_toy_model(monkeypatch):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    monkeypatch.chdir(REPO)
    pipe = StableDiffusionPipeline.from_pretrained("assets/toy-model")
    out = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0.05
    encoder = CLIPVisionModelWithProjection.from_pretrained("assets/toy-model/image_encoder")
    embeds = encoder(pixel_values=torch.rand(1, 3, 32, 32)).image_embeds
    assert embeds.shape == (1, encoder.config.projection_dim)


def test_toy_model_is_small():
    total = sum(p.stat().st_size for p in toy_model_path().rglob("*") if p.is_file())
    assert total < 25 * 1024 * 1024


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_tiny_fixtures_sample_and_reload(build, tmp_path):
    pipe = build()
    pipe.save_pretrained(tmp_path / "model")
    loaded = load(str(tmp_path / "model"), device="cpu")
    assert type(loaded).__name__ == type(pipe).__name__
    out = loaded("a blue square", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_sdxl_fixture_has_sdxl_structure():
    pipe = tiny_sdxl_pipeline()
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.text_encoder_2.config.projection_dim == 16


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(StudioError, match="not found"):
        load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="not a diffusers pipeline"):
        load(str(tmp_path / "empty"))


def test_truncated_and_corrupt_safetensors(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    assert "w" in check_safetensors(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(StudioError, match="truncated"):
        load(str(truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(StudioError, match="corrupt"):
        load(str(garbage))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(StudioError, match="not a valid"):
        load(str(tiny))


def test_truncated_weights_inside_a_folder(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StudioError, match="unet.*truncated|truncated"):
        load(str(tmp_path / "model"))


def test_offline_hub_id_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError, match="local path"):
        load("some-org/some-model-that-is-not-here")


def test_dtype_and_device_choices():
    with pytest.raises(StudioError, match="fp16 needs a GPU"):
        load("toy", device="cpu", dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(StudioError, match="no CUDA GPU"):
            load("toy", device="cuda")
        with pytest.raises(StudioError, match="xformers needs a CUDA GPU"):
            load("toy", device="cpu", xformers=True)
    pipe = load("toy", device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
