"""`studio convert`: our artifact in another tool's layout.

`to_peft` writes a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>...`) that
`peft.PeftModel.from_pretrained(unet, folder)` loads, for the methods PEFT
has (LoRA, OFT, BOFT).

Example:
    >>> to_peft("oft.safetensors", "oft-peft")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from studio import registry
from studio.artifact import read_header
from studio.errors import StudioError

PEFT_PREFIX = "base_model.model."


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
