"""ShapesWorld renderer: one object on a plain background, with ground truth.

Every image is a pure function of its `ShapeSpec` (and the canvas size), so a
seed that fixes the specs fixes the pixels. Shapes are rasterised on a 4x
supersampled grid (antialiased edges), textures are laid on the absolute pixel
grid with a period of 1/8 of the short side, so an image looks the same at any
resolution.

Example:
    >>> spec = ShapeSpec("circle", "red", "striped", "white", "large", "top left")
    >>> out = render(spec, 32, 32)
    >>> out.image.shape, out.mask.dtype, out.labels["shape"]
    ((32, 32, 3), dtype('bool'), 'circle')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SEEN_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
HELDOUT_SHAPES = ("star", "heart")
SHAPES = SEEN_SHAPES + HELDOUT_SHAPES

COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": 0.16, "large": 0.23}  # object radius as a fraction of the short side
POSITIONS = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
COUNTS = ("0", "1", "2+")

# Pattern pixels are the fill colour darkened by this factor, so the colour name stays true.
PATTERN_SHADE = 0.45
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One object: its attributes, all by name (see the module constants)."""

    shape: str
    color: str
    texture: str = "plain"
    background: str = "white"
    size: str = "large"
    position: str = "center"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("color", COLORS),
            ("texture", TEXTURES),
            ("background", BACKGROUNDS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(allowed)}")


@dataclass
class Render:
    """A rendered image (H x W x 3 uint8), the object mask (H x W bool) and its labels."""

    image: np.ndarray
    mask: np.ndarray
    labels: dict = field(default_factory=dict)


def _polygon(points: list[tuple[float, float]], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_points(inner: float = 0.45) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -np.pi / 2 + k * np.pi / 5
        points.append((radius * np.cos(angle), radius * np.sin(angle)))
    return points


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of `shape` in object coordinates: u right, v down, the unit disc is its extent."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return _polygon([(0.0, -0.95), (0.98, 0.8), (-0.98, 0.8)], u, v)
    if shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))
    if shape == "star":
        return _polygon(_star_points(), u, v * 1.0 + 0.05)
    if shape == "heart":
        # The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled into the unit disc.
        x, y = u * 1.2, -v * 1.2 + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def texture_pattern(texture: str, height: int, width: int) -> np.ndarray:
    """Where the darker pattern colour goes (H x W bool), on the absolute pixel grid."""
    period = max(4, round(min(height, width) / 8))
    half = period / 2
    y, x = np.mgrid[0:height, 0:width]
    if texture == "plain":
        return np.zeros((height, width), dtype=bool)
    if texture == "striped":
        return (np.floor(y / half) % 2) == 1
    if texture == "checkered":
        return ((np.floor(x / half) + np.floor(y / half)) % 2) == 1
    if texture == "dotted":
        cx = (x % period) - (period - 1) / 2
        cy = (y % period) - (period - 1) / 2
        return cx * cx + cy * cy <= (0.3 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}; choose one of {list(TEXTURES)}")


def _coverage(spec: ShapeSpec, height: int, width: int, jitter: tuple[float, float, float]) -> np.ndarray:
    """Fraction of each pixel covered by the object (H x W float in [0, 1])."""
    s = SUPERSAMPLE
    short = min(height, width)
    cx_rel, cy_rel = POSITIONS[spec.position]
    dx, dy, dr = jitter
    cx, cy = (cx_rel + dx) * width, (cy_rel + dy) * height
    radius = SIZES[spec.size] * (1.0 + dr) * short
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    v, u = np.meshgrid((ys - cy) / radius, (xs - cx) / radius, indexing="ij")
    inside = shape_mask(spec.shape, u, v).astype(np.float32)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _paint(canvas: np.ndarray, spec: ShapeSpec, coverage: np.ndarray) -> None:
    height, width = coverage.shape
    fill = np.array(COLORS[spec.color], dtype=np.float32)
    pattern = texture_pattern(spec.texture, height, width)[..., None]
    colour = np.where(pattern, fill * PATTERN_SHADE, fill)
    alpha = coverage[..., None]
    canvas *= 1.0 - alpha
    canvas += alpha * colour


def render(
    spec: ShapeSpec,
    width: int = 32,
    height: int = 32,
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Render:
    """Draw one object. `jitter` = (dx, dy, relative size change), small offsets for variety.

    Example:
        >>> render(ShapeSpec("square", "blue"), 48, 32).image.shape
        (32, 48, 3)
    """
    return render_scene([spec], width, height, background=spec.background, jitters=[jitter])


def render_scene(
    objects: list[ShapeSpec],
    width: int = 32,
    height: int = 32,
    background: str = "white",
    jitters: list[tuple[float, float, float]] | None = None,
) -> Render:
    """Draw zero or more objects on one background; labels describe a single object only.

    Example:
        >>> render_scene([], 32, 32, background="gray").labels["count"]
        '0'
    """
    if width < 8 or height < 8:
        raise ValueError(f"canvas {width}x{height} is too small; use at least 8x8 pixels")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {sorted(BACKGROUNDS)}")
    jitters = jitters or [(0.0, 0.0, 0.0)] * len(objects)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = np.array(BACKGROUNDS[background], dtype=np.float32)
    mask = np.zeros((height, width), dtype=bool)
    for spec, jitter in zip(objects, jitters):
        coverage = _coverage(spec, height, width, jitter)
        _paint(canvas, spec, coverage)
        mask |= coverage >= 0.5
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    count = COUNTS[min(len(objects), 2)]
    labels = {"background": background, "count": count}
    if len(objects) == 1:
        labels.update(asdict(objects[0]))
    return Render(image=image, mask=mask, labels=labels)


def random_spec(rng: np.random.Generator, shapes: tuple[str, ...] = SEEN_SHAPES) -> ShapeSpec:
    """Draw every attribute uniformly.

    Example:
        >>> random_spec(np.random.default_rng(0)).shape in SEEN_SHAPES
        True
    """

    def pick(options):
        options = list(options)
        return options[rng.integers(len(options))]

    return ShapeSpec(
        shape=pick(shapes),
        color=pick(COLORS),
        texture=pick(TEXTURES),
        background=pick(BACKGROUNDS),
        size=pick(SIZES),
        position=pick(POSITIONS),
    )


def random_jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    """A small random offset (+-3% of the canvas) and size change (+-8%)."""
    dx, dy = rng.uniform(-0.03, 0.03, size=2)
    return float(dx), float(dy), float(rng.uniform(-0.08, 0.08))
