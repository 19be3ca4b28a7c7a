"""The committed default model (default_model/): loads like users' files, stays small, and follows its prompts."""
from __future__ import annotations

from pathlib import Path

import pytest

from scalekv_core.training.train_default import T5_FOLDER, TRANSFORMER_FILE, VAE_FILE

ROOT = Path(__file__).resolve().parents[1] / "default_model"
PARTS = (ROOT / TRANSFORMER_FILE, ROOT / VAE_FILE, ROOT / T5_FOLDER)
#: the issue's measurement: 100 held-out captions, the figure docs/training.md reports (about 2 minutes on CPU with the other checks here)
N_CAPTIONS = 100


@pytest.fixture(scope="module")
def pipe():
    from scalekv_core.training.prompt_following import load_default
    return load_default(ROOT)


def test_files_exist_and_fit_in_30_mb():
    for p in PARTS:
        assert p.exists(), f"missing {p}"
    files = [f for f in ROOT.rglob("*") if f.is_file() and any(f.is_relative_to(p) or f == p for p in PARTS)]
    total = sum(f.stat().st_size for f in files)
    assert total <= 30 * 2**20, f"default model files take {total / 2**20:.1f} MB"


def test_architecture_is_the_256_default(pipe):
    from scalekv_core.schedules import schedule_for_pixels
    s = schedule_for_pixels(256, 256)
    assert s.size == "0.06M" and s.grids[-1] == (16, 16)
    assert pipe.transformer.cfg.d_vae == pipe.vae.cfg.codebook_dim and not pipe.vae_patchify
    assert pipe.text_encoder.text_channels == pipe.transformer.cfg.text_channels


@pytest.fixture(scope="module")
def report(pipe):
    from scalekv_core.training.prompt_following import evaluate
    r = evaluate(pipe, n=N_CAPTIONS, seed=0)
    failed = [(cap, c.what, c.found) for cap, cs in zip(r.captions, r.checks) for c in cs if not c.ok]
    print(f"prompt following over {N_CAPTIONS} held-out captions: {r.score:.3f} {r.by_kind()}; failed: {failed}")
    return r


def test_backgrounds_follow_the_prompt(report):
    """What the committed model does learn: the named background colour(s), far above chance (1 in 8)."""
    assert report.total >= 2 * N_CAPTIONS
    assert report.by_kind()["background"] >= 0.8


def test_prompt_following_reaches_the_target(report):
    """The issue's target: at least 80% of the checks over 100 held-out captions agree with the caption."""
    assert report.score >= 0.8


def test_truth_scales_hand_the_sampler_the_scene(pipe):
    """The diagnosis behind docs/training.md: 0 truth scales is the plain image; all 7 leave nothing to sample."""
    import numpy as np

    from scalekv_core.training import shapes
    from scalekv_core.training.prompt_following import generate_for, generate_with_truth
    scene, (cap, seed) = shapes.scenes(1, 0, "heldout")[0], shapes.eval_pairs(1, 0)[0]
    assert np.array_equal(generate_with_truth(pipe, scene, cap, seed, 0), generate_for(pipe, [(cap, seed)])[0])
    everything = generate_with_truth(pipe, scene, cap, seed, 7)
    assert np.array_equal(everything, generate_with_truth(pipe, scene, cap, seed + 1, 7))  # the seed is unused
    assert not np.array_equal(everything, generate_with_truth(pipe, scene, cap, seed, 3))
    with pytest.raises(ValueError, match="truth_scales"):
        generate_with_truth(pipe, scene, cap, seed, 8)


def test_the_codec_can_draw_what_the_captions_say(pipe):
    """The ceiling: with every scale's ground truth the checks pass far above what sampling reaches."""
    from scalekv_core.training.prompt_following import evaluate
    assert evaluate(pipe, n=N_CAPTIONS, seed=0, truth_scales=7).score >= 0.8
