"""Orthogonal maths shared by OFT and BOFT: skew-symmetric generators, the Cayley map, block rotations.

Everything acts on a layer's *weight* viewed as (out, in * kh * kw), so a
rotation of the input side is a column operation on the weight and never a
dense d x d matrix.

Example:
    >>> q = skew_symmetric(torch.randn(3, 6), 4)
    >>> r = cayley(q)
    >>> torch.allclose(r @ r.transpose(-1, -2), torch.eye(4).expand(3, 4, 4), atol=1e-5)
    True
"""

from __future__ import annotations

import torch


def skew_symmetric(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b(b-1)/2) strict-upper-triangle entries -> (n, b, b) skew-symmetric matrices Q = U - U^T."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-1, -2)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform (I - Q)(I + Q)^-1 of a batch of skew-symmetric matrices: orthogonal."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    # X (I + Q) = (I - Q)  <=>  X = (I - Q)(I + Q)^-1
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def rotate_weight(weight: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """W' = W R^T for block-diagonal R given as (n, b, b); `weight` is (out, n*b)."""
    out_features = weight.shape[0]
    n, b, _ = rotations.shape
    blocks = weight.reshape(out_features, n, b)
    return torch.einsum("onk,nck->onc", blocks, rotations).reshape(out_features, n * b)


def rotate_input(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x' = x R for block-diagonal R given as (n, b, b); the same as running a Linear with W R^T on x.

    Example:
        >>> r = cayley(skew_symmetric(torch.randn(2, 6), 4))
        >>> x, w = torch.randn(3, 8), torch.randn(5, 8)
        >>> torch.allclose(rotate_input(x, r) @ w.T, x @ rotate_weight(w, r).T, atol=1e-5)
        True
    """
    n, b, _ = rotations.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    return torch.einsum("...nc,nck->...nk", blocks, rotations.to(x.dtype)).reshape(x.shape)
