"""Hostile uploads to the web app: mutated and truncated images, wrong extensions, a decompression bomb's header, a
link out of the upload folder. What the page's dataset upload does with them (`ui/uploads.py`: check, copy; then
the job's `load_dataset`) ends in a one-line `StudioError` or a dataset of readable images, never another
exception. (Archives are not accepted, so there are no links inside archives to follow.)"""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from studio.data import load_dataset
from studio.errors import StudioError
from studio.ui.uploads import check_dataset, copy_dataset

FAST_EXAMPLES = 1000  # the slow test: 10,000


def _image_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid checksum) claims `width` x `height` pixels over a few bytes of data: the
    shape of a decompression bomb, at no cost to make."""
    png = bytearray(_image_bytes("PNG"))
    ihdr = bytearray(png[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def _upload(folder, files: dict[str, bytes]) -> dict:
    """Put `files` where the web server puts uploads, then do what the page and the job do with them."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    try:
        checked = check_dataset([folder / name for name in files], folder)
        copy_dataset(checked, folder.parent / (folder.name + "-data"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = load_dataset(str(folder.parent / (folder.name + "-data")), resolution=32)
    except StudioError as error:
        assert str(error) and "\n" not in str(error)
        return {"refused": 1}
    assert dataset.examples and all(e.image.size[0] > 0 for e in dataset.examples)
    return {"accepted": 1}


def _throw(folder, examples: int) -> dict[str, int]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    originals = {"png": _image_bytes("PNG"), "jpeg": _image_bytes("JPEG"), "webp": _image_bytes("WEBP")}
    counter = iter(range(10**9))
    outcomes = {"refused": 0, "accepted": 0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fmt=st.sampled_from(sorted(originals)), kind=st.sampled_from(["truncate", "flip", "overwrite", "none"]),
           at=st.floats(0, 1), piece=st.binary(min_size=1, max_size=32),
           name=st.sampled_from(["a.png", "a.jpg", "a.webp", "a.bmp", "a.txt", "a.PNG", "a.gif"]))
    def check(fmt, kind, at, piece, name):
        data = originals[fmt]
        cut = int(at * (len(data) - 1))
        data = {"truncate": data[:cut], "flip": data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:],
                "overwrite": data[:cut] + piece + data[cut + len(piece):], "none": data}[kind]
        files = {name: data}
        if not name.lower().endswith(".txt"):
            files["a.txt"] = b"a red circle"
        for outcome, n in _upload(folder / f"case-{next(counter)}", files).items():
            outcomes[outcome] += n

    check()
    return outcomes


def test_fuzzed_image_uploads_are_refused_or_read(tmp_path):
    outcomes = _throw(tmp_path, FAST_EXAMPLES)
    assert outcomes["refused"] and outcomes["accepted"] and sum(outcomes.values()) == FAST_EXAMPLES


@pytest.mark.slow
def test_ten_thousand_fuzzed_image_uploads(tmp_path):
    """With STUDIO_FUZZ_RESULTS=FOLDER, the outcomes are written to FOLDER/fuzz-uploads.json."""
    from test_hostile_files import write_fuzz_results

    outcomes = _throw(tmp_path, 10_000)
    assert sum(outcomes.values()) == 10_000
    write_fuzz_results("fuzz-uploads.json", {"originals": ["png", "jpeg", "webp"], "files": 10_000,
                                             "outcomes": outcomes})


@pytest.mark.parametrize("width, height", [(5000, 5000), (65535, 65535), (1, 2**31 - 1)])
def test_a_decompression_bomb_header_is_refused_before_decoding(tmp_path, width, height):
    with pytest.raises(StudioError, match=f"is {width}x{height} pixels|not a readable image"):
        check_dataset([_write(tmp_path / "bomb.png", _png_claiming(width, height))], tmp_path)


def test_a_wrong_extension_is_refused(tmp_path):
    with pytest.raises(StudioError, match="not an image"):
        check_dataset([_write(tmp_path / "a.gif", _image_bytes("PNG"))], tmp_path)
    with pytest.raises(StudioError, match="not a readable image"):
        check_dataset([_write(tmp_path / "a.png", b"a red circle")], tmp_path)


def test_a_link_out_of_the_upload_folder_is_refused(tmp_path):
    outside = _write(tmp_path / "secret.png", _image_bytes("PNG"))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "a.png").symlink_to(outside)
    with pytest.raises(StudioError, match="outside the app's data folder"):
        check_dataset([uploads / "a.png"], uploads)


def test_a_decompression_bomb_in_a_training_folder_is_skipped(tmp_path):
    _write(tmp_path / "bomb.png", _png_claiming(20000, 20000))  # 400 MP: beyond PIL's own limit
    _write(tmp_path / "good.png", _image_bytes("PNG"))
    with pytest.warns(UserWarning, match="skipping unreadable image .*bomb.png"):
        dataset = load_dataset(str(tmp_path), resolution=32)
    assert [e.source for e in dataset.examples] == [str(tmp_path / "good.png")] and len(dataset.skipped) == 1


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
