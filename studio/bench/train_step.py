"""`studio bench train-step`: seconds per training step and peak memory, ours against PEFT and the floor.

Entries, all on the same UNet, fp32, AdamW:
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
random weights) at 32x32 latents; timing uses batch 1.

Timing (in one fresh process per model): entries are interleaved round by
round, in a new seeded order each round (each round builds every entry afresh
on a copy of the UNet, warms it up with one step, then times `steps` steps).
An entry's time in a round is the median of its steps in that round. Ratios
are paired: each round gives the entry's time over the same round's floor
time, so a slow period of the machine slows both and cancels, and
`ratio_to_floor` is the median of those per-round ratios (it need not equal
`seconds` over the floor's `seconds`). Beside every ratio is its 95% interval,
a percentile bootstrap of that median over rounds (4000 resamples, seed 0, so
the same times always give the same interval). With `until_ci` rounds are
added until every interval lies within ratio ± `ci_target` (3%), or until
`max_rounds` or `max_minutes` stops it.

Keys of `result[entry][model]`:
- `seconds`: median of all the entry's timed steps;
- `ratio_to_floor`, `ratio_ci` ([low, high]): entry time / floor time;
- for `lora`, `oft`, `boft` when the PEFT twin ran: `time_vs_peft`,
  `time_vs_peft_ci` (ours / PEFT's, per round), and `speedup_vs_peft`,
  `speedup_ci` (PEFT's / ours, per round);
- `ci_halfwidth`: the widest of the entry's intervals, as the larger distance
  from the ratio to an end of its interval, over the ratio (0.021 = ±2.1%);
  `ci_target_met`: whether that is below `ci_target` and comes from at
  least 5 rounds (always true for the floor) — false when a cap stopped the
  rounds first (`setup.timing[model].stopped` says which);
- `peak_memory_mb`, `added_memory_mb`, `trainable_params`: memory at the
  timing setting (batch 1, 16x16 toy / 32x32 sd15 latents);
- `paper_peak_memory_mb`, `paper_added_memory_mb`: memory at a paper-like
  setting, batch 2 at 64x64 latents (SD1.5 at 512 px);
- `peft_boft_factors` for `peft-boft`.

Memory: each entry runs alone in a fresh process for a few steps, before any
timing (so an out-of-memory fails in minutes, not after hours of timing);
`peak_memory_mb` is the peak resident memory during those steps on CPU
(sampled every millisecond), or peak allocated CUDA memory on a GPU, weights
included; `added_memory_mb` is the part above what was held just before the
first step.

`result["goals"][model]` checks the README's goals: each with its `value`,
`ci` (timings only), `goal` (e.g. "<= 1.03") and `verdict`: "met" when the
whole interval meets the goal, "missed" when none of it does, "undecided"
when the interval straddles the goal. `result["round_times"][model][entry]`
keeps every timed step, round by round, so the statistics can be recomputed.
`result["setup"]["timing"][model]` gives the rounds run, why they stopped,
the minutes taken and the largest 1-minute load average seen after a round
(the CLI warns above the core count + 1: on a busy machine contention can
slow entries unequally, which no pairing cancels: with other processes on
both of 2 cores, a toy step with 2 threads took 7.4 s for the floor and 14 s
for LoRA against 0.036 s and 0.055 s with 1 thread — `threads` 1 keeps a
shared machine usable for a rough run; the reported figures use the default).

Example (the README's run: toy rounds are cheap, so up to 150; sd15's about 3 minutes each, so at most 2 hours):
    $ studio bench train-step --until-ci --rounds 5 --max-rounds 150 --max-minutes 120 \\
        --json --output benchmarks/results/train-step.json
"""

from __future__ import annotations

import collections
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio import registry
from studio.bench.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CI_LEVEL,
    bootstrap_median_ci,
)
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

TIMING_LATENTS = {"toy": 16, "sd15": 32}
PAPER_BATCH = 2
PAPER_LATENTS = 64

CI_TARGET = 0.03
MIN_CI_ROUNDS = 5  # below this a bootstrap interval of a median is little more than the sample's range: not trusted
MAX_ROUNDS = 50

