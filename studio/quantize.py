"""Low-bit UNets: the quantizers, the quantized layer, the file, and putting it on a pipeline.

Shared by the three quantization methods (`adapters/efficientdm.py`, `adapters/ptq.py`, `adapters/qat.py`; how each
is learned is `trainers/quantize.py`):

- **Weights**: per output channel, asymmetric, n bits: q = clamp(round(W / Δ) + z, 0, 2ⁿ − 1), Ŵ = (q − z) Δ, with a
  learned step Δ per channel (LSQ: the straight-through gradient of the rounding reaches Δ) and a fixed integer zero
  point z; initialised from the weight's range (`minmax`) or by searching the range that minimises the Lp error
  (`mse`, p = 2.4, as the reference does).
- **Activations** (temporal LSQ): per tensor, asymmetric, m bits, one step Δ_k and zero point z_k per calibrated
  timestep t_k, because activation ranges shift along the trajectory. A call at another timestep interpolates between
  the two nearest calibrated ones, so any number of sampling steps and any scheduler work. The layer learns which
  timestep it is at from the UNet's own `timestep` argument (a pre-hook on the UNet, `Clock`), per sample.
- **Which layers** (`layer_roles`, found from the model's structure, not hard-coded positions): every Linear/Conv2d
  of the UNet at the chosen bits, except the input conv, the output conv and the time/added embeddings (8 bits,
  "edge"), and the skip-connection and downsampling convs (full precision), as the paper does; attention's QKᵀ and
  softmax·V products are not quantized.
- **The file**: per quantized layer the integer weight packed (two 4-bit values per byte at ≤ 4 bits), Δ and z per
  channel, and Δ_k, z_k per calibrated timestep; the layers left in full precision come from the base model. Applied
  with `studio.plugin.apply`, each layer computes with its dequantized weight and fake-quantized input (any device);
  `use_int8_kernels` runs the Linear layers of a W8 file on torchao's integer kernels instead.

Example:
    >>> layer = torch.nn.Linear(16, 8)
    >>> quantizer = WeightQuantizer(layer.weight.detach(), bits=4, search="minmax")
    >>> int(quantizer.integers(layer.weight).max()) <= 15
    True
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.targets import layer_forward, replace_module

BitSetting = Literal["w8a8", "w6a6", "w4a8", "w4a4"]  # w: weight bits, a: activation bits
BIT_SETTINGS = typing.get_args(BitSetting)
EDGE_BITS = (8, 8)  # the input/output convs and the embeddings, whatever the setting (the paper's W8A8 there)
LP_NORM = 2.4  # the range search's error norm (the reference's)
SEARCH_CANDIDATES = 80  # shrink factors 1.00, 0.99, ... 0.21 of the full range
SEARCH_CHUNK_ELEMENTS = 1 << 22  # values x candidates searched at once
ACT_SEARCH_ELEMENTS = 1 << 14  # an activation range is searched on at most this many of the tensor's values
KEY_PREFIX = "unet."
QWEIGHT, WEIGHT_STEP, WEIGHT_ZERO, ACT_STEP, ACT_ZERO, BITS = (
    "qweight", "weight_step", "weight_zero", "act_step", "act_zero", "bits")
TIMESTEPS = "act_timesteps"  # the calibrated timesteps, one tensor for the whole file
PARAMS = (QWEIGHT, WEIGHT_STEP, WEIGHT_ZERO, ACT_STEP, ACT_ZERO, BITS)
PROMPTS_FILE = Path(__file__).with_name("default-prompts.txt")  # the generic prompts of a non-toy model's trajectories


@dataclass
class QuantizeOptions:
    """What every quantization method takes: the bit setting and the teacher's trajectories (prompts, steps,
    guidance) that calibration and distillation see."""

    bits: BitSetting = "w4a8"
    prompts_file: str | None = None  # one prompt per line (default: the toy captions; elsewhere a shipped generic list)
    trajectories: int = ranged(64, 1, 100_000)  # teacher trajectories, one prompt and seed each
    denoising_steps: int = ranged(20, 2, 1000)  # DDIM steps of each trajectory (the calibrated timesteps)
    guidance: float = ranged(5.0, 0, 100)  # classifier-free guidance along them (studio sample's default)
    calibration: Literal["mse", "minmax"] = "mse"  # how the initial ranges are chosen


def parse_bits(setting: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a setting such as "w4a8"; a clear error for anything else.

    Example:
        >>> parse_bits("w4a8")
        (4, 8)
    """
    match = re.fullmatch(r"w(\d+)a(\d+)", str(setting).strip().lower())
    if not match or setting not in BIT_SETTINGS:
        raise StudioError(f"--bits {setting!r}: unsupported bit setting; choose one of {', '.join(BIT_SETTINGS)} "
                          "(weights w, activations a)")
    return int(match.group(1)), int(match.group(2))


