"""Choosing which layers of a model an adapter touches, and swapping them for wrapped ones.

Shared by every method that wraps layers: a target is a module whose
qualified name ends with one of the patterns (PEFT's rule for a list of
`target_modules`), and is a `nn.Linear` or `nn.Conv2d`.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> find_targets(net, ["0"])
    ['0']
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import StudioError

# The attention projections of diffusers' transformer blocks: LoRA's usual targets in diffusers.
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def find_targets(model: nn.Module, patterns: list[str], kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of the `kinds` modules whose name is a pattern or ends with "." + pattern.

    Raises a `StudioError` naming the patterns when nothing matches.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds) and any(name == p or name.endswith("." + p) for p in patterns)
    ]
    if not names:
        raise StudioError(
            f"no layer of {type(model).__name__} matches target modules {patterns}; "
            "pass names of Linear/Conv2d layers such as to_q, to_k, to_v, to_out.0, proj_in, conv1"
        )
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding `name` and the attribute name under which it sits."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was; return the old module."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def flat_weight(layer: nn.Module) -> torch.Tensor:
    """A Linear or Conv2d weight as (out_features, in_features * kh * kw)."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def in_dim(layer: nn.Module) -> int:
    """The input dimension an input-side transform acts on: in_features, or in_channels * kh * kw."""
    return flat_weight(layer).shape[1]


def layer_forward(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run a Linear or Conv2d `base` with another weight (same shape as its own)."""
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, weight, base.bias)
    return F.linear(x, weight, base.bias)


def add_sparse(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`weight` with `scale` x `values` added at its flat `indices` (a sparse weight update: SaRA's, ANT's).

    Example:
        >>> add_sparse(torch.zeros(2, 2), torch.tensor([3]), torch.tensor([0.5])).tolist()
        [[0.0, 0.0], [0.0, 0.5]]
    """
    flat = weight.reshape(-1).index_add(0, indices.to(weight.device), values.to(weight) * scale)
    return flat.view_as(weight)


def wrap_targets(model: nn.Module, patterns: list[str], make_layer) -> list[str]:
    """Replace every target layer by `make_layer(layer)`, freeze the rest of `model`; return the wrapped names.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> wrap_targets(net, ["0"], lambda layer: torch.nn.Sequential(layer))
        ['0']
    """
    model.requires_grad_(False)
    names = find_targets(model, patterns)
    for name in names:
        replace_module(model, name, make_layer(model.get_submodule(name)))
    return names


def file_module_name(model: nn.Module, name: str) -> str:
    """The name a file gives module `name` of `model`: its own name, except in a CLIP text model that
    transformers 5 flattened (`encoder.layers.0...`), where files keep the `text_model.` prefix that
    CLIPTextModelWithProjection, older transformers, diffusers' and kohya's LoRA files all use.

    Example:
        >>> from transformers import CLIPTextConfig, CLIPTextModel
        >>> te = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
        >>> file_module_name(te, "encoder.layers.0.self_attn.q_proj")
        'text_model.encoder.layers.0.self_attn.q_proj'
    """
    if _flattened_clip_text(model) and not name.startswith("text_model."):
        return "text_model." + name
    return name


def model_module_name(model: nn.Module, name: str) -> str:
    """The inverse of `file_module_name`: a name as files write it -> the module's name in `model`.

    Example:
        >>> model_module_name(torch.nn.Sequential(torch.nn.Linear(2, 2)), "0")
        '0'
    """
    if _flattened_clip_text(model) and name.startswith("text_model."):
        return name[len("text_model."):]
    return name


def _flattened_clip_text(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clip_text_model" and not hasattr(model, "text_model")
