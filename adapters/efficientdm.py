"""EfficientDM (He et al. 2024): data-free, quantization-aware LoRA fine-tuning of a low-bit UNet.

- **QALoRA**: each quantized layer (`studio.quantize.QuantLayer`, rank > 0) computes with Q(W + B A): the LoRA is
  merged into the weight *before* the weight fake-quantizer, so the deployed model is one low-bit weight per layer
  (the file holds the integers of Q(W + B A); nothing of the LoRA is left to apply). A is Kaiming-initialised with
  the layer's own kernel, B zero, so training starts from the post-training-quantized model.
- **Scale-aware optimisation**: each layer's LoRA learns at a rate proportional to that layer's mean weight step
  (the reference's lr = mean Δ / 2500): a LoRA change matters only in units of the grid it is rounded to.
  `--learning-rate` is the average of those rates over the layers.
- **Temporal LSQ**: the activation steps and zero points, one per calibrated timestep, learn too (`--act-step-lr`),
  as do the weight steps (`--weight-step-lr`).
- **Data-free distillation** (`trainers/quantize.py`): the full-precision UNet is the teacher on its own sampling
  trajectories; the student matches its classifier-free-guided noise prediction timestep by timestep.

The quantizers, the layer roles (which layers stay at 8 bits or in full precision), the file and its attaching are
shared with the baselines (`adapters/ptq.py`, `adapters/qat.py`) in `studio/quantize.py`.

Example:
    >>> EfficientDMConfig().rank, EfficientDMConfig().bits
    (32, 'w4a8')
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.options import ranged
from studio.quantize import KEY_PREFIX, QuantizeOptions, attach, recognises  # noqa: F401  (the plugin's entry points)


@dataclass
class EfficientDMConfig(QuantizeOptions):
    """EfficientDM's options: the shared ones (bits, trajectories, calibration), the QALoRA's rank and the
    quantizers' step learning rates."""

    rank: int = ranged(32, 1, 1024)  # the reference's r = 32 (capped per layer by its size)
    weight_step_lr: float = ranged(1e-6, 0)  # the weights' per-channel steps (the reference's 1e-6)
    act_step_lr: float = ranged(5e-4, 0)  # the activations' per-timestep steps and zero points (the reference's 5e-4)


CONFIG = EfficientDMConfig
