"""`studio bench quantize`: low-bit toy UNets by PTQ, EfficientDM and QAT against the full-precision model.

Rows: `ptq`, `efficientdm`, `qat` (each run with its defaults and `RECIPES`' step budget through `studio quantize`'s
own code, `train`); columns: the bit settings (`w8a8`, `w4a8`, `w4a4`; QAT at `w4a8` only, its row the last model of its timing run). Per (row, column), on the toy
model, 20 steps at guidance 5, the same prompts and seeds as the full-precision model's samples:

- `agreement`: share of samples whose evaluator attributes (every one it reads: shape, colour, texture, size,
  position, background, count) all equal those of the full-precision model's sample with the same prompt and seed
  (`agreement_ci`: its 95% bootstrap interval over the samples);
- `differing`: per attribute, the share of samples where the evaluator reads it differently (where `agreement` is lost);
- `psnr` (dB) against those samples; `fd`, Fréchet distance of the evaluator features to theirs;
- `size_bytes`: the deployed UNet (the file's packed weights and steps, plus the parameters it leaves in full
  precision), beside `fp32_size_bytes`; `seconds` to quantize (trajectories and calibration included).

Top level:
- `qat_time_ratio` (measured with the `qat` row, which needs EfficientDM's W4A8 run beside it; `qat_target`: the
  agreement it was timed to): QAT's time to reach EfficientDM's final W4A8 agreement over EfficientDM's time, QAT run fresh
  for `QAT_FIRST_STEPS` steps, then twice as many, ... (`qat_curve`) and capped at `QAT_CAP` x EfficientDM's time (a
  QAT that does not reach it within the cap reports the cap, with `qat_reached: false`);
- `int8_speedup`: one SD1.5-shaped UNet step (batch 2, 64x64 latents, random weights) with its Linear layers on
  torchao's int8 kernels (dynamic int8 activations, compiled) against the same UNet in float32, same run; convolutions
  stay float32. `int8_linear_speedup`: the Linear layers alone, on the inputs they get in that step.
  `int8_agreement`: the toy W8A8 EfficientDM file run on those kernels against its fake-quantized run.

Example:
    $ studio bench quantize --json --output benchmarks/results/quantize.json
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from studio import plugin, registry
from studio.bench.erase import other_prompts
from studio.eval import features, frechet_distance, load_evaluator, score
from studio.pipeline import load
from studio.sample import SampleSettings, generate

ROWS = tuple(m.name for m in registry.METHODS.values() if m.kind == "quantize")
COLUMNS = ("w8a8", "w4a8", "w4a4")
# EfficientDM, 1600 steps at the toy learning rate 3e-4, decaying linearly to 0 (its default, the reference's
# schedule). Chosen with benchmarks/quantize_sweep.py on other prompts and seeds (benchmarks/results/quantize-sweep.jsonl;
# W4A8 agreement there: 400 constant steps 0.871, 1600 constant 0.883, 1600 at batch 16 0.875, 1600 decaying 0.906;
# W4A4: 400 constant 0.746, 1600 decaying 0.738, PTQ 0.680), and its activation steps at 2e-3 instead of the
# reference's 5e-4 (W4A8 0.922, PSNR 39.8 -> 40.3 dB; W4A4 0.742, 29.8 -> 30.3 dB; at 5e-3: W4A4 0.754, 29.9 dB).
# Earlier, at 400 constant steps: 1e-3 fell to 0.78 and 3e-3 diverged; activation steps at 1e-5 gave a lower PSNR.
# QAT gets the same activation-step rate: timed against EfficientDM, it must not lose on a rate EfficientDM was tuned
# for (held out, 800 QAT steps: 0.918 at 2e-3).
RECIPES = {"efficientdm": {"max_train_steps": 1600, "method_options": {"act_step_lr": 2e-3}},
           "qat": {"method_options": {"act_step_lr": 2e-3}}}
QAT_FIRST_STEPS = 400  # QAT's first run; each next run has twice the steps
QAT_CAP = 10.0  # ... until a run would pass this many times EfficientDM's time
SAMPLE_STEPS, GUIDANCE = 20, 5.0


def draw(pipe, prompts: list[str], seeds: list[int]) -> list:
    settings = SampleSettings(prompts=prompts, seeds=seeds, steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, batch_size=64)
    return generate(pipe, settings, progress=False)


def psnr(a, b) -> float:
    """Mean PSNR (dB) of image pairs.

    Example:
        >>> from PIL import Image
        >>> psnr([Image.new("RGB", (4, 4))], [Image.new("RGB", (4, 4), (255, 255, 255))])
        0.0
    """
    values = []
    for x, y in zip(a, b):
        mse = np.mean((np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2)
        values.append(100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return round(float(np.mean(values)), 3)


def agreeing(rows: list[dict], reference: list[dict]) -> list[bool]:
    """Per sample, whether its every evaluator attribute equals the reference sample's."""
    from studio.eval import ATTRIBUTES

    return [all(r[a] == s[a] for a in ATTRIBUTES) for r, s in zip(rows, reference)]


