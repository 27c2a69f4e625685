"""Our artifacts and diffusers' own loaders on one pipeline, in either order.

The reference for "stock LoRA, then our OFT" is the same LoRA file applied through our plugin, then the
OFT: our stack composes in the order applied (tests/test_plugin.py), so the stock path must equal it.
"""

import pytest
import torch
from studio.adapters.boft import BOFTConfig
from studio.adapters.lora import LoRAConfig
from studio.adapters.oft import OFTConfig
from studio.adapters.sara import SaRAConfig

from studio import plugin
from studio.errors import StudioError
from studio.testing import random_artifact, tiny_sd_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
WITH_CONV = ATTENTION + ["conv1"]  # 3x3 convolutions: OFT rotates their weight, not their input


def _unet_output(pipe, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, text, **kwargs).sample


@pytest.fixture
def files(tmp_path):
    return {
        "lora": random_artifact(tmp_path / "lora.safetensors", "lora", LoRAConfig(rank=2, alpha=4.0, target_modules=WITH_CONV), seed=1),
        "oft": random_artifact(tmp_path / "oft.safetensors", "oft", OFTConfig(block_size=4, target_modules=WITH_CONV), seed=2),
        "boft": random_artifact(tmp_path / "boft.safetensors", "boft", BOFTConfig(block_size=4, n_butterfly_factor=2), seed=3),
        "sara": random_artifact(tmp_path / "sara.safetensors", "sara", SaRAConfig(fraction=0.2), seed=4),
    }


def _studio_only(steps):
    """The reference: every step through our plugin, in order. steps: (path, scale) pairs."""
    pipe = tiny_sd_pipeline()
    for path, scale in steps:
        plugin.apply(pipe, path, scale=scale, name=None)
    return _unet_output(pipe)


@pytest.mark.parametrize("ours", ["oft", "boft", "sara"])
def test_stock_lora_then_ours_composes_in_that_order(files, ours):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    plugin.apply(pipe, files[ours])
    expected = _studio_only([(files["lora"], 1.0), (files[ours], 1.0)])
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)
    # diffusers' scales are honoured at every call, under our transform.
    pipe.set_adapters(["downloaded"], [0.5])
    assert torch.allclose(_unet_output(pipe), _studio_only([(files["lora"], 0.5), (files[ours], 1.0)]), atol=1e-5)
    pipe.disable_lora()
    assert torch.allclose(_unet_output(pipe), _studio_only([(files[ours], 1.0)]), atol=1e-5)
    pipe.enable_lora()
    pipe.set_adapters(["downloaded"], [1.0])
    # A stock fuse merges the LoRA into the weight under our hook: same result; unfuse and unload too.
    pipe.fuse_lora()
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)
    pipe.unfuse_lora()
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)
    pipe.unload_lora_weights()
    assert torch.allclose(_unet_output(pipe), _studio_only([(files[ours], 1.0)]), atol=1e-5)


@pytest.mark.parametrize("ours", ["oft", "boft", "sara"])
def test_ours_then_stock_lora_adds_on_top(files, ours):
    pipe = tiny_sd_pipeline()
    name = plugin.apply(pipe, files[ours])
    pipe.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    expected = _studio_only([(files[ours], 1.0), (files["lora"], 1.0)])
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)
    pipe.set_adapters(["downloaded"], [0.5])
    assert torch.allclose(_unet_output(pipe), _studio_only([(files[ours], 1.0), (files["lora"], 0.5)]), atol=1e-5)
    pipe.set_adapters(["downloaded"], [1.0])
    pipe.fuse_lora()  # merged into the weight under our hook, yet still on top of our transform
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)
    pipe.unfuse_lora()
    plugin.remove(pipe, name)  # the stock LoRA stays, alone
    assert torch.allclose(_unet_output(pipe), _studio_only([(files["lora"], 1.0)]), atol=1e-5)
    pipe.unload_lora_weights()  # (PEFT's unfuse subtracts the update back out: float drift, not exact)
    assert torch.allclose(_unet_output(pipe), _unet_output(tiny_sd_pipeline()), atol=1e-5)


def test_order_matters_for_a_rotation_and_an_addition(files):
    first = tiny_sd_pipeline()
    first.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    plugin.apply(first, files["oft"])
    second = tiny_sd_pipeline()
    plugin.apply(second, files["oft"])
    second.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    assert (_unet_output(first) - _unet_output(second)).abs().max() > 1e-3


def test_three_in_a_sandwich(files, tmp_path):
    """ours, stock, ours: the stock LoRA lies between the two."""
    pipe = tiny_sd_pipeline()
    plugin.apply(pipe, files["boft"])
    pipe.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    plugin.apply(pipe, files["oft"])
    expected = _studio_only([(files["boft"], 1.0), (files["lora"], 1.0), (files["oft"], 1.0)])
    assert torch.allclose(_unet_output(pipe), expected, atol=1e-5)


