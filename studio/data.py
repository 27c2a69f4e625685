"""Training data: a folder of images with captions (kohya's convention) or a ShapesWorld spec.

Folder convention (kohya sd-scripts): `img.png` + `img.txt` (or `.caption`)
holding its caption. A sub-folder named `<N>_<text>` repeats its images N
times and uses `<text>` as the caption of images without one; otherwise the
`default_caption` (or the trigger word) is used. A trigger word is put in
front of every caption that lacks it. Unreadable images are skipped with a
warning naming each; a folder with none usable is an error.

ShapesWorld spec: `shapesworld:shape=star,count=8,colors=red|green|blue,caption=a {color} sks,seed=0`
renders `count` images of the listed shapes and colours (each cycled; `shape=seen`
means the five shapes the toy model was trained on), other attributes random,
captioned from the template ({color}, {shape}, {texture}, {position},
{background} are filled in; {caption} is the full canonical caption, e.g.
"a red striped circle in the top left on a white background").

A control image (T2I-Adapter's condition: a mask, an edge map) of `X/img.jpg` is
`X/conditions/img.png` (any image suffix), the same size as its image; images in
a folder named `conditions` are never training images. A ShapesWorld spec with
`condition=mask` or `condition=edge` derives it from each render (the object's
mask, or its 1-pixel outline), and `place=random` puts each object anywhere on
the canvas instead of at one of the five named positions. `sizes=24|48|64x32`
renders the examples at these sizes in turn, each size with every shape and
colour (N or WxH pixels; the object scales with the canvas), instead of at the
training resolution.

Images are sorted into aspect-ratio buckets of about `resolution`^2 pixels
(sides multiples of `multiple`); each image is resized and centre-cropped to
its bucket, and a batch never mixes buckets.

Example:
    >>> data = load_dataset("shapesworld:shape=star,count=4,caption=a {color} sks", resolution=32)
    >>> len(data.examples), data.examples[0].caption
    (4, 'a red sks')
"""

from __future__ import annotations

import math
import re
import warnings
from glob import escape as glob_escape
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from studio.errors import StudioError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MAX_IMAGE_BYTES = 20 * 2**20  # per image a user hands us (an upload, an image prompt)
MAX_IMAGE_PIXELS = 4096 * 4096  # larger than any SD training size; beyond it PIL may be fed a decompression bomb
SHAPESWORLD_PREFIX = "shapesworld:"
CONDITIONS_FOLDER = "conditions"  # control images beside the training images: conditions/<image stem>.png
SHAPESWORLD_CONDITIONS = ("mask", "edge")
RANDOM_PLACE_RANGE = 0.25  # place=random: the object's centre anywhere within +-25% of the canvas around its middle


@dataclass
class Example:
    image: Image.Image
    caption: str
    source: str
    condition: Image.Image | None = None  # a control image (mask, edges) aligned with `image`, for T2I-Adapter


@dataclass
class Dataset:
    """Examples (repeats already expanded), their buckets, and what was skipped."""

    examples: list[Example]
    buckets: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per example
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "images": len(self.examples),
            "buckets": sorted({f"{w}x{h}" for w, h in self.buckets}),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped,
        }


