"""How a low-bit UNet is made, on the loop contract, from the model itself (no data): PTQ, EfficientDM and QAT.

All three start alike (`PTQTrainer`):
1. `attach`: a frozen copy of the full-precision UNet is the teacher; the pipeline's UNet becomes the student, each
   layer a `studio.quantize.QuantLayer` at its bits (EfficientDM: with its QALoRA).
2. `prepare`: the teacher's own sampling trajectories, `--trajectories` of them (a prompt and a seed each: the toy
   vocabulary's captions on the toy model, `--prompts-file` or the shipped generic list elsewhere), DDIM with
   `--denoising-steps` steps and classifier-free guidance `--guidance`. Kept per step: the latent x_t, its
   timestep, its prompt and the teacher's guided noise prediction. Then calibration: at each of those timesteps,
   the student runs on the first trajectories' x_t (up to `CALIBRATION_TRAJECTORIES`) while every layer's input
   range is searched (per tensor, per timestep).
PTQ ends there (closed form). EfficientDM and QAT then distil (`DistillationTrainer`): each step draws
`--train-batch-size` (trajectory, step) pairs from the kept ones and the student's guided noise prediction at the
teacher's x_t learns to match the teacher's (MSE), timestep by timestep; the trajectory is always the teacher's,
so the student never drifts onto its own. (The reference walks one trajectory per epoch and steps the optimizer at
each of its steps; drawing the steps from trajectories made once keeps every step's randomness seeded by the step
alone, so a resumed run ends with the same weights.)

What trains: EfficientDM the LoRA (scale-aware rates, `adapters/efficientdm.py`) and the steps; QAT every
quantized layer's whole weight and the steps.

Example:
    >>> from studio import registry
    >>> registry.get("ptq").trainer.closed_form, registry.get("efficientdm").trainer.needs_data
    (True, False)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from studio.trainers.base import Loop, MethodTrainer
from studio.trainers.trajectories import Conditioning, ddim_schedule

from studio.errors import StudioError
from studio.pipeline import TOY_MODEL
from studio.quantize import PROMPTS_FILE, calibrate_activations, export, quantize_unet

CALIBRATION_TRAJECTORIES = 16  # trajectories whose x_t calibrate the activation ranges, at each timestep
TRAJECTORY_BATCH = 16  # teacher trajectories computed together
MIN_STEP_FRACTION = 0.05  # a learned step stays above this share of its calibrated value


def quantize_prompts(config, toy: bool) -> list[str]:
    """The prompts the teacher's trajectories start from: `--prompts-file`, else on the toy model its vocabulary's
    captions (shape x colour x texture, shuffled with a fixed seed), else the shipped generic list.

    Example:
        >>> from studio.quantize import QuantizeOptions
        >>> quantize_prompts(QuantizeOptions(), toy=False)[0]
        'a red circle'
    """
    from studio.sample import read_prompts_file

    if config.prompts_file:
        return read_prompts_file(config.prompts_file)
    if not toy:
        return read_prompts_file(PROMPTS_FILE)
    from studio.toy.captions import caption_grid

    captions = [caption for _, caption in caption_grid(positions=False, backgrounds=False)]
    random.Random(0).shuffle(captions)
    return captions


@dataclass
class Trajectories:
    """The teacher's trajectories, flattened to one row per (trajectory, step)."""

    latents: torch.Tensor  # rows x latent
    timesteps: torch.Tensor  # rows
    prompt: torch.Tensor  # rows: the index of the row's prompt in the encoded prompts
    target: torch.Tensor  # rows x latent: the teacher's guided noise prediction there
    steps: int  # steps per trajectory: row r is step r % steps of trajectory r // steps


