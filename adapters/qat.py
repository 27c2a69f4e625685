"""Full quantization-aware training, the costly baseline EfficientDM is measured against.

Every quantized layer's whole weight trains (at `--learning-rate`) through the same fake quantizers as EfficientDM,
with the same data-free distillation from the full-precision teacher, and the steps learn as EfficientDM's do; the
file is the same (`studio/quantize.py`). How it is learned: `trainers/quantize.py` (`QATTrainer`).

Example:
    >>> QATConfig().weight_step_lr
    1e-06
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.options import ranged
from studio.quantize import KEY_PREFIX, QuantizeOptions, attach, recognises  # noqa: F401  (the plugin's entry points)


@dataclass
class QATConfig(QuantizeOptions):
    """QAT's options: the shared ones and the quantizers' step learning rates (the weights learn at
    --learning-rate)."""

    weight_step_lr: float = ranged(1e-6, 0)
    act_step_lr: float = ranged(5e-4, 0)


CONFIG = QATConfig
