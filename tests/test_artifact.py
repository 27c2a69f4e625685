import pytest
import torch

from studio.artifact import (
    check_fingerprint,
    fingerprint,
    load_artifact,
    read_header,
    save_artifact,
)
from studio.errors import StudioError


def test_header_round_trip(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Conv2d(8, 8, 3))
    path = save_artifact(tmp_path / "a.safetensors", {"x": torch.ones(3)}, "lora", {"rank": 4}, fingerprint(net, ["0", "1"]),
                         extra_metadata={"format": "pt"})
    tensors, header = load_artifact(path)
    assert header.method == "lora" and header.config == {"rank": 4} and header.extra == {"format": "pt"}
    assert header.fingerprint == {"model": "Sequential", "layers": {"0": [8, 4], "1": [8, 8, 3, 3]}}
    assert torch.equal(tensors["x"], torch.ones(3))
    assert not (tmp_path / "a.safetensors.partial").exists()


def test_other_base_model_is_refused_naming_layers(tmp_path):
    made_on = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8))
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 8))
    expected = fingerprint(made_on, ["0", "1"])
    check_fingerprint(expected, made_on)
    with pytest.raises(StudioError, match=r"2 layers differ: 0: file \[8, 4\], model \[16, 4\]"):
        check_fingerprint(expected, other, "a.safetensors")
    with pytest.raises(StudioError, match="missing in this model"):
        check_fingerprint({"model": "X", "layers": {"nope": [1]}}, made_on)


def test_foreign_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StudioError, match="not written by Diffusion Studio"):
        read_header(tmp_path / "plain.safetensors")
    with pytest.raises(StudioError, match="not found"):
        read_header(tmp_path / "missing.safetensors")
