"""Checks on everything a browser hands the app: files it uploads and paths it names.

Every check raises a `StudioError` with one line that says what is wrong; the app shows it in
the page. Files are copied only into folders under the app's data folder, under names made
safe here, so no upload can write anywhere else.

Example:
    >>> inside("/data", "/data/jobs/1/out/lora.safetensors")
    PosixPath('/data/jobs/1/out/lora.safetensors')
    >>> inside("/data", "/etc/passwd")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    StudioError: /etc/passwd is outside the app's data folder /data
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from studio.data import CONDITIONS_FOLDER, IMAGE_SUFFIXES, check_image
from studio.errors import StudioError

MAX_CAPTION_BYTES = 64 * 2**10


def inside(root: str | Path, path: str | Path) -> Path:
    """`path` resolved (links and `..` followed), or a `StudioError` if that leaves `root`."""
    root, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise StudioError(f"{Path(path).name} is outside the app's data folder; pick a file the page offers")
    return resolved


def safe_name(name: str) -> str:
    """A file name with no folder part and only ordinary characters: `../../x y.png` -> `x_y.png`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".")
    if not stem:
        raise StudioError(f"{name!r} is not a usable file name")
    return stem


def check_dataset(files: list[str | Path], upload_root: str | Path) -> list[tuple[Path, str]]:
    """Check uploaded images and `.txt` captions; every file must come from `upload_root` (where the
    web server put it). Returns each file with the safe name it will be copied under.

    Example:
        >>> check_dataset(["/data/tmp/a.png", "/data/tmp/a.txt"], "/data/tmp")  # doctest: +SKIP
        [(PosixPath('/data/tmp/a.png'), 'a.png'), (PosixPath('/data/tmp/a.txt'), 'a.txt')]
    """
    if not files:
        raise StudioError("no files uploaded: add images (and optional .txt captions with the same names)")
    checked = []
    for file in files:
        path = inside(upload_root, file)
        name = safe_name(path.name)
        if path.suffix.lower() == ".txt":
            if path.stat().st_size > MAX_CAPTION_BYTES:
                raise StudioError(f"caption {name} is larger than {MAX_CAPTION_BYTES // 1024} KB")
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise StudioError(f"caption {name} is not UTF-8 text") from None
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise StudioError(f"{name} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))}) or a .txt caption")
        else:
            check_image(path, name)
        checked.append((path, name))
    names = [name for _, name in checked]
    if len(set(names)) != len(names):
        raise StudioError("two uploaded files have the same name; rename one")
    if not any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names):
        raise StudioError("the upload has captions but no images")
    return checked


CONDITION_MARK = "-condition"  # an uploaded `x-condition.png` is the control image of `x.png` (T2I-Adapter)


def copy_dataset(checked: list[tuple[Path, str]], dest: str | Path) -> dict:
    """Copy a checked upload (what `check_dataset` returned) into `dest` as a kohya-style folder
    (`x.png` + `x.txt`; a control image `x-condition.png` goes to `conditions/x.png`). Returns counts.

    Example:
        >>> copy_dataset(check_dataset(files, "/data/tmp"), "/data/jobs/1/data")  # doctest: +SKIP
        {'images': 1, 'captions': 1}
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    conditions = 0
    for path, name in checked:
        stem, suffix = Path(name).stem, Path(name).suffix
        if stem.endswith(CONDITION_MARK) and suffix.lower() in IMAGE_SUFFIXES:
            (dest / CONDITIONS_FOLDER).mkdir(exist_ok=True)
            shutil.copyfile(path, dest / CONDITIONS_FOLDER / f"{stem[:-len(CONDITION_MARK)]}{suffix}")
            conditions += 1
        else:
            shutil.copyfile(path, dest / name)
    captions = sum(1 for _, name in checked if name.lower().endswith(".txt"))
    return {"images": len(checked) - captions - conditions, "captions": captions, "conditions": conditions}


def check_artifact(path: str | Path, model: str, model_config: str | None = None):
    """Refuse a file that is not a studio artifact or was made on another base model than `model`
    (layer shapes compared on a weightless UNet, as `studio inspect FILE --model M` does).
    Returns its header.

    Example:
        >>> check_artifact("outputs/train/lora.safetensors", "toy").method  # doctest: +SKIP
        'lora'
    """
    from studio.artifact import check_fingerprint, read_header, verify_content
    from studio.pipeline import unet_skeleton

    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"{path.name} is not a .safetensors artifact")
    try:  # the messages name the file as the user knows it, never the server's (temporary upload) path
        header = read_header(path)
        verify_content(path)
    except StudioError as err:
        raise StudioError(str(err).replace(str(path), path.name)) from None
    if model_config or not Path(model).is_file():  # a single file without its config can't be checked here
        check_fingerprint(header.fingerprint, unet_skeleton(model, model_config), path.name)
    return header


def import_artifact(file: str | Path, upload_root: str | Path, dest: str | Path, model: str,
                    model_config: str | None = None):
    """Check an uploaded artifact against `model`, then copy it into the folder `dest`.
    Returns the copy's path and the file's header."""
    from studio.artifact import FOLDER_WEIGHTS_NAME

    path = inside(upload_root, file)
    header = check_artifact(path, model, model_config)
    if path.name == FOLDER_WEIGHTS_NAME or header.method in ("t2i-adapter", "res-adapter"):
        raise StudioError(f"a {header.method} artifact is a folder (its weights and the files beside them), not one "
                          "file; apply the folder from the command line (studio sample --adapter FOLDER), or train it "
                          "here in the Train tab")
    target = Path(dest) / safe_name(path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target, header
