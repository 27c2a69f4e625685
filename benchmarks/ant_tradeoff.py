"""ANT on the toy model: where erasing "circle" starts, and what it costs the other prompts (`--multi`: the
multi-concept path's refinement weights).

`studio bench erase` runs ANT with one recipe (the paper's 250 iterations and t' = 43 of 50, at the toy learning rate)
and finds it erases little of "circle" while losing a quarter of the other prompts' attributes. This sweeps the
options ANT has for that trade-off, with `--learning-rate` and the method's own `--preserve-steps` (how many of the
first DDIM steps keep the guidance direction) and `--saliency` (the share of each weight the mask lets train), and
scores each run with the bench's quick check (`studio.bench.erase.quick_check`: 32 prompts naming circle, 32 naming
none of it, one seed). One JSON object: per run its options, the share of circle prompts still drawing a circle
before and after, and the preservation (attribute accuracy on the other prompts, minus the unedited model's).

    python benchmarks/ant_tradeoff.py --output benchmarks/results/ant-tradeoff.json   # about 20 minutes on 2 cores

With `--multi`, the multi-concept path instead: circle, red and striped erased at once (a LoRA per concept, fused
into the cross-attention keys and values in closed form, `studio.adapters.ant.refine`: the projections send each
concept's prompt tokens where its LoRA, scaled by `--fuse-scale`, sends them, and the kept prompts' tokens, weighted
by `--preserve-scale`, where the original does). It trains once per preserve scale and checks the file at several
fuse scales: the refined change is linear in the fuse scale, so the file refined at the reference's 4.3 applied at
plugin scale s is exactly the file refined at 4.3 s. Per run the options, each concept's share still drawn, and the
preservation.

    python benchmarks/ant_tradeoff.py --multi --output benchmarks/results/ant-multi-tradeoff.json   # about 30 minutes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from studio.bench.erase import RECIPES, quick_check
from studio.cli import print_result
from studio.trainers.base import TrainConfig, train

# (learning rate (None: the toy rate), method options); the bench's recipe first.
RUNS = [
    (None, {"preserve_steps": 7}),
    (None, {"preserve_steps": 2}),
    (None, {"preserve_steps": 0}),
    (5e-4, {"preserve_steps": 0}),
    (None, {"preserve_steps": 0, "saliency": 0.1}),
]


def sweep(folder: Path) -> list[dict]:
    """Train and check every run of `RUNS` on "circle"; one dict per run."""
    results = []
    for i, (learning_rate, options) in enumerate(RUNS):
        started = time.time()
        trained = train(TrainConfig(method="ant", output_dir=str(folder / f"run-{i}"), validation_steps=0,
                                    learning_rate=learning_rate, method_options={"concept": ["circle"], **options},
                                    max_train_steps=RECIPES["ant"]["max_train_steps"]))
        checked = quick_check(trained.artifact, ["circle"])
        results.append({"learning_rate": learning_rate or "toy", **options, "circle_before": checked["before"]["circle"],
                        "circle_after": checked["after"]["circle"], "preservation": checked["preservation"],
                        "seconds": round(time.time() - started)})
        print(json.dumps(results[-1]), flush=True)
    return results


CONCEPTS = ["circle", "red", "striped"]  # --multi
TRAINED_FUSE_SCALE = 4.3  # the reference's; the other fuse scales are this file at a plugin scale
PRESERVE_SCALES = [0.1, 1.0, 10.0, 30.0]
FUSE_SCALES = [4.3, 3.0, 2.15, 1.0]


def sweep_multi(folder: Path) -> list[dict]:
    """Erase `CONCEPTS` at once, trained once per preserve scale and checked at every fuse scale; one dict per
    (preserve scale, fuse scale)."""
    results = []
    for preserve_scale in PRESERVE_SCALES:
        trained = train(TrainConfig(method="ant", output_dir=str(folder / f"preserve-{preserve_scale}"), validation_steps=0,
                                    method_options={"concept": CONCEPTS, "preserve_scale": preserve_scale,
                                                    "fuse_scale": TRAINED_FUSE_SCALE}, max_train_steps=RECIPES["ant"]["max_train_steps"]))
        for fuse_scale in FUSE_SCALES:
            checked = quick_check(trained.artifact, CONCEPTS, scale=fuse_scale / TRAINED_FUSE_SCALE)
            results.append({"preserve_scale": preserve_scale, "fuse_scale": fuse_scale, "still_drawn": checked["after"],
                            "before": checked["before"], "preservation": checked["preservation"]})
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi", action="store_true", help="the multi-concept path's refinement weights instead")
    parser.add_argument("--output", help="also write the JSON here")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.multi:
            result = {"concepts": CONCEPTS, "max_train_steps": RECIPES["ant"]["max_train_steps"],
                      "check": "quick_check: 32 prompts naming each concept, 32 naming none of them, seed 0",
                      "runs": sweep_multi(Path(folder))}
        else:
            result = {"concept": "circle", "max_train_steps": RECIPES["ant"]["max_train_steps"],
                      "check": "quick_check: 32 prompts naming circle, 32 naming none of it, seed 0",
                      "runs": sweep(Path(folder))}
    print_result(result, args)


if __name__ == "__main__":
    main()
