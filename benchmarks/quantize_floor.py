"""How much `agreement` a perturbation of a given size costs, whatever made it: the full-precision toy UNet with seeded
Gaussian noise on its weights, scored as `studio bench quantize` scores a quantized file (same prompts, seeds and
evaluator).

Each Conv2d and Linear weight of the UNet (the layers a quantized file replaces) gets noise of `sigma` times its
output channel's standard deviation, one seed per level. A quantized file's `psnr` placed on this curve says how
much agreement any change of that size loses: where random noise at the same PSNR agrees on less than a goal, the
goal asks for a closer copy of the full-precision samples, not for better attributes.

Example:
    $ python benchmarks/quantize_floor.py --output benchmarks/results/quantize-floor.json
"""

import argparse

import torch
from torch import nn

from studio.bench import quantize
from studio.cli import check_counts, print_result
from studio.errors import StudioError
from studio.eval import load_evaluator
from studio.pipeline import load

SIGMAS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24)


@torch.no_grad()
def add_weight_noise(unet: nn.Module, sigma: float, seed: int) -> None:
    """Add `sigma` x (the output channel's standard deviation) x N(0, 1) to every Conv2d/Linear weight of `unet`."""
    generator = torch.Generator().manual_seed(seed)
    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            spread = weight.flatten(1).std(dim=1).view(-1, *([1] * (weight.dim() - 1)))
            weight += sigma * spread * torch.randn(weight.shape, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS),
                        help="relative noise levels (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=128, help="scored prompts (default 128, as the bench)")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed (level i uses seed + i)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    try:
        check_counts(args, "--prompts")
        if any(not 0 < s <= 1 for s in args.sigmas):
            raise StudioError(f"--sigmas {args.sigmas}: each level must be in (0, 1]")
    except StudioError as err:
        parser.error(str(err))
    reference = quantize.Reference(args.prompts, [0, 1], load_evaluator())  # the bench's prompts and seeds
    levels = []
    for i, sigma in enumerate(args.sigmas):
        pipe = load("toy")
        add_weight_noise(pipe.unet, sigma, args.seed + i)
        levels.append({"sigma": sigma, **reference.compare(pipe)})
        print(levels[-1], flush=True)
    print_result({"levels": levels, "protocol": {"prompts": args.prompts, "seeds": [0, 1],
                                                 "sample_steps": quantize.SAMPLE_STEPS, "guidance": quantize.GUIDANCE,
                                                 "noise_seed": args.seed}},
                 args)


if __name__ == "__main__":
    main()
