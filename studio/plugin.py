"""Putting artifacts on a stock diffusers pipeline: apply, scale, compose, fuse, unfuse, remove.

Every method's file says, per layer, how it changes that layer's weight
(`studio.adapters.<method>.transform(weight, params, scale, config)`): LoRA adds
B A, OFT and BOFT rotate, SaRA scatter-adds. `apply` wraps each touched layer
once in an `AdaptedLayer` that keeps the untouched base layer and an ordered
stack of such transforms, so artifacts of different methods compose on one
layer, each with its own scale, and the effective weight is computed once and
cached until a scale changes.

We do this ourselves rather than through diffusers' `set_adapters`/`fuse_lora`
because those handle LoRA only (OFT raises, scaled fuse is ignored) and their
fuse/unfuse subtracts deltas back out, which drifts; here `fuse` keeps the
original weight and `unfuse` restores it bit-exactly.

A file's keys start with the pipeline part they change (`unet.`, and for a
LoRA trained with `--train-text-encoder` also `text_encoder.` and, on SDXL,
`text_encoder_2.`: the method's `COMPONENTS`); the text encoders' layers are
wrapped, scaled, fused and removed exactly like the UNet's.

Example:
    >>> from studio.pipeline import load
    >>> pipe = load("toy")
    >>> name = apply(pipe, "star-lora.safetensors", scale=0.8)  # doctest: +SKIP
    >>> fuse(pipe); unfuse(pipe); remove(pipe, name)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from studio import registry
from studio.artifact import check_fingerprint, read_header
from studio.errors import StudioError
from studio.targets import layer_forward, model_module_name, replace_module


@dataclass
class _Stacked:
    method: str
    params: dict[str, torch.Tensor]
    config: dict
    scale: float = 1.0
    enabled: bool = True


class AdaptedLayer(nn.Module):
    """A Linear/Conv2d carrying a stack of artifact transforms, applied in order to its weight."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.stack: dict[str, _Stacked] = {}
        self.original: torch.Tensor | None = None  # set while fused
        self._cached: torch.Tensor | None = None

    def invalidate(self) -> None:
        self._cached = None

    def effective_weight(self) -> torch.Tensor:
        if self._cached is None:
            weight = self.base_layer.weight if self.original is None else self.original
            with torch.no_grad():
                for entry in self.stack.values():
                    if entry.enabled and entry.scale != 0:
                        adapter = registry.get(entry.method).adapter
                        weight = adapter.transform(weight, entry.params, entry.scale, entry.config)
            self._cached = weight
        return self._cached

    @property
    def active(self) -> bool:
        return any(e.enabled and e.scale != 0 for e in self.stack.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.original is not None or not self.active:
            return self.base_layer(x)  # fused (the weight already holds the stack), or nothing to do
        return layer_forward(self.base_layer, x, self.effective_weight())


NO_TENSORS = "the file holds no tensors this method recognises; was it converted from another format?"


def components(adapter) -> dict[str, str]:
    """The pipeline parts a method's files may change, each with the prefix of its keys: the UNet
    (under the method's `KEY_PREFIX`), and for LoRA (`COMPONENTS`) also the text encoders.

    Example:
        >>> components(registry.get("oft").adapter)
        {'unet': 'base_model.model.'}
        >>> list(components(registry.get("lora").adapter).values())
        ['unet.', 'text_encoder.', 'text_encoder_2.']
    """
    parts = getattr(adapter, "COMPONENTS", None)
    return {part: f"{part}." for part in parts} if parts else {"unet": adapter.KEY_PREFIX}


def split_by_module(tensors: dict[str, torch.Tensor], adapter, prefix: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Group a file's tensors by the layer they belong to, using the key prefix (default the adapter's,
    "unet.") and the adapter's parameter names.

    Example:
        >>> from studio.adapters import lora
        >>> sorted(split_by_module({"unet.a.lora_A.weight": torch.zeros(1)}, lora))
        ['a']
    """
    required, prefix = prefix is None, adapter.KEY_PREFIX if prefix is None else prefix
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for param in adapter.PARAMS:
            if rest.endswith("." + param):
                grouped.setdefault(rest[: -len(param) - 1], {})[param] = value
                break
    if not grouped and required:
        raise StudioError(NO_TENSORS)
    return grouped


def _registry(pipe) -> dict[str, list[tuple[str, str]]]:
    """Artifact name -> the (pipeline part, layer name) pairs it touches, kept on the pipeline."""
    if not hasattr(pipe, "_studio_artifacts"):
        pipe._studio_artifacts = {}
    return pipe._studio_artifacts


def _layers(pipe, name: str) -> list[AdaptedLayer]:
    return [getattr(pipe, part).get_submodule(layer) for part, layer in _registry(pipe)[name]]


def _adapted_layers(pipe) -> list[AdaptedLayer]:
    """Every wrapped layer of the pipeline, in the UNet and the text encoders alike."""
    return [m for part in pipe.components.values() if isinstance(part, nn.Module)
            for m in part.modules() if isinstance(m, AdaptedLayer)]


def apply(pipe, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
    """Attach the artifact at `path` to `pipe` at `scale`; return its name (default: the file stem,
    made unique: two runs' `lora.safetensors` are applied as `lora` and `lora-2`).

    A file made on another base model is refused, naming the layers that differ. A LoRA with text-encoder
    tensors changes the text encoder(s) too.

    Example:
        >>> apply(pipe, "outputs/star/lora.safetensors", scale=0.8)  # doctest: +SKIP
        'lora'
    """
    path = Path(path)
    header = read_header(path)
    method = registry.get(header.method)
    if name is None:
        name, n = path.stem, 1
        while name in _registry(pipe):
            n += 1
            name = f"{path.stem}-{n}"
    if name in _registry(pipe):
        raise StudioError(f"an artifact named {name!r} is already applied; pass another name or remove it first")
    tensors = load_file(str(path))
    # Per pipeline part: its layers' tensors, and the part, checked against the file's fingerprint first.
    parts = {}
    for part, prefix in components(method.adapter).items():
        grouped = split_by_module(tensors, method.adapter, prefix)
        if not grouped:
            continue
        model = getattr(pipe, part, None)
        if model is None:
            raise StudioError(f"{path} changes {part}, which this pipeline ({type(pipe).__name__}) does not have; "
                              "load the kind of model it was made for (a file with text_encoder_2 is for SDXL)")
        expected = header.fingerprint if part == "unet" else header.fingerprint.get(part, {})
        check_fingerprint(expected, model, path)
        parts[part] = (model, grouped)
    if not parts:
        raise StudioError(f"{path}: {NO_TENSORS}")
    if any(layer.original is not None for layer in _adapted_layers(pipe)):
        raise StudioError("unfuse the pipeline before applying another artifact")
    touched = []
    for part, (model, grouped) in parts.items():
        device, dtype = model.device, model.dtype
        for file_name, params in grouped.items():
            layer_name = model_module_name(model, file_name)
            layer = model.get_submodule(layer_name)
            if not isinstance(layer, AdaptedLayer):
                if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                    raise StudioError(f"{path}: layer {part}.{file_name} is a {type(layer).__name__}, not a Linear or Conv2d")
                layer = AdaptedLayer(layer)
                replace_module(model, layer_name, layer)
            on_device = {k: v.to(device) if k.endswith("indices") else v.to(device, dtype) for k, v in params.items()}
            layer.stack[name] = _Stacked(header.method, on_device, header.config, scale)
            layer.invalidate()
            touched.append((part, layer_name))
    _registry(pipe)[name] = touched
    return name


def set_scale(pipe, name: str, scale: float) -> None:
    """Change the scale of an applied artifact (0 switches it off)."""
    for layer in _layers(pipe, _known(pipe, name)):
        layer.stack[name].scale = scale
        layer.invalidate()


def set_enabled(pipe, name: str, enabled: bool) -> None:
    """Switch an applied artifact on or off without forgetting it."""
    for layer in _layers(pipe, _known(pipe, name)):
        layer.stack[name].enabled = enabled
        layer.invalidate()


def compose(pipe, artifacts: list[tuple[str | Path, float]]) -> list[str]:
    """Apply several artifacts, each at its scale, in order.

    Example:
        >>> compose(pipe, [("style.safetensors", 0.6), ("star.safetensors", 1.0)])  # doctest: +SKIP
        ['style', 'star']
    """
    return [apply(pipe, path, scale) for path, scale in artifacts]


def fuse(pipe) -> None:
    """Write every adapted layer's effective weight into the layer, keeping the original for `unfuse`."""
    for layer in _adapted_layers(pipe):
        if layer.original is None and layer.active:
            weight = layer.effective_weight()
            layer.original = layer.base_layer.weight.data.clone()
            layer.base_layer.weight.data.copy_(weight)
            layer.invalidate()


def unfuse(pipe) -> None:
    """Restore every fused layer's original weight, bit for bit."""
    for layer in _adapted_layers(pipe):
        if layer.original is not None:
            layer.base_layer.weight.data.copy_(layer.original)
            layer.original = None
            layer.invalidate()


def remove(pipe, name: str) -> None:
    """Take an artifact off; layers left with nothing on them are put back as they were."""
    entries = _registry(pipe)[_known(pipe, name)]
    if any(layer.original is not None for layer in _layers(pipe, name)):
        raise StudioError("unfuse the pipeline before removing an artifact")
    for part, layer_name in entries:
        model = getattr(pipe, part)
        layer = model.get_submodule(layer_name)
        del layer.stack[name]
        layer.invalidate()
        if not layer.stack:
            replace_module(model, layer_name, layer.base_layer)
    del _registry(pipe)[name]


def applied(pipe) -> dict[str, list[str]]:
    """Names of the applied artifacts and the layers each touches, as paths from the pipeline
    ("unet.down_blocks.0...to_q", "text_encoder.encoder.layers.0.self_attn.q_proj")."""
    return {k: [f"{part}.{layer}" for part, layer in v] for k, v in _registry(pipe).items()}


def _known(pipe, name: str) -> str:
    if name not in _registry(pipe):
        raise StudioError(f"no artifact named {name!r} is applied; applied: {sorted(_registry(pipe)) or 'none'}")
    return name
