"""The prompts a new user types, on a stock diffusers pipeline: does free phrasing change what is drawn?

60 prompts "a picture of a {colour} {shape} on a plain background" (every seen
shape x colour, two seeds) plus a few hand-written phrasings, sampled with
stock `StableDiffusionPipeline.from_pretrained` (20 DPM-Solver++ steps,
guidance 5) and read by the evaluator. One JSON object per model folder.

    python benchmarks/free_phrasing_check.py assets/toy-model [OLD_MODEL_FOLDER ...] \
        --output benchmarks/results/free-phrasing-check.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from studio.eval import score
from studio.toy.render import COLORS, SEEN_SHAPES

HAND_WRITTEN = [
    ("a photo of a red circle", {"shape": "circle", "color": "red"}),
    ("a picture of a red circle", {"shape": "circle", "color": "red"}),
    ("A RED CIRCLE.", {"shape": "circle", "color": "red"}),
    ("a circle, red, striped", {"shape": "circle", "color": "red", "texture": "striped"}),
    ("draw me a blue square, high quality", {"shape": "square", "color": "blue"}),
    ("green triangle", {"shape": "triangle", "color": "green"}),
    ("an image of a yellow dotted cross in the top left, 4k", {"shape": "cross", "color": "yellow", "texture": "dotted"}),
    ("Purple diamond, checkered, on a black background", {"shape": "diamond", "color": "purple", "texture": "checkered"}),
]


def check(model: str) -> dict:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    combos = list(itertools.product(SEEN_SHAPES, COLORS))
    picture = [(f"a picture of a {c} {s} on a plain background", {"shape": s, "color": c}) for s, c in combos] * 2
    result = {}
    for name, items in (("picture_of", picture), ("hand_written", HAND_WRITTEN * 4)):
        prompts = [p for p, _ in items]
        images = []
        for start in range(0, len(prompts), 30):
            chunk = prompts[start:start + 30]
            generator = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            images += pipe(chunk, num_inference_steps=20, guidance_scale=5.0, generator=generator).images
        accuracy = score(images, [e for _, e in items]).accuracy()
        result[name] = {k: round(v, 3) for k, v in accuracy.items()} | {"n": len(items)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="diffusers folders of toy models")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    out = {model: check(model) for model in args.models}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
