"""`studio bench train-step`: seconds per training step and peak memory, ours against PEFT and the floor.

Entries, all on the same UNet, batch 1, fp32, AdamW:
- `floor`: the same forward and backward with nothing trainable (every entry
  back-propagates to the input latents, so the floor is the same work minus
  the adapter's);
- `full`: every UNet weight trains;
- `lora`, `oft`, `boft`, `sara`: our methods with their default configs;
- `peft-lora`, `peft-oft`, `peft-boft`: PEFT's tuners with matched settings
  (same targets, rank 4 / block 32 / block 8 with 2 butterfly factors, exact
  Cayley). Without its CUDA extension (every CPU machine) PEFT silently runs
  BOFT with one butterfly factor; `peft_boft_factors` reports what it ran.

Models: the toy UNet at its 16x16 latents, and an SD1.5-shaped UNet (860M
random weights) at 32x32 latents.

Timing (in one fresh process per model): entries are interleaved round by
round, in a new seeded order each round (each round builds every entry afresh
on a copy of the UNet, warms it up with one step, then times `steps` steps),
and the median over all timed steps is reported. Memory: each entry runs
alone in a fresh process for a few steps; `peak_memory_mb` is the peak
resident memory during those steps on CPU (sampled every millisecond), or peak
allocated CUDA memory on a GPU, weights included; `added_memory_mb` is the
part above what was held just before the first step.

Example:
    $ studio bench train-step --json --output benchmarks/results/train-step.json
"""

from __future__ import annotations

import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio import registry
from studio.errors import StudioError
from studio.targets import ATTENTION_PROJECTIONS

OURS = ("lora", "oft", "boft", "sara")
PEFT = ("peft-lora", "peft-oft", "peft-boft")
ENTRIES = ("floor", "full") + OURS + PEFT
MODELS = ("toy", "sd15")
LORA_RANK = 4
OFT_BLOCK = 32
BOFT_BLOCK = 8
BOFT_FACTORS = 2


