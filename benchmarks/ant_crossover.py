"""Why ANT's all-three column misses: what its samples show instead of the concept they name.

`studio bench erase` counts an all-three sample as failed when it shows any of the three erased concepts. This
trains ANT on circle, red and striped at once with the bench's recipe, then for each concept draws the bench's kind
of prompts naming it (every other attribute named, never an erased value; 16 prompts x 2 seeds) and reports the
share of samples showing each erased concept, and the shapes and textures the evaluator reads. ANT's erase target is
the unconditional prediction, and the toy model's empty prompt draws a circle. One JSON object.

    python benchmarks/ant_crossover.py --output benchmarks/results/ant-crossover.json   # about 5 minutes on 2 cores

`--option KEY=VALUE` changes an ANT option of the recipe (e.g. `--option preserve_steps=15`: more early steps where
the guidance direction is kept); `any_erased_shown` is the share of all its samples showing any erased concept (the
bench's all-three erase_rate, on these prompts).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from personalize_sweep import parse_options

from studio import plugin
from studio.bench import with_method_options
from studio.bench.erase import CONCEPTS, RECIPES, concept_prompts, draw
from studio.cli import print_result
from studio.errors import StudioError
from studio.eval import load_evaluator, score
from studio.pipeline import load
from studio.trainers.base import TrainConfig, train

ERASED = ["circle", "red", "striped"]


def crossover(folder: Path, n_prompts: int = 16, seeds: tuple[int, ...] = (0, 1), options: dict | None = None) -> dict:
    """Per erased concept's prompts: the share of samples showing each erased concept, and what they show; with
    `options` over the recipe's ANT options."""
    trained = train(TrainConfig(method="ant", output_dir=str(folder / "ant"), validation_steps=0,
                                **with_method_options(RECIPES["ant"], {"concept": ERASED, **(options or {})})))
    pipe, evaluator = load("toy"), load_evaluator()
    plugin.apply(pipe, trained.artifact)
    result, shown = {}, []
    for i, concept in enumerate(ERASED):
        prompts = concept_prompts(concept, ERASED, n_prompts, seed=100 + i)
        rows = score(draw(pipe, prompts, list(seeds)), evaluator=evaluator).rows
        shown += [any(row[CONCEPTS[c]] == c for c in ERASED) for row in rows]
        result[concept] = {"example_prompts": prompts[:2],
                           "shows": {c: round(float(np.mean([row[CONCEPTS[c]] == c for row in rows])), 4) for c in ERASED},
                           "shapes": dict(Counter(row["shape"] for row in rows).most_common()),
                           "textures": dict(Counter(row["texture"] for row in rows).most_common())}
    result["any_erased_shown"] = round(float(np.mean(shown)), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an ANT option over the recipe's, converted to its type: preserve_steps=15")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    try:
        options = parse_options("ant", args.option + [f"concept={','.join(ERASED)}"])  # checked with the concepts
        options.pop("concept")
    except StudioError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory() as folder:
        result = {"erased": ERASED, "recipe": with_method_options(RECIPES["ant"], options),
                  "samples": "16 prompts x seeds 0, 1 per concept",
                  "by_prompts_naming": crossover(Path(folder), options=options)}
    print_result(result, args)


if __name__ == "__main__":
    main()
