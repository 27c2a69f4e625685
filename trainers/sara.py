"""How SaRA is learned: the loop's default (the sparse deltas train on the denoising loss), plus the
reference's two extras.

- The nuclear-norm term: each step, lambda * ||delta||_* of one randomly chosen
  2-D layer whose smaller dim is at least `rank_min_dim` (as the reference does,
  to keep the SVD cost to one layer a step).
- Progressive re-selection at half of training: entries that grew out of the
  ineffective set are frozen with what they learned, the rest train on with a
  fresh optimizer state.

Example:
    >>> from studio import registry
    >>> type(registry.get("sara").trainer).__name__
    'SaRATrainer'
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from studio.adapters.sara import SaRAConfig, SaRALayer, nuclear_norm
from studio.trainers.base import Loop, MethodTrainer


def extra_loss(unet: nn.Module, config: SaRAConfig, rng: np.random.Generator) -> torch.Tensor | float:
    """lambda * nuclear norm of one random eligible layer's delta (0 when lambda is 0 or no layer is eligible)."""
    if not config.rank_weight:
        return 0.0
    eligible = [
        layer for layer in unet.modules()
        if isinstance(layer, SaRALayer) and min(layer.dense_delta().shape) >= config.rank_min_dim
    ]
    if not eligible:
        return 0.0
    return config.rank_weight * nuclear_norm(eligible[int(rng.integers(len(eligible)))])


class SaRATrainer(MethodTrainer):
    """The default loop contract plus SaRA's nuclear-norm term and half-way re-selection."""

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        return super().loss(loop, rng, generator) + extra_loss(loop.unwrap(), loop.method_config, rng)

    def after_step(self, loop: Loop, step: int, optimizer: torch.optim.Optimizer) -> None:
        """At half of training, re-select the ineffective entries and restart the optimizer on them."""
        if step != loop.config.max_train_steps // 2:
            return
        for layer in loop.unwrap().modules():
            if isinstance(layer, SaRALayer):
                layer.reselect()
        # Fresh moments: frozen entries (zero gradient from now on) then never move, as in the reference.
        optimizer.state.clear()
