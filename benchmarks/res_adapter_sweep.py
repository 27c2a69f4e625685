"""One ResAdapter run with its recipe changed, scored as `studio bench adapters` scores it: the sweep behind
`studio.bench.adapters.RES_RECIPE`.

The recipe is chosen on other texts than those the bench scores (`--text-seed`, default 900; the bench's is
20003). Prints one JSON line: the bench's `res-adapter` result (every size, base and with the adapter, and
`native_agreement`) plus what was changed. Lines measured so far: benchmarks/results/res-adapter-sweep.jsonl.

Example:
    $ python benchmarks/res_adapter_sweep.py --caption-dropout 0.1 >> benchmarks/results/res-adapter-sweep.jsonl
"""

import argparse
import json
import tempfile
from pathlib import Path

from studio.bench import adapters
from studio.cli import check_counts
from studio.errors import StudioError
from studio.options import check_options
from studio.trainers.base import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The loop's own flag names (as `studio train`), so a bad value's message names what was typed.
    parser.add_argument("--max-train-steps", type=int, default=None, help="training steps (the recipe's: 3000)")
    parser.add_argument("--train-batch-size", type=int, default=None, help="images per step (the recipe's: 16)")
    parser.add_argument("--learning-rate", type=float, default=None, help="(the recipe's: 2e-4)")
    parser.add_argument("--caption-dropout", type=float, default=None, help="share of empty captions (the recipe's: 0)")
    parser.add_argument("--data", default=None, help="the training data spec (the recipe's: 14 sizes and aspects)")
    parser.add_argument("--references", type=int, default=64, help="scored texts (default 64; the bench's 128)")
    parser.add_argument("--text-seed", type=int, default=900, help="seed drawing them (the bench's is 20003)")
    parser.add_argument("--train-seed", type=int, default=0)
    args = parser.parse_args()
    changed = {key: value for key, value in (("max_train_steps", args.max_train_steps), ("train_batch_size", args.train_batch_size),
                                             ("learning_rate", args.learning_rate),
                                             ("caption_dropout", args.caption_dropout), ("data", args.data))
               if value is not None}
    recipe = {**adapters.RES_RECIPE, **changed}
    try:  # before the minutes of drawing the base model's samples
        check_counts(args, "--references")
        check_options(TrainConfig(method="res-adapter", **recipe))
    except StudioError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory(prefix="studio-res-sweep-") as folder:
        result = adapters.res_adapter(args.references, args.train_seed, None, Path(folder), recipe=recipe,
                                      text_seed=args.text_seed)
    sizes = {size: {key: row[key]["value"] if isinstance(row[key], dict) else row[key] for key in row}
             for size, row in result.pop("sizes").items()}
    print(json.dumps({"changed": changed, "sizes": sizes, **result}), flush=True)


if __name__ == "__main__":
    main()
