"""The one table of Infinity's resolution schedules: aspect templates, sizes and per-scale token grids."""
from __future__ import annotations

import math
from dataclasses import dataclass

# Token grids (h, w) of the 13 scales of the largest ('1M') schedule, per aspect ratio h/w.
# Smaller sizes use a prefix of the same list, so a token's position depends only on (scale, cell).
_BASE_GRIDS: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}

#: Number of scales per named size; each is a prefix of the 13-scale schedule.
SIZES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

#: Pixels per transformer token along each side (patch 16, or patch 8 after the 8B's 2x2 patchify).
PIXELS_PER_TOKEN = 16


def _build_grids() -> dict[float, list[tuple[int, int]]]:
    """Add the transposed (portrait/landscape) twin of every template, keyed as the original rounds it."""
    grids: dict[float, list[tuple[int, int]]] = {}
    for ratio, hws in _BASE_GRIDS.items():
        grids[ratio] = hws
        if ratio != 1.0:
            grids[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return grids


#: Aspect templates (h/w) in the original's order, and their 13 grids.
GRIDS: dict[float, list[tuple[int, int]]] = _build_grids()
TEMPLATES: tuple[float, ...] = tuple(GRIDS)


@dataclass(frozen=True)
class Schedule:
    """A resolution: aspect template, size name and the (h, w) token grid of every scale."""

    template: float
    size: str
    grids: tuple[tuple[int, int], ...]

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_scale)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the concatenated token sequence."""
        out, acc = [], 0
        for n in self.tokens_per_scale:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def full_grids(self) -> tuple[tuple[int, int], ...]:
        """The 13-scale schedule of this aspect, which fixes RoPE positions for every size."""
        return tuple(GRIDS[self.template])

    @property
    def pixel_size(self) -> tuple[int, int]:
        """Output image (height, width) in pixels."""
        h, w = self.grids[-1]
        return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN

    def vae_grids(self, patchify: bool) -> tuple[tuple[int, int], ...]:
        """Latent grids the VAE sees: doubled when the transformer works on 2x2-patchified latents."""
        f = 2 if patchify else 1
        return tuple((h * f, w * f) for h, w in self.grids)

    def as_original(self) -> list[tuple[int, int, int]]:
        """The (1, h, w) triples the original sampler takes."""
        return [(1, h, w) for h, w in self.grids]


def nearest_template(h_div_w: float) -> float:
    """The aspect template the original would pick for a requested h/w (first of ties)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {h_div_w!r}")
    best = TEMPLATES[0]
    for t in TEMPLATES:
        if abs(t - h_div_w) < abs(best - h_div_w):
            best = t
    return best


def get_schedule(template: float, size: str) -> Schedule:
    """Look up one schedule by aspect template and size name, with a clear error for unknown ones."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    match = [t for t in TEMPLATES if abs(t - float(template)) < 1e-6]
    if not match:
        raise ValueError(
            f"unsupported aspect template {template!r}; supported h/w templates: {', '.join(map(str, TEMPLATES))}")
    t = match[0]
    return Schedule(template=t, size=size, grids=tuple(GRIDS[t][: SIZES[size]]))


def schedule_for_pixels(width: int, height: int) -> Schedule:
    """Snap a requested width x height to the nearest template and size, as the original's callers do."""
    if width <= 0 or height <= 0:
        raise ValueError(f"unsupported resolution {width}x{height}: width and height must be positive")
    template = nearest_template(height / width)
    if abs(math.log((height / width) / template)) > math.log(1.25):
        raise ValueError(
            f"unsupported resolution {width}x{height}: aspect ratio h/w = {height / width:.3g} is outside the "
            f"official templates ({min(TEMPLATES)} to {max(TEMPLATES)})")
    target = width * height
    best: Schedule | None = None
    for size in SIZES:
        s = get_schedule(template, size)
        ph, pw = s.pixel_size
        if best is None or abs(ph * pw - target) < abs(best.pixel_size[0] * best.pixel_size[1] - target):
            best = s
    assert best is not None
    h, w = best.pixel_size
    if not (0.5 <= (h * w) / target <= 2.0):
        raise ValueError(
            f"unsupported resolution {width}x{height}: the nearest Infinity schedule is {w}x{h}; "
            f"supported sizes are about 256^2, 512^2, 768^2 and 1024^2 pixels at aspect ratios 1:3 to 3:1")
    return best


def all_schedules() -> list[Schedule]:
    """Every (template, size) pair, for tables and tests."""
    return [get_schedule(t, s) for t in TEMPLATES for s in SIZES]


def resolution_label(schedule: Schedule) -> str:
    """'1024x1024 (1:1)': width x height and the aspect, the way a resolution menu lists it."""
    h, w = schedule.pixel_size
    aspect = f"{round(w / h, 2):g}:1" if w >= h else f"1:{round(h / w, 2):g}"  # width : height
    return f"{w}x{h} ({aspect})"


def resolution_choices() -> list[str]:
    """Every official resolution as a menu label, largest size first, square first within a size."""
    sizes = sorted(SIZES, key=SIZES.get, reverse=True)
    return [resolution_label(get_schedule(t, s)) for s in sizes for t in TEMPLATES]


def schedule_from_label(label: str) -> Schedule:
    """The schedule a menu label names; an error for a label that is not an official resolution."""
    from .limits import shown

    for s in all_schedules():
        if resolution_label(s) == label:
            return s
    raise ValueError(f"unsupported resolution {shown(label)}; choose one of the official templates, e.g. "
                     f"{resolution_choices()[0]!r}")
