"""`studio convert --to peft` and `--to lycoris` (and LyCORIS files back in) are exact or refuse.

Every comparison runs the UNet through the other library's own loader (`peft.PeftModel.from_pretrained`,
`lycoris.wrapper.create_lycoris_from_weights`) and through our plugin on a fresh copy of the same UNet.
Set STUDIO_CONVERT_REPORT=1 and run with -s to print each case's max abs difference and the adapter's
own effect on the output (plugin output minus base output), which the difference is to be read against.
"""

import copy
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio import plugin, registry
from studio.artifact import fingerprint, read_header, save_artifact
from studio.cli import main
from studio.convert import (
    from_lycoris,
    is_lycoris_file,
    merge_butterfly,
    peft_form,
    to_lycoris,
    to_peft,
)
from studio.errors import StudioError
from studio.testing import perturb_trainable, tiny_sd_pipeline

pytest.importorskip("lycoris", reason="the LyCORIS checks need lycoris-lora (the test extra)")

# The three kinds of layer, as targets in an SD1.x UNet (proj_in/proj_out are 1x1 convs there).
LAYER_KINDS = {
    "Linear": ["to_q", "to_k", "to_v", "to_out.0"],
    "1x1 conv": ["proj_in", "proj_out", "conv_shortcut"],
    "3x3 conv": ["conv1", "conv2"],
}
# Method configs small enough for the tiny UNet's dims (16 .. 64 channels, x9 for 3x3 kernels).
METHODS = {
    "lora": ("lora", {"rank": 2, "alpha": 6.0}),
    "oft": ("oft", {"block_size": 4}),
    "boft-1": ("boft", {"block_size": 4, "n_butterfly_factor": 1}),
    "boft-2": ("boft", {"block_size": 4, "n_butterfly_factor": 2}),
}
TOLERANCE = 1e-4


def _report(label: str, difference: float, effect: float) -> None:
    if os.environ.get("STUDIO_CONVERT_REPORT"):
        print(f"\n{label}: max abs difference {difference:.2e} (the adapter moves the output by up to {effect:.2f})")


def _unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 6, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, text).sample


def _artifact(base_unet, method: str, options: dict, targets: list[str], path, seed: int = 0):
    """Our artifact of `method` on `targets` of a copy of `base_unet`, with every trainable parameter moved."""
    adapter = registry.get(method).adapter
    config = registry.get(method).config({**options, "target_modules": targets})
    unet = copy.deepcopy(base_unet)
    names = adapter.inject(unet, config)
    perturb_trainable(unet, seed=seed)
    return save_artifact(path, adapter.state_dict(unet), method, asdict(config), fingerprint(unet, names),
                         adapter.file_metadata(config))


def _plugin_output(base_unet, path) -> torch.Tensor:
    pipe = _pipeline_around(base_unet)
    plugin.apply(pipe, path)
    return _unet_output(pipe.unet)


def _pipeline_around(unet):
    """A stock pipeline holding a fresh copy of `unet` (the plugin works on pipelines); the other parts are tiny."""
    pipe = tiny_sd_pipeline()
    pipe.unet = copy.deepcopy(unet)
    return pipe


@pytest.fixture(scope="module")
def tiny_unet():
    return tiny_sd_pipeline().unet.eval()


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
@pytest.mark.parametrize("case", list(METHODS))
def test_peft_loads_every_method_and_layer_kind_with_our_outputs(case, kind, tiny_unet, tmp_path):
    from peft import PeftModel

    method, options = METHODS[case]
    path = _artifact(tiny_unet, method, options, LAYER_KINDS[kind], tmp_path / f"{method}.safetensors")
    ours = _plugin_output(tiny_unet, path)
    folder = to_peft(path, tmp_path / "peft")
    theirs = _unet_output(PeftModel.from_pretrained(copy.deepcopy(tiny_unet), str(folder)).eval())
    difference = (theirs - ours).abs().max().item()
    _report(f"peft {case} x {kind} [{peft_form(read_header(path))}]", difference,
            (ours - _unet_output(tiny_unet)).abs().max().item())
    assert difference < TOLERANCE


