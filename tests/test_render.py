import numpy as np
import pytest

from studio.toy.render import (
    BACKGROUNDS,
    COLORS,
    PATTERN_SHADE,
    POSITIONS,
    SHAPES,
    TEXTURES,
    ShapeSpec,
    random_jitter,
    random_spec,
    render,
    render_scene,
)


def test_same_seed_same_pixels():
    def draw(seed):
        rng = np.random.default_rng(seed)
        spec = random_spec(rng, SHAPES)
        return render(spec, 40, 24, random_jitter(rng))

    a, b, c = draw(7), draw(7), draw(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.labels == b.labels
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("texture", TEXTURES)
def test_mask_and_pixels_agree_with_labels(shape, texture):
    spec = ShapeSpec(shape, "blue", texture, "white", "large", "bottom left")
    out = render(spec, 64, 64)
    assert out.labels == {**spec.__dict__, "count": "1"}
    background = np.array(BACKGROUNDS["white"])
    # Far from the object, every pixel is exactly the background.
    assert (out.image[~_dilate(out.mask, 2)] == background).all()
    # Inside the object (away from antialiased edges) pixels are the fill or its pattern shade.
    core = _erode(out.mask, 1)
    fill = np.array(COLORS["blue"], dtype=float)
    allowed = [fill, np.rint(fill * PATTERN_SHADE)]
    pixels = out.image[core].astype(float)
    nearest = np.min([np.abs(pixels - a).max(axis=1) for a in allowed], axis=0)
    assert core.sum() > 50 and nearest.max() <= 1
    shaded = np.abs(pixels - allowed[1]).max(axis=1) <= 1
    assert (shaded.mean() > 0.1) == (texture != "plain")


@pytest.mark.parametrize("position", POSITIONS)
def test_object_sits_at_its_position(position):
    out = render(ShapeSpec("square", "red", position=position), 48, 32)
    ys, xs = np.nonzero(out.mask)
    cx, cy = POSITIONS[position]
    assert abs(xs.mean() / 48 - cx) < 0.05 and abs(ys.mean() / 32 - cy) < 0.05


def test_any_resolution_and_aspect():
    for width, height in [(32, 32), (64, 32), (24, 96), (128, 128)]:
        out = render(ShapeSpec("circle", "green", "striped"), width, height)
        assert out.image.shape == (height, width, 3) and out.mask.shape == (height, width)
        assert out.mask.any()


def test_size_changes_area():
    small = render(ShapeSpec("circle", "red", size="small")).mask.sum()
    large = render(ShapeSpec("circle", "red", size="large")).mask.sum()
    assert large > 1.6 * small


def test_count_labels():
    assert render_scene([], background="black").labels["count"] == "0"
    two = render_scene([ShapeSpec("circle", "red", position="top left"), ShapeSpec("cross", "blue", position="bottom right")])
    assert two.labels["count"] == "2+" and "shape" not in two.labels


def test_unknown_attribute_is_named():
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        ShapeSpec("circle", "teal")
    with pytest.raises(ValueError, match="too small"):
        render(ShapeSpec("circle", "red"), 4, 4)


def _dilate(mask, k):
    out = mask.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _erode(mask, k):
    return ~_dilate(~mask, k)
