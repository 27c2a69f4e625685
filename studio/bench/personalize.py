"""`studio bench personalize`: teach the toy model a shape it never saw, with each adapter method.

Protocol (the same for every method):
- Data: 8 renders of the held-out star in four colours, captioned "a {colour} sks"
  (`DATA`), with prior preservation on renders of the seen shapes (`PRIOR_DATA`);
  each method trains with its own defaults on the same layers (`RECIPES`, with
  a learning rate per method), the same batch size and steps.
- `fidelity`: share of "a {colour} sks" samples, colours seen in training,
  that the evaluator reads as a star.
- `composition`: the same with the two colours never seen with the token;
  `composition_color` is the share of those drawn in the asked colour.
- `preservation`: evaluator accuracy (mean over shape, colour, texture,
  position) on fully specified base prompts without the token, adapter
  applied, minus the base model's on the same prompts and seeds.
- `trainable_params`, `train_seconds` from the run's summary.

An entry is a method name, or a variant of one named in `RECIPES` with its
`method`: `lora-te` is the LoRA recipe with the text encoder trained too
(`--train-text-encoder`), to see whether that raises composition.

Example:
    $ studio bench personalize --json --output benchmarks/results/personalize.json
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from studio import plugin, registry
from studio.eval import load_evaluator, score
from studio.pipeline import load
from studio.sample import SampleSettings, generate
from studio.toy.report import seen_prompt_set

TRAIN_COLORS = ("red", "green", "blue", "yellow")
NOVEL_COLORS = ("orange", "purple")
TOKEN = "sks"
DATA = f"shapesworld:shape=star,count=8,colors={'|'.join(TRAIN_COLORS)},caption=a {{color}} {TOKEN},seed=0"
ATTRIBUTES = ("shape", "color", "texture", "position")

PRIOR_DATA = "shapesworld:shape=seen,count=120,caption={caption},seed=1"

# Every method trains the same layers: attention, the transformer's projections
# and feed-forward, and the ResNet convolutions. A new shape is drawn by the
# convolutions: attention-only LoRA reached fidelity 0.66 (preservation -0.19)
# without prior preservation and 0.13 with it, at 1000 steps. Everything else
# is the method's own default config, with prior preservation on the seen
# shapes (DreamBooth's remedy for the drift that costs preservation).
# Learning rates, measured with these settings (fidelity / preservation):
#   OFT   2e-3: 0.44 / -0.088   1e-3: 0.50 / -0.058   5e-4: 0.72 / -0.038
#         3.5e-4: 0.72 / +0.005   2.5e-4: 0.78 / +0.000   1.25e-4: 0.41 / +0.003
#   BOFT  3e-3: 0.53 / -0.080   1e-3: 0.63 / -0.010   5e-4: 0.75 / +0.005   2.5e-4: 0.41 / +0.003
#   SaRA  (fraction 0.1) 1e-3: 0.38 / +0.005   3e-3: 0.66 / -0.008   6e-3: 0.66 / -0.040
#         (fraction 0.2) 3e-3: 0.84 / -0.023
#   LoRA  1e-3: 0.84 / +0.003
# (the rows from 2026-11-23 on: benchmarks/personalize_sweep.py, kept in
# benchmarks/results/personalize-sweep.jsonl)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
RECIPES: dict[str, dict] = {
    "lora": {"learning_rate": 1e-3, "method_options": {"rank": 8, "alpha": 8.0, "target_modules": TARGETS}},
    "oft": {"learning_rate": 2.5e-4, "method_options": {"target_modules": TARGETS}},
    "boft": {"learning_rate": 5e-4, "method_options": {"target_modules": TARGETS}},
    "sara": {"learning_rate": 3e-3, "method_options": {"fraction": 0.2, "target_modules": TARGETS}},
}
# LoRA with text-encoder LoRA too (not in the default list); the text encoder at half the UNet's rate, kohya's usual ratio.
RECIPES["lora-te"] = {**RECIPES["lora"], "method": "lora", "train_text_encoder": True, "text_encoder_lr": 5e-4}
SHARED = {"max_train_steps": 1000, "train_batch_size": 4, "seed": 0, "prior_data": PRIOR_DATA, "prior_loss_weight": 1.0}


def _accuracy(pipe, prompts: list[str], expected: list[dict], seeds: list[int], evaluator) -> float:
    settings = SampleSettings(prompts=prompts, seeds=seeds, steps=20, guidance_scale=5.0, batch_size=50)
    images = generate(pipe, settings, progress=False)
    table = score(images, [e for e in expected for _ in seeds], evaluator)
    accuracy = table.accuracy()
    return float(np.mean([accuracy[a] for a in ATTRIBUTES]))


def token_scores(pipe, colors: tuple[str, ...], seeds: list[int], evaluator) -> tuple[float, float]:
    """(share of stars, share in the asked colour) over "a {colour} sks" for each colour and seed."""
    prompts = [f"a {color} {TOKEN}" for color in colors]
    settings = SampleSettings(prompts=prompts, seeds=seeds, steps=20, guidance_scale=5.0, batch_size=50)
    table = score(generate(pipe, settings, progress=False), evaluator=evaluator)
    wanted = [color for color in colors for _ in seeds]
    stars = np.mean([row["shape"] == "star" for row in table.rows])
    colored = np.mean([row["color"] == want for row, want in zip(table.rows, wanted)])
    return float(stars), float(colored)


def personalize(
    methods: list[str] | None = None,
    n_preservation: int = 100,
    n_seeds: int = 8,
    work_dir: str | Path | None = None,
    steps: int | None = None,
) -> dict:
    """Train each method on the star set and measure it; one dict keyed by method name.

    Example:
        >>> personalize(["lora"], n_preservation=4, n_seeds=1, steps=2)["lora"]["trainable_params"] > 0  # doctest: +SKIP
        True
    """
    from studio.trainers.base import TrainConfig, train

    methods = methods or [name for name, m in registry.METHODS.items() if m.kind == "adapter"]
    for name in methods:
        registry.get(RECIPES.get(name, {}).get("method", name))
    keep = work_dir is not None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="studio-bench-"))
    evaluator = load_evaluator()
    seeds = list(range(n_seeds))
    prompts, expected = seen_prompt_set(n_preservation, seed=1)
    pipe = load("toy", device="cpu", dtype="fp32")
    base_accuracy = _accuracy(pipe, prompts, expected, [0], evaluator)
    base_stars, _ = token_scores(pipe, TRAIN_COLORS, seeds, evaluator)
    results: dict = {}
    try:
        for name in methods:
            options = {"method": name, **SHARED, **RECIPES.get(name, {})}
            if steps is not None:
                options["max_train_steps"] = steps
            run = train(TrainConfig(data=DATA, output_dir=str(work_dir / name), **options))
            plugin.apply(pipe, run.artifact, name=name)
            fidelity, fidelity_color = token_scores(pipe, TRAIN_COLORS, seeds, evaluator)
            composition, composition_color = token_scores(pipe, NOVEL_COLORS, seeds, evaluator)
            accuracy = _accuracy(pipe, prompts, expected, [0], evaluator)
            plugin.remove(pipe, name)
            results[name] = {
                "fidelity": round(fidelity, 4),
                "fidelity_color": round(fidelity_color, 4),
                "composition": round(composition, 4),
                "composition_color": round(composition_color, 4),
                "preservation": round(accuracy - base_accuracy, 4),
                "trainable_params": run.trainable_params,
                "train_seconds": round(run.seconds, 1),
                "learning_rate": options["learning_rate"],
                **({"text_encoder_lr": options["text_encoder_lr"]} if options.get("train_text_encoder") else {}),
                "max_train_steps": options["max_train_steps"],
                "method_options": options.get("method_options", {}),
            }
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["base"] = {
        "fidelity": round(base_stars, 4),
        "accuracy": round(base_accuracy, 4),
        "n_preservation": n_preservation,
        "n_token_samples": n_seeds * len(TRAIN_COLORS),
        "data": DATA,
    }
    return results
