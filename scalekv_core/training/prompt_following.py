"""Does an image show what its caption says? Colour checks where the renderer would have drawn each part.

For every shape: the dominant named colour (nearest palette colour, majority vote) in a disc at the centre of
the shape's named position, sized so every kind of shape covers it. For the background: the dominant colour
of the outer ring, which no shape reaches; for a gradient, of the top and of the bottom strip. The same
measurement scores ground-truth renders at 100%, which is what makes it a test of the captions too.
"""
from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import shapes

_PALETTE_NAMES = list(shapes.PALETTE)
_PALETTE_RGB = np.array([shapes.PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)
#: The checked disc's radius as a fraction of the shape's radius (inside a small star's inner radius, 0.45).
CORE = 0.3


@dataclass
class Check:
    """One statement of a caption and what the image shows there."""

    kind: str  # "shape" or "background"
    what: str  # e.g. "red circle at the top left", "background top"
    expected: str
    found: str

    @property
    def ok(self) -> bool:
        return self.expected == self.found


@dataclass
class Report:
    """All checks over a set of captions."""

    captions: list[str] = field(default_factory=list)
    checks: list[list[Check]] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.ok for cs in self.checks for c in cs)

    @property
    def total(self) -> int:
        return sum(len(cs) for cs in self.checks)

    @property
    def score(self) -> float:
        """Fraction of checks that agree with the caption."""
        return self.passed / max(1, self.total)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, list[bool]] = {}
        for cs in self.checks:
            for c in cs:
                out.setdefault(c.kind, []).append(c.ok)
        return {k: sum(v) / len(v) for k, v in out.items()}

    def shapes_by_count(self) -> dict[str, float]:
        """Shape checks split by how many shapes the caption names: two-shape captions test colour binding."""
        out: dict[str, list[bool]] = {}
        for cs in self.checks:
            shape_checks = [c.ok for c in cs if c.kind == "shape"]
            out.setdefault(f"{len(shape_checks)} shape" + ("s" if len(shape_checks) != 1 else ""), []).extend(
                shape_checks)
        return {k: sum(v) / len(v) for k, v in sorted(out.items()) if v}

    def as_dict(self) -> dict:
        return {"score": self.score, "passed": self.passed, "checks": self.total, "by_kind": self.by_kind(),
                "shapes_by_count": self.shapes_by_count(),
                "captions": [{"caption": cap, "checks": [dict(asdict(c), ok=c.ok) for c in cs]}
                             for cap, cs in zip(self.captions, self.checks)]}


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) index of the nearest palette colour."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE_RGB) ** 2).sum(-1)
    return d.argmin(-1)


def dominant_color(pixels: np.ndarray) -> str:
    """The palette name most pixels are closest to."""
    idx = nearest_colors(pixels.reshape(-1, 3))
    return _PALETTE_NAMES[Counter(idx.tolist()).most_common(1)[0][0]]


def _disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def check_image(scene: shapes.Scene, image: np.ndarray) -> list[Check]:
    """Every colour statement of the scene's caption, measured on a (S, S, 3) uint8 RGB image."""
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
        raise ValueError(f"expected a square (S, S, 3) RGB image, got shape {image.shape}")
    size = image.shape[0]
    out = []
    for s in scene.shapes:
        cy, cx = shapes.shape_center(s.position, size)
        r = max(1.5, CORE * shapes.shape_radius(s.size, size))
        found = dominant_color(image[_disc(size, cy, cx, r)])
        out.append(Check("shape", f"{s.color} {s.kind} at the {s.position}", s.color, found))
    b = max(1, int(shapes.BORDER * size))
    if scene.is_gradient:
        out.append(Check("background", "background top", scene.background[0], dominant_color(image[:b])))
        out.append(Check("background", "background bottom", scene.background[1], dominant_color(image[-b:])))
    else:
        ring = np.ones((size, size), dtype=bool)
        ring[b:-b, b:-b] = False
        out.append(Check("background", "background", scene.background[0], dominant_color(image[ring])))
    return out


