"""Where along the sampling trajectory a quantized file loses `agreement`: the quantized UNet for the first k (noisiest)
of the 20 sampling steps and the full-precision one after, scored as `studio bench quantize` scores the file.

k = 0 is the full-precision model itself, k = 20 the file as the bench scores it. What the evaluator reads that
changes between k and a larger k was decided in those steps. `size_changes` counts the samples whose object size
the evaluator reads differently, by direction (a quantization that shrinks or grows objects shows one direction).

Without `--artifact`, makes the bench's EfficientDM W4A8 file (`studio bench quantize`'s recipe) first.

Example:
    $ python benchmarks/quantize_by_step.py --output benchmarks/results/quantize-by-step.json
"""

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from studio import plugin
from studio.bench import quantize
from studio.cli import check_counts, print_result
from studio.errors import StudioError
from studio.eval import load_evaluator
from studio.pipeline import load

FIRST_QUANTIZED = (0, 1, 3, 6, 10, 20)


def switched_unet(pipe, artifact: Path, first_quantized: int) -> None:
    """Apply `artifact` to `pipe`, then route the UNet's calls to a full-precision copy once the sampler is past
    its first `first_quantized` steps (the quantizers' own hooks still run; their output is just not used)."""
    full_precision = load("toy").unet
    plugin.apply(pipe, artifact)
    pipe.scheduler.set_timesteps(quantize.SAMPLE_STEPS)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    last_quantized = timesteps[first_quantized - 1] if first_quantized else float("inf")
    quantized_forward = pipe.unet.forward

    def forward(sample, timestep, *args, **kwargs):
        t = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)
        chosen = quantized_forward if t >= last_quantized else full_precision.forward
        return chosen(sample, timestep, *args, **kwargs)

    pipe.unet.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=None, help="a quantized file (default: make the bench's W4A8 one)")
    parser.add_argument("--first-quantized", type=int, nargs="+", default=list(FIRST_QUANTIZED),
                        help="values of k (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=128, help="scored prompts (default 128, as the bench)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    try:
        check_counts(args, "--prompts")
        if any(not 0 <= k <= quantize.SAMPLE_STEPS for k in args.first_quantized):
            raise StudioError(f"--first-quantized {args.first_quantized}: each k must be in [0, {quantize.SAMPLE_STEPS}]")
        if args.artifact:
            method = next(iter(plugin.artifact_methods([args.artifact]).values()))
            if method not in quantize.ROWS:
                raise StudioError(f"--artifact {args.artifact}: a {method} file, not a quantized UNet "
                                  f"({', '.join(quantize.ROWS)}); make one with `studio quantize`")
    except StudioError as err:
        parser.error(str(err))
    reference = quantize.Reference(args.prompts, [0, 1], load_evaluator())  # the bench's prompts and seeds
    with tempfile.TemporaryDirectory(prefix="studio-quantize-by-step-") as folder:
        artifact = Path(args.artifact) if args.artifact else quantize.run("efficientdm", "w4a8", Path(folder))[0]
        rows = []
        for k in args.first_quantized:
            pipe = load("toy")
            switched_unet(pipe, artifact, k)
            measured, read = reference.compare_images(quantize.draw(pipe, reference.prompts, reference.seeds))
            rows.append({
                "first_quantized": k, **measured,
                "size_changes": dict(Counter(f"{s['size']} -> {r['size']}" for r, s in zip(read, reference.rows)
                                             if r["size"] != s["size"])),
            })
            print(rows[-1], flush=True)
    print_result({"by_first_quantized_steps": rows,
                  "protocol": {"artifact": str(args.artifact or "the bench's efficientdm w4a8 recipe"),
                               "prompts": args.prompts, "seeds": [0, 1], "sample_steps": quantize.SAMPLE_STEPS,
                               "guidance": quantize.GUIDANCE}}, args)


if __name__ == "__main__":
    main()
