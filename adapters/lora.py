"""LoRA (Hu et al. 2021) through PEFT, in the file layout diffusers loads.

The low-rank update W + (alpha / r) B A is PEFT's own layer; we only choose
the targets and write the state dict with diffusers' keys
(`unet.<module>.lora_A.weight`) and its `lora_adapter_metadata` header entry,
so stock `pipe.load_lora_weights(file)` accepts our file.

With `studio train --train-text-encoder` the text encoder(s) get LoRA too, on
CLIP's attention projections (`TEXT_ENCODER_TARGETS`) with the UNet's rank,
alpha and dropout, saved beside the UNet's under diffusers' prefixes
`text_encoder.` and, on SDXL, `text_encoder_2.` (`COMPONENTS`).

Example:
    >>> from studio.testing import tiny_sd_pipeline
    >>> unet = tiny_sd_pipeline().unet
    >>> len(inject(unet, LoRAConfig(rank=2)))  # the wrapped layers' names
    80
    >>> sorted(state_dict(unet))[0].startswith("unet.")
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.targets import ATTENTION_PROJECTIONS, file_module_name, find_targets, flat_weight

ADAPTER_NAME = "studio"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoRAConfig:
    """LoRA options: rank r, alpha (the update is scaled by alpha / r), targets, dropout on the LoRA input."""

    rank: int = ranged(4, 1, 4096)
    alpha: float = ranged(4.0, 0, low_open=True)
    dropout: float = ranged(0.0, 0, 1, high_open=True)
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


CONFIG = LoRAConfig  # the method's options: CLI flags, TOML keys and form fields (studio.registry.Method.config)
STOCK_LOADER = "pipe.load_lora_weights(FILE)"  # what reads our LoRA files as they are (diffusers keys)


A_PARAM = "lora_A.weight"
B_PARAM = "lora_B.weight"
PARAMS = (A_PARAM, B_PARAM)
KEY_PREFIX = "unet."
# The pipeline parts a LoRA file may change; each part's tensors are keyed "<component>.<module>.<param>".
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# CLIP's attention projections: the text-encoder targets of diffusers' train_dreambooth_lora and of kohya's sd-scripts.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
    check_rank(model, names, config.rank)
    model.add_adapter(peft_config(config), adapter_name=ADAPTER_NAME)
    return names


def check_rank(model: nn.Module, names: list[str], rank: int, flag: str = "--rank", retarget: bool = True) -> None:
    """Refuse a rank above a targeted layer's smaller weight dimension (B A could not reach it; it only costs);
    `flag` is the option the message names, `retarget` whether it may suggest other target layers.

    Example:
        >>> check_rank(nn.Sequential(nn.Linear(8, 4)), ["0"], 16)
        Traceback (most recent call last):
        studio.errors.StudioError: --rank 16 is more than layer 0 can use (its weight is 4 x 8: at most 4); use --rank 4 or less, or target other layers
    """
    for name in names:
        weight = flat_weight(model.get_submodule(name))
        if rank > min(weight.shape):
            raise StudioError(f"{flag} {rank} is more than layer {name} can use (its weight is {weight.shape[0]} x "
                              f"{weight.shape[1]}: at most {min(weight.shape)}); use {flag} {min(weight.shape)} or less"
                              + (", or target other layers" if retarget else ""))


def text_encoder_config(config: LoRAConfig) -> LoRAConfig:
    """The text encoders' LoRA: the UNet's rank, alpha and dropout on `TEXT_ENCODER_TARGETS`.

    Example:
        >>> text_encoder_config(LoRAConfig(rank=8)).target_modules
        ['q_proj', 'k_proj', 'v_proj', 'out_proj']
    """
    return LoRAConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                      target_modules=list(TEXT_ENCODER_TARGETS))


def inject_text_encoder(text_encoder: nn.Module, config: LoRAConfig) -> list[str]:
    """Add trainable LoRA layers to a CLIP text encoder's attention projections, freeze the rest; return the targets.

    PEFT's `inject_adapter_in_model` directly (what diffusers' `add_adapter` calls for the UNet): transformers'
    own `add_adapter` would ask for a newer PEFT than diffusers needs.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> inject_text_encoder(tiny_sd_pipeline().text_encoder, LoRAConfig(rank=2))[0]
        'encoder.layers.0.self_attn.k_proj'
    """
    from peft import inject_adapter_in_model

    te_config = text_encoder_config(config)
    text_encoder.requires_grad_(False)
    names = find_targets(text_encoder, te_config.target_modules)
    check_rank(text_encoder, names, te_config.rank)
    inject_adapter_in_model(peft_config(te_config), text_encoder, adapter_name=ADAPTER_NAME)
    return names


def state_dict(model: nn.Module, component: str = "unet") -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model`, the pipeline's `component`, with diffusers' keys, e.g.
    `unet.down_blocks.0...to_q.lora_A.weight` or `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> te = tiny_sd_pipeline().text_encoder
        >>> _ = inject_text_encoder(te, LoRAConfig(rank=2))
        >>> sorted(state_dict(te, "text_encoder"))[0]
        'text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight'
    """
    from peft.utils import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    out = {}
    for key, value in tensors.items():
        param = next(p for p in PARAMS if key.endswith("." + p))
        module = file_module_name(model, key[: -len(param) - 1])
        out[f"{component}.{module}.{param}"] = value.detach().clone()
    return out


def file_metadata(config: LoRAConfig, prefix: str = "unet", text_encoders: tuple[str, ...] = (),
                  text_encoder_targets: list[str] | None = None) -> dict[str, str]:
    """The `lora_adapter_metadata` header entry diffusers reads to rebuild the LoraConfig of the UNet
    (`prefix`) and of each of `text_encoders` ("text_encoder", "text_encoder_2"); those have the UNet's
    rank, alpha and dropout on `text_encoder_targets` (default `TEXT_ENCODER_TARGETS`).

    Example:
        >>> meta = json.loads(file_metadata(LoRAConfig(rank=2), text_encoders=("text_encoder",))[LORA_METADATA_KEY])
        >>> meta["unet.r"], meta["text_encoder.target_modules"]
        (2, ['k_proj', 'out_proj', 'q_proj', 'v_proj'])
    """
    def kwargs(c: LoRAConfig) -> dict:
        return {"r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": sorted(c.target_modules)}

    metadata = {f"{prefix}.{k}": v for k, v in kwargs(config).items()}
    te_config = text_encoder_config(config)
    if text_encoder_targets is not None:
        te_config.target_modules = list(text_encoder_targets)
    for component in text_encoders:
        metadata.update({f"{component}.{k}": v for k, v in kwargs(te_config).items()})
    return {LORA_METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def peft_adapter_config(config: dict) -> dict:
    """The `adapter_config.json` PEFT needs for our file."""
    return peft_config(LoRAConfig(**config)).to_dict()