# ----------------------------------------------------------------------------- quantizers

class _RoundSTE(torch.autograd.Function):
    """round(x) forward (exactly torch.round), identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """torch.round with a straight-through gradient.

    Example:
        >>> x = torch.tensor([0.4, 1.6], requires_grad=True); round_ste(x).sum().backward(); x.grad.tolist()
        [1.0, 1.0]
    """
    return _RoundSTE.apply(x)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(clamp(round(x / Δ) + z, 0, 2ⁿ − 1) − z) Δ, straight-through; `step` and `zero` broadcast against `x`.

    Example:
        >>> fake_quantize(torch.tensor([0.26, 5.0]), torch.tensor(0.5), torch.tensor(0.0), bits=2).tolist()
        [0.5, 1.5]
    """
    q = torch.clamp(round_ste(x / step) + zero, 0, 2**bits - 1)
    return (q - zero) * step


def search_range(x: torch.Tensor, bits: int, search: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` (channels x values) the step and integer zero point of an asymmetric n-bit grid: from the
    row's range (`minmax`, zero always representable), or the shrunk range with the least Lp error (`mse`).

    Example:
        >>> step, zero = search_range(torch.tensor([[-1.0, 0.0, 2.0]]), bits=2, search="minmax")
        >>> step.tolist(), zero.tolist()
        ([1.0], [1.0])
    """
    x = x.detach().float()
    low, high = x.min(dim=1).values.clamp(max=0), x.max(dim=1).values.clamp(min=0)
    levels = 2**bits - 1

    def grid(lo, hi):
        step = ((hi - lo) / levels).clamp(min=1e-8)
        return step, torch.round(-lo / step).clamp(0, levels)

    best_step, best_zero = grid(low, high)
    if search == "minmax":
        return best_step, best_zero
    best_error = torch.full_like(low, float("inf"))
    shrinks = 1 - 0.01 * torch.arange(SEARCH_CANDIDATES, dtype=x.dtype, device=x.device)
    chunk = max(1, SEARCH_CHUNK_ELEMENTS // x.numel())  # candidates evaluated at once: bounded memory
    for first in range(0, SEARCH_CANDIDATES, chunk):
        shrink = shrinks[first:first + chunk, None]  # candidates x 1
        step, zero = grid(low[None] * shrink, high[None] * shrink)  # candidates x rows
        q = torch.clamp(torch.round(x[None] / step[..., None]) + zero[..., None], 0, levels)
        error = ((q - zero[..., None]) * step[..., None] - x[None]).abs().pow(LP_NORM).mean(dim=2)
        error, pick = error.min(dim=0)  # the best candidate of the chunk, per row
        rows = torch.arange(len(low), device=x.device)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_step = torch.where(better, step[pick, rows], best_step)
        best_zero = torch.where(better, zero[pick, rows], best_zero)
    return best_step, best_zero


class WeightQuantizer(nn.Module):
    """Per-output-channel n-bit fake quantization of a weight, with a learned step per channel (LSQ)."""

    def __init__(self, weight: torch.Tensor, bits: int, search: str = "mse") -> None:
        super().__init__()
        step, zero = search_range(weight.flatten(1), bits, search)
        self.bits = bits
        self.step = nn.Parameter(step.to(weight.device))
        self.register_buffer("zero", zero.to(weight.device))

    def _shaped(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return self.step.view(shape).to(weight.dtype), self.zero.view(shape).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, *self._shaped(weight), self.bits)

    @torch.no_grad()
    def integers(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored integers of `weight` (what `forward` dequantizes), as uint8."""
        step, zero = self._shaped(weight)
        return torch.clamp(torch.round(weight / step) + zero, 0, 2**self.bits - 1).to(torch.uint8)


class ActQuantizer(nn.Module):
    """Per-tensor m-bit fake quantization of a layer's input with a learned step and zero point per calibrated
    timestep (temporal LSQ); at other timesteps both are interpolated linearly between the nearest two."""

    def __init__(self, bits: int, timesteps: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor) -> None:
        super().__init__()
        order = torch.argsort(timesteps)
        self.bits = bits
        self.register_buffer("timesteps", timesteps[order].float())
        self.step = nn.Parameter(steps[order].float())
        self.zero = nn.Parameter(zeros[order].float())

    def at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point) for each timestep in `t` (one per sample); the zero point rounded, straight-through."""
        known = self.timesteps
        if len(known) == 1:
            return self.step.expand(len(t)), round_ste(self.zero).expand(len(t))
        t = t.to(known.device, known.dtype).clamp(known[0], known[-1])
        high = torch.searchsorted(known, t).clamp(1, len(known) - 1)
        low = high - 1
        weight = ((t - known[low]) / (known[high] - known[low])).clamp(0, 1)
        step = self.step[low] * (1 - weight) + self.step[high] * weight
        zero = self.zero[low] * (1 - weight) + self.zero[high] * weight
        return step, round_ste(zero)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step, zero = self.at(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return fake_quantize(x, step.view(shape).to(x.dtype), zero.view(shape).to(x.dtype), self.bits)


class Clock:
    """The timestep of each sample of the UNet's current call, for the activation quantizers: a forward pre-hook on
    the UNet reads its `timestep` argument (a number, or one per sample)."""

    def __init__(self, unet: nn.Module) -> None:
        self.t: torch.Tensor | None = None
        self.handle = unet.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = torch.as_tensor(t, device=sample.device).float().flatten()
        if t.numel() == 1:
            t = t.expand(len(sample))
        if t.numel() != len(sample):
            raise StudioError(f"the UNet got {t.numel()} timesteps for a batch of {len(sample)}; give one, or one per "
                              "sample")
        self.t = t

    def per_sample(self, batch: int) -> torch.Tensor:
        """The current timesteps for a layer's batch (a layer may see the batch regrouped, e.g. attention heads)."""
        if self.t is None:
            raise StudioError("a quantized layer ran outside a UNet call: its activation steps depend on the timestep")
        return self.t if batch == len(self.t) else self.t.repeat_interleave(batch // len(self.t))

    def remove(self) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- which layers, at which bits

def layer_roles(unet: nn.Module) -> dict[str, str]:
    """Each Linear/Conv2d of the UNet to quantize, by name: "edge" (input/output convs, time and added embeddings:
    8 bits, no LoRA) or "body" (the chosen bits). Skip-connection and downsampling convs are left out: they stay in
    full precision.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> roles = layer_roles(tiny_sd_pipeline().unet)
        >>> roles["conv_in"], roles["down_blocks.0.resnets.0.conv1"], "down_blocks.0.resnets.0.conv_shortcut" in roles
        ('edge', 'body', False)
    """
    if not hasattr(unet, "conv_in") or not hasattr(unet, "time_embedding"):
        raise StudioError(f"quantization here is for UNets (SD 1.x/2.x, SDXL); {type(unet).__name__} is not one")
    downsamplers = {name for name, m in unet.named_modules() if type(m).__name__ == "Downsample2D"}
    roles = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if name.endswith("conv_shortcut") or name.rpartition(".")[0] in downsamplers:
            continue
        edge = name in ("conv_in", "conv_out") or name.startswith(("time_embedding.", "add_embedding.", "class_embedding."))
        roles[name] = "edge" if edge else "body"
    return roles


def layer_bits(role: str, setting: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer of `role` under `setting`.

    Example:
        >>> layer_bits("edge", "w4a4"), layer_bits("body", "w4a4")
        ((8, 8), (4, 4))
    """
    return EDGE_BITS if role == "edge" else parse_bits(setting)


# ----------------------------------------------------------------------------- the quantized layer (training)

class QuantLayer(nn.Module):
    """A Linear/Conv2d computing with its fake-quantized input and fake-quantized weight Q(W + B A) (QALoRA with
    `rank` > 0: the LoRA is merged before quantizing, so the result deploys as one low-bit weight).

    The activation quantizer (one step per calibrated timestep) gets its values from calibration
    (`calibrate_activations`); until then inputs pass unquantized, and an `observer` (set during calibration) sees
    each input.
    """

    def __init__(self, base: nn.Module, weight_bits: int, act_bits: int, clock: Clock, timesteps: list[int],
                 rank: int = 0, search: str = "mse") -> None:
        super().__init__()
        self.base_layer = base
        self.clock = clock
        self.act_bits = act_bits
        device = base.weight.device
        self.weight_quantizer = WeightQuantizer(base.weight.detach(), weight_bits, search)
        known = torch.tensor(timesteps, dtype=torch.float32, device=device)
        self.act_quantizer = ActQuantizer(act_bits, known, torch.ones_like(known), torch.zeros_like(known))
        self.register_buffer("calibrated", torch.tensor(False, device=device))  # saved in checkpoints with the steps
        self.observer = None
        self.rank = min(rank, base.weight.shape[0], base.weight[0].numel()) if rank else 0
        if self.rank:
            self.lora_A = nn.Parameter(torch.empty(self.rank, *base.weight.shape[1:], device=base.weight.device))
            nn.init.kaiming_uniform_(self.lora_A.view(self.rank, -1), a=5**0.5)
            self.lora_B = nn.Parameter(torch.zeros(base.weight.shape[0], self.rank, device=base.weight.device))

    def merged_weight(self) -> torch.Tensor:
        """W + B A (A a kernel like the layer's, B a 1x1 projection), shaped like W."""
        weight = self.base_layer.weight
        if not self.rank:
            return weight
        return weight + (self.lora_B @ self.lora_A.flatten(1)).view_as(weight)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.merged_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
        if self.calibrated:
            x = self.act_quantizer(x, self.clock.per_sample(len(x)))
        return layer_forward(self.base_layer, x, self.quantized_weight())


def quantize_unet(unet: nn.Module, setting: str, timesteps: list[int], rank: int = 0,
                  search: str = "mse") -> tuple[dict[str, QuantLayer], Clock]:
    """Replace every layer `layer_roles` names by a `QuantLayer` at its bits (LoRA of `rank` on the body layers),
    with activation steps for the calibrated `timesteps`; the layers by name and the UNet's `Clock`.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> layers, clock = quantize_unet(tiny_sd_pipeline().unet, "w4a8", timesteps=[999, 499])
        >>> layers["conv_in"].weight_quantizer.bits, layers["down_blocks.0.resnets.0.conv1"].weight_quantizer.bits
        (8, 4)
    """
    roles = layer_roles(unet)
    parse_bits(setting)
    clock = Clock(unet)
    layers = {}
    for name, role in roles.items():
        weight_bits, act_bits = layer_bits(role, setting)
        layers[name] = QuantLayer(unet.get_submodule(name), weight_bits, act_bits, clock, timesteps,
                                  rank if role == "body" else 0, search)
        replace_module(unet, name, layers[name])
    unet.requires_grad_(False)  # the quantizers' steps too: each method switches on what it trains
    return layers, clock


@torch.no_grad()
def calibrate_activations(layers: dict[str, QuantLayer], run_timestep, timesteps: list[int], search: str) -> None:
    """Set each layer's activation steps: for the k-th of the calibrated `timesteps` (the layers' own, in the order
    given), `run_timestep(k)` runs the UNet on that timestep's calibration inputs while each layer's input range is
    searched (`search_range`).

    Example:
        >>> calibrate_activations(layers, lambda k: unet(x[k], timesteps[k], text), timesteps, "mse")  # doctest: +SKIP
    """
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    names = {id(layer): name for name, layer in layers.items()}

    def observe(layer: QuantLayer, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if flat.numel() > ACT_SEARCH_ELEMENTS:  # an even spread of the values, deterministic
            flat = flat[:: flat.numel() // ACT_SEARCH_ELEMENTS][:ACT_SEARCH_ELEMENTS]
        step, zero = search_range(flat[None], layer.act_bits, search)
        found[names[id(layer)]].append((step[0], zero[0]))

    for layer in layers.values():
        layer.calibrated.fill_(False)
        layer.observer = observe
    from tqdm.auto import tqdm

    try:
        for k in tqdm(range(len(timesteps)), desc="calibrate activations", leave=False):
            run_timestep(k)
    finally:
        for layer in layers.values():
            layer.observer = None
    for name, layer in layers.items():
        if len(found[name]) != len(timesteps):
            raise StudioError(f"calibration saw layer {name} {len(found[name])} times for {len(timesteps)} timesteps; "
                              "each layer must run once per UNet call")
        steps, zeros = (torch.stack(v) for v in zip(*found[name]))
        quantizer = layer.act_quantizer
        order = torch.argsort(torch.tensor(timesteps, dtype=torch.float32))  # the quantizer keeps them ascending
        if not torch.equal(quantizer.timesteps.cpu(), torch.tensor(timesteps, dtype=torch.float32)[order]):
            raise StudioError(f"layer {name} was made for other timesteps than calibration ran at")
        quantizer.step.copy_(steps[order]), quantizer.zero.copy_(zeros[order])
        layer.calibrated.fill_(True)


# ----------------------------------------------------------------------------- the file

def pack(integers: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2ⁿ) as bytes: two per byte at n ≤ 4, else one.

    Example:
        >>> pack(torch.tensor([1, 15, 7], dtype=torch.uint8), 4).tolist()
        [241, 7]
    """
    flat = integers.flatten().to(torch.uint8)
    if bits > 4:
        return flat.clone()
    if len(flat) % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of `pack`, shaped like `shape`.

    Example:
        >>> unpack(torch.tensor([241, 7], dtype=torch.uint8), 4, torch.Size([3])).tolist()
        [1, 15, 7]
    """
    n = shape.numel()
    if bits > 4:
        flat = packed
    else:
        flat = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    if flat.numel() < n:
        raise StudioError(f"packed weight holds {flat.numel()} values for a layer of {n}; the file is damaged")
    return flat[:n].reshape(shape)


@torch.no_grad()
def export(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    """The file's tensors: per layer the packed integers of Q(W + B A), the weight's steps and zero points, the
    activation steps and zero points per calibrated timestep, and the bits; plus the calibrated timesteps."""
    tensors = {}
    timesteps = None
    for name, layer in layers.items():
        if not layer.calibrated:
            raise StudioError(f"layer {name} was never calibrated; run the calibration before exporting")
        quantizer = layer.weight_quantizer
        key = f"{KEY_PREFIX}{name}."
        tensors[key + QWEIGHT] = pack(quantizer.integers(layer.merged_weight()), quantizer.bits)
        tensors[key + WEIGHT_STEP] = quantizer.step.detach().float().clone()
        tensors[key + WEIGHT_ZERO] = quantizer.zero.to(torch.uint8)
        tensors[key + ACT_STEP] = layer.act_quantizer.step.detach().float().clone()
        tensors[key + ACT_ZERO] = torch.round(layer.act_quantizer.zero.detach()).float()
        tensors[key + BITS] = torch.tensor([quantizer.bits, layer.act_bits], dtype=torch.uint8)
        timesteps = layer.act_quantizer.timesteps
    tensors[TIMESTEPS] = timesteps.float().clone()
    return tensors


def dequantized_weight(params: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A layer's weight from its file entries: (q − z) Δ per output channel, float32.

    Example:
        >>> params = {QWEIGHT: pack(torch.tensor([3, 0], dtype=torch.uint8), 4), WEIGHT_STEP: torch.tensor([0.5, 1.0]),
        ...           WEIGHT_ZERO: torch.tensor([1, 0], dtype=torch.uint8), BITS: torch.tensor([4, 8])}
        >>> dequantized_weight(params, torch.Size([2, 1])).tolist()
        [[1.0], [0.0]]
    """
    bits = int(params[BITS][0])
    integers = unpack(params[QWEIGHT], bits, shape).float()
    view = (-1,) + (1,) * (len(shape) - 1)
    return (integers - params[WEIGHT_ZERO].float().view(view)) * params[WEIGHT_STEP].float().view(view)


# ----------------------------------------------------------------------------- on a pipeline

class QuantizedAttachment:
    """An applied quantized UNet: each quantized layer's weight replaced by its dequantized one (the original kept
    for `remove`) and a pre-hook fake-quantizing its input at the current timestep's step.

    Other artifacts applied on top see the quantized weights as the base weights (whichever order they were
    applied in: a quantized file replaces the base, it is not a transform of it). The scale is 1 (on) or 0 (off).
    """

    def __init__(self, pipe, entries: dict[str, dict[str, torch.Tensor]], timesteps: torch.Tensor, name: str) -> None:
        self.pipe, self.name, self.method = pipe, name, "efficientdm"
        self.entries, self.enabled, self.scale = entries, True, 1.0
        self.originals: dict[str, torch.Tensor] = {}
        self.handles = []
        self.clock = Clock(pipe.unet)
        self.int8_layers: set[str] = set()  # the layers on integer kernels (`use_int8_kernels`)
        try:
            for layer_name, params in entries.items():
                layer = pipe.unet.get_submodule(layer_name)
                self.originals[layer_name] = layer.weight.detach().clone()
                quantizer = ActQuantizer(int(params[BITS][1]), timesteps, params[ACT_STEP], params[ACT_ZERO]).to(
                    layer.weight.device)
                layer.add_module("studio_act_quantizer", quantizer)
                layer.studio_name = layer_name
                self.handles.append(layer.register_forward_pre_hook(self._quantize_input))
            self._write(quantized=True)
        except BaseException:
            self.remove()
            raise

    @property
    def layers(self) -> list[str]:
        return [f"unet.{name}" for name in self.entries]

    def _quantize_input(self, module, args):
        if not self.enabled or module.studio_name in self.int8_layers:  # torchao quantizes those inputs itself
            return None
        quantizer = module.studio_act_quantizer
        with torch.no_grad():
            return (quantizer(args[0], self.clock.per_sample(len(args[0]))),) + tuple(args[1:])

    @torch.no_grad()
    def _write(self, quantized: bool) -> None:
        """Put the dequantized (or the original) weights into the layers (in place: hooks on them see the change)."""
        for layer_name, params in self.entries.items():
            layer = self.pipe.unet.get_submodule(layer_name)
            weight = dequantized_weight(params, layer.weight.shape) if quantized else self.originals[layer_name]
            layer.weight.copy_(weight.to(layer.weight.device, layer.weight.dtype))

    def set_scale(self, scale: float) -> None:
        if scale not in (0, 1):
            raise StudioError(f"a quantized model is on (scale 1) or off (scale 0), not scaled by {scale}")
        self.set_enabled(bool(scale))
        self.scale = float(scale)

    def set_enabled(self, enabled: bool) -> None:
        if self.int8_layers and enabled != self.enabled:
            raise StudioError(f"{self.name} runs on integer kernels: remove it (studio.plugin.remove) to go back")
        if enabled != self.enabled:
            self._write(quantized=enabled)
        self.enabled = enabled

    def call_inputs(self, **_) -> dict:
        return {}

    def remove(self) -> None:
        from studio.plugin import _hooked_layers

        if any(hook.original is not None for _, hook in _hooked_layers(self.pipe)):  # a fuse holds these weights
            raise StudioError("unfuse the pipeline (studio.plugin.unfuse) before removing an artifact")
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.originals:
            with torch.no_grad():
                for layer_name, original in self.originals.items():
                    layer = self.pipe.unet.get_submodule(layer_name)
                    if layer_name in self.int8_layers:  # torchao's int8 weight: put a float one back
                        layer.weight = nn.Parameter(original, requires_grad=False)
                    else:
                        layer.weight.copy_(original)
                    if hasattr(layer, "studio_act_quantizer"):
                        del layer.studio_act_quantizer, layer.studio_name
        self.originals = {}
        self.clock.remove()


def read_entries(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """A quantized file's tensors grouped by layer (every entry present), and its calibrated timesteps."""
    if TIMESTEPS not in tensors:
        raise StudioError(f"{path}: no {TIMESTEPS} tensor; not a quantized UNet file, or a damaged one")
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key == TIMESTEPS:
            continue
        layer_name, _, param = key.removeprefix(KEY_PREFIX).rpartition(".")
        if not key.startswith(KEY_PREFIX) or param not in PARAMS:
            raise StudioError(f"{path}: unexpected tensor {key!r} in a quantized UNet file")
        entries.setdefault(layer_name, {})[param] = value
    timesteps = tensors[TIMESTEPS]
    if timesteps.dim() != 1 or not len(timesteps) or not timesteps.is_floating_point() or not timesteps.isfinite().all():
        raise StudioError(f"{path}: {TIMESTEPS} is not a list of timesteps; the file is damaged")
    for layer_name, params in entries.items():
        missing = [p for p in PARAMS if p not in params]
        if missing:
            raise StudioError(f"{path}: layer {layer_name} lacks {', '.join(missing)}; the file is damaged")
        problem = _entry_problem(params, timesteps)
        if problem:
            raise StudioError(f"{path}: layer {layer_name} {problem}; the file is damaged")
    return entries, timesteps


def _entry_problem(params: dict[str, torch.Tensor], timesteps: torch.Tensor) -> str | None:
    """What is wrong with one layer's entries in a quantized file, before any of them is used (None: nothing)."""
    bits = params[BITS]
    if bits.dtype != torch.uint8 or bits.shape != (2,) or not ((bits >= 2) & (bits <= 8)).all():
        return "has no valid bit widths (two whole numbers from 2 to 8)"
    if params[QWEIGHT].dtype != torch.uint8 or params[QWEIGHT].dim() != 1:
        return "has packed weights that are not a row of bytes"
    step, zero = params[WEIGHT_STEP], params[WEIGHT_ZERO]
    if step.dim() != 1 or not step.is_floating_point() or not (step.isfinite() & (step > 0)).all():
        return "has weight steps that are not positive numbers, one per output channel"
    if zero.shape != step.shape:
        return f"has {zero.numel()} weight zero points for {step.numel()} steps"
    for name in (ACT_STEP, ACT_ZERO):
        values = params[name]
        if values.shape != timesteps.shape or not values.is_floating_point() or not values.isfinite().all():
            return f"has {values.numel()} activation {name.split('_')[-1]}s for {timesteps.numel()} timesteps"
    if not (params[ACT_STEP] > 0).all():
        return "has activation steps that are not positive"
    return None


def attach(pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> QuantizedAttachment:
    """Put a quantized UNet file on `pipe`: every layer checked first (present, a Linear/Conv2d whose weight the
    packed integers fill), then all replaced; a failure half-way puts back what was replaced."""
    if scale not in (0, 1):
        raise StudioError(f"{path} is a quantized model: apply it at scale 1 (or 0 for off), not {scale}")
    entries, timesteps = read_entries(tensors, path)
    for layer_name, params in entries.items():
        try:
            layer = pipe.unet.get_submodule(layer_name)
        except AttributeError:
            raise StudioError(f"{path}: the UNet has no layer {layer_name}; the file was made for another model") from None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise StudioError(f"{path}: layer {layer_name} is a {type(layer).__name__}, not a Linear or Conv2d (is "
                              "another adapter wrapping it? remove it first)")
        if hasattr(layer, "studio_act_quantizer"):
            raise StudioError(f"{path}: the UNet is already quantized (layer {layer_name}); remove that one first")
        shape = layer.weight.shape
        if params[WEIGHT_STEP].numel() != shape[0]:
            raise StudioError(f"{path}: layer {layer_name} has {params[WEIGHT_STEP].numel()} channel steps for "
                              f"{shape[0]} output channels; the file was made for another model")
        dequantized_weight(params, shape)  # the packed integers fill the layer (else a clear error)
    attachment = QuantizedAttachment(pipe, entries, timesteps, name)
    if scale == 0:
        attachment.set_scale(0)
    return attachment


def recognises(keys: list[str]) -> bool:
    """A quantized file always carries the studio header: no other layout is recognised."""
    return False


def file_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of `tensors`' data (what the file stores besides its header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def unet_size_bytes(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """The deployed UNet's size: the quantized file's tensors plus every parameter of the UNet that the file does
    not replace (biases, norms, the full-precision convs), at their own precision.

    Example:
        >>> unet_size_bytes(torch.nn.Linear(2, 2), {})  # nothing quantized: the whole float32 layer
        24
    """
    replaced = {f"{key.removeprefix(KEY_PREFIX).rpartition('.')[0]}.weight" for key in tensors if key.endswith(QWEIGHT)}
    rest = sum(p.numel() * p.element_size() for name, p in unet.named_parameters() if name not in replaced)
    return file_bytes(tensors) + rest


# ----------------------------------------------------------------------------- real integer kernels

ROW_PER_IMAGE = ("time_embedding.", "time_emb_proj", "add_embedding.", "class_embedding.")  # Linears fed one row per image


def use_int8_kernels(pipe, compile: bool = True) -> list[str]:
    """Run the Linear layers of an applied 8-bit quantized UNet on torchao's integer kernels (int8 weights per
    channel, int8 activations with torchao's own dynamic per-token scales: the file's activation steps are not
    used there); convolutions keep their dequantized weights and float inputs. The Linear layers switched, by name.
    `compile`: compile each (`int8_linear_layers`).

    Example:
        >>> plugin.apply(pipe, "outputs/quantize/efficientdm.safetensors")  # a w8a8 file  # doctest: +SKIP
        >>> len(use_int8_kernels(pipe)) > 0  # doctest: +SKIP
        True
    """
    from studio import plugin

    quantized = [a for a in plugin.attachments(pipe) if isinstance(a, QuantizedAttachment)]
    if not quantized:
        raise StudioError("no quantized UNet is applied: apply a file from `studio quantize` first")
    attachment = quantized[0]
    low = [n for n, p in attachment.entries.items() if int(p[BITS][0]) < 8]
    if low:
        raise StudioError(f"integer kernels here are int8: this file has {len(low)} layers at fewer weight bits "
                          f"(first: {low[0]}); quantize with --bits w8a8 for them")
    # The time (and SDXL's added) embeddings see one row per image: integer matmuls need more rows (CUDA's, > 16)
    # and would save nothing there, so they keep their fake-quantized float path.
    names = [n for n in attachment.entries if isinstance(pipe.unet.get_submodule(n), nn.Linear)
             and not any(part in n for part in ROW_PER_IMAGE)]
    int8_linear_layers(pipe.unet, names, compile)
    attachment.int8_layers = set(names)
    return names


def int8_linear_layers(model: nn.Module, names: list[str], compile: bool = True) -> None:
    """Put the Linear layers `names` of `model` on torchao's int8 kernels (weights per channel, activations
    dynamically per token); with `compile`, each compiled (`torch.compile`) so the activation quantization fuses
    with the integer matmul: uncompiled, it costs more than the int8 matmul saves on a CPU.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> int8_linear_layers(net, ["0"], compile=False)  # doctest: +SKIP
    """
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise StudioError("integer kernels need torchao: pip install 'diffusion-studio[int8]'") from None
    chosen = set(names)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda module, fqn: fqn in chosen and isinstance(module, nn.Linear))
    if compile:
        import warnings

        import torch._dynamo

        # torchao's int8 tensor lacks a hash for the compile cache: it is only recompiled, nothing a user can act on
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")

        # Every Linear shares nn.Linear.forward: one compiled version per layer shape, more than dynamo's default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(names))
        for name in names:
            model.get_submodule(name).compile()


COMPARISON_NAME = "fp-vs-quantized.png"


def comparison_sheet(config, artifact: str | Path, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    """The first four trajectory prompts drawn by the full-precision model (left) and the quantized one (right),
    written beside `artifact` (`studio.sample.side_by_side`).

    Example:
        >>> comparison_sheet(train_config, "outputs/quantize/efficientdm.safetensors")  # doctest: +SKIP
        PosixPath('outputs/quantize/fp-vs-quantized.png')
    """
    from studio import registry
    from studio.pipeline import TOY_MODEL
    from studio.sample import side_by_side
    from studio.trainers.quantize import quantize_prompts

    options = registry.get(config.method).config(config.method_options)
    prompts = quantize_prompts(options, toy=config.model == TOY_MODEL)[:4]
    return side_by_side(config.model, artifact, prompts, seeds, Path(artifact).parent / COMPARISON_NAME)
