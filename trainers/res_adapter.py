"""How ResAdapter is learned: the sampler LoRA and the ResNet norms train, everything else frozen, on the denoising
loss of images each at its own size and aspect (`keeps_image_sizes`): a batch holds one size (one bucket), and
the sizes come round in turn. Without such data (one size only) it would learn nothing about resolution, so a
dataset of a single size is refused.

Example:
    >>> from studio import registry
    >>> type(registry.get("res-adapter").trainer).__name__
    'ResAdapterTrainer'
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.artifact import FOLDER_WEIGHTS_NAME
from studio.errors import StudioError
from studio.trainers.base import Loop, MethodTrainer


class ResAdapterTrainer(MethodTrainer):
    """The loop contract for ResAdapter: the default loss on multi-size data, the official two-file folder."""

    keeps_image_sizes = True
    uses_prior_data = False  # the prior set would be fitted to one resolution, against the point

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        return {"unet": self.adapter.inject(pipe.unet, method_config)}

    def artifact_path(self, output_dir: Path) -> Path:
        """`<output_dir>/res-adapter/diffusion_pytorch_model.safetensors` (the norms), beside the LoRA file."""
        return output_dir / self.method.name / FOLDER_WEIGHTS_NAME

    def prepare(self, loop: Loop) -> None:
        sizes = sorted(set(loop.data[0].data.buckets))
        if len(sizes) < 2:
            raise StudioError(f"--method res-adapter learns from images of several sizes and aspects, and every image of "
                              f"--data is {sizes[0][0]}x{sizes[0][1]}; use images of varied sizes (a ShapesWorld spec "
                              "with sizes=24|32|48|64|32x64|64x32)")

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The norms (the file with our header); the kohya-key LoRA is written beside it."""
        unet = loop.unwrap("unet")
        if loop.accelerator.is_main_process:
            folder = self.artifact_path(Path(loop.config.output_dir)).parent
            self.adapter.write_lora_file(folder, self.adapter.kohya_lora(unet, loop.method_config))
        return self.adapter.norm_state_dict(unet), self.adapter.file_metadata(loop.method_config)
