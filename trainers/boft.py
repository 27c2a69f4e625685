"""How BOFT is learned on the shared loop. BOFT: generators and per-output scales train; no weight decay.

Example:
    >>> default_config({}).__class__.__name__
    'BOFTConfig'
"""

from __future__ import annotations

from studio.adapters.boft import BOFTConfig
from studio.options import config_from_options

WEIGHT_DECAY = 0.0


def default_config(options: dict) -> BOFTConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(BOFTConfig, options)

