import copy

import pytest
import torch
from studio.adapters.boft import BOFTConfig, BOFTLayer, factor_rotations
from studio.adapters.oft import OFTConfig, OFTLayer, project_coft, rotations
from torch import nn

from studio.errors import StudioError
from studio.orthogonal import skew_symmetric

LAYERS = {
    "linear": (lambda: nn.Linear(64, 16), lambda: torch.randn(3, 64)),
    "conv1x1": (lambda: nn.Conv2d(32, 8, 1), lambda: torch.randn(2, 32, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(16, 8, 3, padding=1, stride=2), lambda: torch.randn(2, 16, 7, 7)),
}
ADAPTERS = {
    "oft": lambda base: OFTLayer(base, OFTConfig(block_size=8)),
    "boft": lambda base: BOFTLayer(base, BOFTConfig(block_size=4, n_butterfly_factor=3)),
}


def _randomise(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p is not layer.base_layer.weight and p is not layer.base_layer.bias:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("method", ADAPTERS)
def test_identity_at_init_is_exact(kind, method):
    torch.manual_seed(0)
    make_base, make_input = LAYERS[kind]
    base = make_base()
    layer = ADAPTERS[method](base)
    x = make_input()
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("method", ADAPTERS)
def test_rotation_is_orthogonal_and_scale_interpolates(method):
    torch.manual_seed(0)
    base = nn.Linear(64, 16)
    layer = ADAPTERS[method](base)
    _randomise(layer)
    blocks = rotations(layer.oft_R) if method == "oft" else factor_rotations(layer.boft_R).flatten(0, 1)
    eye = torch.eye(blocks.shape[-1]).expand_as(blocks)
    assert torch.allclose(blocks @ blocks.transpose(-1, -2), eye, atol=1e-5)
    # Rotating the input side keeps each output neuron's norm (up to BOFT's per-output scale).
    if method == "oft":
        assert torch.allclose(layer.rotated_weight().norm(dim=1), base.weight.norm(dim=1), atol=1e-5)
    x = torch.randn(4, 64)
    full = layer(x)
    layer.scale = 0.0
    assert torch.equal(layer(x), base(x))
    layer.scale = 0.5
    half = layer(x)
    assert 0 < (half - base(x)).abs().mean() < (full - base(x)).abs().mean()


def test_coft_keeps_generators_in_the_ball():
    params = torch.randn(4, 28)
    projected = project_coft(params, 8, eps=1e-3)
    norms = skew_symmetric(projected, 8).flatten(1).norm(dim=1)
    assert (norms <= 1e-3 / 2 + 1e-9).all()
    small = params * 1e-6
    assert torch.equal(project_coft(small, 8, eps=1e-3), small)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 8)
        self.conv = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, z):
        return self.lin(x), self.conv(z), self.conv3(z)


def test_oft_equals_peft_on_linear_and_1x1_conv():
    from peft import OFTConfig as PeftOFTConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    model = TwoLayers()
    x, z = torch.randn(2, 32), torch.randn(2, 8, 5, 5)
    peft_model = get_peft_model(copy.deepcopy(model), PeftOFTConfig(oft_block_size=4, r=0, target_modules=["lin", "conv"], use_cayley_neumann=False))
    for name, inp in (("lin", x), ("conv", z)):
        ours = OFTLayer(getattr(model, name), OFTConfig(block_size=4))
        _randomise(ours)
        with torch.no_grad():
            getattr(peft_model.base_model.model, name).oft_R["default"].weight.copy_(ours.oft_R)
        assert torch.allclose(getattr(peft_model.base_model.model, name)(inp), ours(inp), atol=1e-5)


def test_boft_equals_peft_single_factor():
    from peft import BOFTConfig as PeftBOFTConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    model = TwoLayers()
    x, z = torch.randn(2, 32), torch.randn(2, 8, 5, 5)
    config = PeftBOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["lin", "conv3"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    for name, inp in (("lin", x), ("conv3", z)):
        ours = BOFTLayer(getattr(model, name), BOFTConfig(block_size=4, n_butterfly_factor=1))
        _randomise(ours)
        theirs = getattr(peft_model.base_model.model, name)
        with torch.no_grad():
            theirs.boft_R["default"].copy_(ours.boft_R)
            theirs.boft_s["default"].copy_(ours.boft_s)
        assert torch.allclose(theirs(inp), ours(inp), atol=1e-5)


@pytest.mark.parametrize("dim, block, factors", [(32, 4, 2), (64, 4, 3), (48, 6, 2), (64, 8, 3)])
def test_boft_butterfly_matches_peft_permutations(dim, block, factors):
    # PEFT builds these dense; on CPU it never uses more than one factor, so compare with its maths directly.
    from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer

    torch.manual_seed(0)
    base = nn.Linear(dim, 5)
    ours = BOFTLayer(base, BOFTConfig(block_size=block, n_butterfly_factor=factors))
    _randomise(ours)
    blocks = factor_rotations(ours.boft_R)
    rotation = torch.eye(dim)
    for i in range(factors):
        perm = PeftBOFTLayer.block_butterfly_perm(None, dim, int((dim // block) / 2**i), block // 2, factors - 1)
        p = PeftBOFTLayer.perm2mat(None, perm)
        rotation = p @ torch.block_diag(*blocks[i]) @ p.T @ rotation
    x = torch.randn(3, dim)
    reference = (x @ rotation @ base.weight.T) * ours.boft_s.reshape(-1) + base.bias
    assert torch.allclose(ours(x), reference, atol=1e-5)


def test_bad_block_sizes_are_explained():
    with pytest.raises(StudioError, match="block_size 7 does not divide"):
        OFTLayer(nn.Linear(64, 8), OFTConfig(block_size=7))
    with pytest.raises(StudioError, match="multiple of 32"):
        BOFTLayer(nn.Linear(48, 8), BOFTConfig(block_size=8, n_butterfly_factor=3))