def test_peft_form_says_what_was_written(tiny_unet, tmp_path):
    oft_attention = _artifact(tiny_unet, "oft", {"block_size": 4}, LAYER_KINDS["Linear"] + LAYER_KINDS["1x1 conv"], tmp_path / "a.safetensors")
    oft_convs = _artifact(tiny_unet, "oft", {"block_size": 4}, ["to_q", "conv1"], tmp_path / "b.safetensors")
    boft_two = _artifact(tiny_unet, "boft", {"block_size": 4, "n_butterfly_factor": 2}, ["to_q"], tmp_path / "c.safetensors")
    assert peft_form(read_header(oft_attention)).startswith("PEFT OFT")
    assert peft_form(read_header(oft_convs)).startswith("PEFT BOFT with 1 factor and s = 1")
    assert "block size 8" in peft_form(read_header(boft_two))
    assert json.loads((to_peft(oft_convs, tmp_path / "pb") / "adapter_config.json").read_text())["peft_type"] == "BOFT"
    assert json.loads((to_peft(oft_attention, tmp_path / "po") / "adapter_config.json").read_text())["peft_type"] == "OFT"


def test_peft_oft_is_not_the_base_layer_on_a_3x3_conv(tmp_path):
    """Why OFT files with 3x3 convs go to PEFT as BOFT: PEFT's OFT folds overlapping patches back, so on a
    3x3 conv it changes the output even with every rotation at identity (if a PEFT release fixes this,
    `to_peft` can write such files as OFT again)."""
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    peft_net = get_peft_model(copy.deepcopy(net), OFTConfig(r=0, oft_block_size=8, target_modules=["0"], use_cayley_neumann=False))
    with torch.no_grad():
        assert (peft_net(x) - net(x)).abs().max() > 0.1


def test_coft_files_are_written_without_peft_reprojecting(tiny_unet, tmp_path):
    """COFT's projection is a training step; the stored generators (far outside the eps ball here) are what
    our plugin applies, so the PEFT config says coft=false and PEFT applies them as they are."""
    from peft import PeftModel

    path = _artifact(tiny_unet, "oft", {"block_size": 4, "coft": True, "eps": 1e-4}, ["to_q", "proj_in"], tmp_path / "oft.safetensors")
    folder = to_peft(path, tmp_path / "peft")
    theirs = _unet_output(PeftModel.from_pretrained(copy.deepcopy(tiny_unet), str(folder)).eval())
    assert (theirs - _plugin_output(tiny_unet, path)).abs().max() < TOLERANCE