@torch.no_grad()
def teacher_trajectories(teacher, scheduler, latent_shape, prompts: Conditioning, empty: Conditioning, n: int,
                         guidance: float, seed: int, device) -> Trajectories:
    """`n` DDIM trajectories of `teacher` with classifier-free guidance, trajectory i from prompt i mod len(prompts)
    and its own seeded noise; every step's latent, timestep and guided prediction kept."""
    from tqdm.auto import tqdm

    latents, timesteps, prompt_rows, targets = [], [], [], []
    steps = len(scheduler.timesteps)
    for first in tqdm(range(0, n, TRAJECTORY_BATCH), desc="teacher trajectories", leave=False):
        index = list(range(first, min(n, first + TRAJECTORY_BATCH)))
        rows = [i % len(prompts) for i in index]
        x = torch.cat([torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                       for i in index]).to(device) * scheduler.init_noise_sigma
        both = Conditioning.cat(empty.repeat(len(index)), prompts.rows(rows))
        per_step = []
        for t in scheduler.timesteps:
            uncond, cond = both.predict(teacher, torch.cat([x, x]), t).chunk(2)
            guided = uncond + guidance * (cond - uncond)
            per_step.append((x.cpu(), guided.cpu()))
            x = scheduler.step(guided, t, x).prev_sample
        for j, prompt in enumerate(rows):  # trajectory-major: row = trajectory * steps + step
            latents += [x_k[j] for x_k, _ in per_step]
            targets += [eps_k[j] for _, eps_k in per_step]
            timesteps += [int(t) for t in scheduler.timesteps]
            prompt_rows += [prompt] * steps
    return Trajectories(torch.stack(latents), torch.tensor(timesteps), torch.tensor(prompt_rows), torch.stack(targets),
                        steps)


