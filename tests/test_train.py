import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from studio.trainers.base import TrainConfig, train

from studio import plugin
from studio.artifact import read_header
from studio.cli import main
from studio.errors import StudioError
from studio.pipeline import load

STAR = "shapesworld:shape=star,count=4,colors=red|blue,caption=a {color} sks"


@pytest.mark.parametrize("method, options", [
    ("lora", {"rank": 2}),
    ("oft", {"block_size": 8}),
    ("boft", {"block_size": 4, "n_butterfly_factor": 2}),
    ("sara", {"fraction": 0.05}),
])
def test_each_method_trains_and_applies(method, options, tmp_path):
    config = TrainConfig(method=method, data=STAR, output_dir=str(tmp_path), max_train_steps=4, train_batch_size=2,
                         learning_rate=1e-3, method_options=options)
    result = train(config)
    header = read_header(result.artifact)
    assert header.method == method and result.trainable_params > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"]["images"] == 4
    pipe = load("toy")
    plugin.apply(pipe, result.artifact)
    image = pipe("a red sks", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_resume_equals_uninterrupted_run(tmp_path):
    def run(folder, steps, resume=None):
        return train(TrainConfig(method="lora", data=STAR, output_dir=str(folder), max_train_steps=steps,
                                 train_batch_size=2, learning_rate=1e-3, checkpointing_steps=3, resume=resume,
                                 method_options={"rank": 2, "dropout": 0.1}))

    straight = load_file(str(run(tmp_path / "a", 6).artifact))
    run(tmp_path / "b", 3)  # as if stopped at step 3, right after its checkpoint
    resumed = load_file(str(run(tmp_path / "b", 6, resume="latest").artifact))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_lora_dropout_acts_during_training(tmp_path):
    """The loop trains in train mode: LoRA's dropout changes the gradients, so the weights differ."""
    def weights(folder, dropout):
        run = train(TrainConfig(method="lora", data=STAR, output_dir=str(folder), max_train_steps=2, train_batch_size=2,
                                learning_rate=1e-3, method_options={"rank": 2, "dropout": dropout}))
        return load_file(str(run.artifact))

    plain, dropped = weights(tmp_path / "a", 0.0), weights(tmp_path / "b", 0.5)
    assert any(not torch.equal(plain[k], dropped[k]) for k in plain)


def test_sigterm_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    """A SIGTERM during step 3 (the app's Stop button) ends the run after that step with a checkpoint;
    resuming from it gives the same weights as a run that never stopped (the decaying rate continues where it
    stopped)."""
    import signal

    from studio.trainers import base

    def run(folder, resume=None):
        return train(TrainConfig(method="lora", data=STAR, output_dir=str(folder), max_train_steps=6, train_batch_size=2,
                                 learning_rate=1e-3, lr_scheduler="linear", resume=resume,
                                 method_options={"rank": 2, "dropout": 0.1}))

    straight = load_file(str(run(tmp_path / "a").artifact))
    calls, real_denoising_loss = [], base.denoising_loss

    def denoising_loss_with_a_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)  # handled by the loop: a flag, not an exit
        return real_denoising_loss(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(base, "denoising_loss", denoising_loss_with_a_signal)
    with pytest.raises(base.TrainingStopped, match="stopped at step 3 of 6"):
        run(tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-3"]
    assert not (tmp_path / "b" / "lora.safetensors").exists()
    monkeypatch.setattr(base, "denoising_loss", real_denoising_loss)
    resumed = load_file(str(run(tmp_path / "b", resume="latest").artifact))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("schedule, expected", [
    (None, [1e-3] * 4),  # LoRA's default: constant
    ("cosine", [1e-3, 8.535534e-4, 5e-4, 1.464466e-4]),  # (linear: the SIGTERM test above runs it)
])
def test_lr_scheduler_sets_each_steps_rate(schedule, expected, tmp_path, monkeypatch):
    used, real_step = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(TrainConfig(method="lora", data=STAR, output_dir=str(tmp_path), max_train_steps=4, train_batch_size=2,
                      learning_rate=1e-3, lr_scheduler=schedule, method_options={"rank": 2}))
    assert used == pytest.approx(expected, rel=1e-6)


def test_distillation_decays_its_rate_by_default():
    from studio import registry

    assert registry.get("efficientdm").trainer.lr_scheduler == registry.get("qat").trainer.lr_scheduler == "linear"
    assert registry.get("lora").trainer.lr_scheduler == "constant"


def test_cli_train_with_toml_and_flag_override(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(f'method = "oft"\ndata = "{STAR}"\nmax-train-steps = 50\nblock-size = 8\ntrain-batch-size = 2\n')
    code = main(["train", "--config", str(job), "--max-train-steps", "2", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["artifact"].endswith("oft.safetensors")
    assert main(["inspect", out["artifact"]]) == 0
    assert '"method": "oft"' in capsys.readouterr().out


def test_bad_training_input(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--method", "dora", "--data", STAR]) == 2
    assert "unknown method 'dora'" in capsys.readouterr().err
    with pytest.raises(StudioError, match="no checkpoint to resume"):
        train(TrainConfig(data=STAR, output_dir=str(tmp_path / "fresh"), resume=str(tmp_path / "fresh" / "checkpoints" / "step-1"),
                          max_train_steps=1))


def test_cli_sample_with_adapters(tmp_path, capsys):
    result = train(TrainConfig(method="lora", data=STAR, output_dir=str(tmp_path / "lora"), max_train_steps=2,
                               train_batch_size=2, method_options={"rank": 2}))
    other = train(TrainConfig(method="sara", data=STAR, output_dir=str(tmp_path / "sara"), max_train_steps=2,
                              train_batch_size=2, method_options={"fraction": 0.05}))
    out = tmp_path / "samples"
    code = main(["sample", "a red sks", "--adapter", f"{result.artifact}:0.8", "--adapter", str(other.artifact),
                 "--steps", "2", "--output-dir", str(out)])
    assert code == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["adapters"] == [{"file": str(result.artifact), "scale": 0.8}, {"file": str(other.artifact), "scale": 1.0}]
    assert main(["sample", "a red sks", "--adapter", str(tmp_path / "missing.safetensors"), "--output-dir", str(out)]) == 2
    assert "adapter file" in capsys.readouterr().err


def test_stock_load_lora_weights_accepts_our_lora(tmp_path):
    from diffusers import StableDiffusionPipeline

    from studio.pipeline import toy_model_path

    result = train(TrainConfig(method="lora", data=STAR, output_dir=str(tmp_path), max_train_steps=3,
                               train_batch_size=2, learning_rate=1e-2, method_options={"rank": 2, "alpha": 4}))
    stock = StableDiffusionPipeline.from_pretrained(str(toy_model_path()))
    ours = load("toy")
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 32, 128, generator=generator)
    with torch.no_grad():
        base = stock.unet(sample, 10, text).sample
        stock.load_lora_weights(str(result.artifact))
        plugin.apply(ours, result.artifact)
        via_diffusers, via_plugin = stock.unet(sample, 10, text).sample, ours.unet(sample, 10, text).sample
    assert not torch.allclose(via_diffusers, base, atol=1e-6)
    assert torch.allclose(via_diffusers, via_plugin, atol=1e-5)


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory):
    from studio.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("fixtures")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    return {"sd": root / "sd", "sdxl": root / "sdxl"}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("method, flags", [
    ("lora", ["--rank", "2"]),
    ("oft", ["--block-size", "4"]),
    ("boft", ["--block-size", "4"]),
    ("sara", []),
])
def test_cli_trains_on_sd_and_sdxl_fixtures(kind, method, flags, fixture_models, tmp_path, capsys):
    model = str(fixture_models[kind])
    code = main(["train", "--model", model, "--method", method, "--data", STAR, "--resolution", "32",
                 "--max-train-steps", "2", "--train-batch-size", "2", "--learning-rate", "1e-2",
                 "--output-dir", str(tmp_path), *flags])
    assert code == 0
    artifact = json.loads(capsys.readouterr().out)["artifact"]
    pipe = load(model, device="cpu", dtype="fp32")
    prompt = "a red sks"
    before = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    plugin.apply(pipe, artifact)
    after = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert after.shape == before.shape and not (after == before).all()


@pytest.mark.parametrize("method", ["sara", "boft"])
def test_bf16_mixed_precision(method, fixture_models, tmp_path):
    result = train(TrainConfig(method=method, model=str(fixture_models["sd"]), data=STAR, output_dir=str(tmp_path),
                               resolution=32, max_train_steps=2, train_batch_size=2, mixed_precision="bf16",
                               method_options={"block_size": 4} if method == "boft" else {}))
    tensors = load_file(str(result.artifact))
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_cache_validation_images_and_logs(tmp_path):
    config = dict(method="lora", data=STAR, max_train_steps=2, train_batch_size=2, learning_rate=1e-3,
                  validation_prompt="a red sks", validation_steps=2, cache_dir=str(tmp_path / "cache"))
    first = train(TrainConfig(output_dir=str(tmp_path / "a"), **config))
    cached = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = train(TrainConfig(output_dir=str(tmp_path / "b"), **config))
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    a, b = load_file(str(first.artifact)), load_file(str(second.artifact))
    assert all(torch.equal(a[k], b[k]) for k in a)
    images = sorted((tmp_path / "a" / "validation" / "step-2").glob("*.png"))
    assert len(images) == 4
    assert list((tmp_path / "a" / "logs").rglob("events.out.tfevents.*"))


ACCELERATE_CONFIGS = Path(__file__).parents[1] / "docs" / "accelerate"
STAR_8 = "shapesworld:shape=star,count=8,seed=3"


def test_the_accelerate_configs_in_docs_parse():
    """The ready-made configs for users who outgrow one GPU read as accelerate reads them."""
    from accelerate.commands.config.config_args import load_config_from_file

    ddp, fsdp, zero2 = (load_config_from_file(str(ACCELERATE_CONFIGS / name))
                        for name in ("ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml"))
    assert [c.distributed_type.value for c in (ddp, fsdp, zero2)] == ["MULTI_GPU", "FSDP", "DEEPSPEED"]
    assert all(c.num_processes == 2 and c.num_machines == 1 for c in (ddp, fsdp, zero2))
    # Only the adapter's parameters train: FSDP must keep them apart from the frozen ones, and gather the whole
    # model when checkpoints and the artifact are written.
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert zero2.deepspeed_config["zero_stage"] == 2


def _launch(config: str, output_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
               "--num_processes", "2", "--mixed_precision", "no", "-m", "studio.cli", *argv,
               "--output-dir", str(output_dir)]
    # Without ACCELERATE_USE_CPU, a CPU-only launch starts two separate single-process runs.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _lora(folder: Path, batch: int, steps: int, resume: str | None = None) -> Path:
    return train(TrainConfig(data=STAR_8, output_dir=str(folder), max_train_steps=steps, train_batch_size=batch,
                             learning_rate=1e-3, checkpointing_steps=2, validation_steps=0, seed=7, resume=resume,
                             method_options={"rank": 2})).artifact


def _assert_close(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_whole_batch(tmp_path):
    """`accelerate launch` with two CPU processes (gloo), batch 2 each, ends within float tolerance of one process
    with batch 4; its checkpoint resumes in a one-process run, which ends as one that never stopped."""
    two = tmp_path / "two"
    out = _launch("ddp.yaml", two, "train", "--method", "lora", "--data", STAR_8, "--rank", "2", "--train-batch-size",
                  "2", "--learning-rate", "1e-3", "--max-train-steps", "4", "--checkpointing-steps", "2",
                  "--validation-steps", "0", "--seed", "7")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"artifact"') == 1  # one process reports
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    _assert_close(two / "lora.safetensors", _lora(tmp_path / "one", batch=4, steps=4))
    pipe = load("toy")
    plugin.apply(pipe, two / "lora.safetensors")

    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    _assert_close(_lora(resumed, batch=4, steps=6, resume="latest"), _lora(tmp_path / "one-6", batch=4, steps=6))


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_in_one_line(tmp_path):
    """accelerate's FSDP plugin wants a GPU: on CPU the launch ends with our one-line message naming the way that
    works there (DDP), from each process (accelerate's launcher then reports the failed processes)."""
    out = _launch("fsdp.yaml", tmp_path, "train", "--method", "lora", "--data", STAR_8, "--max-train-steps", "2")
    assert out.returncode != 0
    assert "error: accelerate cannot set up this launch" in out.stderr and "docs/accelerate/ddp.yaml" in out.stderr
