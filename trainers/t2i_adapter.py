"""How T2I-Adapter is learned: the UNet and everything else frozen, only the added network trains, on the
denoising loss of (image, control image, caption) triples, with the paper's timesteps biased to the noisy end.

The network is not a pipeline component: `attach` builds it beside the pipeline (`model` hands it to the loop
as the part "adapter") and puts a `ControlHook` on the UNet, through which every step's features go in, as
they do on a stock pipeline with our plugin. Timesteps are t = (1 - u^3) T for uniform u (diffusers'
train_t2i_adapter_sdxl.py): the structure of an image is decided in the early, noisy steps, where the control
matters most. The artifact is a `save_pretrained` folder, `<output_dir>/t2i-adapter/`; beside it
`control-example.png`, the first training example's control image, to sample with.

Example:
    >>> from studio import registry
    >>> type(registry.get("t2i-adapter").trainer).__name__
    'T2IAdapterTrainer'
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from studio.artifact import FOLDER_WEIGHTS_NAME
from studio.data import SHAPESWORLD_PREFIX, parse_shapesworld_spec
from studio.errors import StudioError
from studio.trainers.base import Loop, MethodTrainer, denoising_loss, draw_batch


CONTROL_EXAMPLE = "control-example.png"  # the first training example's control image, written beside the artifact


def cubic_timesteps(n: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps t = (1 - u^3) T, u uniform in [0, 1): most of them noisy (the T2I-Adapter paper's sampling).

    Example:
        >>> bool((cubic_timesteps(1000, 1000, torch.Generator().manual_seed(0)) >= 500).float().mean() > 0.75)
        True
    """
    u = torch.rand(n, generator=generator)
    return ((1 - u**3) * total).long().clamp(0, total - 1)


class T2IAdapterTrainer(MethodTrainer):
    """The loop contract for T2I-Adapter: a network of its own, control images as the extra field, cubic timesteps."""

    weight_decay = 0.01  # AdamW's default, as diffusers' T2I-Adapter script trains
    uses_prior_data = False  # the loss is the controlled denoising of --data alone

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        pipe.unet.requires_grad_(False)
        self.network = self.adapter.build(pipe, method_config)
        self.hook = self.adapter.ControlHook()
        pipe.unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        # The fingerprint: each down block's last convolution, whose width its feature must have.
        last_convs = [f"down_blocks.{i}.resnets.{len(block.resnets) - 1}.conv2" for i, block in enumerate(pipe.unet.down_blocks)]
        return {"unet": last_convs, "adapter": []}

    def model(self, pipe, part: str) -> torch.nn.Module:
        return self.network if part == "adapter" else getattr(pipe, part)

    def artifact_path(self, output_dir: Path) -> Path:
        """`<output_dir>/t2i-adapter/diffusion_pytorch_model.safetensors`, beside its config.json."""
        return output_dir / self.method.name / FOLDER_WEIGHTS_NAME

    def prepare(self, loop: Loop) -> None:
        """Each example's control image as a tensor; examples without one are refused, naming the fix."""
        condition = loop.method_config.condition
        data = loop.config.data
        if data.startswith(SHAPESWORLD_PREFIX):
            drawn = parse_shapesworld_spec(data[len(SHAPESWORLD_PREFIX):])["condition"]
            if not drawn:
                raise StudioError(f"--method t2i-adapter needs control images: add condition={condition} to the ShapesWorld "
                                  "spec (it draws mask or edge)")
            if drawn != condition:
                raise StudioError(f"the ShapesWorld spec draws {drawn} conditions but --condition is {condition}; "
                                  f"pass --condition {drawn}")
        examples = loop.data[0].data.examples
        missing = [example.source for example in examples if example.condition is None]
        if missing:
            raise StudioError(f"--method t2i-adapter needs a control image for every training image; {len(missing)} have "
                              f"none (first: {missing[0]}); put each one's {condition} at conditions/<image name>.png beside it")
        if loop.accelerator.is_main_process:  # a control image to try the artifact with: `studio sample --control`
            output_dir = Path(loop.config.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            examples[0].condition.save(output_dir / CONTROL_EXAMPLE)
        color = loop.method_config.color
        self.conditions = [self.adapter.control_tensor([self.adapter.control_pixels(example.condition, color, example.source)])
                           for example in examples]

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        device = loop.accelerator.device
        batch = draw_batch(loop.data[0], loop.config, loop.noise_scheduler, rng, generator, device, loop.live_text,
                           timesteps=cubic_timesteps)
        features = loop.models["adapter"](torch.cat([self.conditions[i] for i in batch.indices]).to(device))
        self.hook.features = lambda sample: features
        try:
            return denoising_loss(loop.pipe.unet, batch, loop.config, loop.noise_scheduler, device)
        finally:
            self.hook.features = None

    def validation_inputs(self, loop: Loop) -> dict:
        """Validation samples are drawn with the first training example's control image (through the hook)."""
        network, pixels = loop.unwrap("adapter"), self.conditions[0]  # prepared in `prepare`
        self.hook.features = lambda sample: network(pixels.to(sample.device, sample.dtype))
        return {"width": pixels.shape[-1], "height": pixels.shape[-2]}

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The network's state dict, with its config.json written beside (what `T2IAdapter.from_pretrained` reads)."""
        network = loop.unwrap("adapter")
        folder = self.artifact_path(Path(loop.config.output_dir)).parent
        if loop.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            network.save_config(folder)
        tensors = {key: value.detach().clone().contiguous() for key, value in network.state_dict().items()}
        return tensors, self.adapter.file_metadata(loop.method_config)
