"""Killed runs: real training processes killed with SIGKILL (at a random step, in the middle of writing a
checkpoint, in the middle of writing the artifact) and restarted with `--resume latest` end with the artifact an
uninterrupted run writes, bit for bit (CPU, same seed); no kill leaves a truncated file where a good one was.

The fast set kills a LoRA run at each point; the slow set (`pytest -m slow`) an erasure (SPM) and a quantization
(EfficientDM) run as well.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.trainers.base import CHECKPOINT_MANIFEST, latest_checkpoint

RUNS = {  # short runs checkpointed every 2 steps; the artifact each writes
    "lora": (["train", "--method", "lora", "--data", "shapesworld:shape=star,count=8,seed=3", "--rank", "2",
              "--train-batch-size", "2", "--learning-rate", "1e-3", "--max-train-steps", "8"], "lora.safetensors"),
    "spm": (["erase", "--method", "spm", "--concept", "circle", "--max-train-steps", "6"], "spm.safetensors"),
    "efficientdm": (["quantize", "--method", "efficientdm", "--bits", "w4a8", "--trajectories", "4",
                     "--denoising-steps", "4", "--max-train-steps", "6"], "efficientdm.safetensors"),
}
COMMON = ["--checkpointing-steps", "2", "--validation-steps", "0", "--seed", "7"]

# Runs `studio` with one writer made deadly: with STUDIO_DIE_IN=<part of a path>, the first write of a matching file
# writes half of it and then the process SIGKILLs itself, as a kill -9 in the middle of that save would.
DRIVER = """
import os, signal, sys
target = os.environ.get("STUDIO_DIE_IN")
if target:
    import accelerate.checkpointing as checkpointing
    import studio.artifact as artifact

    def die_half_way(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    accelerate_save = checkpointing.save
    def save(obj, f, *args, **kwargs):
        if target in str(f):
            import io, torch
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            die_half_way(f, buffer.getvalue())
        return accelerate_save(obj, f, *args, **kwargs)
    checkpointing.save = save

    real_open = open
    def deadly_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and target in str(file):
            write = handle.write
            def half_write(data):
                write(data[: len(data) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            handle.write = half_write
        return handle
    artifact.open = deadly_open  # write_atomically's open
from studio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _studio(argv: list[str], die_in: str | None = None, kill_at_step: int | None = None, folder: Path | None = None):
    """Run `studio ARGV` in a fresh process; with `kill_at_step`, SIGKILL it once its metrics show that step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if die_in:
        env["STUDIO_DIE_IN"] = die_in
    process = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if kill_at_step is not None:
        metrics = folder / "metrics.jsonl"
        while process.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            if lines and json.loads(lines[-1])["step"] >= kill_at_step:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    out, err = process.communicate(timeout=600)
    return process.returncode, err


def _run(method: str, folder: Path, *extra: str, **kill):
    argv, _ = RUNS[method]
    return _studio([*argv, *COMMON, "--output-dir", str(folder), *extra], folder=folder, **kill)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same(a: Path, b: Path) -> None:
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ (first: {different[0]})"


def _kill_and_resume(method: str, tmp_path: Path, seed: int, points=("step", "save", "artifact")) -> None:
    _, artifact = RUNS[method]
    code, err = _run(method, tmp_path / "straight")
    assert code == 0, err
    reference = tmp_path / "straight" / artifact
    steps = int(RUNS[method][0][RUNS[method][0].index("--max-train-steps") + 1])
    if "step" in points:
        _kill_at_a_step(method, tmp_path, seed, steps, reference)
    if "save" in points:
        _kill_in_a_checkpoint(method, tmp_path, reference)
    if "artifact" in points:
        _kill_in_the_artifact(method, tmp_path, reference)


def _kill_at_a_step(method: str, tmp_path: Path, seed: int, steps: int, reference: Path) -> None:
    """SIGKILL at a random step (before the first checkpoint too: the resume then starts over), then resume."""
    _, artifact = RUNS[method]
    killed = tmp_path / "killed"
    step = random.Random(seed).randint(1, steps - 1)
    code, _ = _run(method, killed, kill_at_step=step)
    assert code == -signal.SIGKILL and not (killed / artifact).exists()
    code, err = _run(method, killed, "--resume", "latest")
    assert code == 0, err
    _assert_same(reference, killed / artifact)
    steps_logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1)), "the loss log repeats or skips steps after the resume"


def _kill_in_a_checkpoint(method: str, tmp_path: Path, reference: Path) -> None:
    """SIGKILL while the step-4 checkpoint is half-written: resume skips it (from step 2) and ends the same."""
    _, artifact = RUNS[method]
    in_save = tmp_path / "killed-in-save"
    code, _ = _run(method, in_save, die_in="step-4.partial")
    assert code == -signal.SIGKILL
    assert (in_save / "checkpoints" / "step-4.partial").is_dir() and not (in_save / "checkpoints" / "step-4").exists()
    assert latest_checkpoint(in_save).name == "step-2"  # the half-written one never got a checkpoint's name
    code, err = _run(method, in_save, "--resume", "latest")
    assert code == 0, err
    _assert_same(reference, in_save / artifact)
    assert (in_save / "checkpoints" / "step-4" / CHECKPOINT_MANIFEST).is_file()


def _kill_in_the_artifact(method: str, tmp_path: Path, reference: Path) -> None:
    """SIGKILL while the artifact is half-written: the good artifact of an earlier run stays whole, and a resume
    from the last checkpoint writes the new one."""
    _, artifact = RUNS[method]
    in_artifact = tmp_path / "killed-in-artifact"
    in_artifact.mkdir()
    earlier = reference.read_bytes()
    (in_artifact / artifact).write_bytes(earlier)
    code, _ = _run(method, in_artifact, die_in=f"{artifact}.")
    assert code == -signal.SIGKILL
    assert (in_artifact / artifact).read_bytes() == earlier, "a kill during the save damaged the artifact"
    (in_artifact / artifact).unlink()  # the earlier run's file is not this run's: the resume writes it
    code, err = _run(method, in_artifact, "--resume", "latest")
    assert code == 0, err
    _assert_same(reference, in_artifact / artifact)


@pytest.mark.slow  # 17-21 s; CI was 10:37 on a slow day. `pytest -m slow`; its siblings there kill SPM and EfficientDM runs
def test_a_lora_run_killed_while_saving_a_checkpoint_resumes_to_the_same_artifact(tmp_path):
    _kill_and_resume("lora", tmp_path, seed=1, points=("save",))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "spm", "efficientdm"])
def test_killed_adapter_erasure_and_quantization_runs_resume_to_the_same_artifact(method, tmp_path):
    _kill_and_resume(method, tmp_path, seed=2)


def test_a_checkpoint_changed_after_it_was_written_is_not_resumed_from(tmp_path):
    from studio.errors import StudioError
    from studio.trainers.base import TrainConfig, train

    def run(resume=None):
        return train(TrainConfig(data="shapesworld:shape=star,count=4", output_dir=str(tmp_path), max_train_steps=4,
                                 train_batch_size=2, checkpointing_steps=2, validation_steps=0, resume=resume,
                                 method_options={"rank": 2}))

    run()
    assert latest_checkpoint(tmp_path).name == "step-4"
    optimizer = next((tmp_path / "checkpoints" / "step-4").glob("optimizer*"))
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-4: its file optimizer.bin changed after it was written"):
        assert latest_checkpoint(tmp_path).name == "step-2"
    with pytest.raises(StudioError, match="step-4: its file optimizer.bin changed after it was written; pass another"):
        run(resume=str(tmp_path / "checkpoints" / "step-4"))
