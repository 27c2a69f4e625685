"""Quantization (PTQ, EfficientDM, QAT): the quantizers, QALoRA's merge-then-quantize, the file, the plugin, the CLI."""

import json

import pytest
import torch

from studio import plugin
from studio.errors import StudioError
from studio.quantize import (
    BITS,
    QWEIGHT,
    ActQuantizer,
    WeightQuantizer,
    dequantized_weight,
    export,
    fake_quantize,
    layer_roles,
    pack,
    parse_bits,
    unpack,
)
from studio.trainers.base import TrainConfig, train

SMALL = {"trajectories": 4, "denoising_steps": 4}  # a short teacher run: enough for every check here


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_round_trip_error_is_within_half_a_step(bits):
    weight = torch.randn(16, 8, 3, 3)
    quantizer = WeightQuantizer(weight, bits, search="minmax")
    error = (quantizer(weight) - weight).abs().flatten(1).max(dim=1).values
    assert torch.all(error <= quantizer.step.detach() / 2 + 1e-6)
    assert int(quantizer.integers(weight).max()) <= 2**bits - 1
    # The MSE search trades clipping for resolution: never a worse Lp error than the full range.
    searched = WeightQuantizer(weight, bits, search="mse")
    assert (searched(weight) - weight).abs().pow(2.4).sum() <= (quantizer(weight) - weight).abs().pow(2.4).sum() + 1e-6


def test_activation_steps_follow_the_timestep():
    quantizer = ActQuantizer(8, torch.tensor([999.0, 499.0, 0.0]), torch.tensor([0.3, 0.2, 0.1]), torch.full((3,), 128.0))
    step, _ = quantizer.at(torch.tensor([0.0, 499.0, 999.0, 249.5, 2000.0]))
    assert torch.allclose(step, torch.tensor([0.1, 0.2, 0.3, 0.15, 0.3]))
    x = torch.linspace(-1, 1, 50)[None].repeat(2, 1)
    out = quantizer(x, torch.tensor([0.0, 999.0]))
    assert (out[0] - x[0]).abs().max() <= 0.05 + 1e-6 and (out[1] - x[1]).abs().max() <= 0.15 + 1e-6


def test_packing_round_trips():
    for bits in (2, 4, 6, 8):
        values = torch.randint(0, 2**bits, (7, 5), dtype=torch.uint8)
        packed = pack(values, bits)
        assert packed.numel() == (values.numel() + 1) // 2 if bits <= 4 else values.numel()
        assert torch.equal(unpack(packed, bits, values.shape), values)


def test_straight_through_gradients_reach_only_the_lora_and_the_steps():
    from studio import registry
    from studio.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    trainer = registry.get("efficientdm").trainer
    config = registry.get("efficientdm").config({"bits": "w4a4", **SMALL})
    trainer.attach(pipe, config)
    layer = trainer.layers["down_blocks.0.resnets.0.conv1"]
    layer.calibrated.fill_(True)  # activation steps of 1: coarse, but differentiable
    x = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    pipe.unet(x, 500, torch.randn(1, 77, pipe.unet.config.cross_attention_dim)).sample.square().mean().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad is not None  # zero while B is zero, as for any LoRA
    assert layer.weight_quantizer.step.grad is not None and layer.weight_quantizer.step.grad.abs().sum() > 0
    assert layer.act_quantizer.step.grad is not None and layer.act_quantizer.step.grad.abs().sum() > 0
    frozen = [n for n, p in pipe.unet.named_parameters() if p.grad is not None and "lora_" not in n and "step" not in n
              and not n.endswith("act_quantizer.zero")]
    assert frozen == []
    assert trainer.teacher.conv_in.weight.grad is None


def test_qalora_merge_then_quantize_is_exactly_the_exported_weight():
    from studio.quantize import Clock, QuantLayer

    base = torch.nn.Conv2d(8, 16, 3, padding=1)
    clock = Clock(torch.nn.Identity())
    layer = QuantLayer(base, 4, 8, clock, timesteps=[999, 0], rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained LoRA
    layer.calibrated.fill_(True)
    tensors = export({"conv": layer})
    params = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith("unet.conv.")}
    assert torch.equal(dequantized_weight(params, base.weight.shape), layer.quantized_weight().detach())
    assert params[QWEIGHT].numel() == (base.weight.numel() + 1) // 2  # two 4-bit values per byte


