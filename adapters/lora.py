"""LoRA (Hu et al. 2021) through PEFT, in the file layout diffusers loads.

The low-rank update W + (alpha / r) B A is PEFT's own layer; we only choose
the targets and write the state dict with diffusers' keys
(`unet.<module>.lora_A.weight`) and its `lora_adapter_metadata` header entry,
so stock `pipe.load_lora_weights(file)` accepts our file.

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> inject(unet, LoRAConfig(rank=2))
    >>> sorted(state_dict(unet))[0].startswith("unet.")
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from studio.targets import ATTENTION_PROJECTIONS, find_targets

ADAPTER_NAME = "studio"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoRAConfig:
    """LoRA options: rank r, alpha (the update is scaled by alpha / r), targets, dropout on the LoRA input."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


A_PARAM = "lora_A.weight"
B_PARAM = "lora_B.weight"
PARAMS = (A_PARAM, B_PARAM)
KEY_PREFIX = "unet."


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """W + scale * (alpha / r) * B A for one layer (Linear, or Conv2d with a k x k A and a 1 x 1 B).

    Example:
        >>> w = torch.zeros(3, 2)
        >>> p = {A_PARAM: torch.ones(1, 2), B_PARAM: torch.ones(3, 1)}
        >>> transform(w, p, 0.5, {"rank": 1, "alpha": 2.0})[0].tolist()
        [1.0, 1.0]
    """
    down = params[A_PARAM].reshape(params[A_PARAM].shape[0], -1).float()
    up = params[B_PARAM].reshape(params[B_PARAM].shape[0], -1).float()
    rank = down.shape[0]
    alpha = float((config or {}).get("alpha", rank))
    delta = (up @ down) * (scale * alpha / rank)
    return (weight.float() + delta.reshape(weight.shape).to(weight.device)).to(weight.dtype)


def peft_config(config: LoRAConfig):
    """The equivalent `peft.LoraConfig`."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        init_lora_weights="gaussian",
    )


def inject(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Add trainable LoRA layers to `model` (a diffusers model with PEFT support), freeze the rest; return the targets."""
    model.requires_grad_(False)
    names = find_targets(model, config.target_modules)
    model.add_adapter(peft_config(config), adapter_name=ADAPTER_NAME)
    return names


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors with diffusers' keys, e.g. `unet.down_blocks.0...to_q.lora_A.weight`."""
    from peft.utils import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {f"{KEY_PREFIX}{key}": value.detach().clone() for key, value in tensors.items()}


def file_metadata(config: LoRAConfig, prefix: str = "unet") -> dict[str, str]:
    """The `lora_adapter_metadata` header entry diffusers reads to rebuild the LoraConfig."""
    kwargs = {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
    }
    return {LORA_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in kwargs.items()}, sort_keys=True)}


def peft_adapter_config(config: dict) -> dict:
    """The `adapter_config.json` PEFT needs for our file."""
    return peft_config(LoRAConfig(**config)).to_dict()
