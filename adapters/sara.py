"""SaRA (Hu et al. 2024): train the smallest-magnitude weights as a sparse delta.

For each targeted Linear/Conv2d, the `fraction` of entries with the smallest
|w| ("temporarily ineffective" parameters) is selected; their per-tensor
threshold is kept. Training learns a 1-D vector of deltas for exactly those
entries (flat indices), so gradients and optimizer state exist only for the
sparse set:

- Memory-light backward: `SparseDeltaLinear`/`SparseDeltaConv2d` patch the
  deltas into the frozen weight in place for the matmul and restore the saved
  originals bit-exactly afterwards; the backward computes the weight gradient
  and keeps only its masked entries. No full-size weight copy, gradient or
  optimizer state outlives one layer's backward.
- Nuclear-norm constraint: `nuclear_norm` of the dense delta of a layer, added
  to the loss with weight `rank_weight` (the trainer picks one random 2-D
  layer per step, as the reference does).
- Progressive re-selection: `reselect` re-applies the stored threshold to the
  updated weights W + delta: entries that grew beyond it are frozen with the
  delta they learned (the `trainable` mask cuts their gradient), those still
  below it keep training (the trainer resets the optimizer state).

The artifact stores, per layer, int32 flat indices and float deltas; applying
is a scatter-add, removing a scatter of the saved originals.

Example:
    >>> layer = SaRALayer(torch.nn.Linear(16, 8), SaRAConfig(fraction=0.25))
    >>> layer.values.numel()
    32
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.targets import add_sparse, layer_forward, wrap_targets

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass
class SaRAConfig:
    """SaRA options: the fraction of each targeted weight to train, the nuclear-norm weight, the targets."""

    fraction: float = ranged(0.1, 0, 1, low_open=True)
    rank_weight: float = ranged(5e-4, 0)  # lambda of the nuclear-norm term (the reference README's value)
    rank_min_dim: int = ranged(32, 1)  # only layers whose smaller weight dim is at least this get the term
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


CONFIG = SaRAConfig  # the method's options: CLI flags, TOML keys and form fields (studio.registry.Method.config)


def smallest_indices(weight: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """Flat indices of the `fraction` smallest |w|, and the threshold |w| below which they lie."""
    if not 0 < fraction <= 1:
        raise StudioError(f"SaRA fraction must be in (0, 1] (got {fraction})")
    magnitudes = weight.detach().abs().flatten().float()
    k = max(1, int(round(fraction * magnitudes.numel())))
    threshold = torch.kthvalue(magnitudes, k).values.item()
    if magnitudes.numel() >= 2**31:
        raise StudioError(f"SaRA indexes weights with int32; a weight of {magnitudes.numel()} entries is too large")
    # int32 halves the memory of the index buffers (the largest part of SaRA's training state).
    indices = torch.nonzero(magnitudes <= threshold).flatten()[:k].to(torch.int32)
    return indices, threshold


INDICES = "sara_indices"  # our keys under each wrapped module: flat indices (int32) and deltas
VALUES = "sara_values"
PARAMS = (INDICES, VALUES)
KEY_PREFIX = "unet."


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """W with `scale` x the sparse delta scatter-added at its flat indices.

    Example:
        >>> w = torch.zeros(2, 2)
        >>> transform(w, {INDICES: torch.tensor([3]), VALUES: torch.tensor([0.5])}).tolist()
        [[0.0, 0.0], [0.0, 0.5]]
    """
    return add_sparse(weight, params[INDICES], params[VALUES], scale)


@contextmanager
def _patched(layer: nn.Module, indices: torch.Tensor, values: torch.Tensor):
    """The frozen weight with the deltas written in place, restored bit-exactly on exit."""
    flat = layer.weight.data.view(-1)
    originals = flat[indices].clone()
    flat[indices] = originals + values.to(flat.dtype)
    try:
        yield layer.weight.data
    finally:
        flat[indices] = originals


class _SparseDelta(torch.autograd.Function):
    """y = layer(x; W + scatter(values)) with only the masked weight gradient kept."""

    @staticmethod
    def forward(ctx, x, values, layer, indices):
        with _patched(layer, indices, values) as weight:
            out = layer_forward(layer, x, weight)
        ctx.layer = layer
        ctx.save_for_backward(x, values, indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        layer = ctx.layer
        # Under autocast the forward ran in grad_out's dtype (e.g. bf16): the backward does too.
        compute = grad_out.dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            with _patched(layer, indices, values) as weight:
                grad_x = _input_grad(layer, x, grad_out, weight.to(compute)).to(x.dtype)
        grad_weight = _weight_grad(layer, x.to(compute), grad_out)
        grad_values = grad_weight.reshape(-1)[indices].to(values.dtype)
        return grad_x, grad_values, None, None


def _input_grad(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_input(x.shape, weight, grad_out, layer.stride, layer.padding, layer.dilation, layer.groups)
    return grad_out @ weight


def _weight_grad(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(x, layer.weight.shape, grad_out, layer.stride, layer.padding, layer.dilation, layer.groups)
    return grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class SaRALayer(nn.Module):
    """A Linear or Conv2d with a trainable sparse delta on its smallest-magnitude weights."""

    def __init__(self, base_layer: nn.Module, config: SaRAConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise StudioError(f"SaRA wraps Linear and Conv2d layers, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise StudioError("SaRA supports zero-padded convolutions only")
        self.base_layer = base_layer.requires_grad_(False)
        indices, threshold = smallest_indices(base_layer.weight, config.fraction)
        self.threshold = threshold
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=base_layer.weight.device))
        # Which entries still train; a re-selection freezes those that grew out of the ineffective set.
        # A mask rather than a smaller Parameter: the optimizer (and DDP) keep the same tensors.
        self.register_buffer("trainable", torch.ones(indices.numel(), dtype=torch.bool, device=indices.device))
        self.scale = 1.0

    def masked_values(self) -> torch.Tensor:
        """The deltas, with the gradient of frozen entries cut."""
        if bool(self.trainable.all()):
            return self.values
        return torch.where(self.trainable, self.values, self.values.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDelta.apply(x, self.masked_values() * self.scale, self.base_layer, self.indices)

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All learned (flat index, delta) pairs of this layer."""
        return self.indices, self.values.detach()

    def dense_delta(self) -> torch.Tensor:
        """The delta as a dense (out, in*kh*kw) matrix, differentiable in the trainable values (for the nuclear norm)."""
        weight = self.base_layer.weight
        dense = torch.zeros(weight.numel(), device=weight.device, dtype=self.values.dtype)
        return dense.index_put((self.indices,), self.masked_values()).view(weight.shape[0], -1)

    @torch.no_grad()
    def reselect(self) -> int:
        """Freeze trained entries that left the ineffective set (|w + delta| >= threshold); return how many."""
        updated = self.base_layer.weight.data.view(-1)[self.indices] + self.values
        leaving = self.trainable & (updated.abs() >= self.threshold)
        self.trainable &= ~leaving
        return int(leaving.sum())


def nuclear_norm(layer: SaRALayer) -> torch.Tensor:
    """||delta||_* (sum of singular values) of the layer's dense delta; its gradient is U V^T."""
    return torch.linalg.svdvals(layer.dense_delta().float()).sum()


def inject(model: nn.Module, config: SaRAConfig) -> list[str]:
    """Wrap every target of `model` in a `SaRALayer`; return the wrapped names."""
    return wrap_targets(model, config.target_modules, lambda layer: SaRALayer(layer, config))


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every `SaRALayer`'s learned (flat index, delta) pairs."""
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, SaRALayer):
            indices, values = layer.delta()
            tensors[f"{KEY_PREFIX}{name}.{INDICES}"] = indices.clone()
            tensors[f"{KEY_PREFIX}{name}.{VALUES}"] = values.clone()
    return tensors


def file_metadata(config) -> dict[str, str]:
    """Extra header entries for our file (none beyond the studio header)."""
    return {}
