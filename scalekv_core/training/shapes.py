"""Procedural captioned scenes: coloured shapes on a plain or gradient background, drawn and described exactly.

Everything is computed from a numpy Generator, so a (seed, split) pair always gives the same scenes and no
data set has to be downloaded. The geometry helpers (`shape_center`, `shape_radius`, `BORDER`) are public so
the prompt-following check measures exactly where the renderer drew.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Named colours, far apart in RGB so the nearest-colour test never confuses two of them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (35, 70, 230),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 25),
    "purple": (140, 45, 185),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Position name -> (row, column) in a 3x3 layout.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}  # shape radius as a fraction of the image side
_CELL_CENTERS = (0.2, 0.5, 0.8)  # fractions of the image side; a large shape stays 0.04 from every edge
#: Width of the background ring (fraction of the side) that no shape ever reaches.
BORDER = 0.03
_P_TWO_SHAPES = 0.5
_P_GRADIENT = 1 / 3
#: One caption in this many is reserved for the held-out split (by a stable hash), so the splits never share one.
_HELDOUT_EVERY = 8


@dataclass(frozen=True)
class Shape:
    """One shape: kind, named colour, named position in a 3x3 layout, named size."""

    kind: str
    color: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for field_name, value, allowed in (("kind", self.kind, KINDS), ("color", self.color, COLORS),
                                           ("position", self.position, tuple(POSITIONS)),
                                           ("size", self.size, tuple(SIZES))):
            if value not in allowed:
                raise ValueError(f"Shape.{field_name}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    """One or two shapes over a background of one colour, or a top-to-bottom gradient of two."""

    shapes: tuple[Shape, ...]
    background: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"Scene needs one or two shapes, got {len(self.shapes)}")
        if not 1 <= len(self.background) <= 2 or any(c not in PALETTE for c in self.background):
            raise ValueError(f"Scene.background={self.background!r} must be one or two of {', '.join(COLORS)}")
        if len({s.position for s in self.shapes}) != len(self.shapes):
            raise ValueError(f"Scene shapes share a position: {[s.position for s in self.shapes]}")

    @property
    def is_gradient(self) -> bool:
        return len(self.background) == 2


def shape_center(position: str, size: int) -> tuple[float, float]:
    """(y, x) pixel centre of a named position in a size x size image."""
    row, col = POSITIONS[position]
    return _CELL_CENTERS[row] * size, _CELL_CENTERS[col] * size


def shape_radius(shape_size: str, size: int) -> float:
    """Radius in pixels of a small or large shape in a size x size image."""
    return SIZES[shape_size] * size


def _polygon_mask(dy: np.ndarray, dx: np.ndarray, radii: list[float], start: float) -> np.ndarray:
    """Inside test for a polygon that is star-shaped around the origin, with vertices at equal angles."""
    n = len(radii)
    step = 2 * math.pi / n
    angles = start + step * np.arange(n)
    vy, vx = np.array(radii) * np.sin(angles), np.array(radii) * np.cos(angles)
    theta = np.mod(np.arctan2(dy, dx) - start, 2 * math.pi)
    i = np.minimum((theta // step).astype(np.int64), n - 1)
    j = (i + 1) % n
    ey, ex = vy[j] - vy[i], vx[j] - vx[i]
    # The edge's line is where cross(p - v_i, e) changes sign; the origin is on the inside.
    side = (dx - vx[i]) * ey - (dy - vy[i]) * ex
    inside_sign = (0 - vx[i]) * ey - (0 - vy[i]) * ex
    return side * inside_sign >= 0


@lru_cache(maxsize=4)
def _pixel_centers(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def shape_mask(shape: Shape, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the pixels a shape covers."""
    cy, cx = shape_center(shape.position, size)
    r = shape_radius(shape.size, size)
    yy, xx = _pixel_centers(size)
    dy, dx = yy - cy, xx - cx
    if shape.kind == "circle":
        return dy * dy + dx * dx <= r * r
    if shape.kind == "square":
        a = 0.8 * r
        return (np.abs(dy) <= a) & (np.abs(dx) <= a)
    if shape.kind == "triangle":  # pointing up, centroid at the centre (inradius r/2)
        return _polygon_mask(dy, dx, [r] * 3, start=-math.pi / 2)
    if shape.kind == "star":  # five points; inner radius 0.45 r
        return _polygon_mask(dy, dx, [r, 0.45 * r] * 5, start=-math.pi / 2)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene: Scene, size: int = 256) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB image."""
    if size < 16:
        raise ValueError(f"render size must be at least 16 pixels, got {size}")
    top = np.array(PALETTE[scene.background[0]], dtype=np.float64)
    bottom = np.array(PALETTE[scene.background[-1]], dtype=np.float64)
    t = ((np.arange(size) + 0.5) / size)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    for shape in scene.shapes:
        img[shape_mask(shape, size)] = PALETTE[shape.color]
    return np.rint(img).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(shape: Shape) -> str:
    return f"a {shape.size} {shape.color} {shape.kind} at the {shape.position}"


def caption(scene: Scene) -> str:
    """The scene in words: every shape's size, colour, kind and position, then the background."""
    shapes = " and ".join(_describe(s) for s in scene.shapes)
    if scene.is_gradient:
        return f"{shapes} on {_article(scene.background[0])} {scene.background[0]} to {scene.background[1]} gradient background"
    return f"{shapes} on {_article(scene.background[0])} {scene.background[0]} background"


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: shape colours differ from each other and from every background colour."""
    if rng.random() < _P_GRADIENT:
        bg = tuple(str(c) for c in rng.choice(COLORS, size=2, replace=False))
    else:
        bg = (str(rng.choice(COLORS)),)
    n = 2 if rng.random() < _P_TWO_SHAPES else 1
    colors = rng.choice([c for c in COLORS if c not in bg], size=n, replace=False)
    positions = rng.choice(list(POSITIONS), size=n, replace=False)
    shapes = tuple(Shape(kind=str(rng.choice(KINDS)), color=str(colors[i]), position=str(positions[i]),
                         size=str(rng.choice(list(SIZES)))) for i in range(n))
    return Scene(shapes=shapes, background=bg)


def is_heldout(scene: Scene) -> bool:
    """Whether a scene's caption belongs to the held-out split (a stable hash, the same on every machine)."""
    return zlib.crc32(caption(scene).encode()) % _HELDOUT_EVERY == 0


_SPLITS = {"train": 0, "heldout": 1}


def scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n scenes of one split: separate seed streams, and no caption ever appears in both splits."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"number of scenes must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), _SPLITS[split]])
    want_heldout = split == "heldout"
    out: list[Scene] = []
    while len(out) < n:
        s = random_scene(rng)
        if is_heldout(s) == want_heldout:
            out.append(s)
    return out


def eval_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(caption, sampling seed) pairs over held-out scenes, for benchmarks that need the same prompts every run."""
    return [(caption(s), seed + i) for i, s in enumerate(scenes(n, seed, "heldout"))]