def test_a_stock_adapter_name_is_not_reused(files):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(files["lora"]), adapter_name="oft")
    with pytest.raises(StudioError, match="a stock adapter named 'oft' is loaded"):
        plugin.apply(pipe, files["oft"])
    assert plugin.applied(pipe) == {}


def test_our_fuse_beside_a_stock_lora_is_refused(files):
    pipe = tiny_sd_pipeline()
    plugin.apply(pipe, files["oft"])
    pipe.load_lora_weights(str(files["lora"]), adapter_name="downloaded")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(StudioError, match="carry a stock LoRA beside a studio artifact"):
        plugin.fuse(pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def _ip_adapter_file(pipe, path, tokens=4, embed_dim=8, seed=0):
    """A random IP-Adapter in the official layout (image_proj + ip_adapter, key ids 1, 3, ... over the
    cross-attention processors), for the tiny UNet."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    cross = pipe.unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(tokens * cross, embed_dim, generator=generator) * 0.1,
               "image_proj.proj.bias": torch.zeros(tokens * cross),
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name in pipe.unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = pipe.unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        for param in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{param}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
        key_id += 2
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("stock_first", [True, False])
def test_ip_adapter_and_ours_in_either_order(files, tmp_path, stock_first):
    _ip_adapter_file(tiny_sd_pipeline(), tmp_path / "ip.safetensors")
    image_embeds = [torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(5))]  # one image embedding
    pipe = tiny_sd_pipeline()

    def load_ip():
        pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)

    def output():
        return _unet_output(pipe, added_cond_kwargs={"image_embeds": image_embeds})

    if stock_first:
        load_ip()
        ip_only = output()
        name = plugin.apply(pipe, files["oft"])
    else:
        name = plugin.apply(pipe, files["oft"])
        load_ip()
    both = output()
    plugin.fuse(pipe)  # our weights written into the layers: the IP processors call them the same way
    assert torch.allclose(output(), both, atol=1e-5)
    plugin.unfuse(pipe)
    plugin.remove(pipe, name)
    if stock_first:
        assert torch.allclose(output(), ip_only, atol=1e-6)
    assert not torch.allclose(output(), both, atol=1e-4)
    pipe.unload_ip_adapter()
    assert torch.equal(_unet_output(pipe), _unet_output(tiny_sd_pipeline()))


def test_apply_is_all_or_nothing(files, monkeypatch):
    """A failure half-way through attaching leaves the pipeline exactly as it was."""
    pipe = tiny_sd_pipeline()
    plugin.apply(pipe, files["sara"])
    before = _unet_output(pipe)
    hooked_before = {n for n, m in pipe.unet.named_modules() if hasattr(m, "_diffusers_hook")}
    calls = {"n": 0}
    real = plugin._Stacked

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(plugin, "_Stacked", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        plugin.apply(pipe, files["oft"])
    monkeypatch.setattr(plugin, "_Stacked", real)
    assert list(plugin.applied(pipe)) == ["sara"]
    assert {n for n, m in pipe.unet.named_modules() if hasattr(m, "_diffusers_hook")} == hooked_before
    assert torch.equal(_unet_output(pipe), before)


def test_a_layer_of_the_wrong_kind_is_refused_before_anything_changes(tmp_path):
    """The file's last layer is a GroupNorm: refused, and none of its earlier layers got a hook."""
    from safetensors.torch import load_file

    from studio.artifact import read_header, save_artifact

    good = random_artifact(tmp_path / "good.safetensors", "lora", LoRAConfig(rank=2))
    header = read_header(good)
    tensors = load_file(str(good))
    tensors["unet.down_blocks.0.resnets.0.norm1.lora_A.weight"] = torch.zeros(2, 16)
    tensors["unet.down_blocks.0.resnets.0.norm1.lora_B.weight"] = torch.zeros(16, 2)
    bad = save_artifact(tmp_path / "bad.safetensors", tensors, "lora", header.config, {"model": "UNet2DConditionModel", "layers": {}})
    pipe = tiny_sd_pipeline()
    with pytest.raises(StudioError, match="norm1 is a GroupNorm, not a Linear or Conv2d"):
        plugin.apply(pipe, bad)
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert plugin.applied(pipe) == {}


def test_apply_on_a_fused_pipeline_is_refused(files):
    pipe = tiny_sd_pipeline()
    plugin.apply(pipe, files["oft"])
    plugin.fuse(pipe)
    with pytest.raises(StudioError, match="unfuse the pipeline"):
        plugin.apply(pipe, files["sara"])
    assert list(plugin.applied(pipe)) == ["oft"]


def test_layers_keep_their_class_and_keys(files):
    pipe = tiny_sd_pipeline()
    types = {n: type(m) for n, m in pipe.unet.named_modules()}
    keys = set(pipe.unet.state_dict())
    plugin.apply(pipe, files["oft"])
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == types
    assert set(pipe.unet.state_dict()) == keys