class PTQTrainer(MethodTrainer):
    """Post-training quantization: the student's weight ranges at `attach`, its activation ranges calibrated on the
    teacher's trajectories in `prepare`; nothing trains."""

    needs_data = False
    uses_prior_data = False
    closed_form = True

    def lora_rank(self, method_config) -> int:
        """The QALoRA's rank (0: none)."""
        return 0

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        if getattr(pipe, "unet", None) is None:
            raise StudioError(f"{type(pipe).__name__} has no UNet: quantization here is for UNet models (SD 1.x/2.x, "
                              "SDXL)")
        self.teacher = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
        self.scheduler, self.latent_shape = ddim_schedule(pipe, method_config.denoising_steps, pipe.device)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        pipe.unet.requires_grad_(False)
        self.layers, self.clock = quantize_unet(pipe.unet, method_config.bits, self.timesteps,
                                                self.lora_rank(method_config), method_config.calibration)
        self.train_parameters(method_config)
        return {"unet": sorted(self.layers)}

    def train_parameters(self, method_config) -> None:
        """Switch on the gradients of what learns (PTQ: nothing)."""

    def validation_prompt(self, method_config) -> str | None:
        from studio.sample import read_prompts_file

        return read_prompts_file(method_config.prompts_file or PROMPTS_FILE)[0]

    def prepare(self, loop: Loop) -> None:
        pipe, config, device = loop.pipe, loop.method_config, loop.accelerator.device
        self.guidance = config.guidance
        texts = quantize_prompts(config, toy=loop.config.model == TOY_MODEL)
        self.prompts = Conditioning.encode(pipe, texts[: config.trajectories], device)
        self.empty = Conditioning.encode(pipe, [""], device)
        self.pool = teacher_trajectories(self.teacher, self.scheduler, self.latent_shape, self.prompts, self.empty,
                                         config.trajectories, config.guidance, loop.config.seed, device)
        calibrating = list(range(min(CALIBRATION_TRAJECTORIES, config.trajectories)))

        def run_timestep(k: int) -> None:
            rows = [i * self.pool.steps + k for i in calibrating]
            self._predict(pipe.unet, rows, device)

        calibrate_activations(self.layers, run_timestep, self.timesteps, config.calibration)

    def _predict(self, unet, rows: list[int], device) -> torch.Tensor:
        """The guided noise prediction of `unet` at the trajectory rows `rows` (float32)."""
        pool = self.pool
        x, t = pool.latents[rows].to(device), pool.timesteps[rows].to(device)
        both = Conditioning.cat(self.empty.repeat(len(rows)), self.prompts.rows(pool.prompt[rows].tolist()))
        uncond, cond = both.predict(unet, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return export(self.layers), {}


class DistillationTrainer(PTQTrainer):
    """PTQ's start, then distillation from the teacher: the student's guided prediction matches the teacher's at the
    teacher's x_t, for `--train-batch-size` (trajectory, step) pairs per step."""

    closed_form = False
    lr_scheduler = "linear"  # the reference's: every rate falls linearly to 0 over the run

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        rows = rng.integers(0, len(self.pool.latents), size=loop.config.train_batch_size).tolist()
        device = loop.accelerator.device
        return F.mse_loss(self._predict(loop.models["unet"], rows, device), self.pool.target[rows].to(device))

    def step_groups(self, method_config) -> list[dict]:
        """The quantizers' steps: the weights' at `--weight-step-lr`, the activations' (steps and zero points) at
        `--act-step-lr`."""
        weights = [layer.weight_quantizer.step for layer in self.layers.values()]
        acts = [p for layer in self.layers.values() for p in (layer.act_quantizer.step, layer.act_quantizer.zero)]
        return [{"params": weights, "lr": method_config.weight_step_lr},
                {"params": acts, "lr": method_config.act_step_lr}]

    def train_parameters(self, method_config) -> None:
        for group in self.step_groups(method_config):
            for parameter in group["params"]:
                parameter.requires_grad_(True)

    def prepare(self, loop: Loop) -> None:
        super().prepare(loop)
        # The lowest each step may learn down to: a fraction of its calibrated value. Adam moves a step by about its
        # learning rate per update whatever the step's size, and the toy model's activation steps (~0.015) crossed
        # zero within 400 steps at the reference's 5e-4 (17 of 123 layers had a negative step at some timestep,
        # which flips and zeroes that layer's input there). Calibration is seeded, so a resumed run gets the same floors.
        self.step_floors = [(quantizer.step, quantizer.step.detach().clone() * MIN_STEP_FRACTION)
                            for layer in self.layers.values()
                            for quantizer in (layer.weight_quantizer, layer.act_quantizer)]

    @torch.no_grad()
    def after_step(self, loop: Loop, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Project every learned step back above its floor (a step must stay positive: LSQ's steps are scales)."""
        for parameter, floor in self.step_floors:
            torch.maximum(parameter, floor, out=parameter)


class EfficientDMTrainer(DistillationTrainer):
    """EfficientDM: the QALoRA and the steps learn; each layer's LoRA at a rate proportional to its mean weight step
    (scale-aware), averaging `--learning-rate`."""

    def lora_rank(self, method_config) -> int:
        return method_config.rank

    def train_parameters(self, method_config) -> None:
        super().train_parameters(method_config)
        for layer in self.layers.values():
            if layer.rank:
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)

    def parameter_groups(self, models: dict, config, method_config) -> list[dict]:
        with_lora = [layer for layer in self.layers.values() if layer.rank]
        mean_steps = torch.stack([layer.weight_quantizer.step.detach().mean() for layer in with_lora])
        rates = (config.learning_rate * mean_steps / mean_steps.mean()).tolist()
        lora = [{"params": [layer.lora_A, layer.lora_B], "lr": rate} for layer, rate in zip(with_lora, rates)]
        return lora + self.step_groups(method_config)


class QATTrainer(DistillationTrainer):
    """Full quantization-aware training: every quantized layer's whole weight learns at `--learning-rate`, and the
    steps."""

    def train_parameters(self, method_config) -> None:
        super().train_parameters(method_config)
        for layer in self.layers.values():
            layer.base_layer.weight.requires_grad_(True)

    def parameter_groups(self, models: dict, config, method_config) -> list[dict]:
        weights = [layer.base_layer.weight for layer in self.layers.values()]
        return [{"params": weights, "lr": config.learning_rate}] + self.step_groups(method_config)
