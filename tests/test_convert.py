"""`studio convert` between our LoRA file and the kohya/A1111 layout, both ways."""

from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from studio.adapters import lora

from studio import plugin
from studio.artifact import fingerprint, read_header, save_artifact
from studio.cli import main
from studio.convert import from_kohya, to_kohya
from studio.errors import StudioError
from studio.pipeline import load
from studio.testing import perturb_trainable, tiny_sd_pipeline


def _unet_output(pipe):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, text).sample


@pytest.fixture()
def tiny_lora(tmp_path):
    """A tiny SD1.x model folder and a LoRA for it with alpha != rank (so alpha handling is exercised)."""
    model_dir = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(model_dir)
    pipe = load(str(model_dir), device="cpu", dtype="fp32")
    config = lora.LoRAConfig(rank=2, alpha=6.0)
    names = lora.inject(pipe.unet, config)
    perturb_trainable(pipe.unet)
    path = save_artifact(tmp_path / "lora.safetensors", lora.state_dict(pipe.unet), "lora", asdict(config),
                         fingerprint(pipe.unet, names), lora.file_metadata(config))
    return model_dir, path, _unet_output(pipe)


def test_kohya_keys_and_round_trip(tiny_lora, tmp_path):
    model_dir, path, trained = tiny_lora
    kohya = to_kohya(path, tmp_path / "kohya.safetensors")
    keys = load_file(str(kohya))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys.keys()
    assert float(keys[f"{stem}.alpha"]) == 6.0
    assert all(k.startswith("lora_unet_") for k in keys)

    back = from_kohya(kohya, tmp_path / "back.safetensors", model=str(model_dir))
    assert read_header(back).method == "lora"
    pipe = load(str(model_dir), device="cpu", dtype="fp32")
    plugin.apply(pipe, back)
    assert torch.allclose(_unet_output(pipe), trained, atol=1e-5)
    original, converted = load_file(str(path)), load_file(str(back))
    assert original.keys() == converted.keys()


def test_stock_load_lora_weights_reads_our_kohya_export(tiny_lora, tmp_path):
    model_dir, path, trained = tiny_lora
    kohya = to_kohya(path, tmp_path / "kohya.safetensors")
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(str(model_dir))
    stock.load_lora_weights(str(kohya))
    assert torch.allclose(_unet_output(stock), trained, atol=1e-5)


def test_cli_convert_both_ways_and_errors(tiny_lora, tmp_path, capsys):
    model_dir, path, _ = tiny_lora
    assert main(["convert", str(path), "--to", "kohya", "--output", str(tmp_path / "k.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "--output", str(tmp_path / "d.safetensors"),
                 "--model", str(model_dir)]) == 0
    assert read_header(tmp_path / "d.safetensors").config["rank"] == 2
    capsys.readouterr()
    # Made for another model: the toy UNet has other module names.
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "not in toy's UNet" in capsys.readouterr().err
    tensors = load_file(str(tmp_path / "k.safetensors"))
    save_file({**tensors, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 4)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(StudioError, match="text-encoder"):
        from_kohya(tmp_path / "te.safetensors", tmp_path / "y.safetensors", model=str(model_dir))
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StudioError, match="not a kohya LoRA"):
        from_kohya(tmp_path / "other.safetensors", tmp_path / "z.safetensors", model=str(model_dir))
    capsys.readouterr()
    assert main(["convert", str(path), "--to", "diffusers", "--output", str(tmp_path / "w.safetensors")]) == 2
    assert "already a studio file" in capsys.readouterr().err
