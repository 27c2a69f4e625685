"""The app's job queue (`studio.ui.jobs`) and its form-to-flags mapping, without a browser."""

import json
import re
import time

import pytest
from studio.ui.jobs import DONE, FAILED, QUEUED, RUNNING, STOPPED, JobQueue

from studio.errors import StudioError


def test_jobs_run_in_their_own_folders_and_survive_a_restart(tmp_path, toy_artifact):
    queue = JobQueue(tmp_path / "data", workers=2, poll_seconds=0.05)
    good, bad = queue.create("inspect", "good"), queue.create("inspect", "bad")
    queue.submit(good, ["inspect", str(toy_artifact), "--model", "toy"])
    queue.submit(bad, ["inspect", str(tmp_path / "missing.safetensors")])
    assert queue.wait(good.id, 120).status == DONE
    assert queue.wait(bad.id, 120).status == FAILED
    assert json.loads(queue.log_tail(good.id).split("\n", 1)[1])["fits_model"] == "toy"
    assert "missing.safetensors not found" in queue.get(bad.id).message  # the command's one-line error
    assert good.folder != bad.folder and good.log.is_file() and bad.log.is_file()

    # A second app on the same folder sees both, newest first; a job that was running when the app
    # stopped comes back as stopped (its process is gone), ready to resume.
    running = queue.create("inspect", "cut off")
    queue.submit(running, ["inspect", str(toy_artifact)])
    queue.wait(running.id, 120)
    record = json.loads((tmp_path / "data" / "jobs" / running.id / "job.json").read_text())
    (tmp_path / "data" / "jobs" / running.id / "job.json").write_text(json.dumps({**record, "status": RUNNING}))
    again = JobQueue(tmp_path / "data", workers=1)
    assert [j.id for j in again.list()] == [running.id, bad.id, good.id]
    assert again.get(good.id).status == DONE and again.get(running.id).status == STOPPED


def test_shutdown_stops_running_training_with_a_checkpoint(tmp_path):
    queue = JobQueue(tmp_path / "data", workers=1, poll_seconds=0.05)
    job = queue.create("train", "long")
    queue.submit(job, ["train", "--method", "lora", "--data", "shapesworld:shape=star,count=2", "--max-train-steps", "5000",
                       "--train-batch-size", "1", "--output-dir", str(job.out)])
    deadline = time.time() + 120
    while not (job.out / "metrics.jsonl").is_file() or not (job.out / "metrics.jsonl").read_text():
        assert time.time() < deadline and queue.get(job.id).status in (QUEUED, RUNNING), queue.log_tail(job.id)
        time.sleep(0.2)
    queue.shutdown()
    assert queue.get(job.id).status == STOPPED
    assert re.fullmatch(r"stopped at step \d+ of 5000 — Resume continues from there", queue.get(job.id).message)
    assert len(list((job.out / "checkpoints").glob("step-*"))) == 1
    assert json.loads((tmp_path / "data" / "jobs" / job.id / "job.json").read_text())["status"] == STOPPED


def test_stop_a_queued_job_and_resume_replaces_a_flag(tmp_path, toy_artifact):
    queue = JobQueue(tmp_path / "data", workers=0)  # nothing starts: jobs stay queued
    job = queue.submit(queue.create("inspect", "x"), ["inspect", str(toy_artifact), "--model", "toy"])
    assert queue.get(job.id).status == QUEUED
    assert queue.stop(job.id).status == STOPPED
    queue.resume(job.id, ["--model", "elsewhere"])
    assert queue.get(job.id).argv == ["inspect", str(toy_artifact), "--model", "elsewhere"]
    assert queue.get(job.id).command.startswith("studio inspect ")
    with pytest.raises(StudioError, match="only a stopped or failed job"):
        queue.resume(job.id, [])
    with pytest.raises(StudioError, match="no job 'nope'"):
        queue.get("nope")


