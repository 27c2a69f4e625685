import pytest
import torch
import torch.nn.functional as F
from studio.adapters.sara import SaRAConfig, SaRALayer, nuclear_norm, smallest_indices
from torch import nn

from studio.errors import StudioError

CASES = [
    (lambda: nn.Linear(16, 8), lambda: torch.randn(3, 5, 16)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), lambda: torch.randn(2, 4, 7, 7)),
    (lambda: nn.Conv2d(8, 4, 1), lambda: torch.randn(2, 8, 5, 5)),
]


def _dense_reference(base, weight, x):
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding)
    return F.linear(x, weight, base.bias)


@pytest.mark.parametrize("make_base, make_input", CASES)
def test_sparse_delta_matches_dense_and_touches_only_masked_entries(make_base, make_input):
    torch.manual_seed(0)
    base, x = make_base(), make_input().requires_grad_(True)
    original = base.weight.detach().clone()
    layer = SaRALayer(base, SaRAConfig(fraction=0.2))
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.values.normal_(0, 0.3)
    dense = original.clone().view(-1)
    dense[layer.indices] += layer.values.detach()
    reference_weight = dense.view_as(original).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), _dense_reference(base, reference_weight, x_ref)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(layer.values.grad, reference_weight.grad.view(-1)[layer.indices], atol=1e-6)
    # The frozen weight is bit-exactly what it was, and never gets a gradient.
    assert torch.equal(base.weight, original) and base.weight.grad is None
    # Only the masked entries change the effective weight.
    effective = original.clone().view(-1)
    idx, vals = layer.delta()
    effective[idx] += vals
    changed = (effective != original.view(-1)).nonzero().flatten()
    assert set(changed.tolist()) <= set(layer.indices.tolist())


def test_selection_takes_the_smallest_fraction():
    weight = torch.arange(1, 101, dtype=torch.float32).view(10, 10) * torch.tensor([1.0, -1.0]).repeat(50).view(10, 10)
    indices, threshold = smallest_indices(weight, 0.1)
    assert sorted(weight.view(-1)[indices].abs().tolist()) == list(range(1, 11))
    assert threshold == 10
    with pytest.raises(StudioError, match="fraction must be in"):
        smallest_indices(weight, 0.0)


def test_reselection_freezes_grown_entries_and_keeps_the_function():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = SaRALayer(base, SaRAConfig(fraction=0.3))
    with torch.no_grad():
        layer.values.normal_(0, 0.5)
    x = torch.randn(4, 32)
    before = layer(x)
    total = layer.values.numel()
    frozen = layer.reselect()
    assert 0 < frozen < total and int(layer.trainable.sum()) == total - frozen
    assert torch.allclose(layer(x), before, atol=1e-6)
    trainable = layer.trainable
    still = base.weight.view(-1)[layer.indices][trainable] + layer.values.detach()[trainable]
    assert (still.abs() < layer.threshold).all()
    # Frozen entries get no gradient, from the loss or from the nuclear norm.
    (layer(x).sum() + nuclear_norm(layer)).backward()
    assert (layer.values.grad[~trainable] == 0).all() and (layer.values.grad[trainable] != 0).any()


def test_nuclear_norm_gradient_flows_to_values():
    torch.manual_seed(0)
    layer = SaRALayer(nn.Linear(32, 32), SaRAConfig(fraction=0.5))
    with torch.no_grad():
        layer.values.normal_(0, 0.1)
    norm = nuclear_norm(layer)
    assert torch.isclose(norm, torch.linalg.matrix_norm(layer.dense_delta().detach(), ord="nuc"))
    norm.backward()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
