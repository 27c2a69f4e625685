"""OFT: orthogonal finetuning (Qiu et al. 2023), block-diagonal, Cayley-parameterised.

Each targeted layer's input side is rotated by a block-diagonal orthogonal
matrix R = blockdiag(R_1, ..., R_n), R_i = (I - Q_i)(I + Q_i)^-1 with Q_i
skew-symmetric. In PEFT's row convention the rotated input is x R, so the
layer computes (x R) W^T = x (W R^T)^T: its effective weight is W' = W R^T.

A Conv2d gets R on its *weight* (out x in*kh*kw): a 3x3 convolution then
stays an exact convolution (PEFT's unfold/fold on activations is not the base
layer at identity). A Linear rotates its input instead (x R, then the frozen
layer): the same layer, and its backward needs no full weight gradient, which
is what the weight path costs (`studio bench train-step`:
benchmarks/results/train-step-weight-path.json vs train-step.json). At init
Q = 0, so R = I and the layer is exactly the base layer.

Parameter layout follows PEFT (`oft_R`: n_blocks x b(b-1)/2, the strict upper
triangle of each Q_i, row-major), so our files load into PEFT with
`use_cayley_neumann=False` (exact Cayley) and give the same outputs on Linear
and 1x1 Conv2d layers.

Example:
    >>> layer = OFTLayer(torch.nn.Linear(64, 8), OFTConfig(block_size=16))
    >>> x = torch.randn(2, 64)
    >>> torch.equal(layer(x), layer.base_layer(x))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from studio.errors import StudioError
from studio.options import ranged
from studio.orthogonal import cayley, rotate_input, rotate_weight, skew_symmetric
from studio.targets import ATTENTION_PROJECTIONS, in_dim, layer_forward, wrap_targets


@dataclass
class OFTConfig:
    """OFT options. `block_size` must divide every targeted layer's input dim (in_features, or in_ch*kh*kw)."""

    block_size: int = ranged(32, 1, 4096)
    coft: bool = False  # constrained OFT: keep each ||Q_i|| within eps / sqrt(n_blocks)
    eps: float = ranged(6e-5, 0, low_open=True)
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


CONFIG = OFTConfig  # the method's options: CLI flags, TOML keys and form fields (studio.registry.Method.config)


def project_coft(params: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: scale each block's Q back onto the ball ||Q||_F <= eps / sqrt(n_blocks) (PEFT's radius)."""
    radius = eps / params.shape[0] ** 0.5
    norms = skew_symmetric(params, block_size).flatten(1).norm(dim=1, keepdim=True)
    return torch.where(norms > radius, params * (radius / norms.clamp_min(1e-12)), params)


PARAM = "oft_R.weight"  # PEFT's key for the generators under each wrapped module
PARAMS = (PARAM,)
KEY_PREFIX = "base_model.model."  # PEFT's prefix: our files load with set_peft_model_state_dict


def rotations(params: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The blocks R_i = Cayley(scale * Q_i), (n_blocks, b, b), from PEFT-layout generators (n_blocks, b(b-1)/2)."""
    n_params = params.shape[1]
    block_size = int(round((1 + (1 + 8 * n_params) ** 0.5) / 2))
    return cayley(skew_symmetric(params.float() * scale, block_size))


def transform(weight: torch.Tensor, params: dict[str, torch.Tensor], scale: float = 1.0, config: dict | None = None) -> torch.Tensor:
    """The rotated weight W R^T of one layer, from its OFT tensors; `scale` interpolates the generator.

    Example:
        >>> w = torch.randn(4, 8)
        >>> torch.equal(transform(w, {PARAM: torch.zeros(2, 6)}), w)
        True
    """
    return rotate_layer_weight(weight, rotations(params[PARAM], scale))


def rotate_layer_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W R^T for a Linear or Conv2d weight (viewed as out x in*kh*kw), in fp32, returned in its dtype."""
    flat = weight.reshape(weight.shape[0], -1)
    return rotate_weight(flat.float(), blocks).reshape(weight.shape).to(weight.dtype)


class OFTLayer(nn.Module):
    """A Linear or Conv2d whose weight is rotated on the input side by a learned block-diagonal R."""

    def __init__(self, base_layer: nn.Module, config: OFTConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise StudioError(f"OFT wraps Linear and Conv2d layers, not {type(base_layer).__name__}")
        dim = in_dim(base_layer)
        if dim % config.block_size:
            raise StudioError(
                f"OFT block_size {config.block_size} does not divide the layer's input dim {dim}; "
                "pick a block size that divides every targeted layer (e.g. 4, 8, 16, 32)"
            )
        self.base_layer = base_layer
        self.block_size = config.block_size
        self.coft = config.coft
        self.eps = config.eps
        n_blocks = dim // config.block_size
        n_params = config.block_size * (config.block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(n_blocks, n_params, device=base_layer.weight.device))
        self.scale = 1.0

    def rotations(self) -> torch.Tensor:
        if self.coft and self.training:
            with torch.no_grad():
                self.oft_R.copy_(project_coft(self.oft_R, self.block_size, self.eps))
        return rotations(self.oft_R, self.scale)

    def rotated_weight(self) -> torch.Tensor:
        return rotate_layer_weight(self.base_layer.weight, self.rotations())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Linear):
            # For a Linear, rotating the input is the same layer, and its backward needs no full
            # weight gradient (the weight path pays one tokens x out x in matmul per layer).
            return self.base_layer(rotate_input(x, self.rotations()))
        return layer_forward(self.base_layer, x, self.rotated_weight())


def inject(model: nn.Module, config: OFTConfig) -> list[str]:
    """Wrap every target of `model` in an `OFTLayer` (identity at init); return the wrapped names."""
    return wrap_targets(model, config.target_modules, lambda layer: OFTLayer(layer, config))


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The generators of every `OFTLayer`, under PEFT's keys."""
    return {
        f"{KEY_PREFIX}{name}.{PARAM}": layer.oft_R.detach().clone()
        for name, layer in model.named_modules()
        if isinstance(layer, OFTLayer)
    }


def file_metadata(config) -> dict[str, str]:
    """Extra header entries for our file (none beyond the studio header)."""
    return {}

