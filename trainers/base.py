"""The one training loop every adapter method runs on (accelerate).

Read top to bottom: load the base pipeline, let the method wrap its layers, load
and bucket the data, cache latents and text embeddings once, then a plain
loop of noise -> predict -> loss -> step, with checkpoints, validation samples
and the artifact written at the end.

With `train_text_encoder` (LoRA only) the method also wraps the text
encoder(s), and the captions go through them at every step (`LiveText`): the
cached text embeddings are those of the frozen encoder, so they are not used.

Every random choice of step k (which examples, which noise, which timesteps,
caption dropout, adapter dropout) is drawn from generators seeded with
(seed, k), so a run stopped at step k and resumed from its checkpoint ends
with the same weights as one that never stopped; under several processes each
takes its share of the same global batch (`draw_batch`), so they end as one
process with the whole batch would. Checkpoints are written atomically and
resumed from only when complete (`save_checkpoint`).

Example:
    >>> from studio.trainers.base import TrainConfig, train  # doctest: +SKIP
    >>> train(TrainConfig(method="lora", data="shapesworld:shape=star,count=8", max_train_steps=100))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from studio import registry
from studio.artifact import TRIGGER_WORDS_KEY, fingerprint, save_artifact, write_atomically
from studio.data import Dataset, bucket_batches, load_dataset
from studio.errors import StudioError, TrainingStopped
from studio.options import check_options, ranged
from studio.pipeline import TOY_MODEL, default_size, load

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # a pipeline's text encoder components (SDXL has both)


@dataclass
class TrainConfig:
    """The loop's options; names match the CLI flags (and diffusers' example scripts where they exist)."""

    method: str = "lora"
    model: str = "toy"
    data: str = ""
    output_dir: str = "outputs/train"
    resolution: int | None = ranged(None, 8, 4096, multiple_of=8)  # default: the model's own training size
    train_batch_size: int = ranged(4, 1, 1024)
    learning_rate: float | None = ranged(None, 0, 1, low_open=True)  # default: the method's (`recommended_learning_rate`)
    lr_scheduler: Literal["constant", "linear", "cosine"] | None = None  # default: the method's (`MethodTrainer.lr_scheduler`)
    max_train_steps: int = ranged(500, 1, 10_000_000)
    seed: int = ranged(0, 0, 2**32 - 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = ranged(1, 1, 1024)
    gradient_checkpointing: bool = False
    checkpointing_steps: int = ranged(0, 0)  # 0: only the final artifact
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_prompt: str | None = None  # default: the first training caption
    validation_steps: int | None = ranged(None, 0)  # default: every quarter of a run of >= 100 steps; 0: none
    snr_gamma: float | None = ranged(None, 0, low_open=True)  # min-SNR weighting (Hang et al. 2023); 5.0 is the usual value
    noise_offset: float = ranged(0.0, 0, 1)
    caption_dropout: float = ranged(0.0, 0, 1, high_open=True)  # 1 would never show a caption
    default_caption: str | None = None
    trigger: str | None = None
    repeats: int = ranged(1, 1, 1000)
    prior_data: str = ""  # prior preservation (DreamBooth): a second dataset the model must keep drawing
    prior_loss_weight: float = ranged(1.0, 0)
    cache_dir: str | None = None  # encoded latents and captions, reused across runs; default <output_dir>/cache
    train_text_encoder: bool = False  # LoRA on the text encoder(s) too (both on SDXL); captions encoded every step
    text_encoder_lr: float | None = ranged(None, 0, 1, low_open=True)  # the text encoders' learning rate; default: learning_rate
    method_options: dict = field(default_factory=dict)


# What each option left out (None) means; the CLI's --help and the page's empty fields say it.
UNSET_MEANS = {
    "resolution": "the model's training size",
    "learning_rate": "the method's rate for this model",
    "lr_scheduler": "the method's (constant; linear decay to 0 for EfficientDM and QAT)",
    "resume": "start fresh",
    "validation_prompt": "the first training caption",
    "validation_steps": "every quarter of a run of 100+ steps (0: none)",
    "snr_gamma": "off (5 is the usual value)",
    "default_caption": "none",
    "trigger": "none",
    "cache_dir": "<output-dir>/cache",
    "text_encoder_lr": "--learning-rate",
}

VALIDATION_MIN_STEPS = 100  # runs this long validate by default (4 times); shorter ones are tests, not watched


def recommended_learning_rate(method: str, model: str) -> float:
    """The method's default learning rate: its toy-model rate on the toy model, its general one elsewhere.

    Example:
        >>> recommended_learning_rate("lora", "toy"), recommended_learning_rate("lora", "path/to/sd15")
        (0.001, 0.0001)
    """
    registered = registry.get(method)
    return registered.toy_learning_rate if model == TOY_MODEL else registered.learning_rate


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The share of the learning rate used at `step` (from 0) of `total`: 1 throughout (`constant`), falling in a
    straight line (`linear`) or along a half cosine (`cosine`) from 1 at the first step towards 0 after the last.
    A function of the step alone, so a resumed run continues the schedule exactly.

    Example:
        >>> [lr_factor("linear", s, 4) for s in range(4)], lr_factor("cosine", 2, 4), lr_factor("constant", 3, 4)
        ([1.0, 0.75, 0.5, 0.25], 0.5, 1.0)
    """
    progress = step / max(1, total)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return round(0.5 * (1.0 + math.cos(math.pi * progress)), 12)
    return 1.0


