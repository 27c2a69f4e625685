"""How BOFT is learned on the shared loop. BOFT: generators and per-output scales train; no weight decay.

Example:
    >>> default_config({}).__class__.__name__
    'BOFTConfig'
"""

from __future__ import annotations

import torch
from torch import nn

from studio.adapters.boft import BOFTConfig
from studio.trainers.options import config_from_options

WEIGHT_DECAY = 0.0


def default_config(options: dict) -> BOFTConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(BOFTConfig, options)


def extra_loss(unet: nn.Module, config, rng) -> torch.Tensor | float:
    """No term beyond the diffusion loss."""
    return 0.0


def after_step(unet: nn.Module, config, step: int, total_steps: int, optimizer) -> None:
    """Nothing to do between steps."""
