"""ANT (Li et al. 2025, "Set You Straight"): erase a concept by steering the denoising trajectory.

Fine-tuning of the UNet's Linear/Conv2d weights, restricted by a weight-saliency mask, so that a prompt naming the
concept keeps the classifier-free-guidance direction in the early, high-noise steps (the image keeps its structure
on the natural-image manifold) and reverses it in the mid-to-late steps (the concept's content goes); no anchor
concept is needed. The objective and the saliency map are `trainers/ant.py`.

Several concepts at once (one too, with `--refine`) take the paper's multi-concept path instead (no saliency mask): a LoRA per concept
(`--lora-rank`) on the cross-attention key/value projections, each trained with the same objective on its own
concept's prompts, then fused by a closed-form refinement of those projections (as in MACE, `refine`): the
projections that send each concept's prompt tokens where its LoRA (scaled by `--fuse-scale`) sends them, while the
kept prompts' tokens stay where the original sends them.

The artifact is the sparse weight change: per touched layer the flat indices of the entries the mask let train
(`ant_indices`, int32) and their change (`ant_values`); applying it is a scatter-add (`studio.targets.add_sparse`),
so it composes, scales, fuses and comes off like any weight artifact.

Example:
    >>> w = torch.zeros(2, 2)
    >>> transform(w, {INDICES: torch.tensor([0]), VALUES: torch.tensor([1.0])}, scale=0.5).tolist()
    [[0.5, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from studio.erasure import EraseOptions
from studio.errors import StudioError
from studio.options import ranged
from studio.targets import add_sparse

INDICES, VALUES = "ant_indices", "ant_values"
PARAMS = (INDICES, VALUES)
KEY_PREFIX = "unet."


@dataclass
class ANTConfig(EraseOptions):
    """ANT options: the concepts (`EraseOptions`; ANT needs no anchor, `--anchor` only names what the concept-in-context
    prompts are paired with), the trajectory-aware objective, the saliency mask."""

    guidance: float = ranged(1.0, 0)  # η: the guidance direction kept (early steps) or reversed (later steps)
    sampling_guidance: float = ranged(3.0, 0, 100)  # classifier-free guidance of the trajectories trained on
    denoising_steps: int = ranged(50, 2, 1000)  # DDIM steps of those trajectories
    preserve_steps: int = ranged(7, 0, 999)  # the first steps, where the direction is kept (50 - t′; 7: t′ = 43)
    early_weight: float = ranged(1.0, 0)  # α₁: weight of the early-step terms
    uncond_weight: float = ranged(0.5, 0)  # α₂: weight of the unconditional terms
    saliency: float = ranged(0.5, 0, 1, low_open=True)  # per tensor, the share of most salient entries kept (1: no mask)
    saliency_prompts: int = ranged(4, 1, 100)  # prompt augmentations the saliency map is computed from
    saliency_seeds: int = ranged(2, 1, 100)  # seeds per augmentation; the maps of all are intersected
    # Several concepts (the multi-concept path; the saliency options above are for one concept, taken by the
    # multi-concept path too with `refine`):
    refine: bool = False
    lora_rank: int = ranged(64, 1, 4096)  # rank of each concept's LoRA (the reference's 64)
    # The refinement's weights, chosen on the toy model (benchmarks/ant_tradeoff.py --multi; the reference fuses at 4.3,
    # with its own preservation caches): each LoRA's scale, how strongly the projections stay at the original, and
    # the weight of the kept prompts' tokens.
    fuse_scale: float = ranged(3.0, 0, low_open=True)
    lamb: float = ranged(0.1, 0, low_open=True)
    preserve_scale: float = ranged(30.0, 0)


CONFIG = ANTConfig


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """W with `scale` x the change added at its flat indices."""
    return add_sparse(weight, params[INDICES], params[VALUES], scale)


def target_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the UNet (the reference's "full" fine-tuning, on the layers a weight artifact can carry)."""
    found = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if not found:
        raise StudioError("this UNet has no Linear or Conv2d layers for ANT to fine-tune")
    return found


def salient_mask(gradients: list[torch.Tensor], keep: float) -> torch.Tensor:
    """The entries that are among the `keep` share of largest |gradient| in every one of `gradients` (one tensor's
    gradients from several prompt augmentations and seeds): the intersection of their top-`keep` maps.

    Example:
        >>> salient_mask([torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([1.0, 3.0, 2.0, 0.0])], 0.5).tolist()
        [False, False, True, False]
    """
    mask = None
    for gradient in gradients:
        magnitude = gradient.abs().flatten()
        count = max(1, round(keep * magnitude.numel()))
        top = torch.zeros_like(magnitude, dtype=torch.bool)
        top[torch.topk(magnitude, count).indices] = True  # the most salient (the reference kept the least: a defect)
        mask = top if mask is None else mask & top
    return mask.view_as(gradients[0])


def sparse_change(original: torch.Tensor, trained: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file's entries for one layer: where `trained` differs from `original`, the flat indices and the change."""
    change = (trained.detach() - original.detach()).flatten()
    indices = torch.nonzero(change).flatten()
    if indices.numel() and int(indices.max()) >= 2**31:
        raise StudioError(f"ANT indexes weights with int32; a weight of {change.numel()} entries is too large")
    return {INDICES: indices.to(torch.int32), VALUES: change[indices].clone()}


def refine(original: torch.Tensor, deltas: list[torch.Tensor], concept_grams: list[torch.Tensor],
           inverse: torch.Tensor, fuse_scale: float) -> torch.Tensor:
    """The closed-form refinement of one projection W⁰ (out x in) from the concepts' LoRA changes ΔW_k: the least
    squares W = argmin Σ_k ‖W C_k − (W⁰ + f ΔW_k) C_k‖² + s_p ‖W K − W⁰ K‖² + λ ‖W − W⁰‖², whose solution is
    W = W⁰ + f (Σ_k ΔW_k G_k) M⁻¹ with G_k = C_k C_kᵀ (concept k's prompt tokens) and M = λI + Σ_k G_k + s_p K Kᵀ
    (`refinement_inverse`; the same for every projection). Float64, like RECE's closed form.

    Example:
        >>> gram = torch.eye(2).double()  # the concept's tokens span the input space
        >>> inverse = refinement_inverse([gram], torch.zeros(0, 2), lamb=1e-9, preserve_scale=0.0)
        >>> refine(torch.zeros(1, 2), [torch.ones(1, 2)], [gram], inverse, fuse_scale=2.0).round().tolist()
        [[2.0, 2.0]]
    """
    towards = sum(delta.double().cpu() @ gram for delta, gram in zip(deltas, concept_grams))
    return (original.double().cpu() + fuse_scale * towards @ inverse).to(original)


def refinement_inverse(concept_grams: list[torch.Tensor], kept: torch.Tensor, lamb: float,
                       preserve_scale: float) -> torch.Tensor:
    """M⁻¹ of `refine`, M = λI + Σ_k G_k + s_p K Kᵀ, from the concepts' Gram matrices and the kept tokens (rows x in).

    Example:
        >>> refinement_inverse([torch.eye(2).double()], torch.zeros(0, 2), lamb=1.0, preserve_scale=0.0).diagonal().tolist()
        [0.5, 0.5]
    """
    kept = kept.double().cpu()
    dim = kept.shape[1]
    matrix = lamb * torch.eye(dim, dtype=torch.float64) + sum(concept_grams) + preserve_scale * kept.T @ kept
    return torch.linalg.inv(matrix)
