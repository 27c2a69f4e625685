"""Where a W8A8 toy UNet's error comes from: its noise prediction with only one group of layers' inputs quantized
(weights in full precision), and with only the weights quantized, against the full-precision UNet.

Makes a PTQ W8A8 file of the toy model (`studio quantize --method ptq --bits w8a8`'s code), applies it, then per
group switches the activation quantization on for that group's layers alone and reports the relative error
‖ε − ε_fp‖ / ‖ε_fp‖ at three timesteps for two prompts.

Example:
    $ python benchmarks/quantize_sensitivity.py --output benchmarks/results/quantize-sensitivity.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from studio import plugin
from studio.pipeline import load
from studio.trainers.base import TrainConfig, train

GROUPS = {
    "cross-attention keys/values (text)": lambda n: "attn2.to_k" in n or "attn2.to_v" in n,
    "time embeddings": lambda n: "time_emb" in n,
    "input and output convs": lambda n: n in ("conv_in", "conv_out"),
    "other attention projections": lambda n: ".attn" in n and not ("attn2.to_k" in n or "attn2.to_v" in n),
    "feed-forward": lambda n: ".ff." in n,
    "transformer proj_in/proj_out": lambda n: "proj_in" in n or "proj_out" in n,
    "ResNet convs": lambda n: "resnets" in n and "conv" in n,
    "upsampling convs": lambda n: "upsamplers" in n,
    "every layer": lambda n: True,
}


@torch.no_grad()
def sensitivity(artifact: Path) -> dict:
    reference, pipe = load("toy"), load("toy")
    plugin.apply(pipe, artifact)
    attachment = plugin.attachments(pipe)[0]
    text = pipe.encode_prompt(["a red striped circle in the top left", "a blue dotted square"], "cpu", 1, False)[0]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def error(t: int) -> float:
        expected = reference.unet(x, t, text).sample
        return round(float((pipe.unet(x, t, text).sample - expected).norm() / expected.norm()), 4)

    for handle in attachment.handles:  # every input quantizer off; switched on group by group below
        handle.remove()
    result = {}
    for t in (900, 500, 100):
        attachment._write(quantized=False)  # full-precision weights while the inputs are examined
        row = {}
        for group, chosen in GROUPS.items():
            hooks = [pipe.unet.get_submodule(name).register_forward_pre_hook(attachment._quantize_input)
                     for name in attachment.entries if chosen(name)]
            row[f"activations: {group}"] = error(t)
            for hook in hooks:
                hook.remove()
        attachment._write(quantized=True)
        row["weights only"] = error(t)
        result[str(t)] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        artifact = train(TrainConfig(method="ptq", output_dir=folder, validation_steps=0,
                                     method_options={"bits": "w8a8"})).artifact
        result = {"relative_error_of_the_noise_prediction": sensitivity(artifact)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