def test_layer_roles_follow_the_paper():
    from studio.testing import tiny_sdxl_pipeline

    roles = layer_roles(tiny_sdxl_pipeline().unet)
    assert roles["conv_in"] == roles["conv_out"] == roles["time_embedding.linear_1"] == "edge"
    assert roles["add_embedding.linear_1"] == "edge"
    assert not any(name.endswith("conv_shortcut") or ".downsamplers." in name for name in roles)
    assert any(name.endswith("attn2.to_k") for name, role in roles.items() if role == "body")
    with pytest.raises(StudioError, match="for UNets"):
        layer_roles(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture(scope="module")
def efficientdm_file(tmp_path_factory):
    """A short EfficientDM run on the toy model at W8A8 (4 trajectories of 4 steps, 3 distillation steps)."""
    out = tmp_path_factory.mktemp("efficientdm")
    return train(TrainConfig(method="efficientdm", output_dir=str(out), max_train_steps=3, validation_steps=0,
                             method_options={"bits": "w8a8", **SMALL}))


def test_learned_steps_stay_above_their_floor(tmp_path):
    """Adam moves a step by about its learning rate whatever its size: at a rate far above the steps' size they would
    cross zero (a negative step flips the layer's input; the file would be refused as damaged). Each step is
    projected back to its floor (a share of its calibrated value) after every update, so the file stays valid."""
    from safetensors.torch import load_file

    from studio.pipeline import load
    from studio.quantize import ACT_STEP, WEIGHT_STEP

    options = {"bits": "w4a8", **SMALL, "act_step_lr": 1.0, "weight_step_lr": 1.0}
    result = train(TrainConfig(method="efficientdm", output_dir=str(tmp_path), max_train_steps=3, validation_steps=0,
                               method_options=options))
    tensors = load_file(str(result.artifact))
    steps = [value for key, value in tensors.items() if key.endswith((ACT_STEP, WEIGHT_STEP))]
    assert steps and all((value > 0).all() for value in steps)
    plugin.apply(load("toy"), result.artifact)  # a valid file


def test_the_file_reproduces_the_fake_quantized_student(tmp_path):
    import dataclasses

    from studio import registry
    from studio.artifact import fingerprint, save_artifact
    from studio.pipeline import load
    from studio.quantize import calibrate_activations

    student, deployed = load("toy"), load("toy")
    trainer = registry.get("efficientdm").trainer
    config = registry.get("efficientdm").config({"bits": "w4a8", **SMALL})
    trainer.attach(student, config)
    x = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, student.unet.config.cross_attention_dim)
    with torch.no_grad():
        for layer in trainer.layers.values():  # a trained QALoRA
            if layer.rank:
                layer.lora_B.normal_(std=0.01)
        calibrate_activations(trainer.layers, lambda k: student.unet(x, trainer.timesteps[k], text), trainer.timesteps,
                              "mse")
    path = save_artifact(tmp_path / "efficientdm.safetensors", export(trainer.layers), "efficientdm",
                         dataclasses.asdict(config), fingerprint(student.unet, sorted(trainer.layers)))
    plugin.apply(deployed, path)
    with torch.no_grad():
        for t in (trainer.timesteps[0], trainer.timesteps[-1], 600):  # calibrated timesteps, and one between two
            assert torch.equal(deployed.unet(x, t, text).sample, student.unet(x, t, text).sample)


def test_apply_remove_and_other_artifacts_on_top(efficientdm_file, toy_artifact):
    from studio.pipeline import load

    pipe = load("toy")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    name = plugin.apply(pipe, efficientdm_file.artifact)
    assert not torch.equal(pipe.unet.conv_in.weight, before["conv_in.weight"])
    lora = plugin.apply(pipe, toy_artifact)  # a LoRA on top of the quantized weights
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape[-1] == 3
    with pytest.raises(StudioError, match="on \\(scale 1\\) or off"):
        plugin.set_scale(pipe, name, 0.5)
    plugin.fuse(pipe)  # the LoRA fused onto the quantized weights: the quantized file cannot come off under it
    with pytest.raises(StudioError, match="unfuse the pipeline"):
        plugin.remove(pipe, name)
    plugin.unfuse(pipe)
    plugin.remove(pipe, lora)
    plugin.remove(pipe, name)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    with pytest.raises(StudioError, match="at scale 1"):
        plugin.apply(pipe, efficientdm_file.artifact, scale=0.7)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_integer_kernels_agree_with_fake_quantization(efficientdm_file):
    pytest.importorskip("torchao")
    from studio.pipeline import load
    from studio.quantize import use_int8_kernels

    pipe = load("toy")
    plugin.apply(pipe, efficientdm_file.artifact)
    x = torch.randn(2, 4, 16, 16)
    text = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, False)[0]
    fake = pipe.unet(x, 500, text).sample
    from studio.quantize import ROW_PER_IMAGE

    linear = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
              and not any(part in n for part in ROW_PER_IMAGE)]
    assert sorted(use_int8_kernels(pipe, compile=False)) == sorted(linear) and len(linear) > 50
    real = pipe.unet(x, 500, text).sample
    assert (real - fake).norm() / fake.norm() < 0.05


