"""The method registry: every method is registered here once, by name.

A method is a pair of modules, `studio.adapters.<name>` (what it is: config,
layers, how its file changes a weight) and `studio.trainers.<name>` (how it
is learned). The CLI, the web app and the plugin find methods here and never
name one in an if/else chain. Modules are imported on first use, so listing
methods is cheap.

Example:
    >>> sorted(METHODS)[:2]
    ['boft', 'lora']
    >>> get("oft").adapter.OFTConfig().block_size
    32
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from studio.errors import StudioError


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its kind of job, and where its two halves live."""

    name: str
    kind: str  # "adapter" (train & apply), "erase", "quantize", ...
    summary: str

    @property
    def adapter(self) -> ModuleType:
        return importlib.import_module(f"studio.adapters.{self.name}")

    @property
    def trainer(self) -> ModuleType:
        return importlib.import_module(f"studio.trainers.{self.name}")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", "adapter", "low-rank update W + (alpha/r) B A, through PEFT"),
        Method("oft", "adapter", "block-diagonal orthogonal rotation of each weight's input side"),
        Method("boft", "adapter", "butterfly-factorised orthogonal rotation and per-output scale"),
        Method("sara", "adapter", "sparse update of each weight's smallest entries"),
    ]
}


def get(name: str) -> Method:
    """The registered method called `name`, or a `StudioError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise StudioError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None