def test_form_fields_become_the_cli_flags():
    from studio.trainers.base import TrainConfig
    from studio.ui.app import config_fields

    common = {f.name: f for f in config_fields("common", TrainConfig)}
    from studio import registry

    lora = {f.name: f for f in config_fields("lora", registry.get("lora").config({}))}
    assert common["max_train_steps"].argv(20.0) == ["--max-train-steps", "20"]
    assert common["max_train_steps"].argv(500) == []  # the default is left out
    assert common["gradient_checkpointing"].argv(True) == ["--gradient-checkpointing"]
    assert common["resolution"].argv("") == [] and common["resolution"].argv("48") == ["--resolution", "48"]
    assert common["validation_prompt"].argv("a red sks") == ["--validation-prompt", "a red sks"]
    assert common["mixed_precision"].argv("bf16") == ["--mixed-precision", "bf16"]
    assert common["mixed_precision"].argv("no") == []
    assert lora["target_modules"].argv("to_q, to_v") == ["--target-modules", "to_q,to_v"]
    assert lora["target_modules"].argv("to_q,to_k,to_v,to_out.0") == []
    assert common["max_train_steps"].argv(1.5) == ["--max-train-steps", "1.5"]  # not rounded: refused below
    # What the form produces, `studio train` reads back to the same config, and refuses alike.
    from studio.cli import build_parser, check_command, train_config_from_args

    for bad in (common["max_train_steps"].argv("ten"), common["max_train_steps"].argv(1.5)):
        with pytest.raises(StudioError, match="--max-train-steps .*: must be a whole number from 1 to"):
            check_command(["train", "--data", "shapesworld:shape=star", *bad])

    argv = ["train", "--method", "lora", "--data", "shapesworld:shape=star"]
    argv += common["max_train_steps"].argv(20) + common["gradient_checkpointing"].argv(True) + common["mixed_precision"].argv("bf16")
    argv += common["snr_gamma"].argv("5") + lora["rank"].argv(8.0) + lora["target_modules"].argv("to_q, to_v")
    config = train_config_from_args(build_parser().parse_args(argv))
    assert (config.max_train_steps, config.gradient_checkpointing, config.snr_gamma) == (20, True, 5.0)
    assert config.mixed_precision == "bf16"
    from studio.options import config_from_options

    with pytest.raises(StudioError, match="must be one of no, fp16, bf16"):  # a TOML file can't pass a bad value either
        config_from_options(TrainConfig, {"mixed_precision": "fp8"})
    assert config.method_options == {"rank": "8", "target_modules": "to_q,to_v"}


def test_inspect_checks_the_base_model(tmp_path, toy_artifact, capsys):
    from studio.cli import main

    assert main(["inspect", str(toy_artifact), "--model", "toy"]) == 0
    assert json.loads(capsys.readouterr().out)["fits_model"] == "toy"
    from studio.testing import tiny_sd_pipeline

    other = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(other)
    assert main(["inspect", str(toy_artifact), "--model", str(other)]) == 2
    assert "was made on another base model" in capsys.readouterr().err


def test_progress_is_read_from_the_latest_bar_in_the_log(tmp_path):
    queue = JobQueue(tmp_path / "data", workers=0)
    job = queue.submit(queue.create("sample", "x"), ["sample", "x"])
    assert queue.progress(job.id) is None
    job.log.write_text("Loading pipeline components...: 100%|##########| 7/7 [00:00<00:00]\r"
                       "sampling:   0%|          | 0/16 [00:00<?, ?img/s]\rsampling:  50%|#####     | 8/16 [00:03<00:03]")
    assert queue.progress(job.id) == ("sampling", 8, 16)


def test_the_page_restores_a_session_for_its_own_user_only(tmp_path, toy_artifact):
    """A reload brings back the picked job and the stack, from the browser's storage; with --auth, another user's
    saved state (same browser) is not restored, and entries whose files are gone are dropped."""
    import shutil
    from types import SimpleNamespace

    from studio.ui.app import Studio

    studio = Studio(tmp_path / "data", workers=0)
    job = studio.queue.submit(studio.queue.create("train", "t"), ["train"])
    kept = studio.artifact_dir / "a" / "lora.safetensors"
    kept.parent.mkdir(parents=True)
    shutil.copy(toy_artifact, kept)
    stack = [{"path": str(kept), "name": "x", "scale": 0.5, "enabled": True},
             {"path": str(studio.artifact_dir / "gone.safetensors"), "name": "y", "scale": 1.0, "enabled": True}]
    alice, bob = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")
    saved = studio.remember({}, job.id, stack, alice)
    *pickers, restored_stack, _ = studio.restore(saved, alice)
    # The Train picker (a train job) and the Jobs picker; the Erase and Quantize tabs' pickers stay as they were.
    assert [p.get("value") for p in pickers] == [job.id, None, None, job.id]
    assert [item["name"] for item in restored_stack] == ["x"]  # the missing file is dropped
    *pickers, restored_stack, _ = studio.restore(saved, bob)
    assert restored_stack == [] and all("value" not in p for p in pickers)


def test_defaults_that_show_something(tmp_path):
    """The method's own learning rate (its toy-model rate on the toy model), in the page and the loop, and
    validation on the first caption every quarter of a run of 100+ steps."""
    from studio.trainers.base import (
        TrainConfig,
        recommended_learning_rate,
        with_defaults,
    )
    from studio.ui.app import Studio

    studio = Studio(tmp_path / "data", workers=0)
    assert [studio.recommended_rate(m, studio.default_model) for m in ("lora", "oft", "boft", "sara")] == \
        ["0.001", "0.00025", "0.0005", "0.003"]
    assert recommended_learning_rate("oft", "path/to/sd15") == 1e-4
    filled = with_defaults(TrainConfig(method="oft", max_train_steps=400), "a red sks")
    assert (filled.learning_rate, filled.validation_steps, filled.validation_prompt) == (2.5e-4, 100, "a red sks")
    assert with_defaults(TrainConfig(max_train_steps=20), "x").validation_steps == 0  # a short run: no validation
    assert with_defaults(TrainConfig(max_train_steps=400, validation_steps=0, learning_rate=0.01), "x").validation_steps == 0
