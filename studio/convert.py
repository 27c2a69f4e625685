"""`studio convert`: our artifact in another tool's layout, and kohya/A1111 LoRA files into ours.

- `to_peft` writes a PEFT adapter folder (`adapter_config.json` +
  `adapter_model.safetensors`, keys `base_model.model.<module>...`) that
  `peft.PeftModel.from_pretrained(unet, folder)` loads, for the methods PEFT
  has (LoRA, OFT, BOFT).
- `to_kohya` writes a LoRA in kohya sd-scripts / A1111 keys:
  `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (a scalar tensor per module).
- `from_kohya` reads such a file back into our artifact (diffusers keys +
  studio header). Kohya names lose the dots, so the base model is needed to
  find the module each key belongs to (and for the fingerprint). A per-module
  alpha is folded into `lora_up`, so the file's alpha equals its rank.

Example:
    >>> to_kohya("lora.safetensors", "lora-kohya.safetensors")  # doctest: +SKIP
    >>> from_kohya("lora-kohya.safetensors", "lora.safetensors", model="toy")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio import registry
from studio.artifact import METHOD_KEY, fingerprint, read_header, save_artifact
from studio.errors import StudioError
from studio.pipeline import check_safetensors

PEFT_PREFIX = "base_model.model."
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def to_peft(path: str | Path, output: str | Path) -> Path:
    """Write the artifact at `path` as a PEFT adapter folder `output`."""
    header = read_header(path)
    adapter = registry.get(header.method).adapter
    if not hasattr(adapter, "peft_adapter_config"):
        raise StudioError(f"PEFT has no {header.method!r} method; convert LoRA, OFT or BOFT files to peft")
    tensors = {}
    for key, value in load_file(str(path)).items():
        if not key.startswith(adapter.KEY_PREFIX):
            raise StudioError(f"{path}: unexpected tensor {key!r} for {header.method}")
        tensors[PEFT_PREFIX + key[len(adapter.KEY_PREFIX):]] = value
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter.peft_adapter_config(header.config), indent=2, default=list))
    return folder


def to_kohya(path: str | Path, output: str | Path) -> Path:
    """Write our LoRA artifact at `path` with kohya/A1111 keys to the file `output`."""
    from studio.adapters import lora

    header = read_header(path)
    if header.method != "lora":
        raise StudioError(f"{path} holds {header.method}; only LoRA files have a kohya layout")
    tensors = {}
    alpha = torch.tensor(float(header.config.get("alpha", header.config.get("rank", 4))))
    for key, value in load_file(str(path)).items():
        for ours, theirs in ((lora.A_PARAM, KOHYA_DOWN), (lora.B_PARAM, KOHYA_UP)):
            if key.startswith(lora.KEY_PREFIX) and key.endswith("." + ours):
                module = key[len(lora.KEY_PREFIX):-len(ours) - 1]
                stem = KOHYA_UNET_PREFIX + module.replace(".", "_")
                tensors[stem + theirs] = value
                tensors[stem + KOHYA_ALPHA] = alpha.clone()
                break
        else:
            raise StudioError(f"{path}: unexpected tensor {key!r} for a LoRA file")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(header.config.get("rank")),
                                               "ss_network_alpha": str(float(alpha))})
    return output


def from_kohya(path: str | Path, output: str | Path, model: str = "toy") -> Path:
    """Read a kohya/A1111 LoRA file made for `model` and write it as our artifact `output`."""
    from studio.adapters import lora
    from studio.pipeline import load

    path = Path(path)
    check_safetensors(path)
    tensors = load_file(str(path))
    text_keys = [k for k in tensors if k.startswith(KOHYA_TEXT_PREFIXES)]
    if text_keys:
        raise StudioError(
            f"{path} has {len(text_keys)} text-encoder LoRA tensors ({text_keys[0]}, ...); "
            "only UNet LoRAs convert for now: remove the lora_te* keys to keep the UNet part"
        )
    stems = sorted({k[: -len(KOHYA_DOWN)] for k in tensors if k.endswith(KOHYA_DOWN)})
    if not stems or not all(s.startswith(KOHYA_UNET_PREFIX) for s in stems):
        raise StudioError(f"{path} is not a kohya LoRA file (no lora_unet_*.lora_down.weight tensors)")
    unet = load(model, device="cpu", dtype="fp32").unet
    by_kohya_name = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    unknown = [s for s in stems if s[len(KOHYA_UNET_PREFIX):] not in by_kohya_name]
    if unknown:
        raise StudioError(
            f"{len(unknown)} modules of {path} are not in {model}'s UNet (e.g. {unknown[0]}); "
            "pass the --model it was made for (original-layout SDXL names like input_blocks_* are not supported)"
        )
    ranks = {tensors[s + KOHYA_DOWN].shape[0] for s in stems}
    if len(ranks) > 1:
        raise StudioError(f"{path} mixes LoRA ranks {sorted(ranks)}; only files with one rank convert")
    rank = ranks.pop()
    ours, modules = {}, []
    for stem in stems:
        module = by_kohya_name[stem[len(KOHYA_UNET_PREFIX):]]
        alpha = float(tensors[stem + KOHYA_ALPHA]) if stem + KOHYA_ALPHA in tensors else float(rank)
        ours[f"{lora.KEY_PREFIX}{module}.{lora.A_PARAM}"] = tensors[stem + KOHYA_DOWN]
        ours[f"{lora.KEY_PREFIX}{module}.{lora.B_PARAM}"] = tensors[stem + KOHYA_UP] * (alpha / rank)
        modules.append(module)
    config = lora.LoRAConfig(rank=rank, alpha=float(rank), target_modules=modules)
    return save_artifact(output, ours, "lora", config.__dict__, fingerprint(unet, modules), lora.file_metadata(config))


def is_studio_file(path: str | Path) -> bool:
    """Whether the .safetensors file at `path` carries our header."""
    return METHOD_KEY in (check_safetensors(Path(path)).get("__metadata__") or {})
