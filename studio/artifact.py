"""The artifact: one `.safetensors` file whose header says what it holds.

Header metadata (safetensors metadata is str -> str):

- `studio.method`       the registry name of the method ("lora", "oft", ...)
- `studio.version`      the studio version that wrote it
- `studio.config`       the method's config, as JSON
- `studio.fingerprint`  the base model it was made on, as JSON: the model class
                        and the shape of every layer the artifact touches
- `studio.trigger_words` (optional) the words of its training captions that the
                        toy vocabulary lacks ("sks"), as a JSON list, so the toy
                        model's unknown-word warning leaves them out

`studio.plugin` reads the header to know what a file holds, and
`check_fingerprint` refuses a file made on another base model, naming the
layers that differ.

Example:
    >>> import torch
    >>> save_artifact("/tmp/a.safetensors", {"w": torch.zeros(2)}, "lora", {"rank": 4}, {"model": "X", "layers": {}})
    PosixPath('/tmp/a.safetensors')
    >>> read_header("/tmp/a.safetensors").method
    'lora'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from studio.pipeline import check_safetensors
from studio.targets import file_module_name, model_module_name

METHOD_KEY = "studio.method"
VERSION_KEY = "studio.version"
CONFIG_KEY = "studio.config"
FINGERPRINT_KEY = "studio.fingerprint"
TRIGGER_WORDS_KEY = "studio.trigger_words"  # caption words the toy vocabulary lacks ("sks"), as JSON
FOLDER_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # a model folder's weights, as save_pretrained names them


def studio_version() -> str:
    try:
        return version("diffusion-studio")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ArtifactHeader:
    """What an artifact's header says: method, version, config, base-model fingerprint, other metadata."""

    method: str
    version: str
    config: dict
    fingerprint: dict
    extra: dict = field(default_factory=dict)
    trigger_words: list[str] = field(default_factory=list)


def fingerprint(model: torch.nn.Module, module_names: list[str]) -> dict:
    """The model class and the weight shape of each named module: enough to tell base models apart.

    Example:
        >>> fingerprint(torch.nn.Sequential(torch.nn.Linear(2, 3)), ["0"])
        {'model': 'Sequential', 'layers': {'0': [3, 2]}}
    """
    modules = dict(model.named_modules())
    layers = {}
    for name in module_names:
        module = modules.get(model_module_name(model, name))  # the names as files write them (see file_module_name)
        # Look through adapter wrappers (ours and PEFT's keep the original as `base_layer`).
        while module is not None and not hasattr(module, "weight") and hasattr(module, "base_layer"):
            module = module.base_layer
        weight = getattr(module, "weight", None)
        layers[file_module_name(model, name)] = list(weight.shape) if weight is not None else None
    return {"model": type(model).__name__, "layers": layers}


def check_fingerprint(expected: dict, model: torch.nn.Module, path: str | Path = "artifact") -> None:
    """Raise a `StudioError` naming each layer whose shape differs (or that is missing) in `model`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
        >>> check_fingerprint(fingerprint(net, ["0"]), net)
    """
    actual = fingerprint(model, list(expected.get("layers", {})))["layers"]
    differences = []
    for name, shape in expected.get("layers", {}).items():
        if actual.get(name) is None and shape is not None:
            differences.append(f"{name}: missing in this model (file has {shape})")
        elif actual.get(name) != shape:
            differences.append(f"{name}: file {shape}, model {actual.get(name)}")
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise StudioError(
            f"{path} was made on another base model ({expected.get('model')}, {len(differences)} layers differ: {shown}); "
            "load the model it was trained on, or retrain it on this one"
        )


def save_artifact(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    method: str,
    config: dict,
    base_fingerprint: dict,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write `tensors` with the studio header (plus `extra_metadata`, e.g. diffusers' own keys).

    Written to a temporary name first and renamed, so a crash never leaves a half-written artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        METHOD_KEY: method,
        VERSION_KEY: studio_version(),
        CONFIG_KEY: json.dumps(config, sort_keys=True),
        FINGERPRINT_KEY: json.dumps(base_fingerprint, sort_keys=True),
        **(extra_metadata or {}),
    }
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial), metadata=metadata)
    partial.replace(path)
    return path


def artifact_file(path: str | Path) -> Path:
    """The artifact file at `path`: the file itself, or in a folder written by `save_pretrained` (a T2I-Adapter's)
    its `diffusion_pytorch_model.safetensors`.

    Example:
        >>> artifact_file("outputs/star/lora.safetensors")
        PosixPath('outputs/star/lora.safetensors')
    """
    path = Path(path)
    if path.is_dir():
        if not (path / FOLDER_WEIGHTS_NAME).is_file():
            raise StudioError(f"{path} is a folder without {FOLDER_WEIGHTS_NAME}; pass an artifact file (.safetensors) "
                              "or a T2I-Adapter folder")
        return path / FOLDER_WEIGHTS_NAME
    return path


def artifact_name(path: str | Path) -> str:
    """What an artifact is called when applied: its file's stem, or its folder's name for a folder's weights.

    Example:
        >>> artifact_name("out/lora.safetensors"), artifact_name("out/t2i-adapter/diffusion_pytorch_model.safetensors")
        ('lora', 't2i-adapter')
    """
    path = Path(path)
    return path.parent.name if path.name == FOLDER_WEIGHTS_NAME else path.stem


def read_header(path: str | Path) -> ArtifactHeader:
    """Read an artifact's header without loading its tensors.

    Example:
        >>> read_header("lora.safetensors").config["rank"]  # doctest: +SKIP
        4
    """
    path = artifact_file(path)
    if not path.is_file():
        raise StudioError(f"artifact {path} not found")
    metadata = check_safetensors(path).get("__metadata__", {}) or {}
    if METHOD_KEY not in metadata:
        raise StudioError(
            f"{path} has no {METHOD_KEY} in its header: it was not written by Diffusion Studio; "
            "convert it first with `studio convert`"
        )
    try:
        config = json.loads(metadata.get(CONFIG_KEY, "{}"))
        base = json.loads(metadata.get(FINGERPRINT_KEY, "{}"))
        trigger_words = json.loads(metadata.get(TRIGGER_WORDS_KEY, "[]"))
    except json.JSONDecodeError as err:
        raise StudioError(f"{path} has a corrupt studio header ({err})") from None
    if not isinstance(trigger_words, list) or not all(isinstance(w, str) for w in trigger_words):
        raise StudioError(f"{path} has a corrupt studio header ({TRIGGER_WORDS_KEY} is not a list of words)")
    extra = {k: v for k, v in metadata.items() if not k.startswith("studio.")}
    return ArtifactHeader(metadata[METHOD_KEY], metadata.get(VERSION_KEY, "?"), config, base, extra, trigger_words)


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], ArtifactHeader]:
    """The tensors and the header of an artifact."""
    header = read_header(path)
    return load_file(str(path)), header
