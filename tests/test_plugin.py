import copy
from dataclasses import asdict

import pytest
import torch

from studio import plugin, registry
from studio.artifact import fingerprint, save_artifact
from studio.errors import StudioError
from studio.testing import perturb_trainable, tiny_sd_pipeline

CONFIGS = {
    "lora": lambda a: a.LoRAConfig(rank=2, alpha=4.0),
    "oft": lambda a: a.OFTConfig(block_size=4),
    "boft": lambda a: a.BOFTConfig(block_size=4, n_butterfly_factor=2),
    "sara": lambda a: a.SaRAConfig(fraction=0.2),
}


def _unet_output(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, text).sample


def _trained_artifact(method, tmp_path, seed=0):
    """Inject the method into a tiny SD UNet, perturb its parameters as training would, save the file."""
    adapter = registry.get(method).adapter
    config = CONFIGS[method](adapter)
    pipe = tiny_sd_pipeline()
    names = adapter.inject(pipe.unet, config)
    perturb_trainable(pipe.unet, seed=seed)
    path = save_artifact(tmp_path / f"{method}.safetensors", adapter.state_dict(pipe.unet), method, asdict(config),
                         fingerprint(pipe.unet, names))
    return path, _unet_output(pipe)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_apply_reproduces_the_trained_model(method, tmp_path):
    path, trained = _trained_artifact(method, tmp_path)
    pipe = tiny_sd_pipeline()
    base = _unet_output(pipe)
    name = plugin.apply(pipe, path)
    assert torch.allclose(_unet_output(pipe), trained, atol=1e-5)
    assert not torch.allclose(trained, base, atol=1e-3)
    plugin.set_scale(pipe, name, 0.0)
    assert torch.equal(_unet_output(pipe), base)
    plugin.set_scale(pipe, name, 0.5)
    half = _unet_output(pipe)
    assert 0 < (half - base).abs().mean() < (trained - base).abs().mean()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fuse_unfuse_restores_weights_bit_exactly(method, tmp_path):
    path, trained = _trained_artifact(method, tmp_path)
    pipe = tiny_sd_pipeline()
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plugin.apply(pipe, path, scale=0.7)
    applied = _unet_output(pipe)
    for _ in range(5):
        plugin.fuse(pipe)
        assert torch.allclose(_unet_output(pipe), applied, atol=1e-5)
        plugin.unfuse(pipe)
    restored = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in original.items())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_remove_puts_layers_back(method, tmp_path):
    path, _ = _trained_artifact(method, tmp_path)
    pipe = tiny_sd_pipeline()
    base = _unet_output(pipe)
    modules_before = {n: type(m) for n, m in pipe.unet.named_modules()}
    name = plugin.apply(pipe, path)
    plugin.remove(pipe, name)
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == modules_before
    assert torch.equal(_unet_output(pipe), base)
    assert plugin.applied(pipe) == {}


def test_compose_different_methods_on_one_layer(tmp_path):
    lora, _ = _trained_artifact("lora", tmp_path, seed=1)
    oft, _ = _trained_artifact("oft", tmp_path, seed=2)
    pipe = tiny_sd_pipeline()
    base = _unet_output(pipe)
    assert plugin.compose(pipe, [(lora, 1.0), (oft, 0.5)]) == ["lora", "oft"]
    both = _unet_output(pipe)
    plugin.set_enabled(pipe, "oft", False)
    only_lora = _unet_output(pipe)
    assert not torch.allclose(both, only_lora) and not torch.allclose(only_lora, base)
    plugin.remove(pipe, "lora")
    plugin.set_enabled(pipe, "oft", True)
    single = tiny_sd_pipeline()
    plugin.apply(single, oft, scale=0.5)
    assert torch.allclose(_unet_output(pipe), _unet_output(single), atol=1e-6)


def test_two_files_with_the_same_name_compose(tmp_path):
    """Two runs both write lora.safetensors: by default they are applied as lora and lora-2; an explicit
    name that is already taken is still refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = _trained_artifact("lora", tmp_path / "a", seed=1)
    second, _ = _trained_artifact("lora", tmp_path / "b", seed=2)
    pipe = tiny_sd_pipeline()
    assert plugin.compose(pipe, [(first, 1.0), (second, 0.5)]) == ["lora", "lora-2"]
    with pytest.raises(StudioError, match="an artifact named 'lora' is already applied"):
        plugin.apply(pipe, second, name="lora")


def test_artifact_for_another_base_model_is_refused(tmp_path, toy_pipe):
    path, _ = _trained_artifact("oft", tmp_path)
    with pytest.raises(StudioError, match="made on another base model.*layers differ"):
        plugin.apply(copy.deepcopy(toy_pipe), path)


def test_unknown_names_are_explained(tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(StudioError, match="no artifact named 'nope'"):
        plugin.set_scale(pipe, "nope", 1.0)
    with pytest.raises(StudioError, match="unknown method 'dora'"):
        registry.get("dora")


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_peft_loads_the_converted_file_with_the_same_outputs(method, tmp_path):
    from peft import PeftModel

    from studio.cli import main

    path, trained = _trained_artifact(method, tmp_path)
    assert main(["convert", str(path), "--to", "peft", "--output", str(tmp_path / "peft")]) == 0
    pipe = tiny_sd_pipeline()
    pipe.unet = PeftModel.from_pretrained(pipe.unet, str(tmp_path / "peft"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, 32, generator=generator)
    with torch.no_grad():
        out = pipe.unet(sample, 10, text).sample
    assert torch.allclose(out, trained, atol=1e-4)


def test_boft_single_factor_converts_to_peft(tmp_path):
    from peft import PeftModel

    from studio.convert import to_peft

    adapter = registry.get("boft").adapter
    config = adapter.BOFTConfig(block_size=4, n_butterfly_factor=1)
    pipe = tiny_sd_pipeline()
    names = adapter.inject(pipe.unet, config)
    perturb_trainable(pipe.unet)
    path = save_artifact(tmp_path / "boft.safetensors", adapter.state_dict(pipe.unet), "boft", asdict(config),
                         fingerprint(pipe.unet, names))
    trained = _unet_output(pipe)
    fresh = tiny_sd_pipeline()
    fresh.unet = PeftModel.from_pretrained(fresh.unet, str(to_peft(path, tmp_path / "peft")))
    assert torch.allclose(_unet_output(fresh), trained, atol=1e-4)
