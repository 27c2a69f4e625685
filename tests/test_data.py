import numpy as np
import pytest
from PIL import Image

from studio.data import bucket_batches, bucket_for, load_dataset, parse_shapesworld_spec
from studio.errors import StudioError


def _image(path, size=(40, 24), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_folder_captions_repeats_trigger_and_corrupt_files(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red box\n")
    _image(tmp_path / "b.jpg", (24, 40))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])
    sub = tmp_path / "3_toy block"
    sub.mkdir()
    _image(sub / "c.png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        data = load_dataset(str(tmp_path), resolution=32, default_caption="a photo", trigger="sks")
    captions = sorted(e.caption for e in data.examples)
    assert captions == ["sks a photo", "sks a red box"] + ["sks toy block"] * 3
    assert data.summary()["skipped"] == 2 and any("truncated.png" in s for s in data.skipped)
    assert {e.image.size for e in data.examples} == set(data.buckets)
    width, height = bucket_for((40, 24), 32)
    assert width > height and abs(width * height - 32 * 32) < 0.1 * 32 * 32 and width % 8 == height % 8 == 0
    assert bucket_for((24, 40), 32) == (height, width)


def test_folder_without_usable_images_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(StudioError, match=r"no usable images in .* \(1 unreadable\)"), pytest.warns(UserWarning):
        load_dataset(str(tmp_path))
    with pytest.raises(StudioError, match="not found"):
        load_dataset(str(tmp_path / "missing"))


def test_shapesworld_spec():
    data = load_dataset("shapesworld:shape=star,count=6,colors=red|blue,caption=a {color} sks,seed=3", resolution=32)
    assert [e.caption for e in data.examples] == ["a red sks", "a blue sks"] * 3
    assert all(e.image.size == (32, 32) for e in data.examples)
    again = load_dataset("shapesworld:shape=star,count=6,colors=red|blue,caption=a {color} sks,seed=3", resolution=32)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(data.examples, again.examples))
    with pytest.raises(StudioError, match="unknown shapes \\['blob'\\]"):
        parse_shapesworld_spec("shape=blob")
    with pytest.raises(StudioError, match="bad ShapesWorld spec part 'n8'"):
        parse_shapesworld_spec("n8")


def test_shapesworld_prior_set_of_seen_shapes():
    from studio.eval import score

    data = load_dataset("shapesworld:shape=seen,count=10,caption={caption},seed=1", resolution=32)
    shapes = ["circle", "square", "triangle", "cross", "diamond"] * 2
    assert [e.caption.split(" in the ")[0].split()[-1] for e in data.examples] == shapes
    assert all(" on a " in e.caption for e in data.examples)  # the full caption names the background
    assert [row["shape"] for row in score([e.image for e in data.examples]).rows] == shapes
    two = parse_shapesworld_spec("shape=circle|heart")
    assert two["shapes"] == ["circle", "heart"]


def test_bucket_batches_never_mix_buckets():
    buckets = [(32, 32)] * 5 + [(40, 24)] * 3
    batches = bucket_batches(buckets, 2, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)


def test_shapesworld_sizes_show_every_colour_and_shape():
    """Sizes cycle like shapes and colours do, so with one shared index 14 sizes and 6 colours would give each size
    only 3 colours (ResAdapter's norms then learn which colours a size has); each size must show them all."""
    sizes = "24|32|40|48|56|64|24x48|48x24|32x64|64x32|32x48|48x32|40x64|64x40"
    data = load_dataset(f"shapesworld:shape=seen,count=420,caption={{color}} {{shape}},sizes={sizes}", 32, keep_sizes=True)
    seen: dict = {}
    for example, size in zip(data.examples, data.buckets):
        seen.setdefault(size, set()).update(example.caption.split())
    assert len(seen) == 14
    assert all({"red", "orange", "yellow", "green", "blue", "purple", "circle", "square"} <= words for words in seen.values())
    small = load_dataset("shapesworld:shape=seen,count=2,sizes=24|32", 32, keep_sizes=True)
    assert sorted(set(small.buckets)) == [(24, 24), (32, 32)]  # a few examples still cover every size
