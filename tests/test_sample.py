import json

import numpy as np
import pytest
from PIL import Image

from studio.cli import main
from studio.errors import StudioError
from studio.sample import sample


def test_sample_writes_pngs_grid_and_settings(toy_pipe, tmp_path):
    result = sample(toy_pipe, ["a red circle", "a blue square"], seeds=[0, 1], output_dir=tmp_path, steps=5, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["0000-seed0.png", "0001-seed1.png", "0002-seed0.png", "0003-seed1.png", "grid.png", "settings.json"]
    assert Image.open(tmp_path / "0000-seed0.png").size == (32, 32)
    assert Image.open(tmp_path / "grid.png").size == (64, 64)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["steps"] == 5 and settings["images"][2] == {"file": "0002-seed0.png", "prompt": "a blue square", "seed": 0}
    assert len(result.images) == 4


def test_same_seed_same_image_regardless_of_batch(toy_pipe):
    alone = sample(toy_pipe, ["a green cross"], seeds=[3], steps=5, progress=False).images[0]
    batched = sample(toy_pipe, ["a red circle", "a green cross"], seeds=[3], steps=5, batch_size=2, progress=False).images[1]
    assert np.abs(np.asarray(alone, float) - np.asarray(batched, float)).max() <= 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_schedulers_and_sizes(toy_pipe, scheduler):
    images = sample(toy_pipe, ["a yellow diamond"], steps=4, scheduler=scheduler, width=48, height=40, progress=False).images
    assert images[0].size == (48, 40)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpm++", "dpm++-sde", "pndm", "ddpm", "unipc"])
def test_every_scheduler_draws_what_is_asked(scheduler):
    """DDIM and DDPM made from the toy model's DPM-Solver config once clipped their latents to [-1, 1] and drew no
    square for "a red square"; every scheduler must draw it."""
    from studio.eval import score
    from studio.pipeline import load

    images = sample(load("toy"), ["a red square"], seeds=list(range(5)), steps=20, scheduler=scheduler,
                    progress=False).images
    assert score(images).rate("shape", "square") >= 0.6


def test_cli_sample(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\na purple striped square\n")
    code = main(["sample", "a green disk", "--prompts-file", str(prompts), "--seed", "0", "1", "--steps", "4",
                 "--scheduler", "ddim", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert [r["prompt"] for r in settings["images"]][::2] == ["a green disk", "a red circle", "a purple striped square"]
    assert settings["scheduler"] == "ddim"


@pytest.mark.parametrize(
    "argv, message",
    [
        # out-of-range options: tests/test_bad_options.py, from docs/errors.md's table
        (["sample", "a red circle", "--model", "/no/such/model"], "not found"),
        (["sample"], "no prompt given"),
        (["sample", "--prompts-file", "/no/such/file.txt"], "prompts file /no/such/file.txt not found"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    code = main(argv + ["--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 20)
    assert main(["sample", "a red circle", "--model", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_sample_settings_validate_directly(toy_pipe):
    with pytest.raises(StudioError, match="--steps 0: must be a whole number from 1 to 1000"):
        sample(toy_pipe, ["a red circle"], steps=0)


def test_two_artifacts_with_the_same_file_name_stack(tmp_path, toy_artifact):
    """Two runs both write lora.safetensors; `--adapter a/lora.safetensors --adapter b/lora.safetensors` stacks both."""
    import json
    import shutil

    from studio.cli import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(toy_artifact, tmp_path / folder / "lora.safetensors")
    out = tmp_path / "samples"
    assert main(["sample", "a red sks", "--steps", "2", "--output-dir", str(out), "--adapter", str(tmp_path / "a" / "lora.safetensors"),
                 "--adapter", f"{tmp_path / 'b' / 'lora.safetensors'}:0.5"]) == 0
    assert [a["scale"] for a in json.loads((out / "settings.json").read_text())["adapters"]] == [1.0, 0.5]
