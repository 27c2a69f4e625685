"""Every `studio ...` command in the README's code blocks, so the README cannot drift from the CLI.

In README order, in a fresh folder, on the toy model: step, seed and sampling-step counts are shrunk so each
command takes seconds (`shrink`), and `job.toml` is the README's own TOML block, shrunk alike. Commands that
need what this machine lacks (a user's model or images: `path/to/...`, `my_images/`) or that cannot be
shrunk (`studio serve`, `studio toy pretrain`, `studio bench ...`; their own tests run them) are parsed and
their options checked only (`check_command`)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from studio.cli import check_command, main

README = Path(__file__).resolve().parents[1] / "README.md"
STEP_FLAGS = ("--max-train-steps", "--checkpointing-steps", "--validation-steps")
STEP_DIVISOR = 500  # 1000 README steps -> 2
PARSE_ONLY = re.compile(r"path/to/|my_images/|^studio (serve|bench|toy pretrain)\b")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def readme_commands() -> list[str]:
    """The `studio` command lines of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("studio "):
                commands.append(line)
    return commands


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def shrink(argv: list[str]) -> list[str]:
    """Fewer training steps, at most 4 ShapesWorld renders, one seed and 2 sampling steps, a quantization's teacher
    trajectories two of two steps: the same command, in seconds. Example: `sample "a" --seed 0 1 2 3 --steps 20` -> `sample "a" --seed 0 --steps 2`.
    """
    argv = [re.sub(r"\bcount=\d+", "count=4", token) if token.startswith("shapesworld:") else token for token in argv]
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in STEP_FLAGS:
            out += [token, str(max(1, int(argv[i + 1]) // STEP_DIVISOR))]
            i += 2
        elif token == "--seed":
            out += [token, argv[i + 1]]
            i += 2
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        elif token == "--steps" and argv[0] == "sample":
            out += [token, "2"]
            i += 2
        else:
            out.append(token)
            i += 1
    if argv[0] == "sample" and "--steps" not in out:
        out += ["--steps", "2"]
    if argv[0] == "quantize":  # the teacher's trajectories: two of two steps
        for flag in ("--trajectories", "--denoising-steps"):
            if flag in out:
                out[out.index(flag) + 1] = "2"
            else:
                out += [flag, "2"]
    return out


def test_the_readme_has_commands_to_run():
    commands = readme_commands()
    assert len(commands) >= 15
    assert any(c.startswith("studio train") for c in commands) and any(c.startswith("studio convert") for c in commands)


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square in the top left\n")
    (job,) = [tomllib.loads(block) for block in code_blocks("toml")]
    for key in ("max_train_steps", "checkpointing_steps", "validation_steps"):
        if key in job:
            job[key] = max(1, job[key] // STEP_DIVISOR)
    job["data"] = shrink(["train", job["data"]])[1]
    (tmp_path / "job.toml").write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in job.items()))
    ran = []
    for line in readme_commands():
        argv = shlex.split(line, comments=True)[1:]
        if PARSE_ONLY.search(line):
            check_command(argv)
            continue
        code = main(shrink(argv))
        captured = capsys.readouterr()
        assert code == 0, f"README command failed: {line}\n{captured.err[-2000:]}"
        assert "Traceback" not in captured.err
        ran.append(argv[0])
    assert {"sample", "train", "convert"} <= set(ran)
    assert (tmp_path / "outputs/star/lora.safetensors").is_file() and (tmp_path / "outputs/star/oft.safetensors").is_file()
    assert (tmp_path / "star-oft-back.safetensors").is_file()


@pytest.mark.parametrize("argv, expected", [
    (["sample", "a", "--seed", "0", "1", "2", "--steps", "20"], ["sample", "a", "--seed", "0", "--steps", "2"]),
    (["train", "--max-train-steps", "1000", "--checkpointing-steps", "250", "--data", "shapesworld:shape=seen,count=120"],
     ["train", "--max-train-steps", "2", "--checkpointing-steps", "1", "--data", "shapesworld:shape=seen,count=4"]),
])
def test_shrink(argv, expected):
    assert shrink(argv) == expected
