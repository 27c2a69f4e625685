"""ResAdapter (Cheng et al. 2024): a small adapter that lets a model draw at resolutions and aspect ratios it was
not trained on, keeping what it draws at its own.

What trains (as in the released weights; no training code was ever published, so this is the first open
trainer): a LoRA on the down- and up-sampler convolutions only (ResCLoRA: `downsamplers.0.conv`,
`upsamplers.0.conv`, rank 16, alpha 8), which adapts the receptive field to smaller images, and the full
GroupNorm weights and biases of every ResNet block (ResENorm: `resnets.*.norm1` / `norm2`), whose statistics
drift on larger ones. Everything else is frozen; the data is renders at many sizes and aspects, each trained
at its own size (`MethodTrainer.keeps_image_sizes`).

The artifact is the official layout, a folder of two files:
- `pytorch_lora_weights.safetensors`: the LoRA with kohya keys (`lora_unet_down_blocks_0_downsamplers_0_conv.
  lora_down.weight`, `.lora_up.weight`, `.alpha`), which `pipe.load_lora_weights` reads;
- `diffusion_pytorch_model.safetensors`: the norms as UNet state-dict entries, for
  `pipe.unet.load_state_dict(norms, strict=False)`; our header rides in its metadata.
Our plugin applies the LoRA as weight transforms (it composes and fuses like our LoRA) and swaps the norms in,
keeping the originals: `remove` (and switching the artifact off) puts them back bit for bit. The scale is the
LoRA's, as the release's `set_adapters(..., adapter_weights=[s])`; the norms are swapped in whole.

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> names = inject(unet, ResAdapterConfig())
    >>> sorted(n for n in names if "samplers" in n)[0]
    'down_blocks.0.downsamplers.0.conv'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from studio.errors import StudioError
from studio.options import ranged

SAMPLER_TARGETS = ["downsamplers.0.conv", "upsamplers.0.conv"]
LORA_FILE = "pytorch_lora_weights.safetensors"  # beside the norms file, as the release ships it
KOHYA_PREFIX = "lora_unet_"
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
STOCK_LOADER = ('pipe.load_lora_weights(FOLDER, weight_name="pytorch_lora_weights.safetensors"), then '
                'pipe.unet.load_state_dict(load_file(FOLDER/diffusion_pytorch_model.safetensors), strict=False)')


@dataclass
class ResAdapterConfig:
    """ResAdapter options: the sampler LoRA's rank and alpha (the release's: 16 and 8)."""

    rank: int = ranged(16, 1, 4096)
    alpha: float = ranged(8.0, 0, low_open=True)


CONFIG = ResAdapterConfig


def norm_names(unet: nn.Module) -> list[str]:
    """The GroupNorms of every ResNet block (`...resnets.N.norm1` / `norm2`), in module order.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> norm_names(tiny_sd_pipeline().unet)[:2]
        ['down_blocks.0.resnets.0.norm1', 'down_blocks.0.resnets.0.norm2']
    """
    return [name for name, module in unet.named_modules()
            if isinstance(module, nn.GroupNorm) and ".resnets." in name and name.rsplit(".", 1)[-1] in ("norm1", "norm2")]


def lora_config(config: ResAdapterConfig):
    """The sampler LoRA as our LoRA method's config."""
    from studio.adapters.lora import LoRAConfig

    return LoRAConfig(rank=config.rank, alpha=config.alpha, target_modules=list(SAMPLER_TARGETS))


def inject(unet: nn.Module, config: ResAdapterConfig) -> list[str]:
    """Give `unet` a trainable sampler LoRA (through PEFT, as our LoRA) and trainable ResNet norms, freeze the rest;
    return the touched layers (samplers, then norms) for the file's fingerprint."""
    from studio.adapters import lora

    samplers = lora.inject(unet, lora_config(config))
    norms = norm_names(unet)
    for name in norms:
        unet.get_submodule(name).requires_grad_(True)
    return samplers + norms


