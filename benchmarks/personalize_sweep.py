"""One `studio bench personalize` run of one method with its recipe changed: the sweep behind RECIPES.

Prints one JSON line (the method's result plus what was changed); the lines measured so far are
kept in benchmarks/results/personalize-sweep.jsonl.

Example:
    $ python benchmarks/personalize_sweep.py sara --learning-rate 3e-3 --option fraction=0.2
"""

import argparse
import json

from studio.bench import personalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option (a number)")
    args = parser.parse_args()
    recipe = dict(personalize.RECIPES[args.method])
    options = {key: float(value) for key, value in (o.split("=", 1) for o in args.option)}
    recipe["method_options"] = {**recipe["method_options"], **options}
    if args.learning_rate is not None:
        recipe["learning_rate"] = args.learning_rate
    personalize.RECIPES[args.method] = recipe
    result = personalize.personalize([args.method])[args.method]
    print(json.dumps({"method": args.method, "changed": {"learning_rate": recipe["learning_rate"], **options}, **result}))


if __name__ == "__main__":
    main()