def agreement(rows: list[dict], reference: list[dict]) -> float:
    """Share of samples whose every evaluator attribute equals the reference sample's."""
    return round(float(np.mean(agreeing(rows, reference))), 4)


def agreement_ci(hits: list[bool]) -> list[float]:
    """The 95% bootstrap interval of `agreement` over the samples, from `agreeing`'s per-sample hits (at 256 samples
    about +-0.03 near 0.94)."""
    from studio.bench.stats import two_level_bootstrap_ci

    return [round(x, 4) for x in two_level_bootstrap_ci([np.asarray(hits, dtype=float)])]


class Reference:
    """The full-precision toy model's samples on the bench prompts and seeds, and what the evaluator reads in them."""

    def __init__(self, n_prompts: int, seeds: list[int], evaluator, prompt_seed: int = 500) -> None:
        self.prompts, _ = other_prompts([], n_prompts, seed=prompt_seed)
        self.seeds, self.evaluator = seeds, evaluator
        self.images = draw(load("toy"), self.prompts, seeds)
        self.rows = score(self.images, evaluator=evaluator).rows
        self.features = features(self.images, evaluator)

    def compare(self, pipe) -> dict:
        """`pipe`'s samples on the reference's prompts and seeds against the reference's: agreement, differing,
        psnr, fd."""
        return self.compare_images(draw(pipe, self.prompts, self.seeds))[0]

    def compare_images(self, images: list) -> tuple[dict, list[dict]]:
        """`compare`'s metrics for `images` (drawn on the reference's prompts and seeds, in its order), and what
        the evaluator reads in each image (for a script that looks at samples one by one)."""
        from studio.eval import ATTRIBUTES

        rows = score(images, evaluator=self.evaluator).rows
        hits = agreeing(rows, self.rows)
        differing = {a: round(float(np.mean([r[a] != s[a] for r, s in zip(rows, self.rows)])), 4) for a in ATTRIBUTES}
        return {"agreement": round(float(np.mean(hits)), 4), "agreement_ci": agreement_ci(hits),
                "differing": differing,
                "psnr": psnr(images, self.images),
                "fd": round(frechet_distance(features(images, self.evaluator), self.features), 3)}, rows


def run(method: str, bits: str, folder: Path, method_options: dict | None = None, **loop) -> tuple[Path, float]:
    """Quantize the toy model with `method` at `bits` (and `method_options`), its `RECIPES` entry and `loop` options,
    as `studio quantize` does; the run's folder is under `folder`."""
    from studio.trainers.base import TrainConfig, train

    from studio.bench import with_method_options

    recipe = with_method_options({**RECIPES.get(method, {}), **loop}, {"bits": bits, **(method_options or {})})
    result = train(TrainConfig(method=method, output_dir=str(folder / f"{method}-{bits}"), validation_steps=0, **recipe))
    return result.artifact, result.seconds