def load_default(folder: str | Path = "default_model", device: str = "cpu"):
    """The default model's pipeline from a folder in the users' layout (infinity/, vae/, text_encoders/)."""
    from ..pipeline import InfinityPipeline
    from .train_default import T5_FOLDER, TRANSFORMER_FILE, VAE_FILE
    folder = Path(folder)
    return InfinityPipeline.from_files(folder / TRANSFORMER_FILE, folder / VAE_FILE, folder / T5_FOLDER, device=device,
                                       vae_encoder=True)  # the evaluation encodes true scenes


def generate_for(pipe, pairs: list[tuple[str, int]], cfg: float = 3.0, tau: float = 0.5) -> list[np.ndarray]:
    """One 256x256 image per (caption, seed), full KV cache, each with its own seed as a user would run it."""
    from ..kvcache import CacheConfig
    return [pipe.generate(cap, seed=seed, cfg=cfg, tau=tau, width=256, height=256,
                          cache=CacheConfig(policy="full")).images[0] for cap, seed in pairs]


def generate_with_truth(pipe, scene: shapes.Scene, caption: str, seed: int, truth_scales: int, cfg: float = 3.0,
                        tau: float = 0.5) -> np.ndarray:
    """One 256x256 image whose first `truth_scales` scales are the scene's own quantized bits, the rest sampled.

    Tells where generation goes wrong: if handing the model the truth up to scale k fixes an image, the error
    was made at or before scale k. With 0 it is `generate_for`'s image (same seed and settings).
    """
    import torch

    from ..kvcache import CacheConfig
    from ..schedules import schedule_for_pixels
    from .dataset import encode_scenes
    if pipe.vae_patchify:
        raise ValueError("generate_with_truth quantizes unpatchified latents; this VAE patchifies")
    schedule = schedule_for_pixels(256, 256)
    if not 0 <= truth_scales <= schedule.num_scales:
        raise ValueError(f"truth_scales must be in 0..{schedule.num_scales}, got {truth_scales}")
    truth = encode_scenes(pipe.vae, [scene], schedule, pipe.device)[1]

    def hook(si: int, drawn: torch.Tensor) -> torch.Tensor:
        return truth[si].reshape(drawn.shape).to(drawn) if si < truth_scales else drawn

    return pipe.generate(caption, seed=seed, cfg=cfg, tau=tau, width=256, height=256,
                         cache=CacheConfig(policy="full"), bits_hook=hook).images[0]


def evaluate(pipe, n: int = 100, seed: int = 0, cfg: float = 3.0, tau: float = 0.5, truth_scales: int = 0) -> Report:
    """Prompt-following over the first n held-out captions of `shapes.eval_pairs`.

    `truth_scales` > 0 hands the first scales the ground truth (`generate_with_truth`), for diagnosis.
    """
    scene_list = shapes.scenes(n, seed, "heldout")
    pairs = shapes.eval_pairs(n, seed)
    if truth_scales:
        images = [generate_with_truth(pipe, sc, cap, sd, truth_scales, cfg=cfg, tau=tau)
                  for sc, (cap, sd) in zip(scene_list, pairs)]
    else:
        images = generate_for(pipe, pairs, cfg=cfg, tau=tau)
    report = Report()
    for sc, (cap, _), img in zip(scene_list, pairs, images):
        report.captions.append(cap)
        report.checks.append(check_image(sc, img))
    return report


def sample_grid(pipe, out: str | Path, n: int = 8, seed: int = 0, columns: int = 4, cfg: float = 3.0,
                tau: float = 0.5) -> Path:
    """A PNG of generated images for held-out captions, each captioned, for the docs."""
    from PIL import Image, ImageDraw
    pairs = shapes.eval_pairs(n, seed)
    images = generate_for(pipe, pairs, cfg=cfg, tau=tau)
    size, text_h = images[0].shape[0], 64
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (size + 8) + 8, rows * (size + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((cap, _), img) in enumerate(zip(pairs, images)):
        x, y = 8 + (i % columns) * (size + 8), 8 + (i // columns) * (size + text_h + 8)
        canvas.paste(Image.fromarray(img), (x, y))
        draw.multiline_text((x, y + size + 2), "\n".join(textwrap.wrap(cap, 42)[:5]), fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
