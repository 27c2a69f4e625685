"""ANT on the toy model: where erasing "circle" starts, and what it costs the other prompts.

`studio bench erase` runs ANT with one recipe (the paper's 250 iterations and t' = 43 of 50, at the toy learning rate)
and finds it erases little of "circle" while losing a quarter of the other prompts' attributes. This sweeps the
options ANT has for that trade-off, with `--learning-rate` and the method's own `--preserve-steps` (how many of the
first DDIM steps keep the guidance direction) and `--saliency` (the share of each weight the mask lets train), and
scores each run with the bench's quick check (`studio.bench.erase.quick_check`: 32 prompts naming circle, 32 naming
none of it, one seed). One JSON object: per run its options, the share of circle prompts still drawing a circle
before and after, and the preservation (attribute accuracy on the other prompts, minus the unedited model's).

    python benchmarks/ant_tradeoff.py --output benchmarks/results/ant-tradeoff.json   # about 20 minutes on 2 cores
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
                                    **RECIPES["ant"]))
        checked = quick_check(trained.artifact, ["circle"])
        results.append({"learning_rate": learning_rate or "toy", **options, "circle_before": checked["before"]["circle"],
                        "circle_after": checked["after"]["circle"], "preservation": checked["preservation"],
                        "seconds": round(time.time() - started)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the JSON here")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = {"concept": "circle", "max_train_steps": RECIPES["ant"]["max_train_steps"],
                  "check": "quick_check: 32 prompts naming circle, 32 naming none of it, seed 0", "runs": sweep(Path(folder))}
    print_result(result, args)


if __name__ == "__main__":
    main()
