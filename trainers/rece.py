"""How RECE is learned: in closed form, from the model itself (no data, no optimizer step).

`prepare` computes the edit of the cross-attention projections (`adapters/rece.py::erase`) from the text
encoder's embeddings of the concepts in context; `artifact` writes the weight differences. The pipeline's UNet
is left as it was.

Example:
    >>> from studio import registry
    >>> trainer = registry.get("rece").trainer
    >>> trainer.needs_data, trainer.closed_form
    (False, True)
"""

from __future__ import annotations

import torch
from studio.trainers.base import Loop, MethodTrainer

from studio.erasure import check_options
from studio.pipeline import TOY_MODEL


class RECETrainer(MethodTrainer):
    """The loop contract for RECE: the closed-form edit in `prepare`, its weight differences as the artifact."""

    needs_data = False
    closed_form = True
    uses_prior_data = False

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        """Nothing trains; the edited projections (checked here, before anything is written) name the base model."""
        check_options(method_config, pipe.tokenizer)
        pipe.unet.requires_grad_(False)
        return {"unet": sorted(self.adapter.projections(pipe.unet))}

    def prepare(self, loop: Loop) -> None:
        self.deltas = self.adapter.erase(loop.pipe, loop.method_config, toy=loop.config.model == TOY_MODEL)

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"{self.adapter.KEY_PREFIX}{name}.{self.adapter.DELTA}": delta.contiguous()
                   for name, delta in self.deltas.items()}
        return tensors, {}