def measure(artifact: Path, reference: Reference) -> dict:
    from safetensors.torch import load_file

    from studio.quantize import unet_size_bytes

    pipe = load("toy")
    fp32_bytes = unet_size_bytes(pipe.unet, {})
    plugin.apply(pipe, artifact)
    return {**reference.compare(pipe), "size_bytes": unet_size_bytes(pipe.unet, load_file(str(artifact))),
            "fp32_size_bytes": fp32_bytes}


def qat_time_to(target: float, budget: float, reference: Reference, folder: Path) -> dict:
    """Train QAT at W4A8 from scratch for `QAT_FIRST_STEPS` steps, then twice as many, and so on, measuring
    agreement after each run, until one reaches `target`; the time reported is that run's own (trajectories,
    calibration and steps). Each run is a fresh one because the rate decays over a run's length (the linear schedule
    EfficientDM has too), so a longer run cannot continue a shorter one. A run whose predicted time (twice the last
    one's) passes `budget` is not started, and the cap is reported."""
    steps, curve = QAT_FIRST_STEPS, []
    while True:
        artifact, seconds = run("qat", "w4a8", folder / f"qat-{steps}-steps", max_train_steps=steps)
        measured = measure(artifact, reference)
        curve.append({"steps": steps, "seconds": round(seconds, 1), "agreement": measured["agreement"]})
        if measured["agreement"] >= target and seconds <= budget:
            return {"seconds": seconds, "reached": True, "curve": curve, "measured": measured}
        if 2 * seconds > budget:
            return {"seconds": budget, "reached": False, "curve": curve, "measured": measured}
        steps *= 2


def _time(fn, device: str = "cpu", repeats: int = 3) -> float:
    def synced():
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    synced()
    start = time.perf_counter()
    for _ in range(repeats):
        synced()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def int8_speed(device: str = "cpu", compile: bool = True) -> dict:
    """int8 kernels against float32 on an SD1.5-shaped UNet (random weights), whole step and Linear layers alone, on
    `device`; `compile`: each int8 layer compiled (`studio.quantize.int8_linear_layers`)."""
    from diffusers import UNet2DConditionModel

    from studio.quantize import int8_linear_layers
    from studio.testing import sd15_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config()).eval().to(device)
    x, t, text = (torch.randn(2, 4, 64, 64, device=device), torch.tensor([500, 500], device=device),
                  torch.randn(2, 77, 768, device=device))
    linear_inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, inputs, output) -> None:
            linear_inputs.setdefault(name, inputs[0])
        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    unet(x, t, text)
    for hook in hooks:
        hook.remove()
    from studio.quantize import ROW_PER_IMAGE

    names = [n for n in linear_inputs if not any(part in n for part in ROW_PER_IMAGE)]  # as use_int8_kernels chooses
    linear_inputs = {n: linear_inputs[n] for n in names}
    fp32_step = _time(lambda: unet(x, t, text), device)
    fp32_linear = _time(lambda: [unet.get_submodule(n)(v) for n, v in linear_inputs.items()], device)
    fp32_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    linear_weights = [unet.get_submodule(n).weight for n in linear_inputs]
    # int8 weights and a float32 scale per output channel where the Linear weights were float32
    int8_bytes = fp32_bytes - sum(w.numel() * 4 - w.numel() - w.shape[0] * 4 for w in linear_weights)
    quantized = copy.deepcopy(unet)
    started = time.perf_counter()
    int8_linear_layers(quantized, list(linear_inputs), compile)
    [quantized.get_submodule(n)(v) for n, v in linear_inputs.items()]  # compile each shape once
    compile_seconds = time.perf_counter() - started
    int8_step = _time(lambda: quantized(x, t, text), device)
    int8_linear = _time(lambda: [quantized.get_submodule(n)(v) for n, v in linear_inputs.items()], device)
    return {"int8_speedup": round(fp32_step / int8_step, 3), "int8_linear_speedup": round(fp32_linear / int8_linear, 3),
            "fp32_step_seconds": round(fp32_step, 3), "int8_step_seconds": round(int8_step, 3),
            "fp32_linear_seconds": round(fp32_linear, 3), "int8_linear_seconds": round(int8_linear, 3),
            "compile_seconds": round(compile_seconds, 1), "linear_layers": len(linear_inputs),
            "fp32_weights_bytes": fp32_bytes, "int8_weights_bytes": int8_bytes, "device": device, "threads": torch.get_num_threads(),
            "compiled": compile,
            "note": "Linear layers on torchao int8 (dynamic per-token activations); convolutions in float32"}


