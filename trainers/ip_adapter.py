"""How IP-Adapter is learned: everything frozen but the adapter, on the denoising loss with each image as its
own image prompt (the paper's recipe), with the image prompt, the caption, or both dropped for guidance.

The image prompt of an example is its image's embedding by the pipeline's image encoder (frozen), computed once
in `prepare`. Dropping an image prompt zeroes its embedding (what the pipeline feeds as the unconditional image
prompt); dropping a caption uses the empty caption's embedding.

Example:
    >>> from studio import registry
    >>> type(registry.get("ip-adapter").trainer).__name__
    'IPAdapterTrainer'
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from studio.adapters.ip_adapter import IMAGE_ENCODER_FOLDER, encode_images
from studio.errors import StudioError
from studio.trainers.base import Loop, MethodTrainer, denoising_loss, draw_batch


class IPAdapterTrainer(MethodTrainer):
    """The loop contract for IP-Adapter: its own layers, image prompts as an extra field, dropout for guidance."""

    weight_decay = 0.01  # the paper's AdamW setting
    uses_prior_data = False  # the loss is the image-prompted denoising of --data alone

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
            raise StudioError("--method ip-adapter needs the model's image encoder (an image_encoder/ and "
                              "feature_extractor/ folder in the model, as the toy model has); this model has none")
        image_embed_dim = pipe.image_encoder.config.projection_dim
        return {"unet": self.adapter.inject(pipe.unet, method_config, image_embed_dim)}

    def prepare(self, loop: Loop) -> None:
        """Each training image's embedding: its own image prompt."""
        images = [example.image for example in loop.data[0].data.examples]
        self.image_embeds = torch.cat([encode_images(loop.pipe, images[i:i + 64]) for i in range(0, len(images), 64)])
        self.empty_text = loop.data[0].text[""]

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        device = loop.accelerator.device
        batch = draw_batch(loop.data[0], loop.config, loop.noise_scheduler, rng, generator, device, loop.live_text)
        # One draw per example: [0, p) drops the image prompt, [p, 2p) the caption, [2p, 3p) both.
        rate = loop.method_config.drop_rate
        draw = torch.from_numpy(rng.random(len(batch.indices)))
        drop_image = (draw < rate) | ((draw >= 2 * rate) & (draw < 3 * rate))
        drop_text = (draw >= rate) & (draw < 3 * rate)
        embeds = self.image_embeds[batch.indices].clone()
        embeds[drop_image] = 0.0
        text = batch.text.clone()
        text[drop_text] = self.empty_text.to(text)
        added = {**(batch.added or {}), "image_embeds": [embeds[:, None].to(device)]}  # (batch, 1 image, dim)
        return denoising_loss(loop.models["unet"], replace(batch, text=text, added=added), loop.config,
                              loop.noise_scheduler, device)

    def validation_inputs(self, loop: Loop) -> dict:
        """Validation samples take the first training image as their image prompt."""
        return {"ip_adapter_image": loop.data[0].data.examples[0].image}

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The official layout; the image encoder is saved beside it, where `load_ip_adapter` looks for one."""
        if loop.accelerator.is_main_process:
            loop.pipe.image_encoder.save_pretrained(Path(loop.config.output_dir) / IMAGE_ENCODER_FOLDER)
        return super().artifact(loop)
