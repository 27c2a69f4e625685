"""Merge `studio bench personalize` results of single methods, run side by side, into one file.

Each method's training and scoring are independent of the others (same data, same seeds), so runs of
`--methods oft` and `--methods boft` in two processes give what one `--methods oft boft` run gives, in half
the time on two cores. This checks that every part was measured alike (the `base` blocks, which hold the
model's own scores, seeds and sample counts, must be identical) and writes the union.

Example:
    $ OMP_NUM_THREADS=1 studio bench personalize --methods oft --json --output /tmp/oft.json &
    $ OMP_NUM_THREADS=1 studio bench personalize --methods boft --json --output /tmp/boft.json
    $ python benchmarks/merge_personalize.py /tmp/oft.json /tmp/boft.json --output benchmarks/results/personalize.json
"""

import argparse
import json
import sys
from pathlib import Path


def merge(parts: list[dict], replace: bool = False) -> dict:
    """The union of the parts' methods, with their one shared `base` block; with `replace`, a method in a later part
    replaces the same method in an earlier one (a recipe re-scored), else a method in two parts is an error.

    Example:
        >>> merge([{"oft": {"fidelity": 0.9}, "base": {"n": 1}}, {"boft": {"fidelity": 0.8}, "base": {"n": 1}}])
        {'oft': {'fidelity': 0.9}, 'boft': {'fidelity': 0.8}, 'base': {'n': 1}}
    """
    bases = [part["base"] for part in parts]
    if any(base != bases[0] for base in bases):
        raise SystemExit("error: the parts were not measured alike (their `base` blocks differ); re-run them with "
                         "the same --train-seeds, --seeds, --sample-seed-offset and --preservation-prompts")
    merged: dict = {}
    for part in parts:
        for name, result in part.items():
            if name != "base":
                if name in merged and not replace:
                    raise SystemExit(f"error: {name} is in two parts; keep one, or pass --replace to keep the later")
                merged[name] = result
    return {**merged, "base": bases[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="JSON files written by studio bench personalize --output")
    parser.add_argument("--output", required=True)
    parser.add_argument("--replace", action="store_true", help="a method in a later part replaces it in an earlier one")
    args = parser.parse_args()
    missing = [p for p in args.parts if not Path(p).is_file()]
    if missing:
        sys.exit(f"error: not found: {', '.join(missing)}")
    result = merge([json.loads(Path(p).read_text()) for p in args.parts], replace=args.replace)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}: {', '.join(k for k in result if k != 'base')}")


if __name__ == "__main__":
    main()
