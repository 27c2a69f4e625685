"""How OFT is learned on the shared loop. OFT: only the skew generators train; no weight decay (it would pull R to I).

Example:
    >>> default_config({}).__class__.__name__
    'OFTConfig'
"""

from __future__ import annotations

from studio.adapters.oft import OFTConfig

from studio.options import config_from_options

WEIGHT_DECAY = 0.0
# The default --learning-rate: on the toy model, the `studio bench personalize` recipe's (measured there);
# elsewhere a starting point, not tuned here.
LEARNING_RATE = 1e-4
TOY_LEARNING_RATE = 2.5e-4


def default_config(options: dict) -> OFTConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(OFTConfig, options)