def test_a_low_bit_file_refuses_int8_kernels(tmp_path):
    from studio.pipeline import load
    from studio.quantize import use_int8_kernels

    result = train(TrainConfig(method="ptq", output_dir=str(tmp_path), validation_steps=None,
                               method_options={"bits": "w4a8", "calibration": "minmax", **SMALL}))
    pipe = load("toy")
    with pytest.raises(StudioError, match="no quantized UNet is applied"):
        use_int8_kernels(pipe)
    plugin.apply(pipe, result.artifact)
    with pytest.raises(StudioError, match="--bits w8a8"):
        use_int8_kernels(pipe)


def _cli(argv, capsys):
    from studio.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_quantize_writes_the_file_and_the_comparison(tmp_path, capsys):
    code, out, err = _cli(["quantize", "--method", "ptq", "--bits", "w4a4", "--trajectories", "4", "--denoising-steps",
                           "4", "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bits"] == "w4a4" and result["size_bytes"] > 0
    assert (tmp_path / "fp-vs-quantized.png").is_file() and (tmp_path / "ptq.safetensors").is_file()


@pytest.mark.parametrize("fixture", ["tiny_sd_folder", "tiny_sdxl_folder"])
def test_cli_quantize_on_the_sd_and_sdxl_fixtures(fixture, request, tmp_path, capsys):
    folder = request.getfixturevalue(fixture)
    code, out, err = _cli(["quantize", "--model", str(folder), "--bits", "w4a8", "--trajectories", "2",
                           "--denoising-steps", "3", "--max-train-steps", "2", "--validation-steps", "0",
                           "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "efficientdm.safetensors"))
    bits = {k.rpartition(".")[0]: v.tolist() for k, v in tensors.items() if k.endswith(BITS)}
    assert bits["unet.conv_in"] == [8, 8] and [4, 8] in bits.values()


@pytest.mark.parametrize("argv, message", [
    (["--bits", "w3a3"], "--bits 'w3a3': must be one of"),
    (["--bits", "w16a16"], "--bits 'w16a16': must be one of"),
    (["--method", "ptq", "--max-train-steps", "10"], "--max-train-steps is not used by --method ptq"),
    (["--method", "lora"], "--method lora is an adapter, not a quantization"),
    (["--trajectories", "0"], "--trajectories 0: must be"),
    (["--data", "shapesworld:shape=star,count=2"], "unrecognized arguments"),
    (["--prompts-file", "no-such-prompts.txt"], "prompts file no-such-prompts.txt not found"),
])
def test_bad_quantize_options_are_refused_in_one_line(argv, message, tmp_path, capsys):
    code, out, err = _cli(["quantize", "--output-dir", str(tmp_path), *argv], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "efficientdm.safetensors").exists()


def test_parse_bits_names_the_settings():
    assert parse_bits("w4a4") == (4, 4)
    with pytest.raises(StudioError, match="unsupported bit setting; choose one of w8a8, w6a6, w4a8, w4a4"):
        parse_bits("int4")


def test_a_pipeline_without_a_unet_is_refused():
    from studio import registry

    class TransformerPipeline:  # what an SD3/Flux pipeline looks like to us: a transformer, no UNet
        unet = None

    with pytest.raises(StudioError, match="has no UNet"):
        registry.get("ptq").trainer.attach(TransformerPipeline(), registry.get("ptq").config({}))


def test_fake_quantize_is_exact_on_the_grid():
    step, zero = torch.tensor(0.25), torch.tensor(3.0)
    grid = (torch.arange(16.0) - zero) * step
    assert torch.equal(fake_quantize(grid, step, zero, 4), grid)
