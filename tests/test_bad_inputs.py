"""Every row of docs/errors.md's "Files, data, artifacts and the server" table, run as its command line (in-process): exit
status 2 and exactly the message the table shows, on one line. The table is the docs' own, so the reference and
the behaviour cannot drift apart. `{name}` in a row is a file or folder the fixture below makes."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import torch

from studio.cli import main
from test_hostile_files import _join, _split

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SECTION = DOC.read_text().split("## Files, data, artifacts and the server")[1].split("\n## ")[0]
ROW = re.compile(r"\| (.+?) \| `studio (.+?)` \| `(error: .+)` \|")
ROWS = [m.groups() for m in map(ROW.fullmatch, SECTION.splitlines()) if m]


def _lora(unet, path: Path) -> Path:
    from studio import registry
    from studio.artifact import fingerprint, save_artifact

    spec = registry.get("lora")
    config = spec.config({"rank": 2})
    names = spec.adapter.inject(unet, config)
    return save_artifact(path, spec.adapter.state_dict(unet), "lora", dataclasses.asdict(config),
                         fingerprint(unet, names), extra_metadata=spec.adapter.file_metadata(config))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from PIL import Image
    from safetensors.torch import save_file

    from studio.pipeline import load
    from studio.testing import tiny_sd_pipeline

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00")
    (tmp / "empty").mkdir()
    (tmp / "corrupt-images").mkdir()
    (tmp / "corrupt-images" / "a.png").write_bytes(b"not a png")
    (tmp / "corrupt-images" / "a.txt").write_text("a red circle")
    Image.new("L", (32, 32)).save(tmp / "mask.png")
    (tmp / "misaligned" / "conditions").mkdir(parents=True)  # a control image of another size than its image
    Image.new("RGB", (32, 32), "red").save(tmp / "misaligned" / "a.png")
    (tmp / "misaligned" / "a.txt").write_text("a red circle")
    Image.new("L", (16, 16)).save(tmp / "misaligned" / "conditions" / "a.png")
    Image.new("L", (5000, 5000)).save(tmp / "huge.png")  # 25 MP of black: a few KB on disk, 25 MB decoded
    lora = _lora(load("toy").unet, tmp / "lora.safetensors")
    _lora(tiny_sd_pipeline().unet, tmp / "other-model.safetensors")
    data = bytearray(lora.read_bytes())
    data[-5] ^= 0x10
    (tmp / "damaged.safetensors").write_bytes(bytes(data))
    header, body = _split(lora.read_bytes())
    del header["__metadata__"]["studio.sha256"]
    (tmp / "unhashed.safetensors").write_bytes(_join(header, body))
    save_file({"x": torch.zeros(2)}, str(tmp / "foreign.safetensors"))
    (tmp / "run" / "checkpoints" / "step-2").mkdir(parents=True)  # a folder named like a checkpoint, nothing in it
    return {"tmp": str(tmp), "output": str(tmp / "out")}


def _fill(text: str, files: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: files[m.group(1)], text)


def test_the_table_has_the_inputs_the_issue_lists():
    inputs = " ".join(row[0] for row in ROWS)
    for words in ("model that does not exist", "corrupt model", "no images", "corrupt", "control image",
                  "unknown method", "conflicting", "another base model", "scale", "empty", "bit setting",
                  "damaged", "no content hash", "checkpoint"):
        assert words in inputs, words
    assert len(ROWS) >= 20


@pytest.mark.parametrize("what, command, message", ROWS, ids=[row[0][:40] for row in ROWS])
def test_each_bad_input_gets_its_line(what, command, message, files, capsys):
    code = main(shlex.split(_fill(command, files)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1] == _fill(message, files)
    assert not Path(files["output"]).exists()
