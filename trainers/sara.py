"""How SaRA is learned on the shared loop: the sparse deltas train, plus the reference's two extras.

- The nuclear-norm term: each step, lambda * ||delta||_* of one randomly chosen
  2-D layer whose smaller dim is at least `rank_min_dim` (as the reference does,
  to keep the SVD cost to one layer a step).
- Progressive re-selection at half of training: entries that grew out of the
  ineffective set are frozen with what they learned, the rest train on with a
  fresh optimizer state.

Example:
    >>> default_config({"fraction": 0.05}).fraction
    0.05
"""

from __future__ import annotations

import torch
from studio.adapters.sara import SaRAConfig, SaRALayer, nuclear_norm
from torch import nn

from studio.options import config_from_options

WEIGHT_DECAY = 0.0
# The default --learning-rate: on the toy model, the `studio bench personalize` recipe's (measured there);
# elsewhere a starting point, not tuned here.
LEARNING_RATE = 1e-4
TOY_LEARNING_RATE = 3e-3


def default_config(options: dict) -> SaRAConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(SaRAConfig, options)


def extra_loss(unet: nn.Module, config: SaRAConfig, rng) -> torch.Tensor | float:
    """lambda * nuclear norm of one random eligible layer's delta."""
    if not config.rank_weight:
        return 0.0
    eligible = [
        layer for layer in unet.modules()
        if isinstance(layer, SaRALayer) and min(layer.dense_delta().shape) >= config.rank_min_dim
    ]
    if not eligible:
        return 0.0
    return config.rank_weight * nuclear_norm(eligible[int(rng.integers(len(eligible)))])


def after_step(unet: nn.Module, config: SaRAConfig, step: int, total_steps: int, optimizer) -> None:
    """At half of training, re-select the ineffective entries and restart the optimizer on them."""
    if step != total_steps // 2:
        return
    for layer in unet.modules():
        if isinstance(layer, SaRALayer):
            layer.reselect()
    # Fresh moments: frozen entries (zero gradient from now on) then never move, as in the reference.
    optimizer.state.clear()
