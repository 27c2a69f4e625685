"""Loading a base model as a stock diffusers pipeline.

`load` takes the embedded toy model (`"toy"`, the default everywhere), a local
diffusers folder, a single `.safetensors`/`.ckpt` checkpoint, or a hub id, for
SD1.x, SD2.x and SDXL, and puts it on a device in a dtype. Everything else in
the studio receives the pipeline this returns.

Example:
    >>> pipe = load("toy")
    >>> type(pipe).__name__
    'StableDiffusionPipeline'
"""

from __future__ import annotations

import json
import logging
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from studio.errors import StudioError

TOY_MODEL = "toy"

# DDIM and DDPM clip their predicted clean sample to [-1, 1] unless told not to: right for pixels, ruinous for
# latents (the toy model drew no square for "a red square" with 20 DDIM steps). A latent model's own DDIM config
# (SD's) sets clip_sample false; one made from another scheduler's config did not.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




@contextmanager
def quiet_dtype_notice():
    """Silence diffusers' "There are modules ... that should be kept in float32: []" (an empty list is not None),
    which `ModelMixin.to(dtype)` logs on every cast (the IP-Adapter loader's, ours of a T2I-Adapter): noise for a user."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def assets_dir() -> Path:
    """The shipped `assets/` folder (works for editable and normal installs)."""
    import studio.assets

    return Path(next(iter(studio.assets.__path__)))


def toy_model_path() -> Path:
    """Where the embedded toy model lives."""
    return assets_dir() / "toy-model"


def pick_device(device: str | None = None) -> torch.device:
    """`None`/"auto" picks cuda, then mps, then cpu.

    Example:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StudioError("device 'mps' asked for, but this machine has no Apple GPU; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" is fp16 on CUDA and MPS, fp32 on CPU; fp16 on CPU is refused.

    Example:
        >>> pick_dtype("auto", torch.device("cpu"))
        torch.float32
    """
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise StudioError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    if dtype == "fp16" and device.type == "cpu":
        raise StudioError("fp16 needs a GPU; on the CPU use --dtype fp32 (or bf16)")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise StudioError("this GPU does not support bf16; use --dtype fp16")
    return DTYPES[dtype]


# safetensors' own cap on a header (its Rust reader refuses larger ones): a bigger claim is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of each safetensors dtype; an entry's byte range must equal its shape's count times this, so an
# absurd shape is refused from the header alone (sub-byte and unlisted dtypes are left to safetensors' own checks).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def check_safetensors(path: Path) -> dict:
    """Read and validate a `.safetensors` header without loading tensors; return the header.

    A truncated or corrupt file raises `StudioError` naming it: a header larger than safetensors allows, or one
    that is not a JSON object of entries `{"dtype", "shape", "data_offsets"}` (plus a `__metadata__` of strings),
    an entry whose byte range does not fit its shape and dtype, or data past the end of the file. Nothing is
    allocated for the tensors, so an absurd shape costs nothing.

    Example:
        >>> check_safetensors(Path("missing.safetensors"))  # doctest: +SKIP
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StudioError(f"{path} is not a valid .safetensors file (only {size} bytes); re-download or re-export it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or 8 + header_len > size:
            raise StudioError(f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}")
        if header_len > MAX_HEADER_BYTES:
            raise StudioError(f"{path} is corrupt: its header claims {header_len} bytes, more than safetensors allows "
                              f"({MAX_HEADER_BYTES}); re-download or re-export it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise StudioError(f"{path} is corrupt: its safetensors header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise StudioError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        problem = _entry_problem(name, entry, data_size)
        if problem:
            raise StudioError(f"{path} is corrupt: {problem}; re-download or re-export it")
    return header


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(name: str, entry, data_size: int) -> str | None:
    """What is wrong with one entry of a safetensors header (None if nothing)."""
    if name == "__metadata__":
        if entry is not None and (not isinstance(entry, dict)
                                  or not all(isinstance(v, str) for v in entry.values())):
            return "its __metadata__ is not a map of strings"
        return None
    shown = repr(name[:80])
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return f"tensor {shown} is not described by dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_whole(n) for n in shape):
        return f"tensor {shown} has an invalid dtype or shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        return f"tensor {shown} has invalid data offsets {str(offsets)[:80]}"
    if offsets[1] > data_size:
        return f"tensor {shown} needs data up to byte {offsets[1]}, past the file's end ({data_size}): it is truncated"
    if dtype in DTYPE_BYTES:
        count = 1
        for n in shape:
            count *= n
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            return f"tensor {shown} of shape {shape[:8]} {dtype} does not fit its {offsets[1] - offsets[0]} bytes"
    return None


def _is_sdxl_checkpoint(header: dict) -> bool:
    return any(key.startswith("conditioner.embedders.1") for key in header)


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix == ".safetensors":
        sdxl = _is_sdxl_checkpoint(check_safetensors(path))
    elif path.suffix == ".ckpt":
        # Weights only: never unpickle arbitrary objects from a checkpoint.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
            raise StudioError(f"{path} could not be read as a weights-only checkpoint ({err}); convert it to .safetensors") from None
        sdxl = _is_sdxl_checkpoint(state.get("state_dict", state))
    else:
        raise StudioError(f"{path} is a file but not a .safetensors or .ckpt checkpoint")
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kwargs = {"dtype": dtype}
    if config:
        kwargs["config"] = config
    try:
        return cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise StudioError(
            f"could not build a pipeline from {path} ({err}). Single-file loading needs the model's diffusers "
            "config; offline, pass a local diffusers folder of the same architecture with --model-config"
        ) from None


def load(
    model: str = TOY_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    xformers: bool = False,
    config: str | None = None,
):
    """Load `model` as a diffusers pipeline on `device` in `dtype`.

    `model` is "toy", a diffusers folder, a `.safetensors`/`.ckpt` file, or a hub id.
    `config` is a diffusers folder giving the architecture for single-file loads.
    `xformers=True` turns on xformers attention (CUDA only; SDPA is the default).

    Example:
        >>> pipe = load("toy", device="cpu")
        >>> pipe.unet.config.sample_size
        16
    """
    from diffusers import DiffusionPipeline

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    path = toy_model_path() if model == TOY_MODEL else Path(model).expanduser()
    if model == TOY_MODEL and not (path / "model_index.json").is_file():
        raise StudioError(f"the embedded toy model is missing from {path}; rebuild it with `studio toy pretrain`")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise StudioError(f"{path} is a folder but not a diffusers pipeline (no model_index.json in it)")
        for weights in path.glob("*/*.safetensors"):
            check_safetensors(weights)
        _show_loading_bars(model != TOY_MODEL)  # the toy model loads in a blink; a real model's bars show progress
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype)
    elif path.is_file():
        pipe = _load_single_file(path, config, torch_dtype)
    elif _looks_like_hub_id(model):
        pipe = _load_from_hub(model, torch_dtype)
    else:
        raise StudioError(
            f"model {model!r} not found: pass 'toy', a diffusers folder, a .safetensors/.ckpt file, or a hub id (org/name)"
        )
    pipe = pipe.to(torch_device)
    if xformers:
        enable_xformers(pipe, torch_device)
    return pipe


def _show_loading_bars(show: bool) -> None:
    """Turn diffusers' and transformers' loading bars on or off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        (library.enable_progress_bar if show else library.disable_progress_bar)()


def unet_skeleton(model: str = TOY_MODEL, config: str | None = None):
    """The UNet of `model` built on the meta device from its config: every layer's shape, no weights
    read. Enough to check an artifact's fingerprint against a model in a second (`studio inspect --model`).

    `model` is "toy" or a diffusers folder; for a single-file checkpoint pass `config`, a diffusers
    folder of the same architecture.

    Example:
        >>> unet_skeleton("toy").conv_in.weight.shape
        torch.Size([32, 4, 3, 3])
    """
    from diffusers import UNet2DConditionModel

    folder = toy_model_path() if model == TOY_MODEL else Path(config or model).expanduser()
    unet_config = folder / "unet" / "config.json"
    if not unet_config.is_file():
        raise StudioError(
            f"no UNet config at {unet_config}: pass 'toy', a diffusers folder, or a single-file checkpoint "
            "together with --model-config (a diffusers folder of the same architecture)"
        )
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _load_from_hub(model_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model_id, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean the same here
        raise StudioError(
            f"could not load hub id {model_id!r} ({type(err).__name__}). If this machine is offline, "
            "download the model elsewhere and pass its local path (a diffusers folder or a .safetensors file)"
        ) from None


def enable_xformers(pipe, device: torch.device) -> None:
    """Switch the pipeline's attention to xformers; a clear error where that cannot work."""
    if device.type != "cuda":
        raise StudioError("--xformers needs a CUDA GPU; leave it off to use PyTorch SDPA attention")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise StudioError("--xformers asked for but xformers is not installed: pip install 'diffusion-studio[xformers]'") from None
    pipe.enable_xformers_memory_efficient_attention()


def set_scheduler(pipe, name: str) -> None:
    """Replace the pipeline's scheduler by one of `SCHEDULERS`, keeping its noise schedule.

    Example:
        >>> pipe = load("toy"); set_scheduler(pipe, "ddim"); type(pipe.scheduler).__name__
        'DDIMScheduler'
    """
    pipe.scheduler = make_scheduler(pipe.scheduler.config, name)


def make_scheduler(config, name: str):
    """A new scheduler of `SCHEDULERS[name]` with the noise schedule of `config` (a scheduler's config); the
    erasures sample their training trajectories with `make_scheduler(pipe.scheduler.config, "ddim")`.

    Example:
        >>> type(make_scheduler(load("toy").scheduler.config, "ddim")).__name__
        'DDIMScheduler'
    """
    import diffusers

    if name not in SCHEDULERS:
        raise StudioError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def default_size(pipe) -> tuple[int, int]:
    """The (width, height) the pipeline was trained at."""
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side
