"""BOFT: orthogonal finetuning with a butterfly factorisation (Liu et al. 2024).

The rotation of a layer's input side is a product of m butterfly factors,
M = F_{m-1} ... F_1 F_0, each F_i = P_i B_i P_i^T: a block-diagonal orthogonal
B_i (Cayley of a skew-symmetric generator per block) between a fixed
butterfly permutation P_i and its inverse. A learned per-output scale s
follows. The effective weight is W' = diag(s) W M^T (PEFT's convention).

Unlike PEFT on a machine without its CUDA extension, every requested factor
is used (PEFT silently falls back to one), and the permutations are index
tensors, never dense d x d matrices: each factor is a gather, a block
rotation and a scatter. A Linear applies them to its input (x M, then the
frozen layer and s): its backward then needs no full weight gradient, which
`studio bench train-step` shows is what the weight path costs
(benchmarks/results/train-step-weight-path.json vs train-step.json). A Conv2d
applies them to its (out x in*kh*kw) weight, which keeps a 3x3 convolution
exact. At init the generators are zero and s = 1, so the layer is exactly the
base layer.

Parameter layout follows PEFT (`boft_R`: m x n_blocks x b x b, `boft_s`:
out x 1 on Linear, 1 x out on Conv2d), so files load into PEFT's BOFT.

Example:
    >>> layer = BOFTLayer(torch.nn.Linear(32, 8), BOFTConfig(block_size=4, n_butterfly_factor=2))
    >>> x = torch.randn(2, 32)
    >>> torch.equal(layer(x), layer.base_layer(x))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.orthogonal import cayley, rotate_input, rotate_weight
from studio.targets import ATTENTION_PROJECTIONS, in_dim, layer_forward, wrap_targets


@dataclass
class BOFTConfig:
    """BOFT options. Each targeted input dim must be a multiple of block_size * 2**(n_butterfly_factor - 1)."""

    block_size: int = ranged(8, 1, 4096)
    n_butterfly_factor: int = ranged(2, 1, 12)
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


CONFIG = BOFTConfig  # the method's options: CLI flags, TOML keys and form fields (studio.registry.Method.config)


def butterfly_permutation(dim: int, n_groups: int, half_block: int) -> torch.Tensor:
    """Indices of one butterfly permutation (PEFT's `block_butterfly_perm`): (P x)[j] = x[perm[j]].

    The dim is cut into `n_groups` groups; inside each, chunks of `half_block`
    are reordered evens first, then odds, so a block of the next factor mixes
    halves of blocks that were apart in the previous one.
    """
    group = dim // n_groups
    chunks = group // half_block
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
    within = (order[:, None] * half_block + torch.arange(half_block)[None, :]).reshape(-1)
    return (torch.arange(n_groups)[:, None] * group + within[None, :]).reshape(-1)


def butterfly_permutations(dim: int, block_size: int, n_factors: int) -> list[torch.Tensor]:
    """One permutation per factor; the first is the identity when there is a single factor."""
    n_blocks = dim // block_size
    if n_factors == 1:
        return [torch.arange(dim)]
    return [butterfly_permutation(dim, n_blocks // 2**i, block_size // 2) for i in range(n_factors)]


R_PARAM = "boft_R"  # PEFT's keys under each wrapped module
S_PARAM = "boft_s"
PARAMS = (R_PARAM, S_PARAM)
KEY_PREFIX = "base_model.model."


@lru_cache(maxsize=64)
def _permutations(dim: int, block_size: int, n_factors: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    perms = butterfly_permutations(dim, block_size, n_factors)
    return [(perm, torch.argsort(perm)) for perm in perms]


def factor_rotations(generators: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """B_i blocks of every factor, (m, n_blocks, b, b), from PEFT-layout generators (skew part is used)."""
    generators = generators.float() * scale
    skew = 0.5 * (generators - generators.transpose(-1, -2))
    m, n, b, _ = skew.shape
    return cayley(skew.reshape(m * n, b, b)).reshape(m, n, b, b)


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """diag(s) W M^T for one layer from its BOFT tensors; `scale` interpolates generators and s towards identity.

    Example:
        >>> w = torch.randn(4, 16)
        >>> params = {R_PARAM: torch.zeros(2, 4, 4, 4), S_PARAM: torch.ones(4, 1)}
        >>> torch.equal(transform(w, params), w)
        True
    """
    flat = _rotate_columns(weight.reshape(weight.shape[0], -1).float(), factor_rotations(params[R_PARAM], scale))
    return (flat * output_scales(params[S_PARAM].float(), scale)[:, None]).reshape(weight.shape).to(weight.dtype)


def output_scales(boft_s: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The per-output scale s as a vector (out,), moved `scale` of the way from 1."""
    return 1.0 + (boft_s.reshape(-1) - 1.0) * scale


def _rotate_columns(flat: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W M^T for a flat (out, dim) weight and the factors' blocks (m, n_blocks, b, b)."""
    m, _, b, _ = blocks.shape
    for (perm, inverse), factor in zip(_permutations(flat.shape[1], b, m), blocks):
        # W F_i^T = W P_i B_i^T P_i^T: gather columns, rotate blocks, scatter back.
        flat = rotate_weight(flat[:, inverse.to(flat.device)], factor)[:, perm.to(flat.device)]
    return flat


def rotate_input_butterfly(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x M for activations x (..., dim): the input-side twin of `transform`'s W M^T (factors in reverse).

    Example:
        >>> blocks = factor_rotations(torch.randn(2, 4, 4, 4) * 0.1)
        >>> x, w = torch.randn(3, 16), torch.randn(5, 16)
        >>> torch.allclose(rotate_input_butterfly(x, blocks) @ w.T, x @ _rotate_columns(w, blocks).T, atol=1e-5)
        True
    """
    m, _, b, _ = blocks.shape
    permutations = _permutations(x.shape[-1], b, m)
    for (perm, inverse), factor in reversed(list(zip(permutations, blocks))):
        x = rotate_input(x[..., inverse.to(x.device)], factor.to(x.dtype))[..., perm.to(x.device)]
    return x


class BOFTLayer(nn.Module):
    """A Linear or Conv2d whose weight is rotated by a learned butterfly-orthogonal matrix and scaled per output."""

    def __init__(self, base_layer: nn.Module, config: BOFTConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise StudioError(f"BOFT wraps Linear and Conv2d layers, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups > 1:
            raise StudioError("BOFT cannot wrap a grouped convolution (groups > 1); leave it out of target_modules")
        dim = in_dim(base_layer)
        b, m = config.block_size, config.n_butterfly_factor
        if m < 1:
            raise StudioError(f"n_butterfly_factor must be at least 1 (got {m})")
        if m > 1 and b % 2:
            raise StudioError(f"BOFT with {m} butterfly factors needs an even block_size (got {b})")
        span = b * 2 ** (m - 1)
        if dim % b or dim % span:
            raise StudioError(
                f"BOFT block_size {b} with {m} butterfly factors needs an input dim that is a multiple of {span}; "
                f"this layer has {dim}. Use a smaller block_size or fewer factors"
            )
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.boft_R = nn.Parameter(torch.zeros(m, dim // b, b, b, device=device))
        # PEFT's shapes: (out, 1) on Linear, (1, out) on Conv2d.
        out_features = base_layer.weight.shape[0]
        scale_shape = (1, out_features) if isinstance(base_layer, nn.Conv2d) else (out_features, 1)
        self.boft_s = nn.Parameter(torch.ones(*scale_shape, device=device))
        self.scale = 1.0

    def rotated_weight(self) -> torch.Tensor:
        return transform(self.base_layer.weight, {R_PARAM: self.boft_R, S_PARAM: self.boft_s}, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Linear):
            # y = (x M) W^T diag(s) + b: the rotation acts on the activations, so the backward needs
            # no full weight gradient (the weight path pays one tokens x out x in matmul per layer).
            rotated = rotate_input_butterfly(x, factor_rotations(self.boft_R, self.scale))
            out = nn.functional.linear(rotated, self.base_layer.weight) * output_scales(self.boft_s, self.scale).to(x.dtype)
            return out + self.base_layer.bias if self.base_layer.bias is not None else out
        return layer_forward(self.base_layer, x, self.rotated_weight())


def inject(model: nn.Module, config: BOFTConfig) -> list[str]:
    """Wrap every target of `model` in a `BOFTLayer` (identity at init); return the wrapped names."""
    return wrap_targets(model, config.target_modules, lambda layer: BOFTLayer(layer, config))


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Generators and scales of every `BOFTLayer`, under PEFT's keys."""
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, BOFTLayer):
            tensors[f"{KEY_PREFIX}{name}.{R_PARAM}"] = layer.boft_R.detach().clone()
            tensors[f"{KEY_PREFIX}{name}.{S_PARAM}"] = layer.boft_s.detach().clone()
    return tensors


def file_metadata(config) -> dict[str, str]:
    """Extra header entries for our file (none beyond the studio header)."""
    return {}

