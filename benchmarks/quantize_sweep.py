"""One quantization run with its recipe changed, scored as `studio bench quantize` scores: the sweep behind RECIPES.

The recipe is chosen on other prompts and seeds than those scored: this scores 128 prompts drawn with seed 900
(`--prompt-seed`) on sampling seeds 1000 and 1001 (`--seeds`), while `studio bench quantize` scores prompts drawn
with seed 500 on sampling seeds 0 and 1. Prints one JSON line (the run's metrics plus what was changed); the lines
measured so far are kept in benchmarks/results/quantize-sweep.jsonl (lines without `lr_scheduler` ran at a
constant rate, then the only one).

Knobs (any field of the method's config works with --option, converted to its type):
    --steps 3200                      more distillation steps (the recipe has 1600)
    --batch-size 16                   (trajectory, step) pairs per step (default 4)
    --learning-rate 1e-4              the LoRA's average rate (EfficientDM's toy default 3e-4)
    --lr-scheduler constant           the rate's schedule (default linear; lines before it was added: constant)
    --option trajectories=256         more teacher trajectories (default 64)
    --option act_step_lr=1e-4         the activation steps' rate (the method's default 5e-4; the bench's recipe 2e-3)

Example:
    $ python benchmarks/quantize_sweep.py efficientdm --bits w4a4 --option act_step_lr=5e-3 \\
        >> benchmarks/results/quantize-sweep.jsonl
"""

import argparse
import json
import tempfile
from pathlib import Path

from personalize_sweep import parse_options

from studio import registry
from studio.bench import quantize
from studio.cli import check_counts
from studio.errors import StudioError
from studio.eval import load_evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=quantize.ROWS)
    parser.add_argument("--bits", default="w4a8", choices=quantize.COLUMNS)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (EfficientDM's recipe: 1600)")
    parser.add_argument("--batch-size", type=int, default=None, help="(trajectory, step) pairs per step (default 4)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--lr-scheduler", choices=("constant", "linear", "cosine"), default=None,
                        help="the rate's schedule (the method's default: linear for EfficientDM and QAT)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, converted to its type: trajectories=256, act_step_lr=1e-4")
    parser.add_argument("--prompts", type=int, default=128, help="scored prompts (default 128)")
    parser.add_argument("--prompt-seed", type=int, default=900, help="seed drawing them (the bench's is 500)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001],
                        help="sampling seeds (default 1000 1001; the bench's are 0 1)")
    args = parser.parse_args()
    try:
        check_counts(args, "--steps", "--batch-size", "--prompts")
        options = parse_options(args.method, args.option)
    except StudioError as err:
        parser.error(str(err))
    loop = {}  # what changes from the recipe
    if args.steps is not None:
        loop["max_train_steps"] = args.steps
    if args.batch_size is not None:
        loop["train_batch_size"] = args.batch_size
    if args.learning_rate is not None:
        loop["learning_rate"] = args.learning_rate
    if args.lr_scheduler is not None:
        loop["lr_scheduler"] = args.lr_scheduler
    reference = quantize.Reference(args.prompts, args.seeds, load_evaluator(), prompt_seed=args.prompt_seed)
    with tempfile.TemporaryDirectory(prefix="studio-quantize-sweep-") as folder:
        artifact, seconds = quantize.run(args.method, args.bits, Path(folder), method_options=options, **loop)
        measured = quantize.measure(artifact, reference)
    print(json.dumps({"method": args.method, "bits": args.bits,
                      "changed": recipe_with(args.method, {**loop, **options}),
                      "lr_scheduler": loop.get("lr_scheduler", registry.get(args.method).trainer.lr_scheduler),
                      **measured, "seconds": round(seconds, 1), "prompt_seed": args.prompt_seed,
                      "seeds": args.seeds, "device": device_name()}), flush=True)


def recipe_with(method: str, changes: dict) -> dict:
    """The run's recipe, flat: the bench's `RECIPES` entry (its loop and method options) with `changes` over it."""
    recipe = dict(quantize.RECIPES.get(method, {}))
    return {**recipe.pop("method_options", {}), **recipe, **changes}


def device_name() -> str:
    """Where the run trained and sampled (`studio.pipeline.pick_device`'s choice): lines from a GPU are comparable
    with each other, not with the CPU's, since each device draws its own noise from a seed."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
