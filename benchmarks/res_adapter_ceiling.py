"""Can the toy model learn to draw one object at twice its size at all, and can ResAdapter's parameters do it?

`studio bench adapters` finds ResAdapter (a LoRA on the down/up-samplers plus the ResNet GroupNorms) no better than
the base model at 64x64, where the base model draws several small objects instead of one large one. This trains,
on 64x64 and 56x56 renders only (not the bench's 14 sizes), with the same steps and rate for each:

- `res-adapter`: ResAdapter's parameters (44,672 on the toy UNet);
- `lora`: our LoRA method on its default targets (the attention projections), a different part of the UNet;
- `lora-resnet-convs`: our LoRA method on every ResNet block's two 3x3 convolutions (`conv1`, `conv2`), the
  spatial layers ResAdapter's release leaves alone, with about as many parameters as ResAdapter;
- `lora-rank-32-everywhere`: a rank-32 LoRA (the most the narrowest layers take) on every convolution and
  projection of the UNet's blocks (ResNet convs, samplers, attention, feed-forward), close to fine-tuning them all:
  whether the toy UNet can learn 2x at all from these renders;

and scores each as the bench does at 64x64 (one object of the right shape and colour, judged on the native-size
window) and at the native 32x32, beside the base model. One JSON object.

    python benchmarks/res_adapter_ceiling.py --output benchmarks/results/res-adapter-ceiling.json  # ~30 min, 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from studio import plugin
from studio.bench.adapters import REFERENCE_SEED, _share, native_view, random_spec
from studio.bench.erase import GUIDANCE, SAMPLE_STEPS
from studio.cli import print_result
from studio.eval import load_evaluator, score
from studio.pipeline import load
from studio.toy.captions import caption_from_parts
from studio.trainers.base import TrainConfig, train

DATA = "shapesworld:shape=seen,count=600,caption={caption},sizes=64|56"
STEPS, BATCH, RATE = 1000, 16, 1e-3
REFERENCES = 64
VARIANTS = (  # (name, method, its options)
    ("res-adapter", "res-adapter", {}),
    ("lora", "lora", {"resolution": 64}),
    ("lora-resnet-convs", "lora", {"resolution": 64, "method_options": {"target_modules": ["conv1", "conv2"]}}),
    ("lora-rank-32-everywhere", "lora", {"resolution": 64, "method_options": {
        "rank": 32, "alpha": 32.0, "target_modules": ["conv1", "conv2", "conv", "to_q", "to_k", "to_v", "to_out.0",
                                                      "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]}}),
)


def judge(pipe, prompts: list[str], expected: list[dict], size: int, evaluator) -> list[bool]:
    """Per prompt (seed = its index): exactly one object, of the right shape and colour, at `size` x `size`."""
    images = pipe(prompts, width=size, height=size, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    views = [native_view(image) for image in images]
    rows = score([window for window, _ in views], expected, evaluator).rows
    return [count == 1 and row["shape_ok"] and row["color_ok"] for (_, count), row in zip(views, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the JSON here")
    parser.set_defaults(json=True)  # for print_result: the JSON, on one line
    args = parser.parse_args()
    evaluator = load_evaluator()
    rng = np.random.default_rng(REFERENCE_SEED + 3)  # the bench's texts
    specs = [random_spec(rng) for _ in range(REFERENCES)]
    prompts = [caption_from_parts(s.shape, s.color, s.texture, background=s.background) for s in specs]
    expected = [{"shape": s.shape, "color": s.color} for s in specs]
    pipe = load("toy")
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"data": DATA, "max_train_steps": STEPS, "train_batch_size": BATCH, "learning_rate": RATE,
                    "references": REFERENCES,
                    "base": {size: _share(judge(pipe, prompts, expected, size, evaluator)) for size in (64, 32)}}
    with tempfile.TemporaryDirectory() as folder:
        for variant, method, extra in VARIANTS:
            started = time.time()
            trained = train(TrainConfig(method=method, data=DATA, output_dir=f"{folder}/{variant}", validation_steps=0,
                                        max_train_steps=STEPS, train_batch_size=BATCH, learning_rate=RATE, **extra))
            pipe = load("toy")
            pipe.set_progress_bar_config(disable=True)
            plugin.apply(pipe, trained.artifact)
            result[variant] = {size: _share(judge(pipe, prompts, expected, size, evaluator)) for size in (64, 32)}
            result[variant].update(trainable_params=trained.trainable_params, seconds=round(time.time() - started))
            print(json.dumps({variant: result[variant]}), flush=True)
    print_result(result, args)


if __name__ == "__main__":
    main()
