"""Putting artifacts on a stock diffusers pipeline: apply, scale, compose, fuse, unfuse, remove.

Every method's file says, per layer, how it changes that layer's weight
(`studio.adapters.<method>.transform(weight, params, scale, config)`): LoRA adds
B A, OFT and BOFT rotate, SaRA scatter-adds. `apply` attaches to each touched
Linear/Conv2d a forward hook (`StudioHook`, one per layer, through diffusers'
`HookRegistry`) holding an ordered stack of such transforms: the layer keeps
its class, its parameters and their state-dict keys, so diffusers' and PEFT's
own loaders treat it as the plain layer it is. The effective weight is
computed once and cached until something it depends on changes.

Why a hook and not a wrapper module: a wrapper changes the layer's type and
keys, so a later `pipe.load_lora_weights` refuses it ("Target module ... is not
supported"), and a wrapper posing as a PEFT layer breaks PEFT's merge, scaling
and unload. A hook on the plain layer survives PEFT's injection, merge and
unload (see docs/architecture.md, "Attaching").

Order. Transforms compose in the order they were applied, stock adapters
included: each of our transforms acts on the weight as it stood when it was
applied. Apply an OFT after `pipe.load_lora_weights(...)` and the LoRA's update
is rotated too, W' = (W + B A) R^T; load the LoRA after the OFT and it adds on
top, W' = W R^T + B A. Additive methods (LoRA, SaRA) commute, so for them the
order changes nothing. Stock LoRA scales (`set_adapters`), enabling and
disabling, `fuse_lora` and `unload_lora_weights` are honoured at every call.

A file's keys start with the pipeline part they change (`unet.`, and for a
LoRA trained with `--train-text-encoder` also `text_encoder.` and, on SDXL,
`text_encoder_2.`: the method's `COMPONENTS`); the text encoders' layers are
hooked, scaled, fused and removed exactly like the UNet's.

We do this ourselves rather than through diffusers' `set_adapters`/`fuse_lora`
because those handle LoRA only (OFT raises, scaled fuse is ignored) and their
fuse/unfuse subtracts deltas back out, which drifts; here `fuse` keeps the
original weight and `unfuse` restores it bit-exactly.

Example:
    >>> from studio.pipeline import load
    >>> pipe = load("toy")
    >>> name = apply(pipe, "star-lora.safetensors", scale=0.8)  # doctest: +SKIP
    >>> fuse(pipe); unfuse(pipe); remove(pipe, name)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from studio import registry
from studio.artifact import METHOD_KEY, artifact_file, artifact_name, check_fingerprint, load_tensors, read_header
from studio.errors import StudioError
from studio.targets import layer_forward, model_module_name

HOOK_NAME = "studio"  # our hook's name in each layer's diffusers HookRegistry


@dataclass
class _Stacked:
    method: str
    params: dict[str, torch.Tensor]
    config: dict
    scale: float = 1.0
    enabled: bool = True
    # The stock (PEFT) adapters already on the layer when this artifact was applied: they lie under it.
    below: frozenset[str] = field(default_factory=frozenset)

    @property
    def on(self) -> bool:
        return self.enabled and self.scale != 0


def _stock_layer(module: nn.Module):
    """The PEFT LoRA layer `module` is, or None for a plain layer; anything else that wraps a layer is refused."""
    if not hasattr(module, "base_layer"):
        return None
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        raise StudioError(f"the layer carries a {type(module).__name__}, which studio artifacts cannot share a layer "
                          "with; unload that adapter first")
    variants = getattr(module, "lora_variant", {})
    with_bias = [name for name, on in getattr(module, "lora_bias", {}).items() if on]
    if variants or with_bias:
        raise StudioError(f"the layer carries a PEFT LoRA variant ({', '.join(sorted(variants) + with_bias)}: DoRA or "
                          "LoRA bias), whose update depends on the weight under it; unload it first")
    return module


def _stock_state(stock) -> tuple:
    """Everything of a PEFT LoRA layer that our effective weight depends on (a cache key)."""
    if stock is None:
        return ()
    return (stock.disable_adapters, tuple(stock.active_adapters), tuple(stock.merged_adapters),
            tuple((a, stock.scaling[a], stock.lora_A[a].weight._version, stock.lora_B[a].weight._version)
                  for a in sorted(stock.lora_A)))


class StudioHook(ModelHook):
    """The artifacts on one Linear/Conv2d, in the order applied, run as the layer's forward.

    `model` and `path` say where the layer sits, so a stock PEFT LoRA layer that wraps it later is found
    (its LoRA updates are placed in the stack by when they were loaded; see the module docstring).
    """

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path
        self.stack: dict[str, _Stacked] = {}
        self.original: torch.Tensor | None = None  # set while fused
        self._cached: torch.Tensor | None = None
        self._key: tuple | None = None

    def invalidate(self) -> None:
        self._cached = None

    @property
    def active(self) -> bool:
        return any(entry.on for entry in self.stack.values())

    def stock(self, layer: nn.Module):
        """The PEFT LoRA layer wrapping `layer` at this path now, or None."""
        outer = self.model.get_submodule(self.path)
        return None if outer is layer else _stock_layer(outer)

    def effective_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight `layer` computes with, so that with PEFT's additions after it the result is the stack
        composed in order: W0 (stock updates merged into the weight taken out), then per artifact the stock
        updates applied before it and its transform, then the later stock updates; minus what PEFT's own
        forward adds on top."""
        stock = self.stock(layer)
        key = (layer.weight._version, layer.weight.data_ptr(), _stock_state(stock))
        if self._cached is not None and key == self._key:
            return self._cached
        with torch.no_grad():
            weight = layer.weight
            merged, added, deltas = set(), set(), {}
            if stock is not None:
                merged = set(stock.merged_adapters)
                if not (stock.disable_adapters or stock.merged):
                    added = {a for a in stock.active_adapters if a in stock.lora_A}
                deltas = {a: stock.get_delta_weight(a) for a in merged | added}
                for a in merged:
                    weight = weight - deltas[a]
            pending = set(deltas)
            for entry in self.stack.values():
                for a in sorted(pending & entry.below):
                    weight = weight + deltas[a]
                pending -= entry.below
                if entry.on:
                    weight = registry.get(entry.method).adapter.transform(weight, entry.params, entry.scale, entry.config)
            for a in sorted(pending):
                weight = weight + deltas[a]
            for a in added:
                weight = weight - deltas[a]
        self._cached, self._key = weight, key
        return weight

    def new_forward(self, module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.original is not None or not self.active:
            return self.fn_ref.original_forward(x, *args, **kwargs)  # fused (the weight holds the stack), or nothing on
        return layer_forward(module, x, self.effective_weight(module))


def _plain_layer(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d at a layer's path: itself, or the base layer of the PEFT LoRA layer wrapping it."""
    return module.get_base_layer() if _stock_layer(module) is not None else module


def _hook(layer: nn.Module) -> StudioHook | None:
    registry_ = getattr(layer, "_diffusers_hook", None)
    return registry_.get_hook(HOOK_NAME) if registry_ is not None else None


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


class WeightAttachment:
    """An applied artifact of the default kind: its per-layer transforms, one entry in each touched layer's hook.

    Every kind of attachment has the same face (`method`, `layers`, `set_scale`, `set_enabled`, `remove`,
    `call_inputs`: the pipeline arguments for the per-call inputs its method declares in the registry); a
    method of another kind gives its own from `adapters/<m>.py::attach` (IP-Adapter's attention processors).
    """

    def __init__(self, pipe, name: str, method: str) -> None:
        self.pipe, self.name, self.method = pipe, name, method
        self.touched: list[tuple[str, str]] = []  # (pipeline part, layer path)

    @property
    def layers(self) -> list[str]:
        return [f"{part}.{path}" for part, path in self.touched]

    def hooks(self) -> list[StudioHook]:
        return [_hook(_plain_layer(getattr(self.pipe, part).get_submodule(path))) for part, path in self.touched]

    def set_scale(self, scale: float) -> None:
        for hook in self.hooks():
            hook.stack[self.name].scale = scale
            hook.invalidate()

    def set_enabled(self, enabled: bool) -> None:
        for hook in self.hooks():
            hook.stack[self.name].enabled = enabled
            hook.invalidate()

    def call_inputs(self, **inputs) -> dict:
        return {}

    def remove(self) -> None:
        if any(hook.original is not None for hook in self.hooks()):
            raise StudioError("unfuse the pipeline (studio.plugin.unfuse) before removing an artifact")
        for part, layer_path in self.touched:
            layer = _plain_layer(getattr(self.pipe, part).get_submodule(layer_path))
            hook = _hook(layer)
            hook.stack.pop(self.name, None)
            hook.invalidate()
            if not hook.stack:
                hooks = layer._diffusers_hook
                hooks.remove_hook(HOOK_NAME, recurse=False)
                if not hooks.hooks:
                    del layer._diffusers_hook


def _registry(pipe) -> dict:
    """Artifact name -> its attachment, kept on the pipeline."""
    if not hasattr(pipe, "_studio_artifacts"):
        pipe._studio_artifacts = {}
    return pipe._studio_artifacts


def _stock_names(model: nn.Module) -> set[str]:
    return set(getattr(model, "peft_config", None) or {})


def apply(pipe, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
    """Attach the artifact at `path` to `pipe` at `scale`; return its name (default: the file stem,
    made unique: two runs' `lora.safetensors` are applied as `lora` and `lora-2`).

    All or nothing: every check (the file's base model, each layer's type, the pipeline's state) comes
    before the first layer changes, and a failure while attaching undoes what was attached. A file made on
    another base model is refused, naming the layers that differ; so is a pipeline fused with
    `studio.plugin.fuse` (unfuse it first). A stock LoRA already loaded (`pipe.load_lora_weights`) lies
    under the artifact; one loaded later goes on top. A LoRA with text-encoder tensors changes the text
    encoder(s) too.

    Example:
        >>> apply(pipe, "outputs/star/lora.safetensors", scale=0.8)  # doctest: +SKIP
        'lora'
    """
    check_scale(scale, path)
    path = artifact_file(path)
    header = _header(path)
    method = registry.get(header.method)
    if name is None:
        name = _unique_name(artifact_name(path), _registry(pipe))
    if name in _registry(pipe):
        raise StudioError(f"an artifact named {name!r} is already applied; pass another name or remove it first")
    tensors = load_tensors(path)
    if any(hook.original is not None for _, hook in _hooked_layers(pipe)):
        raise StudioError("unfuse the pipeline (studio.plugin.unfuse) before applying another artifact")
    if method.attaches != "weights":  # a method of its own kind (attention processors, an added network, norms)
        check_fingerprint(header.fingerprint, pipe.unet, path)
        attachment = method.adapter.attach(pipe, tensors, path, scale, name)
        attachment.method = method.name
    else:
        attachment = attach_weights(pipe, name, method, header.config, header.fingerprint, tensors, scale, path)
    _registry(pipe)[name] = attachment
    return name


def attach_weights(pipe, name: str, method: registry.Method, config: dict, base_fingerprint: dict,
                   tensors: dict[str, torch.Tensor], scale: float, path: Path) -> WeightAttachment:
    """Hook the per-layer weight transforms of `tensors` (a `method` file's, with its `config`) onto `pipe`'s layers
    under `name`: the default kind's attaching, also used by a method that carries weight transforms beside its
    own kind (ResAdapter's sampler LoRA). Everything is checked before the first layer changes; a failure while
    attaching undoes what was attached."""
    # 1. Check everything: per pipeline part its layers, each a Linear/Conv2d (maybe under a stock LoRA).
    layers = []  # (part, model, layer path, plain layer, params)
    for part, prefix in components(method.adapter).items():
        grouped = split_by_module(tensors, method.adapter, prefix)
        if not grouped:
            continue
        model = getattr(pipe, part, None)
        if model is None:
            raise StudioError(f"{path} changes {part}, which this pipeline ({type(pipe).__name__}) does not have; "
                              "load the kind of model it was made for (a file with text_encoder_2 is for SDXL)")
        expected = base_fingerprint if part == "unet" else base_fingerprint.get(part, {})
        check_fingerprint(expected, model, path)
        if name in _stock_names(model):
            raise StudioError(f"a stock adapter named {name!r} is loaded on {part} (diffusers' load_lora_weights); "
                              "pass another name")
        for file_name, params in grouped.items():
            layer_path = model_module_name(model, file_name)
            try:
                layer = _plain_layer(model.get_submodule(layer_path))
            except AttributeError:
                raise StudioError(f"{path}: {part} has no layer {file_name!r}; the file was made for another model, "
                                  "or is damaged") from None
            except StudioError as error:
                raise StudioError(f"{path}: layer {part}.{file_name}: {error}") from None
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise StudioError(f"{path}: layer {part}.{file_name} is a {type(layer).__name__}, not a Linear or Conv2d")
            layers.append((part, model, layer_path, layer, params))
    if not layers:
        raise StudioError(f"{path}: {NO_TENSORS}")
    # 2. Attach; undo on any failure, so the pipeline is either changed as a whole or not at all.
    attachment = WeightAttachment(pipe, name, method.name)
    try:
        for part, model, layer_path, layer, params in layers:
            hook = _hook(layer)
            if hook is None:
                hook = StudioHook(model, layer_path)
                HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, HOOK_NAME)
            device, dtype = layer.weight.device, layer.weight.dtype
            on_device = {k: v.to(device) if k.endswith("indices") else v.to(device, dtype) for k, v in params.items()}
            stock = hook.stock(layer)
            below = frozenset(stock.lora_A) if stock is not None else frozenset()
            hook.stack[name] = _Stacked(method.name, on_device, config, scale, below=below)
            hook.invalidate()
            attachment.touched.append((part, layer_path))
    except BaseException:
        attachment.remove()
        raise
    return attachment


def _unique_name(stem: str, taken) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... : the first not in `taken` (two runs' `lora.safetensors`)."""
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name


def _header(path: Path):
    """The file's studio header; a file of another tool's layout that a method recognises (an IP-Adapter release's
    `image_proj.*` / `ip_adapter.*`) gets a header naming that method, with no fingerprint to check."""
    from studio.artifact import ArtifactHeader
    from studio.pipeline import check_safetensors

    try:
        return read_header(path)
    except StudioError:
        header = check_safetensors(path) if path.is_file() else {}
        if METHOD_KEY in (header.get("__metadata__") or {}):  # our file, damaged: its own error
            raise
        keys = [key for key in header if key != "__metadata__"]
        for method in registry.METHODS.values():  # a method whose layout other tools write too says `recognises`
            recognises = getattr(method.adapter, "recognises", None)
            if method.attaches != "weights" and recognises is not None and recognises(keys):
                return ArtifactHeader(method.name, "?", {}, {}, {}, [])
        raise


SCALES = (-2.0, 2.0)  # an artifact's scale: negative reverses it (a slider LoRA's other end); beyond 2 it only breaks


def check_scale(scale: float, path: str | Path | None = None) -> float:
    """`scale` if it is a number in `SCALES`, else a `StudioError` naming it.

    Example:
        >>> check_scale(0.8)
        0.8
    """
    low, high = SCALES
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not low <= scale <= high:
        shown = f"{path}: " if path else ""
        raise StudioError(f"{shown}scale {scale!r} is out of range: an artifact's scale is a number from {low:g} to "
                          f"{high:g} (1 as trained, 0 off, negative reverses it)")
    return float(scale)


def set_scale(pipe, name: str, scale: float) -> None:
    """Change the scale of an applied artifact (0 switches it off)."""
    _registry(pipe)[_known(pipe, name)].set_scale(check_scale(scale))


def set_enabled(pipe, name: str, enabled: bool) -> None:
    """Switch an applied artifact on or off without forgetting it."""
    _registry(pipe)[_known(pipe, name)].set_enabled(enabled)


INPUT_FLAGS = {"image_prompt": "--image-prompt", "control": "--control"}  # per-call inputs as the command line names them


def check_inputs(methods: dict[str, str], given: set[str]) -> None:
    """Refuse per-call inputs that do not fit the applied artifacts (`methods`: name -> method): one that an
    artifact needs but is not `given`, or one `given` that no artifact takes. The CLI and the page call this
    with the `--adapter` files' headers before loading anything; `call_inputs` again on the pipeline.

    Example:
        >>> check_inputs({"star": "lora"}, {"image_prompt"})
        Traceback (most recent call last):
        studio.errors.StudioError: --image-prompt is given but no applied artifact uses it; apply an artifact of a method that takes it (ip-adapter) with --adapter, or drop --image-prompt
    """
    for name, method in methods.items():
        missing = [key for key in registry.get(method).inputs if key not in given]
        if missing:
            flag = INPUT_FLAGS[missing[0]]
            raise StudioError(f"{name} is applied and needs {flag}: pass one (an image file), or remove {name}")
    for key in sorted(given):
        if not any(key in registry.get(method).inputs for method in methods.values()):
            flag = INPUT_FLAGS[key]
            takers = ", ".join(m.name for m in registry.METHODS.values() if key in m.inputs)
            raise StudioError(f"{flag} is given but no applied artifact uses it; apply an artifact of a method that "
                              f"takes it ({takers}) with --adapter, or drop {flag}")


def call_inputs(pipe, **inputs) -> dict:
    """The pipeline call's extra arguments for per-call inputs (`image_prompt=` a PIL image), from the applied
    artifacts that take them; inputs that do not fit the applied artifacts are refused (`check_inputs`).

    Example:
        >>> call_inputs(pipe, image_prompt=image)  # doctest: +SKIP
        {'ip_adapter_image': <PIL.Image.Image ...>}
    """
    given = {key: value for key, value in inputs.items() if value is not None}
    check_inputs({name: attachment.method for name, attachment in _registry(pipe).items()}, set(given))
    kwargs: dict = {}
    for attachment in _registry(pipe).values():
        kwargs.update(attachment.call_inputs(**given))
    return kwargs


def set_prompts(pipe, prompts: list[str] | None) -> None:
    """Tell the applied artifacts whose strength follows the prompt (SPM's Facilitated Transport) the prompts of the
    coming pipeline call, one per image of its batch before classifier-free guidance; None: full strength. `studio
    sample` and the web app call this before every call; a direct `pipe(...)` user calls it the same way.

    Example:
        >>> set_prompts(pipe, ["a red circle", "a blue square"])  # doctest: +SKIP
        >>> images = pipe(["a red circle", "a blue square"]).images  # doctest: +SKIP
    """
    for attachment in _registry(pipe).values():
        if hasattr(attachment, "set_prompts"):
            attachment.set_prompts(prompts)


def artifact_methods(paths: list[str | Path]) -> dict[str, str]:
    """Each artifact file's name (as `apply` would name it) and method, from its header alone.

    Example:
        >>> artifact_methods(["outputs/star/lora.safetensors"])  # doctest: +SKIP
        {'lora': 'lora'}
    """
    methods: dict[str, str] = {}
    for path in map(artifact_file, paths):
        methods[_unique_name(artifact_name(path), methods)] = _header(path).method
    return methods


def compose(pipe, artifacts: list[tuple[str | Path, float]]) -> list[str]:
    """Apply several artifacts, each at its scale, in order.

    Example:
        >>> compose(pipe, [("style.safetensors", 0.6), ("star.safetensors", 1.0)])  # doctest: +SKIP
        ['style', 'star']
    """
    return [apply(pipe, path, scale) for path, scale in artifacts]


def _hooked_layers(pipe) -> list[tuple[nn.Module, StudioHook]]:
    """Every hooked layer of the pipeline with its hook, in the UNet and the text encoders alike."""
    return [(module, hook) for part in pipe.components.values() if isinstance(part, nn.Module)
            for module in part.modules() if (hook := _hook(module)) is not None]


def fuse(pipe) -> None:
    """Write every hooked layer's effective weight into the layer, keeping the original for `unfuse`.

    Refused (nothing changed) where a stock LoRA shares a layer with an artifact: its scale could change
    after the fuse; fuse it with `pipe.fuse_lora()` or unload it first.
    """
    layers = [(layer, hook) for layer, hook in _hooked_layers(pipe) if hook.original is None and hook.active]
    shared = [hook.path for layer, hook in layers if (stock := hook.stock(layer)) is not None and stock.lora_A]
    if shared:
        raise StudioError(f"{len(shared)} layer(s) carry a stock LoRA beside a studio artifact (first: {shared[0]}); "
                          "fuse the stock LoRA with pipe.fuse_lora() or unload it before studio.plugin.fuse")
    for layer, hook in layers:
        weight = hook.effective_weight(layer)
        hook.original = layer.weight.data.clone()
        layer.weight.data.copy_(weight)
        hook.invalidate()


def unfuse(pipe) -> None:
    """Restore every fused layer's original weight, bit for bit."""
    for layer, hook in _hooked_layers(pipe):
        if hook.original is not None:
            layer.weight.data.copy_(hook.original)
            hook.original = None
            hook.invalidate()


def remove(pipe, name: str) -> None:
    """Take an artifact off; layers left with nothing on them are put back as they were (hook removed)."""
    _registry(pipe)[_known(pipe, name)].remove()
    del _registry(pipe)[name]


def attachments(pipe) -> list:
    """The applied artifacts' attachments, in the order applied (a method's own kind may need its siblings: the
    T2I-Adapters share out the control images among themselves)."""
    return list(_registry(pipe).values())


def applied(pipe) -> dict[str, list[str]]:
    """Names of the applied artifacts and the layers each touches, as paths from the pipeline
    ("unet.down_blocks.0...to_q", "text_encoder.encoder.layers.0.self_attn.q_proj")."""
    return {name: attachment.layers for name, attachment in _registry(pipe).items()}


def _known(pipe, name: str) -> str:
    if name not in _registry(pipe):
        raise StudioError(f"no artifact named {name!r} is applied; applied: {sorted(_registry(pipe)) or 'none'}")
    return name