def int8_agreement(artifact: Path, reference: Reference) -> dict:
    """The W8A8 file on the integer kernels against the same file fake-quantized (and against full precision)."""
    from studio.quantize import use_int8_kernels

    pipe = load("toy")
    plugin.apply(pipe, artifact)
    fake = draw(pipe, reference.prompts, reference.seeds)
    use_int8_kernels(pipe)
    real = draw(pipe, reference.prompts, reference.seeds)
    fake_rows = score(fake, evaluator=reference.evaluator).rows
    real_rows = score(real, evaluator=reference.evaluator).rows
    return {"agreement_with_fake_quant": agreement(real_rows, fake_rows), "psnr_to_fake_quant": psnr(real, fake),
            "agreement": agreement(real_rows, reference.rows)}


def quantize_bench(rows: list[str] | None = None, columns: list[str] | None = None, n_prompts: int = 128,
                   n_seeds: int = 2, work_dir: str | None = None, speed: bool = True) -> dict:
    """The table: {row: {bits: metrics}} plus `qat_time_ratio`, `int8_speedup` and the protocol.

    Example:
        >>> quantize_bench(["ptq"], ["w8a8"], n_prompts=8, n_seeds=1, speed=False)["ptq"]["w8a8"]["agreement"]  # doctest: +SKIP
        1.0
    """
    rows, columns = list(rows or ROWS), list(columns or COLUMNS)
    if "qat" in rows and ("efficientdm" not in rows or "w4a8" not in columns):
        from studio.errors import StudioError

        raise StudioError("the qat row is QAT timed to EfficientDM's W4A8 agreement: measure it with --methods "
                          "efficientdm qat and w4a8 among --bits (or leave qat out)")
    folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="studio-bench-quantize-"))
    reference = Reference(n_prompts, list(range(n_seeds)), load_evaluator())
    result: dict = {}
    try:
        for row in rows:
            result[row] = {}
            for bits in columns:
                if row == "qat":  # measured while timing it against EfficientDM, below
                    continue
                artifact, seconds = run(row, bits, folder)
                result[row][bits] = {**measure(artifact, reference), "seconds": round(seconds, 1)}
                if row == "efficientdm" and bits == "w8a8":
                    result["int8_agreement"] = int8_agreement(artifact, reference)
        if "qat" in rows:
            target = result["efficientdm"]["w4a8"]["agreement"]
            efficientdm_seconds = result["efficientdm"]["w4a8"]["seconds"]
            qat = qat_time_to(target, QAT_CAP * efficientdm_seconds, reference, folder)
            result["qat"] = {"w4a8": {**qat["measured"], "seconds": round(qat["seconds"], 1)}}
            result["qat_target"] = target
            result["qat_time_ratio"] = round(qat["seconds"] / efficientdm_seconds, 2)
            result["qat_reached"] = qat["reached"]
            result["qat_curve"] = qat["curve"]
        if speed:
            result.update(int8_speed())
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result["protocol"] = {"prompts": n_prompts, "seeds": n_seeds, "sample_steps": SAMPLE_STEPS,
                          "guidance_scale": GUIDANCE, "recipes": RECIPES, "qat_first_steps": QAT_FIRST_STEPS, "qat_cap": QAT_CAP}
    return result
