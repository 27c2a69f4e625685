"""Post-training quantization, the baseline EfficientDM is measured against (Q-Diffusion-style calibration).

Weights per output channel and activations per tensor and per timestep, their ranges chosen once by calibration on
the full-precision model's own trajectories (`--calibration mse`: the range with the least Lp error; `minmax`: the
full range), nothing trained: the same quantizers, layer roles and file as EfficientDM (`studio/quantize.py`), so
the two compare like for like. How it is computed: `trainers/quantize.py` (`PTQTrainer`).

Example:
    >>> PTQConfig(bits="w4a4").calibration
    'mse'
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.quantize import KEY_PREFIX, QuantizeOptions, attach, recognises  # noqa: F401  (the plugin's entry points)


@dataclass
class PTQConfig(QuantizeOptions):
    """PTQ's options: only the shared ones (bits, trajectories, calibration)."""


CONFIG = PTQConfig