def test_peft_refuses_what_it_cannot_hold(tiny_unet, tmp_path, capsys):
    sara_path = _artifact(tiny_unet, "sara", {"fraction": 0.1}, ["to_q"], tmp_path / "sara.safetensors")
    with pytest.raises(StudioError, match="PEFT has no 'sara' method.*--to lycoris"):
        to_peft(sara_path, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    assert main(["convert", str(sara_path), "--to", "peft", "--output", str(tmp_path / "peft")]) == 2
    assert "PEFT has no 'sara' method" in capsys.readouterr().err

    # Two butterfly factors whose blocks each turn the plane of entries (0, 1) a quarter: their product is a
    # half-turn there, whose Cayley generator does not exist, so no 1-factor PEFT BOFT equals it.
    generators = torch.zeros(2, 4, 4, 4)
    generators[:, 0, 0, 1] = 1.0  # skew part Q[0, 1] = 1: Cayley gives a quarter turn of entries 0 and 1
    generators[:, 0, 1, 0] = -1.0
    with pytest.raises(StudioError, match="to_q: the product of its 2 butterfly factors has an eigenvalue near -1"):
        merge_butterfly(generators, "to_q")


def test_merge_butterfly_is_the_product_of_the_factors():
    from studio.adapters.boft import factor_rotations, rotate_input_butterfly

    generators = torch.randn(3, 8, 4, 4) * 0.3
    merged = merge_butterfly(generators)
    assert merged.shape == (1, 2, 16, 16)
    x = torch.randn(5, 32)
    ours = rotate_input_butterfly(x, factor_rotations(generators))
    single = rotate_input_butterfly(x, factor_rotations(merged))
    assert torch.allclose(ours, single, atol=1e-5)


# --- LyCORIS -------------------------------------------------------------------------------------------


def _lycoris_output(base_unet, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's output with a LyCORIS state dict applied by LyCORIS's own loader, `create_lycoris_from_weights`,
    told that module names start with kohya's `lora_unet` (what A1111/ComfyUI files use). (LyCORIS's kohya
    loader, `lycoris.kohya.create_network_from_weights`, first builds a default network on the UNet and stops
    there on diffusers UNets: it matches time_embedding.linear_1 twice.)"""
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    unet = copy.deepcopy(base_unet)
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, None, unet, weights_sd=weights)
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    assert len(network.loras) == len({k.split(".")[0] for k in weights}), "LyCORIS left modules of the file out"
    network.apply_to()
    return _unet_output_toy(unet)


def _unet_output_toy(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, text).sample


def _plugin_output_toy(base_unet, path) -> torch.Tensor:
    pipe = _pipeline_around(base_unet)
    plugin.apply(pipe, path)
    return _unet_output_toy(pipe.unet)


@pytest.fixture(scope="module")
def toy_unet():
    from studio.pipeline import load

    return load("toy", device="cpu", dtype="fp32").unet.eval()


TOY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
LYCORIS_CASES = {
    "lora": ("lora", {"rank": 2, "alpha": 4.0}),
    "oft": ("oft", {"block_size": 8}),
    "boft-2": ("boft", {"block_size": 8, "n_butterfly_factor": 2}),
    "sara": ("sara", {"fraction": 0.1}),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_loader_gives_our_outputs_and_the_file_imports_back(case, toy_unet, tmp_path, capsys):
    method, options = LYCORIS_CASES[case]
    targets = TOY_TARGETS if method != "sara" else ["to_q", "proj_in", "conv1"]
    path = _artifact(toy_unet, method, options, targets, tmp_path / f"{method}.safetensors")
    ours = _plugin_output_toy(toy_unet, path)

    capsys.readouterr()
    exported = tmp_path / "lycoris.safetensors"
    assert main(["convert", str(path), "--to", "lycoris", "--output", str(exported), "--model", "toy"]) == 0
    printed = capsys.readouterr().out
    weights = load_file(str(exported))
    if method == "lora":
        assert "LoCon" in printed and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights)
    else:
        assert "full weight differences" in printed and all(k.endswith(".diff") for k in weights)
    assert all(k.startswith("lora_unet_") for k in weights)
    theirs = _lycoris_output(toy_unet, weights)
    difference = (theirs - ours).abs().max().item()
    _report(f"lycoris {case} on the toy UNet [{printed.strip()}]", difference, (ours - _unet_output_toy(toy_unet)).abs().max().item())
    assert difference < TOLERANCE

    # And back: the LyCORIS file imports into an artifact our plugin applies with the same output.
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(exported), "--to", "diffusers", "--output", str(back), "--model", "toy"]) == 0
    assert read_header(back).method == ("lora" if method == "lora" else "sara")
    assert is_lycoris_file(exported) == (method != "lora")
    assert (_plugin_output_toy(toy_unet, back) - ours).abs().max() < TOLERANCE


def _our_oft_blocks_as_diag_oft(toy_unet, tmp_path):
    """Our OFT on the square Linears of self-attention (in == out) and the same rotation blocks put into
    LyCORIS's diag-oft params, with the sign that makes LyCORIS's R equal ours."""
    from studio.adapters import oft

    targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    path = _artifact(toy_unet, "oft", {"block_size": 8}, targets, tmp_path / "oft.safetensors")
    weights = {}
    for key, params in load_file(str(path)).items():
        name = key[len(oft.KEY_PREFIX):-len(oft.PARAM) - 1]
        # Ours: R = (I - Q)(I + Q)^-1 with Q = U - U^T; LyCORIS: R = (I + q)(I - q)^-1 with q = B - B^T. B = -U gives q = -Q.
        upper = torch.zeros(params.shape[0], 8, 8)
        rows, cols = torch.triu_indices(8, 8, 1)
        upper[:, rows, cols] = params
        stem = "lora_unet_" + name.replace(".", "_")
        weights.update({f"{stem}.oft_blocks": -upper, f"{stem}.alpha": torch.tensor(0.0)})
    return path, weights


def test_lycoris_diag_oft_rotates_the_output_side_so_ours_go_as_full(toy_unet, tmp_path):
    """The check behind writing OFT/BOFT as `full`: our R in LyCORIS's diag-oft (same R, same blocks)
    changes the output differently from ours, because diag-oft rotates a weight's rows (outputs), ours
    its columns (inputs); the exported `full` file matches."""
    path, diag_oft = _our_oft_blocks_as_diag_oft(toy_unet, tmp_path)
    ours = _plugin_output_toy(toy_unet, path)
    effect = (ours - _unet_output_toy(toy_unet)).abs().max().item()
    wrong_side = (_lycoris_output(toy_unet, diag_oft) - ours).abs().max().item()
    _report("our OFT blocks read as LyCORIS diag-oft (the other side)", wrong_side, effect)
    assert wrong_side > 0.1 * effect
    full = load_file(str(to_lycoris(path, tmp_path / "full.safetensors", model="toy")))
    assert (_lycoris_output(toy_unet, full) - ours).abs().max() < TOLERANCE


def test_lycoris_diag_oft_file_imports_exactly(toy_unet, tmp_path):
    """A LyCORIS-native diag-oft file (with a norm constraint on one module and a rescale on another) imports
    into an artifact whose plugin output equals LyCORIS's loader's."""
    generator = torch.Generator().manual_seed(1)
    modules = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (16, 4, 0.0, False),  # 64 outputs
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (16, 4, 1e-3, False),
        "down_blocks.1.resnets.0.conv1": (8, 8, 0.0, True),  # a 3x3 conv, 64 outputs
    }
    weights = {}
    for name, (n_blocks, size, alpha, rescaled) in modules.items():
        stem = "lora_unet_" + name.replace(".", "_")
        weights[f"{stem}.oft_blocks"] = torch.randn(n_blocks, size, size, generator=generator) * 0.2
        weights[f"{stem}.alpha"] = torch.tensor(alpha)
        if rescaled:
            out = n_blocks * size
            weights[f"{stem}.rescale"] = 1 + 0.1 * torch.randn(out, 1, 1, 1, generator=generator)
    file = tmp_path / "diag-oft.safetensors"
    save_file(weights, str(file))
    theirs = _lycoris_output(toy_unet, weights)
    assert is_lycoris_file(file)
    back = from_lycoris(file, tmp_path / "back.safetensors", model="toy")
    difference = (_plugin_output_toy(toy_unet, back) - theirs).abs().max().item()
    _report("lycoris diag-oft file imported", difference, (theirs - _unet_output_toy(toy_unet)).abs().max().item())
    assert difference < TOLERANCE


def test_lycoris_import_refuses_what_it_cannot_hold(tmp_path):
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    cases = {
        "loha": ({f"{stem}.hada_w1_a": torch.zeros(64, 2), f"{stem}.hada_w1_b": torch.zeros(2, 64)}, "modules of loha"),
        "boft": ({f"{stem}.oft_blocks": torch.zeros(2, 8, 8, 8)}, "modules of boft"),
        "bias": ({f"{stem}.diff": torch.zeros(64, 64), f"{stem}.diff_b": torch.ones(64)}, "changes the bias"),
        "te": ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff": torch.zeros(2, 2)}, "text-encoder modules"),
        "model": ({"lora_unet_no_such_layer.diff": torch.zeros(2, 2)}, "not in toy's UNet"),
        "shape": ({f"{stem}.diff": torch.zeros(3, 3)}, "do not fit this layer's weight"),
    }
    for name, (weights, message) in cases.items():
        save_file(weights, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(StudioError, match=message):
            from_lycoris(tmp_path / f"{name}.safetensors", tmp_path / "out.safetensors", model="toy")
