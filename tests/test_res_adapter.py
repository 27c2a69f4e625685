"""ResAdapter: sampler LoRA + ResNet norms trained on multi-size data, saved in the release's two-file layout that
its published loading recipe reads, applied by our plugin with the norms put back bit for bit on remove."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import plugin
from studio.adapters import res_adapter
from studio.artifact import fingerprint, save_artifact
from studio.cli import main
from studio.errors import StudioError
from studio.pipeline import load
from studio.trainers.base import TrainConfig, train

DATA = "shapesworld:shape=seen,count=12,sizes=24|32|48x24,caption={caption}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(TrainConfig(method="res-adapter", data=DATA, output_dir=str(tmp_path_factory.mktemp("res")),
                             max_train_steps=3, train_batch_size=4, learning_rate=5e-2))


def _sample(pipe, width=48, height=48, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", width=width, height=height, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def _norms(unet):
    return {k: v.clone() for k, v in unet.state_dict().items() if ".norm1." in k or ".norm2." in k}


def test_the_folder_is_the_release_layout(trained):
    folder = trained.artifact.parent
    assert sorted(p.name for p in folder.iterdir()) == ["diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors"]
    lora = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("lora_unet_") and "samplers_0_conv" in k for k in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in lora} == {"lora_down", "lora_up", "alpha"}
    norms = load_file(str(trained.artifact))
    unet = load("toy").unet
    assert set(norms) == {f"{n}.{p}" for n in res_adapter.norm_names(unet) for p in ("weight", "bias")}
    assert trained.trainable_params == sum(t.numel() for t in norms.values()) + sum(
        t.numel() for k, t in lora.items() if not k.endswith(".alpha"))


def test_the_official_recipe_draws_what_our_plugin_draws(trained):
    folder = trained.artifact.parent
    pipe = load("toy")
    plugin.apply(pipe, folder)
    ours = _sample(pipe)
    stock = load("toy")
    stock.load_lora_weights(str(folder), weight_name=res_adapter.LORA_FILE, adapter_name="res_adapter")
    stock.set_adapters(["res_adapter"], adapter_weights=[1.0])
    stock.unet.load_state_dict(load_file(str(trained.artifact)), strict=False)
    assert np.abs(_sample(stock) - ours).max() < 1e-4


def test_remove_and_switching_off_restore_the_norms_bit_exactly(trained):
    pipe = load("toy")
    original, base = _norms(pipe.unet), _sample(pipe)
    name = plugin.apply(pipe, trained.artifact.parent, scale=0.5)
    changed = _norms(pipe.unet)
    assert any(not torch.equal(changed[k], original[k]) for k in original)
    assert not np.array_equal(_sample(pipe), base)
    plugin.set_enabled(pipe, name, False)
    assert all(torch.equal(_norms(pipe.unet)[k], original[k]) for k in original)
    assert np.array_equal(_sample(pipe), base)
    plugin.set_enabled(pipe, name, True)
    plugin.remove(pipe, name)
    assert all(torch.equal(_norms(pipe.unet)[k], original[k]) for k in original)
    assert np.array_equal(_sample(pipe), base)


def test_fuse_and_unfuse_cover_its_lora(trained):
    pipe = load("toy")
    plugin.apply(pipe, trained.artifact.parent)
    hooked = _sample(pipe)
    plugin.fuse(pipe)
    assert np.abs(_sample(pipe) - hooked).max() < 1e-5
    plugin.unfuse(pipe)
    assert np.array_equal(_sample(pipe), hooked)


def test_a_single_size_dataset_is_refused(tmp_path):
    with pytest.raises(StudioError, match="learns from images of several sizes"):
        train(TrainConfig(method="res-adapter", data="shapesworld:shape=seen,count=4", output_dir=str(tmp_path / "o"),
                          max_train_steps=1))
    assert not (tmp_path / "o" / "res-adapter").exists()


def test_cli_trains_and_samples_at_another_size(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "a red circle", "--adapter", f"{trained.artifact.parent}:0.8", "--width", "64", "--height", "32",
                 "--steps", "2", "--output-dir", str(out)]) == 0
    assert (out / "0000-seed0.png").is_file()
    assert main(["train", "--method", "res-adapter", "--data", DATA, "--max-train-steps", "1", "--rank", "0",
                 "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--rank 0: must be a whole number from 1 to 4096" in capsys.readouterr().err


def test_on_the_tiny_sdxl_fixture(tmp_path):
    """On SDXL's UNet too: a trained state (perturbed) written in the release layout, applied by our plugin, gives
    the UNet output of the trained model itself."""
    from studio.testing import perturb_trainable, tiny_sdxl_pipeline

    trained_pipe = tiny_sdxl_pipeline()
    config = res_adapter.ResAdapterConfig(rank=4, alpha=2.0)
    names = res_adapter.inject(trained_pipe.unet, config)
    perturb_trainable(trained_pipe.unet, std=0.2)
    folder = tmp_path / "res-adapter"
    res_adapter.write_lora_file(folder, res_adapter.kohya_lora(trained_pipe.unet, config))
    save_artifact(folder / "diffusion_pytorch_model.safetensors", res_adapter.norm_state_dict(trained_pipe.unet),
                  "res-adapter", {"rank": 4, "alpha": 2.0}, fingerprint(tiny_sdxl_pipeline().unet, names))
    pipe = tiny_sdxl_pipeline()
    plugin.apply(pipe, folder)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 16, generator=generator), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]]).float()}
    with torch.no_grad():
        ours = pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
        expected = trained_pipe.unet(sample, 10, text, added_cond_kwargs=added).sample
    assert torch.allclose(ours, expected, atol=1e-5)


def test_a_norms_file_for_another_model_is_refused(trained, tmp_path):
    folder = tmp_path / "res-adapter"
    folder.mkdir()
    (folder / res_adapter.LORA_FILE).write_bytes((trained.artifact.parent / res_adapter.LORA_FILE).read_bytes())
    norms = load_file(str(trained.artifact))
    key = next(iter(norms))
    norms[key] = torch.ones(3)
    save_file(norms, str(folder / "diffusion_pytorch_model.safetensors"))  # no header: the release's own file
    pipe = load("toy")
    before = _norms(pipe.unet)
    with pytest.raises(StudioError, match=f"{key} is \\[3\\], this UNet's"):
        plugin.apply(pipe, folder)
    assert plugin.applied(pipe) == {} and all(torch.equal(_norms(pipe.unet)[k], v) for k, v in before.items())