def load_dataset(
    spec: str,
    resolution: int = 512,
    default_caption: str | None = None,
    trigger: str | None = None,
    repeats: int = 1,
    multiple: int = 8,
    keep_sizes: bool = False,
) -> Dataset:
    """A folder path or a `shapesworld:` spec -> a bucketed `Dataset`. With `keep_sizes` (a method that learns
    resolutions: ResAdapter) each image keeps its own size, centre-cropped to sides that are multiples of
    `multiple`, instead of being fitted to about `resolution`^2 pixels."""
    if spec.startswith(SHAPESWORLD_PREFIX):
        examples, skipped = shapesworld_examples(spec[len(SHAPESWORLD_PREFIX):], resolution), []
    else:
        examples, skipped = folder_examples(Path(spec), default_caption, trigger, repeats)
    if keep_sizes:
        buckets = [(max(multiple, ex.image.width // multiple * multiple), max(multiple, ex.image.height // multiple * multiple))
                   for ex in examples]
    else:
        buckets = [bucket_for(ex.image.size, resolution, multiple) for ex in examples]
    examples = [Example(fit_to_bucket(ex.image, b), ex.caption, ex.source,
                        fit_to_bucket(ex.condition, b) if ex.condition is not None else None)
                for ex, b in zip(examples, buckets)]
    return Dataset(examples, buckets, skipped)


def folder_examples(folder: Path, default_caption: str | None, trigger: str | None, repeats: int):
    if not folder.is_dir():
        raise StudioError(f"dataset folder {folder} not found; pass a folder of images with .txt captions, or shapesworld:SPEC")
    examples: list[Example] = []
    skipped: list[str] = []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and CONDITIONS_FOLDER not in p.relative_to(folder).parts[:-1])
    for path in files:
        folder_repeats, folder_caption = _folder_convention(path.parent, folder)
        try:
            with Image.open(path) as img:
                img.load()
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            skipped.append(str(path))
            continue
        caption = _read_caption(path) or folder_caption or default_caption or trigger or ""
        if trigger and trigger not in caption.split():
            caption = f"{trigger} {caption}".strip()
        condition = _read_condition(path, image.size)
        examples.extend(Example(image, caption, str(path), condition) for _ in range(repeats * folder_repeats))
    if not examples:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise StudioError(f"no usable images in {folder}{detail}; supported: {', '.join(sorted(IMAGE_SUFFIXES))}")
    return examples, skipped


def _read_caption(image_path: Path) -> str | None:
    for suffix in (".txt", ".caption"):
        caption_path = image_path.with_suffix(suffix)
        if caption_path.is_file():
            return caption_path.read_text(encoding="utf-8", errors="replace").strip()
    return None


def _read_condition(image_path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The control image of `image_path` (`conditions/<stem>.<suffix>` beside it), as it is stored: a mask or
    edge map is one channel ("L"); None when there is none."""
    for candidate in sorted((image_path.parent / CONDITIONS_FOLDER).glob(f"{glob_escape(image_path.stem)}.*")):
        if candidate.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        check_image(candidate, str(candidate))
        with Image.open(candidate) as img:
            img.load()
            condition = img if img.mode in ("L", "RGB") else img.convert("RGB" if len(img.getbands()) >= 3 else "L")
        if condition.size != size:
            raise StudioError(f"condition {candidate} is {condition.width}x{condition.height} but its image "
                              f"{image_path} is {size[0]}x{size[1]}; a condition must be aligned with its image, pixel for pixel")
        return condition
    return None


def _folder_convention(parent: Path, root: Path) -> tuple[int, str | None]:
    """kohya's `<N>_<text>` sub-folders: N repeats, <text> as the fallback caption."""
    if parent == root:
        return 1, None
    match = re.fullmatch(r"(\d+)_(.+)", parent.name)
    return (int(match.group(1)), match.group(2)) if match else (1, None)


def check_image(path: Path, shown_name: str) -> None:
    """Refuse a file that is not a readable image, or one too large to use, naming it as `shown_name`.

    Example:
        >>> check_image(Path("notes.txt"), "notes.txt")
        Traceback (most recent call last):
        studio.errors.StudioError: notes.txt is not an image (expected .bmp, .jpeg, .jpg, .png, .webp)
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise StudioError(f"{shown_name} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise StudioError(f"{shown_name} is {size / 2**20:.1f} MB; images up to {MAX_IMAGE_BYTES // 2**20} MB are accepted")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise StudioError(f"{shown_name} is {width}x{height} pixels; images up to {MAX_IMAGE_PIXELS:,} pixels "
                                  "(4096x4096) are accepted — downscale it first")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise StudioError(f"{shown_name} is not a readable image ({type(err).__name__})") from None


def open_image(path: str | Path, what: str, mode: str | None = "RGB") -> Image.Image:
    """The image at `path` in `mode` (None: as stored), checked first (`check_image`); `what` names it in errors
    ("--image-prompt").

    Example:
        >>> open_image("missing.png", "--image-prompt")
        Traceback (most recent call last):
        studio.errors.StudioError: --image-prompt 'missing.png': no such file
    """
    path = Path(path)
    shown = f"{what} {str(path)!r}"  # quoted: a name with a newline still makes one line
    if not path.is_file():
        raise StudioError(f"{shown}: no such file")
    check_image(path, shown)
    with Image.open(path) as image:
        image.load()
        return image.convert(mode) if mode else image


def parse_shapesworld_spec(spec: str) -> dict:
    """`shape=star,count=8,...` -> a dict, with defaults and checks.

    Example:
        >>> parse_shapesworld_spec("shape=star,count=2")["colors"][:2]
        ['red', 'orange']
    """
    from studio.toy.render import COLORS, SEEN_SHAPES, SHAPES

    options = {"shape": "star", "count": "8", "colors": "|".join(COLORS), "caption": "a {color} {shape}", "seed": "0",
               "condition": "", "place": "named", "sizes": ""}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in options:
            raise StudioError(f"bad ShapesWorld spec part {part!r}; use key=value with keys {', '.join(options)}")
        options[key.strip()] = value.strip()
    shapes = list(SEEN_SHAPES) if options["shape"] == "seen" else options["shape"].split("|")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise StudioError(f"unknown shapes {unknown} in ShapesWorld spec; choose from {', '.join(SHAPES)} (or 'seen')")
    colors = options["colors"].split("|")
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise StudioError(f"unknown colours {unknown} in ShapesWorld spec; choose from {', '.join(COLORS)}")
    if not options["count"].isdigit() or int(options["count"]) < 1:
        raise StudioError(f"ShapesWorld count must be a positive integer (got {options['count']!r})")
    if options["condition"] not in ("", *SHAPESWORLD_CONDITIONS):
        raise StudioError(f"ShapesWorld condition {options['condition']!r}: choose {' or '.join(SHAPESWORLD_CONDITIONS)} "
                          "(or leave it out)")
    if options["place"] not in ("named", "random"):
        raise StudioError(f"ShapesWorld place {options['place']!r}: choose named (the five positions) or random")
    if options["place"] == "random" and re.search(r"\{(position|caption)\}", options["caption"]):
        raise StudioError("a ShapesWorld caption with {position} or {caption} names the object's position, which "
                          "place=random does not have; write the caption without it (e.g. 'a {color} {shape}')")
    sizes = [parse_size(size) for size in options["sizes"].split("|")] if options["sizes"] else []
    if not options["seed"].isdigit():
        raise StudioError(f"ShapesWorld seed must be a whole number (got {options['seed']!r})")
    return {**options, "count": int(options["count"]), "shapes": shapes, "colors": colors, "seed": int(options["seed"]),
            "sizes": sizes}


def parse_size(text: str) -> tuple[int, int]:
    """`48` or `64x32` (width x height) -> (width, height), each from 8 to 1024 pixels.

    Example:
        >>> parse_size("64x32"), parse_size("48")
        ((64, 32), (48, 48))
    """
    width, _, height = text.strip().partition("x")
    if not width.isdigit() or not (height or width).isdigit():
        raise StudioError(f"ShapesWorld size {text!r}: write N or WxH in pixels (e.g. 48 or 64x32)")
    size = (int(width), int(height or width))
    if not all(8 <= side <= 1024 for side in size):
        raise StudioError(f"ShapesWorld size {text!r}: each side must be 8 to 1024 pixels")
    return size


def shapesworld_examples(spec: str, resolution: int) -> list[Example]:
    from studio.toy.captions import canonical_caption
    from studio.toy.render import ShapeSpec, random_jitter, random_spec, render

    options = parse_shapesworld_spec(spec)
    rng = np.random.default_rng(options["seed"])
    examples = []
    # Shapes and colours cycle together, every pair once per `period` examples. Sizes cycle too, shifted by one at
    # each period: cycling them with the same index would tie each size to some colours (with 14 sizes and 6
    # colours, every size would only ever show 3 of them).
    period = math.lcm(len(options["shapes"]), len(options["colors"]))
    for i in range(options["count"]):
        shape = options["shapes"][i % len(options["shapes"])]
        color = options["colors"][i % len(options["colors"])]
        base = random_spec(rng)
        jitter = random_jitter(rng)
        if options["place"] == "random":
            base = ShapeSpec(base.shape, base.color, base.texture, base.background, base.size, "center")
            dx, dy = rng.uniform(-RANDOM_PLACE_RANGE, RANDOM_PLACE_RANGE, size=2)
            jitter = (float(dx), float(dy), jitter[2])
        spec_i = ShapeSpec(shape, color, base.texture, base.background, base.size, base.position)
        width, height = options["sizes"][(i + i // period) % len(options["sizes"])] if options["sizes"] else (resolution, resolution)
        drawn = render(spec_i, width, height, jitter)
        caption = options["caption"].format(
            color=color, shape=shape, texture=spec_i.texture, position=spec_i.position,
            background=spec_i.background, caption=canonical_caption(spec_i),
        )
        condition = condition_image(drawn.mask, options["condition"]) if options["condition"] else None
        examples.append(Example(Image.fromarray(drawn.image), caption, f"shapesworld:{i}", condition))
    return examples


def condition_image(mask: np.ndarray, kind: str) -> Image.Image:
    """A ShapesWorld control image from an object mask (H x W bool): the mask itself, or its edge (the mask's
    pixels with a 4-neighbour outside it, a 1-pixel outline); white on black, one channel.

    Example:
        >>> mask = np.zeros((8, 8), bool); mask[2:6, 2:6] = True
        >>> int((np.array(condition_image(mask, "edge")) > 0).sum()), int((np.array(condition_image(mask, "mask")) > 0).sum())
        (12, 16)
    """
    if kind == "edge":
        padded = np.pad(mask, 1, constant_values=False)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        mask = mask & ~inner
    elif kind != "mask":
        raise StudioError(f"unknown condition kind {kind!r}; ShapesWorld draws {' or '.join(SHAPESWORLD_CONDITIONS)}")
    return Image.fromarray(mask.astype(np.uint8) * 255)


def bucket_for(size: tuple[int, int], resolution: int, multiple: int = 8) -> tuple[int, int]:
    """The (width, height) of about resolution^2 pixels, sides multiples of `multiple`, closest to the image's aspect.

    Example:
        >>> bucket_for((1024, 512), 512, 64)
        (704, 384)
    """
    width, height = size
    aspect = width / height
    area = resolution * resolution
    bucket_w = max(multiple, int(round((area * aspect) ** 0.5 / multiple)) * multiple)
    bucket_h = max(multiple, int(round((area / aspect) ** 0.5 / multiple)) * multiple)
    return bucket_w, bucket_h


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then centre-crop to it."""
    if image.size == bucket:
        return image
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def bucket_batches(buckets: list[tuple[int, int]], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of example indices, each from one bucket (the last of a bucket may be short)."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(i)
    batches = []
    for indices in by_bucket.values():
        order = rng.permutation(indices).tolist()
        batches.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
