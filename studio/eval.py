"""Measuring what a model draws, with the ShapesWorld evaluator.

`score` names the attributes of each image and compares them with what was
asked for; `frechet_distance` compares two sets of evaluator features. Every
later claim (fidelity, erasure, preservation, control) is a call to these.

Example:
    >>> from studio.toy.render import ShapeSpec, render
    >>> img = render(ShapeSpec("circle", "red")).image
    >>> table = score([img], [{"shape": "circle", "color": "red"}])
    >>> table.accuracy()["shape"]
    1.0
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from studio.errors import StudioError
from studio.toy.evaluator import ATTRIBUTES, ShapesEvaluator


def evaluator_path() -> Path:
    """Where the shipped evaluator lives."""
    from studio.pipeline import assets_dir

    return assets_dir() / "toy-evaluator"


@lru_cache(maxsize=4)
def load_evaluator(path: str | None = None) -> ShapesEvaluator:
    """Load (once) the evaluator from `path`, default the shipped one.

    Example:
        >>> load_evaluator().attributes["texture"]
        ['plain', 'striped', 'dotted', 'checkered']
    """
    folder = Path(path) if path else evaluator_path()
    try:
        return ShapesEvaluator.load(folder)
    except FileNotFoundError as err:
        raise StudioError(str(err)) from None


def to_batch(images) -> torch.Tensor:
    """PIL images, uint8 HxWx3 arrays, or an N x 3 x H x W float tensor in [0, 1] -> the latter.

    Example:
        >>> to_batch([np.zeros((32, 32, 3), np.uint8)]).shape
        torch.Size([1, 3, 32, 32])
    """
    if isinstance(images, torch.Tensor):
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        return batch.detach().float().cpu()
    arrays = [np.asarray(img.convert("RGB") if hasattr(img, "convert") else img) for img in images]
    if not arrays:
        raise StudioError("no images to score")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise StudioError(f"images to score differ in size {sorted(shapes)}; score each size separately")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


@dataclass
class ScoreTable:
    """One row per image: predicted attributes, their confidence, and whether they match what was asked."""

    rows: list[dict] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        """Share of images whose prediction matches the expected value, per attribute that had one."""
        result = {}
        for name in ATTRIBUTES:
            hits = [row[f"{name}_ok"] for row in self.rows if f"{name}_ok" in row]
            if hits:
                result[name] = float(np.mean(hits))
        return result

    def rate(self, attribute: str, value: str) -> float:
        """Share of images predicted to have `attribute == value` (e.g. how many are stars)."""
        return float(np.mean([row[attribute] == value for row in self.rows])) if self.rows else 0.0

    def to_json(self) -> str:
        return json.dumps({"accuracy": self.accuracy(), "rows": self.rows}, indent=2)

    def __str__(self) -> str:
        columns = list(ATTRIBUTES)
        lines = ["  ".join(f"{c:>10}" for c in ["#", *columns])]
        for i, row in enumerate(self.rows):
            cells = [str(i)] + [row[c] + ("" if row.get(f"{c}_ok", True) else "*") for c in columns]
            lines.append("  ".join(f"{c:>10}" for c in cells))
        lines.append("accuracy: " + json.dumps({k: round(v, 3) for k, v in self.accuracy().items()}))
        return "\n".join(lines)


@torch.no_grad()
def predict(images, evaluator: ShapesEvaluator | None = None, batch_size: int = 256):
    """Evaluator logits per attribute and features, for a batch of images."""
    evaluator = evaluator or load_evaluator()
    batch = to_batch(images)
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in evaluator.attributes}
    features = []
    for chunk in batch.split(batch_size):
        out, feats = evaluator(chunk)
        for k in logits:
            logits[k].append(out[k])
        features.append(feats)
    return {k: torch.cat(v) for k, v in logits.items()}, torch.cat(features)


def score(images, expected: list[dict] | None = None, evaluator: ShapesEvaluator | None = None) -> ScoreTable:
    """Predict every attribute of each image and compare with `expected` (one dict per image).

    Keys of `expected` are attribute names (shape, color, texture, background,
    size, position, count); attributes left out are predicted but not judged.

    Example:
        >>> from studio.toy.render import ShapeSpec, render
        >>> score([render(ShapeSpec("square", "blue")).image]).rows[0]["color"]
        'blue'
    """
    logits, _ = predict(images, evaluator)
    n = next(iter(logits.values())).shape[0]
    if expected is not None and len(expected) != n:
        raise StudioError(f"{n} images but {len(expected)} expectations; give one dict per image")
    rows = []
    for i in range(n):
        row: dict = {}
        for name, values in ATTRIBUTES.items():
            probs = logits[name][i].softmax(-1)
            row[name] = values[int(probs.argmax())]
            row[f"{name}_p"] = round(float(probs.max()), 4)
        for name, want in (expected[i] if expected else {}).items():
            if name not in ATTRIBUTES:
                raise StudioError(f"unknown attribute {name!r} in expectations; use one of {list(ATTRIBUTES)}")
            if want not in ATTRIBUTES[name]:
                raise StudioError(f"unknown {name} {want!r}; choose one of {ATTRIBUTES[name]}")
            row[f"{name}_ok"] = row[name] == want
        rows.append(row)
    return ScoreTable(rows)


def features(images, evaluator: ShapesEvaluator | None = None) -> np.ndarray:
    """Evaluator features (N x 256) for a Fréchet distance."""
    return predict(images, evaluator)[1].numpy().astype(np.float64)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as FID does).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.normal(size=(500, 4)); round(frechet_distance(a, a), 6)
        0.0
    """
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    # tr(sqrt(A B)) = sum sqrt(eig(sqrt(A) B sqrt(A))), symmetric so eigh is stable.
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