# (goal name, entry, value key, interval key, comparison, bound): the README's time goals.
TIME_GOALS = (
    ("lora x floor", "lora", "ratio_to_floor", "ratio_ci", "<=", 1.15),
    ("lora / peft-lora time", "lora", "time_vs_peft", "time_vs_peft_ci", "<=", 1.03),
    ("oft / peft-oft time", "oft", "time_vs_peft", "time_vs_peft_ci", "<=", 1.0),
    ("boft x floor", "boft", "ratio_to_floor", "ratio_ci", "<=", 1.5),
    ("peft-boft / boft time (speedup)", "boft", "speedup_vs_peft", "speedup_ci", ">=", 2.0),
)
SARA_MEMORY_GOAL = 1.1

PROGRESS = "[bench] "  # a timing subprocess's stderr lines with this prefix are progress, relayed to the user


def build_unet(model: str, batch_size: int = 1, latents: int | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The UNet and one batch (latents, timestep, text embeddings) for `model` ("toy" or "sd15").

    `latents` is the latent side (default: 16 for the toy, 32 for sd15).

    Example:
        >>> unet, batch = build_unet("toy", batch_size=2, latents=64)  # doctest: +SKIP
        >>> batch["sample"].shape  # doctest: +SKIP
        torch.Size([2, 4, 64, 64])
    """
    from diffusers import UNet2DConditionModel

    from studio.pipeline import toy_model_path
    from studio.testing import sd15_unet_config

    if model not in MODELS:
        raise StudioError(f"unknown bench model {model!r}; choose one of {', '.join(MODELS)}")
    if batch_size < 1:
        raise StudioError(f"bench batch size {batch_size} must be at least 1")
    size = TIMING_LATENTS[model] if latents is None else latents
    if size < 8 or size % 8:
        raise StudioError(f"bench latent size {size} must be a positive multiple of 8 (the UNet halves it three times)")
    if model == "toy":
        unet = UNet2DConditionModel.from_pretrained(toy_model_path(), subfolder="unet")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config())
    unet.requires_grad_(False).train()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "sample": torch.randn(batch_size, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.full((batch_size,), 500),
        "encoder_hidden_states": torch.randn(batch_size, 77, unet.config.cross_attention_dim, generator=generator),
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
        method.adapter.inject(unet, method.config({}))
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


# ---------------------------------------------------------------------------------------------------------------
# Statistics: a bootstrap interval of a median, per-round paired ratios, and when to stop adding rounds.


def round_times(rounds: Sequence[Sequence[float]]) -> list[float]:
    """An entry's time in each round: the median of its timed steps in that round.

    Example:
        >>> round_times([[1.0, 3.0], [2.0, 2.0, 5.0]])
        [2.0, 2.0]
    """
    if any(len(steps) == 0 for steps in rounds):
        raise StudioError(f"every round needs at least one timed step, got {list(map(list, rounds))!r}")
    return [statistics.median(steps) for steps in rounds]


def paired_ratio(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]],
                 seed: int = BOOTSTRAP_SEED) -> dict:
    """The median over rounds of (numerator's time / denominator's time in the same round), its 95% bootstrap
    interval over rounds, and `halfwidth`: the interval's larger distance from the median, over the median.

    Both arguments are per-round lists of step seconds, as `time_entries` returns them.

    Example:
        >>> r = paired_ratio([[3.0], [4.0], [2.5]], [[2.0], [4.0], [2.0]])
        >>> r["median"], r["ci"]
        (1.25, [1.0, 1.5])
    """
    if len(numerator) != len(denominator):
        raise StudioError(f"paired ratio needs the same rounds on both sides, got {len(numerator)} and {len(denominator)}")
    if len(numerator) == 0:
        raise StudioError("paired ratio needs at least one round, got none")
    ratios = [a / b for a, b in zip(round_times(numerator), round_times(denominator))]
    median = statistics.median(ratios)
    low, high = bootstrap_median_ci(ratios, seed=seed)
    return {"median": median, "ci": [low, high], "halfwidth": max(median - low, high - median) / median}


def summarize_times(times: dict[str, list[list[float]]], ci_target: float = CI_TARGET) -> dict[str, dict]:
    """Per entry, its seconds and paired ratios with intervals (the keys listed in the module docstring).

    `times` maps each entry (the floor included) to its per-round lists of step seconds. An interval from
    fewer than 5 rounds never meets the target, however narrow.

    Example:
        >>> summary = summarize_times({"floor": [[1.0], [2.0]], "lora": [[1.1], [2.2]]})
        >>> summary["lora"]["ratio_to_floor"], summary["lora"]["ratio_ci"], summary["lora"]["ci_target_met"]
        (1.1, [1.1, 1.1], False)
    """
    if "floor" not in times:
        raise StudioError(f"timings need the 'floor' entry to compute ratios; got {', '.join(times)}")
    summary: dict[str, dict] = {}
    for entry, rounds in times.items():
        to_floor = paired_ratio(rounds, times["floor"])
        metrics = {
            "seconds": round(statistics.median([t for steps in rounds for t in steps]), 4),
            "ratio_to_floor": round(to_floor["median"], 3),
            "ratio_ci": [round(x, 3) for x in to_floor["ci"]],
        }
        halfwidths = [to_floor["halfwidth"]]
        peft = f"peft-{entry}"
        if peft in times:
            ours_over_peft = paired_ratio(rounds, times[peft])
            peft_over_ours = paired_ratio(times[peft], rounds)
            metrics["time_vs_peft"] = round(ours_over_peft["median"], 3)
            metrics["time_vs_peft_ci"] = [round(x, 3) for x in ours_over_peft["ci"]]
            metrics["speedup_vs_peft"] = round(peft_over_ours["median"], 3)
            metrics["speedup_ci"] = [round(x, 3) for x in peft_over_ours["ci"]]
            halfwidths += [ours_over_peft["halfwidth"], peft_over_ours["halfwidth"]]
        metrics["ci_halfwidth"] = round(max(halfwidths), 4)
        enough_rounds = len(rounds) >= MIN_CI_ROUNDS
        metrics["ci_target_met"] = entry == "floor" or bool(enough_rounds and max(halfwidths) < ci_target)
        summary[entry] = metrics
    return summary


def check_round_options(rounds: int, until_ci: bool, ci_target: float, max_rounds: int,
                        max_seconds: float | None) -> None:
    """Raise a `StudioError` naming the flag when a round option of `collect_rounds` is out of range.

    Example:
        >>> check_round_options(rounds=4, until_ci=True, ci_target=0.03, max_rounds=50, max_seconds=None)
    """
    if rounds < 1:
        raise StudioError(f"--rounds {rounds} must be at least 1")
    if until_ci and max_rounds < rounds:
        raise StudioError(f"--max-rounds {max_rounds} must be at least --rounds {rounds}")
    if not 0 < ci_target < 1:
        raise StudioError(f"--ci-target {ci_target} must lie between 0 and 1 (0.03 = ±3%)")
    if max_seconds is not None and max_seconds <= 0:
        raise StudioError(f"--max-minutes must be positive, got {max_seconds / 60:g}")


def collect_rounds(run_round: Callable[[], dict[str, list[float]]], rounds: int, until_ci: bool = False,
                   ci_target: float = CI_TARGET, max_rounds: int = MAX_ROUNDS, max_seconds: float | None = None,
                   say: Callable[[str], None] = lambda text: None,
                   clock: Callable[[], float] = time.monotonic) -> tuple[dict[str, list[list[float]]], str]:
    """Call `run_round` (one round: `{entry: [step seconds]}`) until done; return the per-round times and why it stopped.

    Without `until_ci` it stops after `rounds` rounds ("fixed rounds"). With it, from `rounds` rounds on (and at
    least 5) it stops as soon as every interval of `summarize_times` lies within ± `ci_target` ("target met"),
    else at `max_rounds` ("max rounds"). Either way it stops early ("max minutes") when another round, as long
    as the last one, would end after `max_seconds`.

    Example:
        >>> times, stopped = collect_rounds(lambda: {"floor": [1.0], "lora": [1.1]}, rounds=3, until_ci=True)
        >>> len(times["lora"]), stopped
        (5, 'target met')
    """
    check_round_options(rounds, until_ci, ci_target, max_rounds, max_seconds)
    times: dict[str, list[list[float]]] = {}
    start = clock()
    while True:
        round_start = clock()
        for entry, steps in run_round().items():
            times.setdefault(entry, []).append(list(steps))
        done = len(times["floor"])
        last_round = clock() - round_start
        if not until_ci and done >= rounds:
            return times, "fixed rounds"
        if until_ci and done >= max(rounds, MIN_CI_ROUNDS):
            summary = summarize_times(times, ci_target)
            widest = max(summary, key=lambda entry: summary[entry]["ci_halfwidth"])
            say(f"round {done}: widest interval ±{summary[widest]['ci_halfwidth']:.1%} ({widest}), target ±{ci_target:.1%}")
            if all(metrics["ci_target_met"] for metrics in summary.values()):
                return times, "target met"
        else:
            say(f"round {done} done ({last_round:.0f} s)")
        if until_ci and done >= max_rounds:
            return times, "max rounds"
        if max_seconds is not None and clock() - start + last_round > max_seconds:
            return times, "max minutes"


# ---------------------------------------------------------------------------------------------------------------
# Measurements, each run in a fresh process.


def time_entries(model: str, entries: list[str], rounds: int, steps: int, device: str, until_ci: bool = False,
                 ci_target: float = CI_TARGET, max_rounds: int = MAX_ROUNDS, max_minutes: float | None = None) -> dict:
    """Per entry, the seconds of every timed step, round by round, entries interleaved (see `collect_rounds`).

    Returns `{"times": {entry: [[step seconds] per round]}, "stopped": why, "minutes": wall time,
    "max_load_average": the largest 1-minute load average seen after a round}`.

    Example:
        >>> time_entries("toy", ["floor", "lora"], rounds=2, steps=1, device="cpu")["times"]["lora"]  # doctest: +SKIP
        [[0.031], [0.030]]
    """
    if steps < 1:
        raise StudioError(f"--steps {steps} must be at least 1")
    base, batch = build_unet(model)
    device = torch.device(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    order = np.random.default_rng(0)

    loads: list[float] = []

    def run_round() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {entry: [] for entry in entries}
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
        loads.append(os.getloadavg()[0])  # this bench counts too: about one per thread while it computes
        return times

    def say(text: str) -> None:
        print(f"{PROGRESS}[{model}] {text}", file=sys.stderr, flush=True)

    start = time.monotonic()
    max_seconds = None if max_minutes is None else max_minutes * 60
    times, stopped = collect_rounds(run_round, rounds, until_ci, ci_target, max_rounds, max_seconds, say)
    return {"times": times, "stopped": stopped, "minutes": round((time.monotonic() - start) / 60, 1),
            "max_load_average": round(max(loads), 1)}


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


def measure_memory(model: str, entry: str, steps: int, device: str, batch_size: int = 1,
                   latents: int | None = None) -> dict:
    """Peak memory (MB) of `entry` run alone, weights included: CUDA peak allocated, or peak resident
    memory on CPU; `added_memory_mb` is the part above the memory held just before the first step.

    Example:
        >>> measure_memory("toy", "lora", steps=2, device="cpu", batch_size=2, latents=64)["peak_memory_mb"] > 0  # doctest: +SKIP
        True
    """
    unet, batch = build_unet(model, batch_size, latents)
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


def _in_subprocess(function: str, *args, say: Callable[[str], None] | None = None, threads: int | None = None) -> dict:
    """Run `function(*args)` of this module in a fresh Python (with `threads` CPU threads, default torch's)
    and return its JSON result.

    Every measurement gets its own process, so no run inherits another's memory (a freed SD1.5-sized
    model is not always handed back to the system) or warm caches. Its stderr lines that start with
    `PROGRESS` go to `say` as they come; the others are kept for the error message.
    """
    code = f"import json, studio.bench.train_step as m; print(json.dumps(m.{function}(*{args!r})))"
    with tempfile.TemporaryFile(mode="w+") as stdout:
        env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        process = subprocess.Popen([sys.executable, "-c", code], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        tail: collections.deque[str] = collections.deque(maxlen=40)
        for line in process.stderr:
            if line.startswith(PROGRESS):
                if say is not None:
                    say(line[len(PROGRESS):].rstrip())
            else:
                tail.append(line)
        status = process.wait()
        if status:
            why = "killed: out of memory?" if status == -9 else f"exit status {status}"
            raise StudioError(f"bench run {function}{args} failed ({why}):\n{''.join(tail)[-2000:]}")
        stdout.seek(0)
        return json.loads(stdout.read().strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The bench.


def _verdict(value: float, interval: list[float] | None, comparison: str, bound: float) -> str:
    meets = (lambda x: x <= bound) if comparison == "<=" else (lambda x: x >= bound)
    ends = interval if interval is not None else [value]
    if all(meets(x) for x in ends):
        return "met"
    if not any(meets(x) for x in ends):
        return "missed"
    return "undecided"


def goals(results: dict, model: str) -> dict[str, dict]:
    """The README's goals on `model` that the entries run allow checking: value, interval, goal and verdict.

    Example:
        >>> goals({"lora": {"toy": {"time_vs_peft": 1.0, "time_vs_peft_ci": [0.98, 1.02]}}}, "toy")["lora / peft-lora time"]
        {'value': 1.0, 'ci': [0.98, 1.02], 'goal': '<= 1.03', 'verdict': 'met'}
    """
    checked: dict[str, dict] = {}
    for name, entry, key, ci_key, comparison, bound in TIME_GOALS:
        metrics = results.get(entry, {}).get(model, {})
        if key in metrics:
            checked[name] = {"value": metrics[key], "ci": metrics[ci_key], "goal": f"{comparison} {bound}",
                             "verdict": _verdict(metrics[key], metrics[ci_key], comparison, bound)}
    sara, lora = results.get("sara", {}).get(model, {}), results.get("lora", {}).get(model, {})
    for prefix, setting in (("", "batch 1"), ("paper_", f"batch {PAPER_BATCH}, {PAPER_LATENTS}x{PAPER_LATENTS}")):
        key = f"{prefix}peak_memory_mb"
        if key in sara and key in lora:
            ratio = round(sara[key] / lora[key], 3)
            checked[f"sara / lora peak memory ({setting})"] = {
                "value": ratio, "goal": f"<= {SARA_MEMORY_GOAL}",
                "verdict": _verdict(ratio, None, "<=", SARA_MEMORY_GOAL)}
    return checked


def ci_notes(result: dict) -> list[str]:
    """Lines for the user about timings not to trust: per model, the entries whose interval is wider than the
    target or comes from fewer than 5 rounds (with how many rounds and why they stopped), and a busy machine.

    Example:
        >>> ci_notes(result)  # doctest: +SKIP
        ['sd15: 50 rounds (max rounds); intervals wider than ±3%: lora ±3.4%, peft-lora ±3.1%']
    """
    setup = result["setup"]
    notes = []
    for model, timing in setup["timing"].items():
        wide = [f"{entry} ±{per_model[model]['ci_halfwidth']:.1%}" for entry, per_model in result.items()
                if entry in ENTRIES and model in per_model and not per_model[model]["ci_target_met"]]
        hint = "" if setup["until_ci"] else "; add --until-ci to keep adding rounds"
        if timing["rounds"] < MIN_CI_ROUNDS:
            notes.append(f"{model}: {timing['rounds']} rounds ({timing['stopped']}); an interval needs at least "
                         f"{MIN_CI_ROUNDS} rounds to be trusted{hint}")
        elif wide:
            notes.append(f"{model}: {timing['rounds']} rounds ({timing['stopped']}); intervals wider than "
                         f"±{setup['ci_target']:.0%}: {', '.join(wide)}{hint}")
        if timing["max_load_average"] > setup["cpu_count"] + 1:
            notes.append(f"{model}: the machine was busy (load average up to {timing['max_load_average']} on "
                         f"{setup['cpu_count']} cores): other processes' load can slow entries unequally")
    return notes


def train_step(
    models: list[str] | None = None,
    entries: list[str] | None = None,
    rounds: int = 4,
    steps: int = 2,
    memory_steps: int = 2,
    device: str = "cpu",
    progress: bool = True,
    until_ci: bool = False,
    ci_target: float = CI_TARGET,
    max_rounds: int = MAX_ROUNDS,
    max_minutes: float | None = None,
    threads: int | None = None,
) -> dict:
    """Measure every entry on every model; `{entry: {model: metrics}}` plus `goals`, `round_times` and `setup`.

    `rounds` timing rounds, or with `until_ci` at least that many and then more until every interval lies
    within ± `ci_target` or `max_rounds` / `max_minutes` (per model) stops it. `threads`: CPU threads of
    the measuring processes (default: torch's, one per core). Keys: the module docstring.

    Example:
        >>> r = train_step(["toy"], ["floor", "lora"], rounds=5, steps=1)  # doctest: +SKIP
        >>> r["lora"]["toy"]["ratio_to_floor"], r["lora"]["toy"]["ratio_ci"]  # doctest: +SKIP
        (1.6, [1.55, 1.66])
    """
    models = list(models or MODELS)
    entries = list(entries or ENTRIES)
    for name in models:
        if name not in MODELS:
            raise StudioError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    for name in entries:
        if name not in ENTRIES:
            raise StudioError(f"unknown bench entry {name!r}; choose from {', '.join(ENTRIES)}")
    if "floor" not in entries:
        entries.insert(0, "floor")
    if steps < 1 or memory_steps < 1:
        raise StudioError(f"--steps {steps} and memory steps {memory_steps} must be at least 1")
    check_round_options(rounds, until_ci, ci_target, max_rounds, None if max_minutes is None else max_minutes * 60)
    if threads is not None and threads < 1:
        raise StudioError(f"--threads {threads} must be at least 1")
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    results: dict = {entry: {} for entry in entries}
    all_times: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    for model in models:
        for entry in entries:  # memory first: an entry that does not fit fails in minutes, not after the timing
            say(f"[{model}] memory of {entry}: batch 1 at {TIMING_LATENTS[model]}x{TIMING_LATENTS[model]}, "
                f"batch {PAPER_BATCH} at {PAPER_LATENTS}x{PAPER_LATENTS}")
            metrics = _in_subprocess("measure_memory", model, entry, memory_steps, device, threads=threads)
            paper = _in_subprocess("measure_memory", model, entry, memory_steps, device, PAPER_BATCH, PAPER_LATENTS,
                                   threads=threads)
            metrics["paper_peak_memory_mb"] = paper["peak_memory_mb"]
            metrics["paper_added_memory_mb"] = paper["added_memory_mb"]
            results[entry][model] = metrics
        plan = f"at least {rounds} rounds, until every interval is within ±{ci_target:.1%} (at most {max_rounds})" \
            if until_ci else f"{rounds} rounds"
        say(f"[{model}] timing {len(entries)} entries, {plan} x {steps} steps")
        timed = _in_subprocess("time_entries", model, entries, rounds, steps, device, until_ci, ci_target,
                               max_rounds, max_minutes, say=say, threads=threads)
        for entry, metrics in summarize_times(timed["times"], ci_target).items():
            results[entry][model] = {**metrics, **results[entry][model]}
        all_times[model] = timed["times"]
        timing[model] = {"rounds": len(timed["times"]["floor"]), "stopped": timed["stopped"], "minutes": timed["minutes"],
                         "max_load_average": timed["max_load_average"]}
    results["goals"] = {model: goals(results, model) for model in models}
    results["round_times"] = {model: {entry: [[round(t, 6) for t in steps_] for steps_ in per_round]
                                      for entry, per_round in times.items()} for model, times in all_times.items()}
    results["setup"] = {
        "device": device,
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
        "steps_per_round": steps,
        "until_ci": until_ci,
        "ci_target": ci_target,
        "max_rounds": max_rounds if until_ci else rounds,
        "max_minutes": max_minutes,
        "ci_level": CI_LEVEL,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "over": "rounds",
                      "statistic": "median of per-round paired ratios"},
        "timing": timing,
        "batch": 1,
        "latents": {model: f"{TIMING_LATENTS[model]}x{TIMING_LATENTS[model]}" for model in models},
        "paper_memory": {"batch": PAPER_BATCH, "latents": f"{PAPER_LATENTS}x{PAPER_LATENTS}"},
        "memory_steps": memory_steps,
        "dtype": "fp32",
        "optimizer": "AdamW",
    }
    return results
