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
- `studio.sha256`       the content hash: SHA-256 of every other header entry and
                        of each tensor's name, dtype, shape and bytes (see
                        `content_digest`), checked before a file's tensors are used

`studio.plugin` reads the header to know what a file holds, and
`check_fingerprint` refuses a file made on another base model, naming the
layers that differ. A file whose bytes changed after it was written (a bad
download, a flipped bit) fails its content hash; a file with the studio header
and no hash is refused. The hash guards against damage, not against a forger
(who can recompute it): what protects against a hostile file is that nothing is
unpickled and every header is validated before it is used.

Example:
    >>> import torch
    >>> save_artifact("/tmp/a.safetensors", {"w": torch.zeros(2)}, "lora", {"rank": 4}, {"model": "X", "layers": {}})
    PosixPath('/tmp/a.safetensors')
    >>> read_header("/tmp/a.safetensors").method
    'lora'
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from studio.errors import StudioError
from studio.pipeline import check_safetensors
from studio.targets import file_module_name, model_module_name

METHOD_KEY = "studio.method"
VERSION_KEY = "studio.version"
CONFIG_KEY = "studio.config"
FINGERPRINT_KEY = "studio.fingerprint"
TRIGGER_WORDS_KEY = "studio.trigger_words"  # caption words the toy vocabulary lacks ("sks"), as JSON
CONTENT_HASH_KEY = "studio.sha256"  # the content hash (content_digest), written by save_artifact
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
    sha256: str = ""  # the content hash the header records (checked by `verify_content`)


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
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # Serialized once without the hash to compute it over exactly the bytes the file will hold, then with it.
    unhashed = save(tensors, metadata=metadata)
    (header_len,) = struct.unpack("<Q", unhashed[:8])
    digest = content_digest(io.BytesIO(unhashed), json.loads(unhashed[8:8 + header_len]), 8 + header_len)
    write_atomically(path, save(tensors, metadata={**metadata, CONTENT_HASH_KEY: digest}))
    return path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, flushed to disk and then renamed over
    `path`: a crash or a kill at any moment leaves either the old file or the new one, never a truncated one.

    Example:
        >>> write_atomically("/tmp/note.txt", b"done")
        PosixPath('/tmp/note.txt')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
    return path


def content_digest(stream, header: dict, data_start: int) -> str:
    """SHA-256 of a safetensors file's content as read from `stream` (`header` is its parsed header, `data_start`
    where its tensor data begins): the header's metadata but the hash itself, as sorted JSON, then per tensor in
    name order its name, dtype, shape, byte count and bytes. Independent of the header's formatting and of the
    tensors' order in the file.

    Example:
        >>> path = save_artifact("/tmp/a.safetensors", {"w": torch.zeros(2)}, "lora", {}, {})
        >>> verify_content(path)
    """
    digest = hashlib.sha256()
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CONTENT_HASH_KEY}
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        start, end = entry["data_offsets"]
        digest.update(json.dumps([name, entry["dtype"], entry["shape"], end - start]).encode())
        stream.seek(data_start + start)
        left = end - start
        while left:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                raise StudioError(f"tensor {name!r} ends past the end of the file: it is truncated")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def stored_hash(path: Path, metadata: dict[str, str]) -> str:
    """The content hash a studio header records, or a `StudioError` if it has none (or a malformed one)."""
    expected = metadata.get(CONTENT_HASH_KEY, "")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise StudioError(f"{path} has a studio header but no valid content hash ({CONTENT_HASH_KEY}): it was written "
                          "by an older Diffusion Studio or its header was edited, so its content cannot be checked; "
                          "retrain or re-export it")
    return expected


def verify_content(path: str | Path, header: dict | None = None) -> None:
    """Refuse a studio artifact whose content no longer matches the hash in its header (or that has none); `header`:
    its safetensors header when the caller has read it already.

    Example:
        >>> verify_content("outputs/star/lora.safetensors")  # doctest: +SKIP
    """
    path = artifact_file(path)
    header = header if header is not None else check_safetensors(path)
    expected = stored_hash(path, header.get("__metadata__") or {})
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        actual = content_digest(f, header, 8 + header_len)
    if actual != expected:
        raise StudioError(f"{path} is damaged: its content does not match the hash in its header (changed bytes, a bad "
                          "download or copy); re-download or re-export it")


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
    digest = stored_hash(path, metadata)
    try:
        config = json.loads(metadata.get(CONFIG_KEY, "{}"))
        base = json.loads(metadata.get(FINGERPRINT_KEY, "{}"))
        trigger_words = json.loads(metadata.get(TRIGGER_WORDS_KEY, "[]"))
    except json.JSONDecodeError as err:
        raise StudioError(f"{path} has a corrupt studio header ({err})") from None
    if not isinstance(trigger_words, list) or not all(isinstance(w, str) for w in trigger_words):
        raise StudioError(f"{path} has a corrupt studio header ({TRIGGER_WORDS_KEY} is not a list of words)")
    if not isinstance(config, dict):
        raise StudioError(f"{path} has a corrupt studio header ({CONFIG_KEY} is not a JSON object)")
    layers = base.get("layers", {}) if isinstance(base, dict) else None
    if not isinstance(layers, dict) or not all(
            shape is None or (isinstance(shape, list) and all(isinstance(n, int) for n in shape)) for shape in layers.values()):
        raise StudioError(f"{path} has a corrupt studio header ({FINGERPRINT_KEY} is not a model and its layer shapes)")
    extra = {k: v for k, v in metadata.items() if not k.startswith("studio.")}
    return ArtifactHeader(metadata[METHOD_KEY], metadata.get(VERSION_KEY, "?"), config, base, extra, trigger_words, digest)


def load_artifact(path: str | Path) -> tuple[dict[str, torch.Tensor], ArtifactHeader]:
    """The tensors and the header of an artifact, its content hash checked first.

    Example:
        >>> tensors, header = load_artifact("outputs/star/lora.safetensors")  # doctest: +SKIP
    """
    header = read_header(path)
    return load_tensors(path), header


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file: a studio artifact's after its content hash is checked (a file of
    another tool's, without the studio header, as it is); anything safetensors refuses as a `StudioError`.

    Example:
        >>> load_tensors("outputs/star/lora.safetensors")["unet.conv_in.lora_A"].shape  # doctest: +SKIP
        torch.Size([4, 4, 3, 3])
    """
    path = artifact_file(path)
    header = check_safetensors(path)
    if METHOD_KEY in (header.get("__metadata__") or {}):
        verify_content(path, header)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise StudioError(f"{path} is corrupt: safetensors cannot read it ({str(err)[:200]}); re-download or "
                          "re-export it") from None
