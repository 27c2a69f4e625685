"""Sampling: prompts x seeds through a pipeline, written as PNGs, a grid and the settings.

Example:
    >>> from studio.pipeline import load
    >>> result = sample(load("toy"), ["a red circle"], seeds=[0], output_dir="/tmp/samples")
    >>> sorted(p.name for p in result.output_dir.iterdir())
    ['0000-seed0.png', 'grid.png', 'settings.json']
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from studio.data import open_image
from studio.errors import StudioError
from studio.options import FLAG_KEY, RANGE_KEY, Range, check_options, ranged
from studio.pipeline import SCHEDULERS, default_size, set_scheduler


@dataclass
class SampleSettings:
    """Everything that decides the pixels; written next to them as settings.json."""

    prompts: list  # of str, checked in `validate` (an empty text prompt is fine beside an image prompt)
    seeds: list[int] = field(default_factory=lambda: [0], metadata={RANGE_KEY: Range(0, 2**32 - 1), FLAG_KEY: "--seed"})
    negative_prompt: str = ""
    steps: int = ranged(20, 1, 1000)
    guidance_scale: float = ranged(5.0, 0, 100)
    scheduler: str | None = None
    width: int | None = ranged(None, 8, 4096, multiple_of=8)  # default: the model's training size
    height: int | None = ranged(None, 8, 4096, multiple_of=8)
    batch_size: int = ranged(8, 1, 1024)
    image_prompt: str | None = None  # an image file, for an applied IP-Adapter
    control: list[str] | None = None  # control images "IMG[:KIND]", for applied T2I-Adapters

    def validate(self) -> None:
        """Refuse, in one line naming the option, any setting out of its range; nothing is loaded or written.

        Example:
            >>> SampleSettings(prompts=["a red circle"], steps=-5).validate()
            Traceback (most recent call last):
            studio.errors.StudioError: --steps -5: must be a whole number from 1 to 1000
        """
        if not isinstance(self.prompts, list) or not self.prompts or any(not isinstance(p, str) for p in self.prompts):
            raise StudioError("no prompt given: pass at least one prompt, or --prompts-file with one prompt per line")
        if self.image_prompt is None and any(not p.strip() for p in self.prompts):
            raise StudioError("an empty prompt draws nothing in particular: write one, or give --image-prompt IMG "
                              "(with an IP-Adapter applied) to prompt with an image alone")
        check_options(self)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise StudioError(f"--scheduler {self.scheduler!r}: must be one of {', '.join(SCHEDULERS)}")
        if self.image_prompt is not None:
            open_image(self.image_prompt, "--image-prompt")
        self.control_images()

    def control_images(self) -> list:
        """The control images as (image, kind or None), each checked: a readable image with a usable channel count
        (whether it fits an adapter's one or three channels is checked when it is applied)."""
        from studio.adapters.t2i_adapter import control_pixels, parse_control

        controls = []
        for spec in self.control or []:
            path, kind = parse_control(spec)
            image = open_image(path, "--control", mode=None)
            control_pixels(image, True, f"--control {path!r}")
            controls.append((image, kind))
        return controls


@dataclass
class SampleResult:
    images: list[Image.Image]
    files: list[Path]
    output_dir: Path | None
    seconds: float


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments.

    Example:
        >>> read_prompts_file("prompts.txt")  # doctest: +SKIP
        ['a red circle', 'a blue square']
    """
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"prompts file {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise StudioError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images (all the same size) into one image, row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def generate(pipe, settings: SampleSettings, progress: bool = True) -> list[Image.Image]:
    """Run the pipeline for every (prompt, seed) pair, prompt-major, in batches.

    Each image has its own generator seeded with its seed, so an image does not
    depend on the batch it was drawn in.
    """
    from studio import plugin

    settings.validate()
    image_prompt = open_image(settings.image_prompt, "--image-prompt") if settings.image_prompt else None
    # What the applied artifacts take per call.
    inputs = plugin.call_inputs(pipe, image_prompt=image_prompt, control=settings.control_images() or None)
    if settings.scheduler:
        set_scheduler(pipe, settings.scheduler)
    width, height = default_size(pipe)
    width, height = settings.width or width, settings.height or height
    jobs = [(prompt, seed) for prompt in settings.prompts for seed in settings.seeds]
    device = pipe.device if pipe.device.type != "mps" else torch.device("cpu")
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    bar = tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start : start + settings.batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed) for _, seed in batch]
        plugin.set_prompts(pipe, [p for p, _ in batch])  # an SPM's strength follows each prompt
        out = pipe(
            prompt=[p for p, _ in batch],
            negative_prompt=[settings.negative_prompt] * len(batch),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            width=width,
            height=height,
            generator=generators,
            **inputs,
        )
        images.extend(out.images)
        bar.update(len(batch))
    bar.close()
    return images


def sample(
    pipe,
    prompts: list[str],
    seeds: list[int] | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    record: dict | None = None,
    **settings,
) -> SampleResult:
    """Generate images and, if `output_dir` is given, write `NNNN-seedS.png`, `grid.png` and `settings.json`.

    Extra keyword arguments are `SampleSettings` fields (steps, guidance_scale, ...); `record` adds
    entries to settings.json (e.g. the adapters that were applied).

    Example:
        >>> from studio.pipeline import load
        >>> len(sample(load("toy"), ["a blue square"], seeds=[1, 2]).images)
        2
    """
    config = SampleSettings(prompts=list(prompts), seeds=list(seeds or [0]), **settings)
    start = time.time()
    images = generate(pipe, config, progress=progress)
    seconds = time.time() - start
    files: list[Path] = []
    folder = None
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(p, s) for p in config.prompts for s in config.seeds]
        records = []
        for i, (image, (prompt, seed)) in enumerate(zip(images, jobs)):
            path = folder / f"{i:04d}-seed{seed}.png"
            image.save(path)
            files.append(path)
            records.append({"file": path.name, "prompt": prompt, "seed": seed})
        make_grid(images, columns=len(config.seeds) if len(config.prompts) > 1 else None).save(folder / "grid.png")
        width, height = images[0].size
        meta = {
            **asdict(config),
            "width": width,
            "height": height,
            "scheduler": config.scheduler or type(pipe.scheduler).__name__,
            "model": str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")),
            "images": records,
            "seconds": round(seconds, 2),
            **(record or {}),
        }
        (folder / "settings.json").write_text(json.dumps(meta, indent=2))
    return SampleResult(images=images, files=files, output_dir=folder, seconds=seconds)


def side_by_side(model: str, artifact: str | Path, prompts: list[str], seeds: tuple[int, ...], path: str | Path) -> Path:
    """Draw `prompts` x `seeds` with `model` as it is and with the artifact at `artifact` applied, and write one
    image to `path`: a row per prompt, the seeds without the artifact on the left, with it on the right (an
    erasure's before/after, a quantization's full precision vs quantized).

    Example:
        >>> side_by_side("toy", "outputs/erase/rece.safetensors", ["circle"], (0, 1), "before-after.png")  # doctest: +SKIP
        PosixPath('before-after.png')
    """
    from studio import plugin
    from studio.pipeline import load

    pipe = load(model)
    settings = SampleSettings(prompts=prompts, seeds=list(seeds), batch_size=len(prompts) * len(seeds))
    before = generate(pipe, settings, progress=False)
    plugin.apply(pipe, artifact)
    after = generate(pipe, settings, progress=False)
    rows = []
    for i in range(len(prompts)):
        row = slice(i * len(seeds), (i + 1) * len(seeds))
        rows.append(make_grid(before[row] + after[row], columns=2 * len(seeds)))
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * rows[0].height))
    path = Path(path)
    sheet.save(path)
    return path
