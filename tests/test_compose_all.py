"""Every method in one pipeline: IP-Adapter, T2I-Adapter and ResAdapter with LoRA, OFT, BOFT and SaRA, sampled with
an image prompt and a control image, then taken off again leaving the pipeline as it was, bit for bit."""

import numpy as np
import torch
from PIL import Image

from studio import plugin, registry
from studio.data import condition_image
from studio.pipeline import load
from studio.testing import random_artifact
from studio.toy.render import ShapeSpec, render
from studio.trainers.base import TrainConfig, train


def _sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", width=48, height=48, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def test_all_methods_compose_and_come_off(tmp_path):
    def trained(method, data, **options):
        return train(TrainConfig(method=method, data=data, output_dir=str(tmp_path / method), max_train_steps=2,
                                 train_batch_size=4, learning_rate=1e-2, method_options=options)).artifact

    files = [
        trained("ip-adapter", "shapesworld:shape=seen,count=4,caption={caption}"),
        trained("t2i-adapter", "shapesworld:shape=seen,count=4,condition=edge,place=random", condition="edge").parent,
        trained("res-adapter", "shapesworld:shape=seen,count=4,sizes=24|40").parent,
    ]
    for method in ("lora", "oft", "boft", "sara"):
        config = registry.get(method).config({"block_size": "8"} if method in ("oft", "boft") else {})
        files.append(random_artifact(tmp_path / f"{method}.safetensors", method, config, pipe=load("toy")))
    pipe = load("toy")
    base = _sample(pipe)
    names = plugin.compose(pipe, [(path, 0.8) for path in files])
    assert len(names) == 7
    reference = Image.fromarray(render(ShapeSpec("square", "blue"), 32, 32).image)
    edges = condition_image(render(ShapeSpec("circle", "red", position="top left"), 32, 32).mask, "edge")
    inputs = plugin.call_inputs(pipe, image_prompt=reference, control=[(edges, "edge")])
    assert set(inputs) == {"ip_adapter_image"}
    composed = _sample(pipe, **inputs)
    assert np.abs(composed - base).max() > 1e-3
    for name in reversed(names):
        plugin.remove(pipe, name)
    assert np.array_equal(_sample(pipe), base)
