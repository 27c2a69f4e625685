"""ANT's multi-concept path on the toy model: how its closed-form refinement trades erasure for the other prompts.

Several concepts at once train a LoRA per concept and fuse them into the cross-attention keys and values in closed
form (`studio.adapters.ant.refine`): the projections send each concept's prompt tokens where its LoRA, scaled by
`--fuse-scale`, sends them, and the kept prompts' tokens (weighted by `--preserve-scale`) where the original does.
This trains the three bench concepts (circle, red, striped; the bench's 250 steps) once per `--preserve-scale` and
scores the file with the bench's quick check (`studio.bench.erase.quick_check`: 32 prompts naming each concept, 32
naming none, one seed) at several fuse scales. The refined change is linear in the fuse scale, so the file trained
at the reference's 4.3 applied at plugin scale s is exactly the file refined at fuse scale 4.3 s: one training per
preserve scale serves every fuse scale. One JSON object: per run the options, each concept's share still drawn, and
the preservation (attribute accuracy on the other prompts, minus the unedited model's).

    python benchmarks/ant_multi_tradeoff.py --output benchmarks/results/ant-multi-tradeoff.json   # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from studio.bench.erase import RECIPES, quick_check
from studio.cli import print_result
from studio.trainers.base import TrainConfig, train

CONCEPTS = ["circle", "red", "striped"]
TRAINED_FUSE_SCALE = 4.3  # the reference's; the others are this file at a plugin scale
PRESERVE_SCALES = [0.1, 1.0, 10.0, 30.0]
FUSE_SCALES = [4.3, 3.0, 2.15, 1.0]


def sweep(folder: Path) -> list[dict]:
    """Train once per preserve scale, check at every fuse scale; one dict per (preserve scale, fuse scale)."""
    results = []
    for preserve_scale in PRESERVE_SCALES:
        trained = train(TrainConfig(method="ant", output_dir=str(folder / f"preserve-{preserve_scale}"), validation_steps=0,
                                    method_options={"concept": CONCEPTS, "preserve_scale": preserve_scale,
                                                    "fuse_scale": TRAINED_FUSE_SCALE}, **RECIPES["ant"]))
        for fuse_scale in FUSE_SCALES:
            checked = quick_check(trained.artifact, CONCEPTS, scale=fuse_scale / TRAINED_FUSE_SCALE)
            results.append({"preserve_scale": preserve_scale, "fuse_scale": fuse_scale, "still_drawn": checked["after"],
                            "before": checked["before"], "preservation": checked["preservation"]})
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the JSON here")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = {"concepts": CONCEPTS, "max_train_steps": RECIPES["ant"]["max_train_steps"],
                  "check": "quick_check: 32 prompts naming each concept, 32 naming none of them, seed 0",
                  "runs": sweep(Path(folder))}
    print_result(result, args)


if __name__ == "__main__":
    main()