def with_defaults(config: TrainConfig, first_caption: str) -> TrainConfig:
    """`config` with the options left out (None) filled in: the method's learning rate, and validation with
    the first training caption every quarter of the run (for runs of at least VALIDATION_MIN_STEPS steps).

    Example:
        >>> with_defaults(TrainConfig(max_train_steps=400), "a red sks").validation_steps
        100
    """
    steps = config.validation_steps
    if steps is None:
        steps = config.max_train_steps // 4 if config.max_train_steps >= VALIDATION_MIN_STEPS else 0
    return replace(config, learning_rate=config.learning_rate or recommended_learning_rate(config.method, config.model),
                   validation_steps=steps, validation_prompt=config.validation_prompt or first_caption)


@dataclass
class TrainResult:
    artifact: Path
    steps: int
    seconds: float
    trainable_params: int
    final_loss: float
    data_summary: dict


def _step_generators(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Step `step`'s generators: the same on every process (each keeps its share of the batch drawn from them; the
    trailing 0 keeps the draws of the runs made when each process drew its own)."""
    key = [seed, step, 0]
    return np.random.default_rng(key), torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


# Checkpoints. accelerate writes a checkpoint as several files (weights, optimizer, RNG states); a kill during that
# would leave a folder that looks like a checkpoint and is not one. So it writes into `step-N.partial`, a manifest of
# every file's SHA-256 goes in last, and only then is the folder renamed `step-N`: a `step-N` folder is complete.
# Resume checks the manifest before anything is loaded (the optimizer and RNG states are pickles, read by accelerate
# through torch's weights-only unpickler): only checkpoints this tool wrote, unchanged since, are resumed from.
CHECKPOINT_MANIFEST = "studio-checkpoint.json"


def _file_sha256(path: Path, sync: bool = False) -> str:
    """The file's SHA-256; with `sync`, the file is also flushed to disk (a checkpoint's, before it is named complete)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """`accelerator.save_state` into `folder`, atomically: written beside it, its manifest last, then renamed (every
    process calls it, as `save_state`)."""
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process and partial.exists():  # a save killed half-way
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(path.relative_to(partial)): _file_sha256(path, sync=True)
                 for path in sorted(partial.rglob("*")) if path.is_file()}
        write_atomically(partial / CHECKPOINT_MANIFEST, json.dumps({"step": step, "files": files}, indent=1).encode())
        if folder.exists():  # the same step saved again (a resumed run): the old one goes once the new one is in place
            replaced = folder.with_name(folder.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            folder.rename(replaced)
            partial.rename(folder)
            shutil.rmtree(replaced)
        else:
            partial.rename(folder)
    accelerator.wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, unchanged checkpoint of this tool (None: it is one)."""
    manifest = folder / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        return f"it has no {CHECKPOINT_MANIFEST} (half-written, or not written by Diffusion Studio)"
    try:
        files = json.loads(manifest.read_text())["files"]
        for name, digest in files.items():
            path = folder / name
            if ".." in Path(name).parts or not path.is_file():
                return f"its file {name} is missing"
            if _file_sha256(path) != digest:
                return f"its file {name} changed after it was written"
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"its {CHECKPOINT_MANIFEST} is damaged"
    return None


def check_checkpoint(folder: Path, output_dir: Path) -> None:
    """Refuse `--resume FOLDER` unless it is a complete checkpoint this tool wrote, unchanged since."""
    if not folder.is_dir():
        raise StudioError(f"no checkpoint to resume from ({folder}); checkpoints live in {output_dir / 'checkpoints'}")
    if not CHECKPOINT_PATTERN.fullmatch(folder.name):
        raise StudioError(f"--resume {folder}: not a checkpoint folder (they are named step-N, in "
                          f"{output_dir / 'checkpoints'}); pass one of those, or --resume latest")
    problem = checkpoint_problem(folder)
    if problem:
        raise StudioError(f"cannot resume from {folder}: {problem}; pass another checkpoint, or --resume latest")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in `output_dir/checkpoints`; newer ones that are not (a kill during a save, a
    changed file) are skipped with a warning.

    Example:
        >>> latest_checkpoint(Path("outputs/never-trained")) is None
        True
    """
    folders = [p for p in (output_dir / "checkpoints").glob("step-*") if CHECKPOINT_PATTERN.fullmatch(p.name)]
    for folder in sorted(folders, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipped checkpoint {folder}: {problem}", stacklevel=2)
    return None


@dataclass
class Cached:
    """A dataset with what the loop needs of it precomputed: per example the VAE posterior (mean, std),
    scaled to the UNet's latent space; per distinct caption (and "") the text embeddings, plus the
    pooled embedding on SDXL."""

    data: Dataset
    latents: list[tuple[torch.Tensor, torch.Tensor]]
    text: dict[str, torch.Tensor]
    pooled: dict[str, torch.Tensor]


def _cache_key(pipe, data: Dataset, model: str) -> str:
    """A hash of everything the cached tensors depend on: the model, the images and the captions."""
    digest = hashlib.sha256()
    digest.update(json.dumps([model, pipe.vae.config, pipe.text_encoder.config.to_dict()], sort_keys=True, default=str).encode())
    for example in data.examples:
        digest.update(example.caption.encode() + b"\0" + example.image.tobytes() + str(example.image.size).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cache_examples(pipe, data: Dataset, cache_dir: Path | None = None, model: str = "") -> Cached:
    """Encode every image and caption of `data` once; with `cache_dir`, reuse (or write) a file there."""
    path = cache_dir / f"{_cache_key(pipe, data, model)}.safetensors" if cache_dir else None
    captions = sorted({e.caption for e in data.examples} | {""})
    if path is not None and path.is_file():
        stored = load_file(str(path))
        latents = [(stored[f"mean.{i}"], stored[f"std.{i}"]) for i in range(len(data.examples))]
        text = {c: stored[f"text.{i}"] for i, c in enumerate(captions)}
        pooled = {c: stored[f"pooled.{i}"] for i, c in enumerate(captions) if f"pooled.{i}" in stored}
        return Cached(data, latents, text, pooled)

    scaling = pipe.vae.config.scaling_factor
    latents = []
    for example in tqdm(data.examples, desc="cache latents", leave=False):
        pixels = torch.from_numpy(np.array(example.image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        latents.append(((dist.mean[0] * scaling).float().cpu(), (dist.std[0] * scaling).float().cpu()))
    text, pooled = {}, {}
    for caption in captions:
        encoded = pipe.encode_prompt(caption, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
        text[caption] = encoded[0][0].float().cpu()
        if len(encoded) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
            pooled[caption] = encoded[2][0].float().cpu()
    if path is not None:
        tensors = {}
        for i, (mean, std) in enumerate(latents):
            tensors[f"mean.{i}"], tensors[f"std.{i}"] = mean, std
        for i, caption in enumerate(captions):
            tensors[f"text.{i}"] = text[caption]
            if caption in pooled:
                tensors[f"pooled.{i}"] = pooled[caption]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # processes of one launch write side by side
        save_file(tensors, str(partial))
        partial.replace(path)
    return Cached(data, latents, text, pooled)

class LiveText:
    """Captions -> the UNet's text conditioning through the (trainable) text encoder(s), with gradients,
    computed as `pipe.encode_prompt` does: SD's last hidden state (with the attention mask where the
    encoder's config asks for one); on SDXL both encoders' penultimate hidden states side by side, and
    the pooled projection of the encoder that has one.

    Example:
        >>> from studio.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> text, pooled = LiveText(pipe, [pipe.text_encoder])(["a red sks"], "cpu")
        >>> tuple(text.shape), pooled
        ((1, 77, 32), None)
    """

    def __init__(self, pipe, text_encoders: list[torch.nn.Module]) -> None:
        # `text_encoders`: the pipeline's text encoders in order, as accelerate prepared them (maybe wrapped).
        tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
        configs = [getattr(pipe, name).config for name in text_encoder_names(pipe)]
        self.parts = list(zip(tokenizers, text_encoders, configs))
        self.sdxl = "text_encoder_2" in pipe.components

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tokenizer, text_encoder, config in self.parts:
            tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt")
            ids = tokens.input_ids.to(device)
            if not self.sdxl:
                mask = tokens.attention_mask.to(device) if getattr(config, "use_attention_mask", False) else None
                return text_encoder(ids, attention_mask=mask)[0].float(), None
            out = text_encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0].float()
            hidden.append(out.hidden_states[-2].float())
        return torch.cat(hidden, dim=-1), pooled


def text_encoder_names(pipe) -> list[str]:
    """The pipeline's text encoders by component name: ["text_encoder"], or two on SDXL.

    Example:
        >>> from studio.testing import tiny_sdxl_pipeline
        >>> text_encoder_names(tiny_sdxl_pipeline())
        ['text_encoder', 'text_encoder_2']
    """
    return [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]


def check_text_encoder_options(config: TrainConfig, adapter) -> None:
    """Refuse `text_encoder_lr` without `train_text_encoder`, and `train_text_encoder`
    for a method that has no text-encoder part (only LoRA has one).

    Example:
        >>> from studio.adapters import lora
        >>> check_text_encoder_options(TrainConfig(train_text_encoder=True, text_encoder_lr=5e-5), lora)
    """
    lr = config.text_encoder_lr  # its range is checked with every option's (`check_options`)
    if lr is not None and not config.train_text_encoder:
        raise StudioError(f"--text-encoder-lr {lr} is set but the text encoder is not trained: "
                          "add --train-text-encoder, or drop --text-encoder-lr")
    if config.train_text_encoder and not hasattr(adapter, "inject_text_encoder"):
        raise StudioError(
            f"--train-text-encoder works with --method lora only: {config.method} changes UNet layers only "
            "(its files, studio.plugin and diffusers' loaders have no text-encoder part for it); "
            "drop --train-text-encoder or use --method lora"
        )


def check_prior_data(config: TrainConfig, trainer: MethodTrainer) -> None:
    """Refuse `prior_data` for a method whose loss does not use it (IP-Adapter), rather than ignore it.

    Example:
        >>> check_prior_data(TrainConfig(method="ip-adapter", prior_data="shapesworld:"), registry.get("ip-adapter").trainer)
        Traceback (most recent call last):
        studio.errors.StudioError: --prior-data is not used by --method ip-adapter; drop --prior-data
    """
    if config.prior_data and not trainer.uses_prior_data:
        raise StudioError(f"--prior-data is not used by --method {config.method}; drop --prior-data")


@dataclass
class Batch:
    """One training batch drawn from a cached dataset: which examples, their noised latents, the target, the
    timesteps and the text conditioning (plus SDXL's added conditioning)."""

    indices: list[int]
    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    added: dict | None


def uniform_timesteps(n: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps drawn uniformly from [0, total): the default."""
    return torch.randint(0, total, (n,), generator=generator)


def draw_batch(cached: Cached, config: TrainConfig, noise_scheduler, rng, generator, device,
               live_text: LiveText | None = None, timesteps=uniform_timesteps) -> Batch:
    """Draw a batch (every random choice from `rng` and `generator`); with `live_text`, the captions go
    through the text encoder(s) instead of coming from the cache. `timesteps(n, total, generator)` draws the
    timesteps (T2I-Adapter's are biased towards the noisy end).

    Under several processes, every process draws the same global batch (`--train-batch-size` per process, times
    the processes) with the same generators, and keeps its own consecutive share: N processes step as one process
    with N times the batch would (within float tolerance: DDP averages their gradients)."""
    from accelerate import PartialState

    state = PartialState()
    processes, rank = state.num_processes, state.process_index
    drawn = next((b for b in bucket_batches(cached.data.buckets, config.train_batch_size * processes, rng)
                  if len(b) >= processes), None)
    if drawn is None:
        raise StudioError(f"{processes} processes need at least {processes} training images of one size; add images "
                          "or use fewer processes")
    bounds = np.linspace(0, len(drawn), processes + 1).round().astype(int)
    mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
    batch = drawn[mine]
    mean = torch.stack([cached.latents[i][0] for i in drawn])
    std = torch.stack([cached.latents[i][1] for i in drawn])
    sample = (mean + std * torch.randn(mean.shape, generator=generator))[mine]
    captions = [cached.data.examples[i].caption if rng.random() >= config.caption_dropout else "" for i in drawn][mine]
    if live_text is None:
        text = torch.stack([cached.text[c] for c in captions])
        pooled = torch.stack([cached.pooled[c] for c in captions]) if cached.pooled else None
    else:
        text, pooled = live_text(captions, device)
    added = None
    if pooled is not None:  # SDXL: pooled text and (original size, crop top-left, target size) ids
        width, height = cached.data.buckets[batch[0]]
        added = {"text_embeds": pooled.to(device),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * len(batch), dtype=torch.float32).to(device)}
    shape = (len(drawn),) + sample.shape[1:]
    noise = torch.randn(shape, generator=generator)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn(shape[:2] + (1, 1), generator=generator)
    noise = noise[mine]
    timesteps = timesteps(len(drawn), noise_scheduler.config.num_train_timesteps, generator)[mine]
    noisy = noise_scheduler.add_noise(sample, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(sample, noise, timesteps)
    return Batch(batch, noisy, target, timesteps, text, added)


def denoising_loss(unet, batch: Batch, config: TrainConfig, noise_scheduler, device) -> torch.Tensor:
    """The UNet's prediction error on `batch` (MSE, min-SNR weighted with `snr_gamma`)."""
    from diffusers.training_utils import compute_snr

    pred = unet(batch.noisy.to(device), batch.timesteps.to(device), batch.text.to(device),
                added_cond_kwargs=batch.added).sample.float()
    per_example = F.mse_loss(pred, batch.target.to(device), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma:  # min-SNR weighting
        snr = compute_snr(noise_scheduler, batch.timesteps).to(device)
        clamped = torch.clamp(snr, max=config.snr_gamma)
        per_example = per_example * (clamped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clamped / snr)
    return per_example.mean()


@dataclass
class Loop:
    """What a method's trainer sees of a run, built once by `train` after the data is cached."""

    config: TrainConfig
    method_config: Any
    pipe: Any
    models: dict[str, torch.nn.Module]  # the trained parts by name ("unet", "text_encoder"), as accelerate prepared them
    data: list[Cached]  # the training set, then the prior-preservation set if any
    noise_scheduler: Any
    live_text: LiveText | None
    accelerator: Any

    def unwrap(self, part: str = "unet") -> torch.nn.Module:
        """A trained part without accelerate's wrapper (DDP), e.g. to read its layers."""
        return self.accelerator.unwrap_model(self.models[part])


class MethodTrainer:
    """How a method is learned: the contract between a method and the one loop (`train`).

    The defaults are those of a per-layer weight method trained on the denoising loss of (image, caption)
    pairs, which is all LoRA, OFT and BOFT need; a method that needs more subclasses this in
    `trainers/<method>.py` and names the class in its `studio/registry.py` line (SaRA adds a loss term and a
    half-way re-selection). `train` calls, in this order:

    1. `attach(pipe, method_config, train_text_encoder)` once, before any data is read: put the trainable
       layers on the pipeline (or build a network beside it), freeze the rest, return the touched layer names
       per trained part; `model(pipe, part)` gives each part. A model-dependent bad option fails here, before
       anything is written.
    2. `prepare(loop)` once, after the data is cached: compute what the method's training examples carry
       beyond image and caption (IP-Adapter: each image's embedding as its image prompt).
    3. `loss(loop, rng, generator)` every step, with that step's seeded generators: draw every random choice
       from them, so a resumed run ends with the same weights.
    4. `after_step(loop, step, optimizer)` after every optimizer step (`step` counts from 1).
    5. `validation_inputs(loop)` at each validation: extra arguments of the pipeline call that draws the
       validation images (IP-Adapter: an image prompt).
    6. `artifact(loop)` once at the end: the file's tensors and its extra header entries, written with the
       studio header to `artifact_path(output_dir)`.

    Parts named like the pipeline's text encoders train at `--text-encoder-lr`, every other part at
    `--learning-rate`; all train with AdamW and `weight_decay`.

    Example:
        >>> registry.get("oft").trainer.weight_decay
        0.0
    """

    weight_decay = 0.0  # orthogonal and low-rank methods use none: decay would pull R to I / B A to 0
    uses_prior_data = True  # its loss adds the --prior-data set's (refused where it would be ignored)
    keeps_image_sizes = False  # True: every image trains at its own size (ResAdapter), not fitted to --resolution
    needs_data = True  # False: it learns from the model itself (concept erasure): --data is refused, nothing is cached
    closed_form = False  # True: `prepare` computes the result at once (RECE): no optimizer, no step
    lr_scheduler = "constant"  # the learning-rate schedule when --lr-scheduler is not given (`lr_factor`)

    def __init__(self, method: registry.Method) -> None:
        self.method = method
        self.adapter = method.adapter

    def attach(self, pipe, method_config, train_text_encoder: bool = False) -> dict[str, list[str]]:
        """The method's layers on the UNet (and with `train_text_encoder` on each text encoder); the names
        of the wrapped layers per trained part (the "unet" entry's make the file's base-model fingerprint)."""
        parts = {"unet": self.adapter.inject(pipe.unet, method_config)}
        if train_text_encoder:
            for name in text_encoder_names(pipe):
                parts[name] = self.adapter.inject_text_encoder(getattr(pipe, name), method_config)
        return parts

    def model(self, pipe, part: str) -> torch.nn.Module:
        """The trained part named `part` by `attach`: a pipeline component by default; a network the method
        adds (T2I-Adapter's) is its own."""
        return getattr(pipe, part)

    def artifact_path(self, output_dir: Path) -> Path:
        """Where the artifact is written: `<output_dir>/<method>.safetensors` by default."""
        return output_dir / f"{self.method.name}.safetensors"

    def prepare(self, loop: Loop) -> None:
        """Nothing by default: a training example is an image and its caption."""

    def loss(self, loop: Loop, rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss of one batch of the data, plus the prior set's weighted by `prior_loss_weight`."""
        loss = 0.0
        for which, part in enumerate(loop.data):
            weight = loop.config.prior_loss_weight if which else 1.0
            batch = draw_batch(part, loop.config, loop.noise_scheduler, rng, generator, loop.accelerator.device,
                               loop.live_text)
            loss = loss + weight * denoising_loss(loop.models["unet"], batch, loop.config, loop.noise_scheduler,
                                                  loop.accelerator.device)
        return loss

    def parameter_groups(self, models: dict[str, torch.nn.Module], config: TrainConfig, method_config) -> list[dict]:
        """The optimizer's parameter groups (`config.learning_rate` is the default rate): by default one per trained
        part, the text encoders at `--text-encoder-lr`. A method with rates of its own (EfficientDM's per-layer LoRA
        rates, its quantizers' steps) gives its groups here."""
        groups = []
        for part, model in models.items():
            group = {"params": [p for p in model.parameters() if p.requires_grad]}
            if part in TEXT_ENCODERS:
                group["lr"] = config.text_encoder_lr or config.learning_rate
            groups.append(group)
        return groups

    def after_step(self, loop: Loop, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Nothing by default (SaRA re-selects its entries half-way)."""

    def validation_prompt(self, method_config) -> str | None:
        """What validation images draw when `--validation-prompt` is left out and there is no data to take the first
        caption from (an erasure: its first concept)."""
        concepts = getattr(method_config, "concept", None)
        return concepts[0] if concepts else None

    def validation_inputs(self, loop: Loop) -> dict:
        """Extra arguments of the pipeline call that draws validation samples (IP-Adapter: an image prompt)."""
        return {}

    def artifact(self, loop: Loop) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The file's tensors (each part's under its prefix) and the method's extra header entries."""
        tensors = self.adapter.state_dict(loop.unwrap("unet"))
        text_encoders = tuple(part for part in loop.models if part != "unet")
        for part in text_encoders:
            tensors.update(self.adapter.state_dict(loop.unwrap(part), part))
        if text_encoders:
            return tensors, self.adapter.file_metadata(loop.method_config, text_encoders=text_encoders)
        return tensors, self.adapter.file_metadata(loop.method_config)


def train(config: TrainConfig, method_config=None) -> TrainResult:
    """Train `config.method` on `config.data` and write `<output_dir>/<method>.safetensors`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from diffusers import DDPMScheduler
    method = registry.get(config.method)
    trainer = method.trainer
    check_options(config)  # every option in its declared range (the CLI, TOML and page checked already)
    check_text_encoder_options(config, method.adapter)
    check_prior_data(config, trainer)
    method_config = method_config or method.config(config.method_options)
    check_options(method_config)
    output_dir = Path(config.output_dir)
    if trainer.needs_data and not config.data:
        raise StudioError("no training data: pass --data DIR (images + .txt captions) or --data shapesworld:SPEC")
    if not trainer.needs_data and config.data:
        raise StudioError(f"--data is not used by --method {config.method}: it learns from the model itself; drop --data")
    if trainer.closed_form and config.resume:
        raise StudioError(f"--method {config.method} is computed in one go, with no checkpoints: drop --resume")
    if config.resume and config.resume != "latest":  # a checkpoint named by path is checked before the model loads
        check_checkpoint(Path(config.resume), output_dir)
    # A second run in the same process (tests, the app's worker) may ask for another precision; the
    # process-level state (ranks, devices) is kept, only the per-run settings are dropped.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
            # SDXL's first text encoder is read at its penultimate layer: its last layer's LoRA gets no gradient.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if config.train_text_encoder else None,
        )
    except RuntimeError as err:  # e.g. accelerate's FSDP and DeepSpeed plugins on a machine without GPUs
        raise StudioError(f"accelerate cannot set up this launch: {str(err)[:300].rstrip('.')}; on CPU launch with "
                          "docs/accelerate/ddp.yaml (and ACCELERATE_USE_CPU=true)") from None
    torch.manual_seed(config.seed)

    # 1. The base model, frozen. The method wraps its layers first: options that depend on the model
    # (a block size against a layer's width) fail here, before anything is written. Only the method's
    # parameters train; with train_text_encoder, the text encoders' too, at their own learning rate, in
    # train mode (their gradient checkpointing needs it).
    pipe = load(config.model, device=str(accelerator.device), dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    parts = trainer.attach(pipe, method_config, config.train_text_encoder)
    base_fingerprint = fingerprint(pipe.unet, parts["unet"])
    # The parts that train: a part whose parameters are all frozen (T2I-Adapter's UNet, named only for the
    # fingerprint) is not prepared, optimized or checkpointed.
    models = {part: trainer.model(pipe, part) for part in parts}
    models = {part: model for part, model in models.items() if any(p.requires_grad for p in model.parameters())}
    for part, model in models.items():
        if part != "unet":
            base_fingerprint[part] = fingerprint(model, parts[part])
        model.train()  # LoRA's dropout acts in train mode only; gradient checkpointing needs it
        if config.gradient_checkpointing:
            if part == "unet":
                model.enable_gradient_checkpointing()
            elif part in text_encoder_names(pipe):  # an added network (T2I-Adapter's) is small: none
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.gradient_checkpointing and "unet" not in models:
        # A network trained beside the frozen UNet (T2I-Adapter) still backpropagates through it: its activations
        # are the memory to save.
        pipe.unet.enable_gradient_checkpointing()

    # 2. The data, encoded once (the wrapped layers are the identity until they train). A method that learns from
    # the model itself (an erasure) has none.
    dataset, cached = None, []
    if trainer.needs_data:
        resolution = config.resolution or default_size(pipe)[0]
        dataset = load_dataset(config.data, resolution, config.default_caption, config.trigger, config.repeats,
                               multiple=pipe.vae_scale_factor * 2, keep_sizes=trainer.keeps_image_sizes)
        cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "cache"
        cached = [cache_examples(pipe, dataset, cache_dir, config.model)]
        if config.prior_data:
            prior = load_dataset(config.prior_data, resolution, multiple=pipe.vae_scale_factor * 2)
            cached.append(cache_examples(pipe, prior, cache_dir, config.model))
    config = with_defaults(config, dataset.examples[0].caption if dataset else trainer.validation_prompt(method_config))
    config = replace(config, lr_scheduler=config.lr_scheduler or trainer.lr_scheduler)
    data_summary = dataset.summary() if dataset else {}
    total_steps = 0 if trainer.closed_form else config.max_train_steps
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    te_names = text_encoder_names(pipe)
    groups = trainer.parameter_groups(models, config, method_config)
    trainable = sum(p.numel() for group in groups for p in group["params"])
    optimizer = None  # a closed-form method (RECE) has nothing to step
    if not trainer.closed_form:
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=trainer.weight_decay)
        *prepared, optimizer = accelerator.prepare(*models.values(), optimizer)
        base_rates = [group["lr"] for group in optimizer.param_groups]  # before a resume loads the decayed ones
        models = dict(zip(models, prepared))
    text_encoders = [models[part] for part in models if part in te_names]
    loop = Loop(config, method_config, pipe, models, cached, noise_scheduler,
                LiveText(pipe, text_encoders) if text_encoders else None, accelerator)
    start = time.time()  # a closed-form method (RECE) does all its work in `prepare`
    trainer.prepare(loop)

    start_step = 0
    checkpoint = latest_checkpoint(output_dir) if config.resume == "latest" else config.resume and Path(config.resume)
    if config.resume == "latest" and checkpoint is None:  # killed before its first checkpoint: the run starts over
        print(f"no checkpoint in {output_dir / 'checkpoints'} yet: starting from step 0", file=sys.stderr)
        if accelerator.is_main_process:
            _keep_metrics_until(output_dir / "metrics.jsonl", 0)
    elif config.resume:
        saved_models = len(list(checkpoint.glob("model*.safetensors")) + list(checkpoint.glob("pytorch_model*.bin")))
        if saved_models and saved_models != len(models):  # the UNet, then each trained text encoder
            raise StudioError(f"{checkpoint} was saved {'with' if saved_models > 1 else 'without'} --train-text-encoder; "
                              "resume with the setting it was started with")
        start_step = int(CHECKPOINT_PATTERN.fullmatch(checkpoint.name).group(1))
        # A run that trains nothing never ends "done" — unless it was killed while writing its artifact after the last
        # step: then the resume writes it.
        written = trainer.artifact_path(output_dir).is_file()
        if start_step > config.max_train_steps or (start_step == config.max_train_steps and written):
            raise StudioError(f"{checkpoint} is at step {start_step}, and --max-train-steps is {config.max_train_steps}: "
                              "nothing left to train; raise --max-train-steps to train further")
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:  # the loss lines of steps after the checkpoint are written again
            _keep_metrics_until(output_dir / "metrics.jsonl", start_step)
    accelerator.init_trackers("studio", config={k: str(v) for k, v in asdict(config).items()})

    # 3. The loop. SIGTERM/SIGINT ask it to stop after the current step: it saves a checkpoint
    # there, so `--resume latest` continues exactly (the app's Stop button sends SIGTERM).
    loss_value = math.nan
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = (output_dir / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    stop = _StopRequest()
    try:
        bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                   desc=f"train {config.method}", disable=not accelerator.is_local_main_process or not total_steps)
        for step in bar:
            rng, generator = _step_generators(config.seed, step)
            torch.manual_seed(int(rng.integers(2**31)))  # adapter dropout and the like
            with accelerator.accumulate(*models.values()):
                loss = trainer.loss(loop, rng, generator)
                accelerator.backward(loss)
                factor = lr_factor(config.lr_scheduler, step, config.max_train_steps)
                for group, rate in zip(optimizer.param_groups, base_rates):
                    group["lr"] = rate * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            trainer.after_step(loop, step + 1, optimizer)
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log({"loss": loss_value}, step=step + 1)
            if metrics:  # one line per step, flushed, for live plots (the app's loss plot reads it)
                metrics.write(json.dumps({"step": step + 1, "total": config.max_train_steps, "loss": loss_value,
                                          "seconds": round(time.time() - start, 3)}) + "\n")
                metrics.flush()

            checkpoint = output_dir / "checkpoints" / f"step-{step + 1}"
            saved = bool(config.checkpointing_steps) and (step + 1) % config.checkpointing_steps == 0
            if saved:
                save_checkpoint(accelerator, checkpoint, step + 1)
            if config.validation_prompt and config.validation_steps and (step + 1) % config.validation_steps == 0:
                _validate(pipe, config, step + 1, output_dir, accelerator, trainer.validation_inputs(loop))
            if stop.requested and step + 1 < config.max_train_steps:
                if not saved:  # a periodic checkpoint of this very step is already on disk
                    save_checkpoint(accelerator, checkpoint, step + 1)
                bar.close()
                accelerator.end_training()
                raise TrainingStopped(f"stopped at step {step + 1} of {config.max_train_steps}; checkpoint in {checkpoint}; "
                                      "continue with --resume latest")
    finally:
        stop.restore()
        if metrics:
            metrics.close()

    # 4. The artifact.
    accelerator.wait_for_everyone()
    artifact = trainer.artifact_path(output_dir)
    if accelerator.is_main_process:
        tensors, metadata = trainer.artifact(loop)
        if config.model == TOY_MODEL and dataset:  # caption words the toy vocabulary lacks ("sks"): its prompt warning spares them
            from studio.toy.vocabulary import unknown_words

            captions = " ".join(sorted({example.caption for example in dataset.examples}))
            metadata = {**metadata, TRIGGER_WORDS_KEY: json.dumps(unknown_words(captions))}
        save_artifact(artifact, tensors, config.method, asdict(method_config), base_fingerprint, extra_metadata=metadata)
        write_atomically(output_dir / "summary.json", json.dumps(
            {"steps": total_steps, "processes": accelerator.num_processes, "trainable_params": trainable,
             "final_loss": loss_value, "seconds": round(time.time() - start, 2), "data": data_summary,
             "config": asdict(config)}, indent=2).encode())
    accelerator.end_training()
    return TrainResult(artifact, total_steps, time.time() - start, trainable, loss_value, data_summary)


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` from a run's metrics.jsonl (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a kill
            continue
    write_atomically(path, "".join(line + "\n" for line in kept).encode())


class _StopRequest:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step (main thread only:
    Python delivers signals there; elsewhere the previous behaviour is kept)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


@torch.no_grad()
def _validate(pipe, config: TrainConfig, step: int, output_dir: Path, accelerator, inputs: dict) -> None:
    if not accelerator.is_main_process:
        return
    models = [pipe.unet] + [getattr(pipe, name) for name in text_encoder_names(pipe)]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    images = pipe(config.validation_prompt, num_inference_steps=20, num_images_per_prompt=4,
                  generator=torch.Generator().manual_seed(config.seed), **inputs).images
    folder = output_dir / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    for model, mode in zip(models, was_training):
        model.train(mode)