def build_unet(model: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The UNet and one batch (latents, timestep, text embeddings) for `model` ("toy" or "sd15")."""
    from diffusers import UNet2DConditionModel

    from studio.pipeline import toy_model_path
    from studio.testing import sd15_unet_config

    if model == "toy":
        unet = UNet2DConditionModel.from_pretrained(toy_model_path(), subfolder="unet")
        size = unet.config.sample_size
    elif model == "sd15":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config())
        size = 32
    else:
        raise StudioError(f"unknown bench model {model!r}; choose one of {', '.join(MODELS)}")
    unet.requires_grad_(False).train()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "sample": torch.randn(1, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator),
    }
    return unet, batch


def _peft_model(unet: nn.Module, entry: str) -> nn.Module:
    from peft import BOFTConfig, LoraConfig, OFTConfig, inject_adapter_in_model

    targets = list(ATTENTION_PROJECTIONS)
    configs = {
        "peft-lora": lambda: LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets),
        "peft-oft": lambda: OFTConfig(r=0, oft_block_size=OFT_BLOCK, target_modules=targets, use_cayley_neumann=False),
        "peft-boft": lambda: BOFTConfig(boft_block_size=BOFT_BLOCK, boft_n_butterfly_factor=BOFT_FACTORS, target_modules=targets),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when its BOFT CUDA extension cannot be built
        return inject_adapter_in_model(configs[entry](), unet)


def prepare(unet: nn.Module, entry: str) -> list[nn.Parameter]:
    """Make `entry` trainable on `unet` (in place); return the parameters the optimizer steps."""
    if entry == "floor":
        return []
    if entry == "full":
        return list(unet.requires_grad_(True).parameters())
    if entry in OURS:
        method = registry.get(entry)
        method.adapter.inject(unet, method.trainer.default_config({}))
    elif entry in PEFT:
        _peft_model(unet, entry)
    else:
        raise StudioError(f"unknown bench entry {entry!r}; choose from {', '.join(ENTRIES)}")
    return [p for p in unet.parameters() if p.requires_grad]


def peft_boft_factors(unet: nn.Module) -> int:
    """How many butterfly factors PEFT's BOFT actually built (1 when it fell back)."""
    for module in unet.modules():
        if hasattr(module, "boft_P"):
            return int(module.boft_P.shape[0])
    return 0


def training_step(unet: nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None) -> None:
    """One forward, MSE loss, backward and optimizer step."""
    # Every entry back-propagates to the input too: then the floor is the very same work, minus the adapter's.
    sample = batch["sample"].clone().requires_grad_(True)
    pred = unet(sample, batch["timestep"], batch["encoder_hidden_states"]).sample
    loss = F.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32) + 0.1)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_entries(model: str, entries: list[str], rounds: int, steps: int, device: str) -> dict[str, list[float]]:
    """Per entry, the seconds of every timed step, entries interleaved round by round."""
    base, batch = build_unet(model)
    device = torch.device(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    times: dict[str, list[float]] = {entry: [] for entry in entries}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for entry in order.permutation(entries).tolist():  # a new order each round: no entry always follows `full`
            unet = copy.deepcopy(base)
            params = prepare(unet, entry)
            unet.to(device)
            optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
            training_step(unet, batch, optimizer)  # warm-up: allocations, optimizer state
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                training_step(unet, batch, optimizer)
                _sync(device)
                times[entry].append(time.perf_counter() - start)
            del unet, optimizer, params
    return times


class _PeakRSS:
    """Samples this process's resident memory every millisecond on a thread; `peak_mb` is the largest seen.

    ru_maxrss cannot be used: it also counts the (larger) transient of loading the model.
    """

    def __init__(self) -> None:
        self.peak_mb = self.now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> "_PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


def measure_memory(model: str, entry: str, steps: int, device: str) -> dict:
    """Peak memory (MB) of `entry` run alone, weights included: CUDA peak allocated, or peak resident
    memory on CPU; `added_memory_mb` is the part above the memory held just before the first step."""
    unet, batch = build_unet(model)
    params = prepare(unet, entry)
    device = torch.device(device)
    unet.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        for _ in range(steps):
            training_step(unet, batch, optimizer)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        gc.collect()
        before = _PeakRSS.now_mb()
        with _PeakRSS() as sampler:
            for _ in range(steps):
                training_step(unet, batch, optimizer)
        peak = sampler.peak_mb
    result = {"peak_memory_mb": round(peak, 1), "added_memory_mb": round(peak - before, 1),
              "trainable_params": sum(p.numel() for p in params)}
    if entry == "peft-boft":
        result["peft_boft_factors"] = peft_boft_factors(unet)
    return result


def _in_subprocess(function: str, *args) -> dict:
    """Run `function(*args)` of this module in a fresh Python and return its JSON result.

    Every measurement gets its own process, so no run inherits another's memory (a freed SD1.5-sized
    model is not always handed back to the system) or warm caches.
    """
    code = f"import json, studio.bench.train_step as m; print(json.dumps(m.{function}(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise StudioError(f"bench run {function}{args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_step(
    models: list[str] | None = None,
    entries: list[str] | None = None,
    rounds: int = 4,
    steps: int = 2,
    memory_steps: int = 2,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Time and measure every entry on every model; `{entry: {model: metrics}}` plus a `setup` entry.

    Example:
        >>> train_step(["toy"], ["floor", "lora"], rounds=1, steps=1)["lora"]["toy"]["ratio_to_floor"] > 0  # doctest: +SKIP
        True
    """
    models = list(models or MODELS)
    entries = list(entries or ENTRIES)
    if "floor" not in entries:
        entries.insert(0, "floor")
    results: dict = {entry: {} for entry in entries}
    for model in models:
        say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
        say(f"[{model}] timing {len(entries)} entries, {rounds} rounds x {steps} steps")
        times = _in_subprocess("time_entries", model, entries, rounds, steps, device)
        floor = statistics.median(times["floor"])
        for entry in entries:
            say(f"[{model}] memory of {entry}")
            seconds = statistics.median(times[entry])
            metrics = {"seconds": round(seconds, 4), "ratio_to_floor": round(seconds / floor, 3)}
            metrics.update(_in_subprocess("measure_memory", model, entry, memory_steps, device))
            results[entry][model] = metrics
        for ours in ("oft", "boft"):
            peft = f"peft-{ours}"
            if ours in results and peft in results:
                results[ours][model]["speedup_vs_peft"] = round(results[peft][model]["seconds"] / results[ours][model]["seconds"], 2)
    results["setup"] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_round": steps,
        "batch": 1,
        "latents": {"toy": "16x16", "sd15": "32x32"},
        "dtype": "fp32",
        "optimizer": "AdamW",
    }
    return results
