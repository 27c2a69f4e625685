"""How LORA is learned on the shared loop. LoRA: PEFT's layers on the attention projections; lr around 1e-4 (1e-3 on the toy model).

Example:
    >>> default_config({}).__class__.__name__
    'LoRAConfig'
"""

from __future__ import annotations

from studio.adapters.lora import LoRAConfig

from studio.options import config_from_options

WEIGHT_DECAY = 0.0
# The default --learning-rate: on the toy model, the `studio bench personalize` recipe's (measured there);
# elsewhere a starting point, not tuned here.
LEARNING_RATE = 1e-4
TOY_LEARNING_RATE = 1e-3


def default_config(options: dict) -> LoRAConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(LoRAConfig, options)