def norm_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The ResNet norms as UNet state-dict entries (`down_blocks.0.resnets.0.norm1.weight`, ...)."""
    tensors = {}
    for name in norm_names(unet):
        norm = unet.get_submodule(name)
        tensors[f"{name}.weight"] = norm.weight.detach().clone().contiguous()
        tensors[f"{name}.bias"] = norm.bias.detach().clone().contiguous()
    return tensors


def kohya_lora(unet: nn.Module, config: ResAdapterConfig) -> dict[str, torch.Tensor]:
    """The trained sampler LoRA with kohya keys (what the release's LoRA file holds)."""
    from studio.adapters import lora

    tensors = {}
    for key, value in lora.state_dict(unet).items():
        module, param = key[len("unet."):].rsplit(".", 2)[0], key.rsplit(".", 2)[1] + ".weight"
        stem = KOHYA_PREFIX + module.replace(".", "_")
        tensors[stem + (KOHYA_DOWN if param == lora.A_PARAM else KOHYA_UP)] = value
        tensors[stem + KOHYA_ALPHA] = torch.tensor(float(config.alpha))
    return tensors


def our_lora(unet: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A kohya-key sampler LoRA file's tensors -> our LoRA layout (`unet.<module>.lora_A.weight`) and its config
    (alpha folded into B where the file's alphas differ from one another)."""
    from studio.adapters import lora

    by_kohya = {KOHYA_PREFIX + name.replace(".", "_"): name for name, _ in unet.named_modules()}
    stems = sorted({key[:-len(KOHYA_DOWN)] for key in tensors if key.endswith(KOHYA_DOWN)})
    unknown = [stem for stem in stems if stem not in by_kohya or stem + KOHYA_UP not in tensors]
    if not stems or unknown:
        raise StudioError(f"{path}: not a ResAdapter LoRA for this UNet ({'no lora_down tensors' if not stems else unknown[0]})")
    rank = tensors[stems[0] + KOHYA_DOWN].shape[0]
    ours = {}
    for stem in stems:
        alpha = float(tensors.get(stem + KOHYA_ALPHA, torch.tensor(float(rank))))
        ours[f"unet.{by_kohya[stem]}.{lora.A_PARAM}"] = tensors[stem + KOHYA_DOWN]
        ours[f"unet.{by_kohya[stem]}.{lora.B_PARAM}"] = tensors[stem + KOHYA_UP] * (alpha / rank)
    return ours, {"rank": rank, "alpha": float(rank)}


def write_lora_file(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the kohya-key LoRA file into `folder` (through a temporary name: a crash leaves no half file)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (LORA_FILE + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial),
              metadata={"ss_network_module": "networks.lora"})
    partial.replace(folder / LORA_FILE)
    return folder / LORA_FILE


def recognises(keys: list[str]) -> bool:
    """Whether a file's keys are a ResAdapter norms file (ResNet GroupNorm weights and biases only).

    Example:
        >>> recognises(["down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm1.bias"])
        True
    """
    return bool(keys) and all(".resnets." in k and k.rsplit(".", 2)[-2] in ("norm1", "norm2") for k in keys)


class ResAdapterAttachment:
    """A ResAdapter folder on a pipeline: its sampler LoRA as weight transforms (a `WeightAttachment`) and its
    norms swapped into the UNet's GroupNorms, the originals kept to put back."""

    def __init__(self, pipe, norms: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> None:
        from studio import plugin, registry

        unet = pipe.unet
        lora_path = path.parent / LORA_FILE
        if not lora_path.is_file():
            raise StudioError(f"{path}: a ResAdapter needs its {LORA_FILE} beside it (the folder it was saved in)")
        wanted = set(norm_names(unet))
        bad = sorted(key for key in norms if key.rsplit(".", 1)[0] not in wanted)
        if bad:
            raise StudioError(f"{path}: {bad[0]} is not a ResNet norm of this UNet; was it made for another base model?")
        self.params = {key: unet.get_parameter(key) for key in norms}
        for key, value in norms.items():
            if self.params[key].shape != value.shape:
                raise StudioError(f"{path}: {key} is {list(value.shape)}, this UNet's {list(self.params[key].shape)}; "
                                  "it was made for another base model")
        tensors, config = our_lora(unet, load_file(str(lora_path)), lora_path)
        self.pipe = pipe
        self.norms = {key: value.to(param.device, param.dtype) for (key, value), param in zip(norms.items(), self.params.values())}
        self.originals = {key: param.detach().clone() for key, param in self.params.items()}
        self.lora = plugin.attach_weights(pipe, name, registry.get("lora"), config, {}, tensors, scale, lora_path)
        self._swap(self.norms)
        self.layers = self.lora.layers + [f"unet.{key.rsplit('.', 1)[0]}" for key in norms if key.endswith(".weight")]

    def _swap(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(values[key])

    def set_scale(self, scale: float) -> None:
        self.lora.set_scale(scale)

    def set_enabled(self, enabled: bool) -> None:
        self.lora.set_enabled(enabled)
        self._swap(self.norms if enabled else self.originals)

    def call_inputs(self, **_) -> dict:
        return {}

    def remove(self) -> None:
        self.lora.remove()
        self._swap(self.originals)


def attach(pipe, tensors: dict[str, torch.Tensor], path: Path, scale: float, name: str) -> ResAdapterAttachment:
    """Put a ResAdapter folder (ours, or the release's two files) on `pipe`, its LoRA at `scale`."""
    return ResAdapterAttachment(pipe, tensors, path, scale, name)


def file_metadata(config) -> dict[str, str]:
    """Extra header entries (none beyond the studio header)."""
    return {}
