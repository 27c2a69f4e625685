"""How OFT is learned on the shared loop. OFT: only the skew generators train; no weight decay (it would pull R to I).

Example:
    >>> default_config({}).__class__.__name__
    'OFTConfig'
"""

from __future__ import annotations

from studio.adapters.oft import OFTConfig
from studio.options import config_from_options

WEIGHT_DECAY = 0.0


def default_config(options: dict) -> OFTConfig:
    """The method's config from CLI/TOML options (unknown keys are an error)."""
    return config_from_options(OFTConfig, options)

