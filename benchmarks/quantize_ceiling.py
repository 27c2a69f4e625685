"""How far each half of a W4A8 toy UNet's error goes: its samples with only the weights quantized, with only the
activations quantized, and with only the body layers' activations (the 8-bit input/output convs and time
embeddings left in full precision), scored as `studio bench quantize` scores them.

Makes a PTQ and an EfficientDM W4A8 file of the toy model (`studio bench quantize`'s recipes), applies each, and
switches one half of it off: "weights only" drops the input quantizers, "activations only" puts the full-precision
weights back under the file's input quantizers. If "activations only" stays below a goal, no change to the weights
(a LoRA) can reach it.

Example:
    $ python benchmarks/quantize_ceiling.py --output benchmarks/results/quantize-ceiling.json
"""

import argparse
import tempfile
from pathlib import Path

from studio import plugin
from studio.bench import quantize
from studio.cli import check_counts, print_result
from studio.errors import StudioError
from studio.eval import load_evaluator
from studio.pipeline import load
from studio.quantize import layer_roles


def variants(artifact: Path, reference: quantize.Reference) -> dict:
    """The file as made, weights only, activations only, and body activations only: agreement and PSNR each."""
    result = {}
    for variant in ("as made", "weights only", "activations only", "body activations only"):
        pipe = load("toy")
        plugin.apply(pipe, artifact)
        attachment = plugin.attachments(pipe)[0]
        roles = layer_roles(pipe.unet)
        if variant in ("activations only", "body activations only"):
            attachment._write(quantized=False)  # full-precision weights under the input quantizers
        for name, handle in zip(list(attachment.entries), list(attachment.handles)):
            if variant == "weights only" or (variant == "body activations only" and roles[name] == "edge"):
                handle.remove()
        measured = reference.compare(pipe)
        result[variant] = {k: measured[k] for k in ("agreement", "agreement_ci", "psnr")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128, help="scored prompts (the bench's 128)")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt (the bench's 2)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.set_defaults(json=True)
    args = parser.parse_args()
    try:
        check_counts(args, "--prompts", "--seeds")
    except StudioError as err:
        parser.error(str(err))
    reference = quantize.Reference(args.prompts, list(range(args.seeds)), load_evaluator())
    result = {}
    with tempfile.TemporaryDirectory(prefix="studio-quantize-ceiling-") as folder:
        for method in ("ptq", "efficientdm"):
            artifact, _ = quantize.run(method, "w4a8", Path(folder))
            result[method] = variants(artifact, reference)
    result["protocol"] = {"bits": "w4a8", "prompts": args.prompts, "seeds": args.seeds,
                          "recipes": quantize.RECIPES}
    print_result(result, args)


if __name__ == "__main__":
    main()
