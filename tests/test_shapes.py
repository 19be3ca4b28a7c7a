"""The procedural data set: deterministic, captions that say exactly what is drawn, disjoint splits."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from scalekv_core.training import shapes
from scalekv_core.training.prompt_following import check_image

SPEC_SCENE = shapes.Scene(
    shapes=(shapes.Shape("circle", "red", "top left", "large"), shapes.Shape("square", "blue", "bottom right", "small")),
    background=("yellow",))


def test_caption_wording():
    assert shapes.caption(SPEC_SCENE) == ("a large red circle at the top left and a small blue square at the "
                                          "bottom right on a yellow background")
    grad = shapes.Scene(shapes=(shapes.Shape("star", "white", "center", "small"),), background=("orange", "black"))
    assert shapes.caption(grad) == "a small white star at the center on an orange to black gradient background"


def test_render_draws_the_caption():
    img = shapes.render(SPEC_SCENE, 256)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    # centre of the top-left cell (0.2 * 256 = 51) is the red circle, bottom-right (205) the blue square
    assert tuple(img[51, 51]) == shapes.PALETTE["red"]
    assert tuple(img[205, 205]) == shapes.PALETTE["blue"]
    assert tuple(img[0, 0]) == tuple(img[128, 128]) == shapes.PALETTE["yellow"]
    # the large circle (radius 0.16 * 256 = 41 px) ends before 51 + 45 px; the small square (half side 18) too
    assert tuple(img[51, 51 + 45]) == shapes.PALETTE["yellow"]
    assert tuple(img[205, 205 + 22]) == shapes.PALETTE["yellow"]


def test_gradient_runs_top_to_bottom():
    img = shapes.render(shapes.Scene((shapes.Shape("circle", "red", "center", "small"),), ("white", "black")), 64)
    top, bottom = img[0, 0].astype(int), img[-1, 0].astype(int)
    assert np.abs(top - shapes.PALETTE["white"]).max() <= 8
    assert np.abs(bottom - shapes.PALETTE["black"]).max() <= 8
    column = img[:, 0, 0].astype(int)
    assert (np.diff(column) <= 0).all()  # white -> black: never brighter further down


def test_palette_is_clearly_distinct():
    rgb = {k: np.array(v, dtype=float) for k, v in shapes.PALETTE.items()}
    assert len(rgb) >= 8
    closest = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    assert closest > 80  # the nearest pair, yellow and orange, is 86 apart


def test_scenes_are_deterministic():
    a, b = shapes.scenes(30, seed=7), shapes.scenes(30, seed=7)
    assert a == b
    assert [shapes.caption(s) for s in a] != [shapes.caption(s) for s in shapes.scenes(30, seed=8)]
    for s in a[:5]:
        assert np.array_equal(shapes.render(s), shapes.render(s))


def test_scene_rules():
    for s in shapes.scenes(300, seed=1):
        assert 1 <= len(s.shapes) <= 2
        colours = [sh.color for sh in s.shapes]
        assert len(set(colours)) == len(colours)
        assert not set(colours) & set(s.background)
    kinds = {sh.kind for s in shapes.scenes(300, seed=1) for sh in s.shapes}
    assert kinds == set(shapes.KINDS)
    assert any(s.is_gradient for s in shapes.scenes(50, seed=1))
    assert any(len(s.shapes) == 2 for s in shapes.scenes(50, seed=1))


def test_heldout_split_is_disjoint():
    train = {shapes.caption(s) for s in shapes.scenes(2000, seed=0, split="train")}
    held = [shapes.caption(s) for s in shapes.scenes(200, seed=0, split="heldout")]
    assert not train & set(held)
    pairs = shapes.eval_pairs(12)
    assert [c for c, _ in pairs] == held[:12]
    assert len({seed for _, seed in pairs}) == 12


def test_captions_name_what_is_drawn():
    """The prompt-following measurement on ground-truth renders: every statement of every caption holds."""
    scene_list = shapes.scenes(150, seed=3, split="heldout")
    checks = [c for s in scene_list for c in check_image(s, shapes.render(s))]
    assert len(checks) > 300
    assert all(c.ok for c in checks), [c for c in checks if not c.ok][:3]


def test_measurement_catches_wrong_images():
    """The same measurement on another scene's picture fails most statements: it can tell images apart."""
    scene_list = shapes.scenes(60, seed=4, split="heldout")
    checks = [c for a, b in zip(scene_list, scene_list[1:]) for c in check_image(a, shapes.render(b))]
    assert sum(c.ok for c in checks) / len(checks) < 0.5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kind='hexagon'"):
        shapes.Shape("hexagon", "red", "top", "small")
    with pytest.raises(ValueError, match="background"):
        shapes.Scene((shapes.Shape("circle", "red", "top", "small"),), ("mauve",))
    with pytest.raises(ValueError, match="split"):
        shapes.scenes(3, 0, split="test")
    with pytest.raises(ValueError, match="RGB"):
        check_image(SPEC_SCENE, np.zeros((10, 12, 3), np.uint8))
