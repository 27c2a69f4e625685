"""The ShapesWorld evaluator: a small CNN that names every attribute of a render.

One head per attribute (held-out shapes included) plus the object count; the
256-d penultimate activation is the feature used for Fréchet distances.
Images of any size are resized to 32x32 first.

Example:
    >>> net = ShapesEvaluator()
    >>> logits, features = net(torch.rand(2, 3, 32, 32))
    >>> logits["shape"].shape, features.shape
    (torch.Size([2, 7]), torch.Size([2, 256]))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from studio.toy.render import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
)

ATTRIBUTES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "texture": list(TEXTURES),
    "background": list(BACKGROUNDS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "count": list(COUNTS),
}
INPUT_SIZE = 32
FEATURE_DIM = 256


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShapesEvaluator(nn.Module):
    """Multi-head attribute classifier. Input: RGB in [0, 1], N x 3 x H x W."""

    def __init__(self, attributes: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.attributes = attributes or ATTRIBUTES
        self.body = nn.Sequential(
            _conv_block(3, 32),
            nn.MaxPool2d(2),
            _conv_block(32, 64),
            nn.MaxPool2d(2),
            _conv_block(64, 128),
            nn.MaxPool2d(2),
            nn.Flatten(),  # keep the 4x4 layout: position is a head
            nn.Linear(128 * 4 * 4, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(v)) for name, v in self.attributes.items()})

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        features = self.body((images - 0.5) / 0.25)
        return {name: head(features) for name, head in self.heads.items()}, features

    def save(self, folder: str | Path) -> None:
        """Write `model.safetensors` and `config.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"attributes": self.attributes, "input_size": INPUT_SIZE}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ShapesEvaluator":
        """Load a saved evaluator, in eval mode."""
        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no evaluator at {folder}: expected model.safetensors there; run `studio toy pretrain` to build it"
            )
        config = json.loads((folder / "config.json").read_text())
        net = cls(config["attributes"])
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return net.to(device).eval()
