"""One `studio bench personalize` run of one method with its recipe changed: the sweep behind RECIPES.

The recipe is chosen on other seeds than those scored: by default this trains with seeds 100 and 101
(`--train-seeds`) and samples from seed 1000 on (`--sample-seed-offset`), while `studio bench personalize`
scores training seeds 0 and 1 on sampling seeds from 0. Prints one JSON line (the method's result, with
its 95% intervals and per-seed values, plus what was changed); the lines measured so far are kept in
benchmarks/results/personalize-sweep.jsonl (lines without `train_seeds` were measured on 1 training seed,
0, and sampling seeds 0-7: seeds the scored run uses).

Knobs to try for OFT and BOFT (any field of the method's config works with --option, converted to its type):
    --steps 2000                                 more steps (the recipe has 1000)
    --option coft=true --option eps=1e-3         OFT: COFT's constraint and its radius (default eps 6e-5)
    --option block_size=16                       OFT (default 32) or BOFT (default 8): the block size
    --option n_butterfly_factor=3                BOFT: butterfly factors (default 2)

Examples:
    $ python benchmarks/personalize_sweep.py sara --learning-rate 3e-3 --option fraction=0.2
    $ python benchmarks/personalize_sweep.py oft --learning-rate 5e-4 --steps 2000 --option coft=true \\
        --option eps=1e-3 >> benchmarks/results/personalize-sweep.jsonl
"""

import argparse
import json
import sys

from studio import registry
from studio.bench import personalize
from studio.errors import StudioError

SWEEP_TRAIN_SEEDS = [100, 101]
SWEEP_SAMPLE_SEED_OFFSET = 1000


def parse_options(method: str, pairs: list[str]) -> dict:
    """`KEY=VALUE` strings as the method's option values, each converted to its config field's type.

    Example:
        >>> parse_options("oft", ["coft=true", "eps=1e-3", "block_size=16"])
        {'coft': True, 'eps': 0.001, 'block_size': 16}
    """
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StudioError(f"--option {pair!r} is not KEY=VALUE (e.g. --option block_size=16)")
        if key in raw:
            raise StudioError(f"--option {key} given twice ({raw[key]!r} and {value!r}); give it once")
        raw[key] = value.strip()
    config = registry.get(method).config(raw)  # unknown keys and bad values raise, naming them
    return {key: getattr(config, key) for key in raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a key of RECIPES: " + ", ".join(personalize.RECIPES))
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps (the recipe's: 1000)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, converted to its type: coft=true, eps=1e-3, block_size=16")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=SWEEP_TRAIN_SEEDS,
                        help="training seeds (default 100 101: not the scored run's 0 1)")
    parser.add_argument("--sample-seed-offset", type=int, default=SWEEP_SAMPLE_SEED_OFFSET,
                        help="first sampling seed (default 1000: not the scored run's 0..63)")
    parser.add_argument("--seeds", type=int, default=personalize.N_SEEDS, help="sampling seeds per colour (default 64)")
    parser.add_argument("--preservation-prompts", type=int, default=100)
    args = parser.parse_args()
    if args.method not in personalize.RECIPES:
        parser.error(f"unknown method {args.method!r}; choose one of {', '.join(personalize.RECIPES)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: need at least 1 training step")
    recipe = dict(personalize.RECIPES[args.method])
    try:
        options = parse_options(recipe.get("method", args.method), args.option)
    except StudioError as err:
        parser.error(str(err))
    scored = sorted(set(args.train_seeds) & set(personalize.TRAIN_SEEDS))
    if scored:
        print(f"warning: training seeds {scored} are the scored run's; the recipe should be chosen on others",
              file=sys.stderr)
    if args.sample_seed_offset < personalize.N_SEEDS:
        print(f"warning: sampling seeds from {args.sample_seed_offset} overlap the scored run's 0..{personalize.N_SEEDS - 1}",
              file=sys.stderr)
    recipe["method_options"] = {**recipe["method_options"], **options}
    if args.learning_rate is not None:
        recipe["learning_rate"] = args.learning_rate
    personalize.RECIPES[args.method] = recipe
    try:
        result = personalize.personalize([args.method], n_preservation=args.preservation_prompts, n_seeds=args.seeds,
                                         steps=args.steps, train_seeds=args.train_seeds,
                                         sample_seed_offset=args.sample_seed_offset)
    except StudioError as err:
        parser.error(str(err))
    changed = {"learning_rate": recipe["learning_rate"], **({"max_train_steps": args.steps} if args.steps else {}), **options}
    base = result["base"]
    print(json.dumps({"method": args.method, "changed": changed, **result[args.method],
                      "sample_seeds": base["sample_seeds"], "n_token_samples": base["n_token_samples"],
                      "n_composition_samples": base["n_composition_samples"]}))


if __name__ == "__main__":
    main()
