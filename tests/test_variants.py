"""Model variants without reference outputs: the 8B-style 14-bit patchify pair, non-square schedules, batches,
negative prompts / no CFG, bf16 blocks, and every checkpoint layout. Checked through shapes taken from the
original's tables, determinism and round trips (no expected values produced by the code under test)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_tiny import (
    KEYS,
    T5_TINY,
    TINY14_VAE,
    TINY56_TRANSFORMER,
    TINY_TRANSFORMER,
    TINY_TRANSFORMER_PTH,
    TINY_VAE,
    TINY_VAE_PTH,
    random_text,
    reference_text,
    save_sharded,
    write_tiny56_files,
)
from scalekv_core.model.text_encoder import T5TextEncoder, TextConditioning
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule

TABLE = json.loads((KEYS / "dynamic_resolution_table.json").read_text())
S006 = get_schedule(1.0, "0.06M")


def expected_schedule(width: int, height: int) -> tuple[str, str, dict]:
    """The original's snapping, from its exported table: nearest template (first of ties), then the size
    whose pixel area is closest to the request."""
    templates = TABLE["h_div_w_templates"]
    ratio = height / width
    t = min(templates, key=lambda x: (abs(x - ratio), templates.index(x)))
    key = str(t)
    sizes = TABLE["table"][key]
    pn = min(sizes, key=lambda s: abs(sizes[s]["pixel"][0] * sizes[s]["pixel"][1] - width * height))
    return key, pn, sizes[pn]


def table_grids(entry: dict) -> list[tuple[int, int]]:
    return [(h, w) for _, h, w in entry["scales"]]


def assert_same_generation(a, b) -> None:
    assert len(a.samples.bits) == len(b.samples.bits)
    for x, y in zip(a.samples.bits, b.samples.bits):
        assert torch.equal(x, y)
    assert torch.equal(a.samples.summed_codes, b.samples.summed_codes)
    assert np.array_equal(a.images, b.images)


def bits_differ(a, b) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.samples.bits, b.samples.bits))


def check_image(result, batch: int, height: int, width: int) -> None:
    assert result.images.dtype == np.uint8
    assert result.images.shape == (batch, height, width, 3)
    assert result.decoded.shape == (batch, 3, height, width)
    assert torch.isfinite(result.decoded).all()
    assert result.decoded.abs().max() <= 1.0
    assert result.images.std() > 1.0  # not a flat image


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5() -> T5TextEncoder:
    return T5TextEncoder.from_folder(T5_TINY)


@pytest.fixture(scope="module")
def files14(tmp_path_factory):
    return write_tiny56_files(tmp_path_factory.mktemp("tiny56"))


@pytest.fixture(scope="module")
def pipe14(files14) -> InfinityPipeline:
    transformer, vae = files14
    return InfinityPipeline.from_files(transformer, vae)


@pytest.fixture(scope="module")
def ref_pipe(t5) -> InfinityPipeline:
    p = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE)
    return InfinityPipeline(p.transformer, p.vae, t5)


@pytest.fixture(scope="module")
def text() -> TextConditioning:
    return random_text(length=9, seed=5)


@pytest.fixture(scope="module")
def gen14(pipe14, text):
    kw = dict(cfg=3.0, tau=1.0, width=256, height=256)
    return {"a": pipe14.generate(text, seed=0, **kw), "a2": pipe14.generate(text, seed=0, **kw),
            "b": pipe14.generate(text, seed=1, **kw)}


@pytest.fixture(scope="module")
def ref_plain(ref_pipe):
    """Reference tiny model, seed 0, cfg 3, learned unconditional text (shared by several comparisons)."""
    return ref_pipe.generate(reference_text(), seed=0, cfg=3.0, tau=0.5, schedule=S006)


# ----------------------------------------------------------------------------------------------------------------
# 14-bit, patch-8 VAE with the 2x2 patchify transformer (the 8B layout)
# ----------------------------------------------------------------------------------------------------------------

def test_patchify_pair_is_detected(pipe14) -> None:
    assert pipe14.transformer.cfg == TINY56_TRANSFORMER
    assert pipe14.vae.cfg == TINY14_VAE
    assert pipe14.vae_patchify is True


def test_patchify_generation_shapes(gen14) -> None:
    r = gen14["a"]
    entry = TABLE["table"]["1.0"]["0.06M"]
    grids = table_grids(entry)
    assert r.schedule.grids == tuple(grids)
    check_image(r, 1, *entry["pixel"])
    assert entry["pixel"] == [256, 256]
    assert len(r.samples.bits) == len(r.samples.bits_vae) == len(grids) == 7
    for (h, w), bits, bits_vae in zip(grids, r.samples.bits, r.samples.bits_vae):
        assert bits.shape == (1, h * w, 56) and bits.dtype == torch.uint8
        assert bits_vae.shape == (1, 1, 2 * h, 2 * w, 14) and bits_vae.dtype == torch.uint8
        assert int(bits.max()) <= 1
        # Layout of the original (infinity.py:588-594): (B,h,w,4d) -> permute -> pixel_shuffle(2) -> (B,d,2h,2w).
        shuffled = F.pixel_shuffle(bits.reshape(1, h, w, 56).permute(0, 3, 1, 2).float(), 2)
        assert torch.equal(shuffled.permute(0, 2, 3, 1).to(torch.uint8), bits_vae[:, 0])
    assert r.samples.summed_codes.shape == (1, 14, 32, 32)
    assert r.samples.summed_codes.dtype == torch.float32
    assert torch.isfinite(r.samples.summed_codes).all()
    # The tiny random model gives non-degenerate bits: both values occur at the last scale.
    frac = r.samples.bits[-1].float().mean().item()
    assert 0.05 < frac < 0.95


def summed_codes_from_bits(bits_vae: list[torch.Tensor]) -> torch.Tensor:
    """The original's sum (infinity.py:596-607, multiscale_bsq.py:536-577) rebuilt from the recorded bits:
    codes = normalize(bits*2s - s), s = 1/sqrt(d); earlier scales trilinearly upsampled to the last grid."""
    final = bits_vae[-1].shape[2:4]
    total = None
    for si, b in enumerate(bits_vae):
        d = b.shape[-1]
        s = 1.0 / np.sqrt(d)
        codes = F.normalize(b.float() * (2 * s) - s, dim=-1).permute(0, 4, 1, 2, 3)  # (B, d, 1, H, W)
        if si < len(bits_vae) - 1:
            codes = F.interpolate(codes, size=(1, *final), mode="trilinear")
        total = codes if total is None else total + codes
    return total.squeeze(2)


def test_patchify_summed_codes_follow_the_bits(gen14) -> None:
    for r in (gen14["a"], gen14["b"]):
        want = summed_codes_from_bits(r.samples.bits_vae)
        assert torch.allclose(r.samples.summed_codes, want, atol=1e-5, rtol=0)


def test_patchify_is_deterministic_and_seeded(gen14) -> None:
    assert_same_generation(gen14["a"], gen14["a2"])
    assert bits_differ(gen14["a"], gen14["b"])
    assert not np.array_equal(gen14["a"].images, gen14["b"].images)


def test_patchify_non_square(pipe14, text) -> None:
    key, pn, entry = expected_schedule(256, 384)
    r = pipe14.generate(text, seed=3, width=256, height=384)
    assert (str(r.schedule.template), r.schedule.size) == (key, pn)
    check_image(r, 1, *entry["pixel"])
    for (h, w), bits, bits_vae in zip(table_grids(entry), r.samples.bits, r.samples.bits_vae):
        assert bits.shape == (1, h * w, 56)
        assert bits_vae.shape == (1, 1, 2 * h, 2 * w, 14)
    h, w = table_grids(entry)[-1]
    assert r.samples.summed_codes.shape == (1, 14, 2 * h, 2 * w)


def test_patchify_from_t5_prompt(files14) -> None:
    transformer, vae = files14
    pipe = InfinityPipeline.from_files(transformer, vae, T5_TINY)
    assert pipe.text_encoder is not None
    r = pipe.generate("a red apple on a wooden table", seed=0, schedule=S006)
    check_image(r, 1, 256, 256)
    assert r.samples.bits[-1].shape == (1, 256, 56)


# ----------------------------------------------------------------------------------------------------------------
# Non-square schedules on the reference tiny model
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,template", [(256, 384, "1.5"), (176, 352, "2.0"), (352, 176, "0.5"),
                                                   (320, 240, "0.75")],
                         ids=["1.5", "portrait", "landscape", "0.75"])
def test_non_square_follows_the_original_table(ref_pipe, width, height, template) -> None:
    key, pn, entry = expected_schedule(width, height)
    assert (key, pn) == (template, "0.06M")
    r = ref_pipe.generate(reference_text(), seed=7, cfg=3.0, tau=0.5, width=width, height=height)
    assert str(r.schedule.template) == key and r.schedule.size == pn
    assert r.schedule.grids == tuple(table_grids(entry))
    assert r.schedule.pixel_size == tuple(entry["pixel"])
    check_image(r, 1, *entry["pixel"])
    for (h, w), bits, bits_vae in zip(table_grids(entry), r.samples.bits, r.samples.bits_vae):
        assert bits.shape == (1, h * w, 32)
        assert bits_vae.shape == (1, 1, h, w, 32)
    h, w = table_grids(entry)[-1]
    assert r.samples.summed_codes.shape == (1, 32, h, w)
    if template == "1.5":
        again = ref_pipe.generate(reference_text(), seed=7, cfg=3.0, tau=0.5, width=width, height=height)
        assert_same_generation(r, again)


def test_explicit_schedule_equals_pixel_request(ref_pipe) -> None:
    a = ref_pipe.generate(reference_text(), seed=4, schedule=get_schedule(0.666, "0.06M"))
    b = ref_pipe.generate(reference_text(), seed=4, width=336, height=224)
    assert b.schedule == a.schedule
    assert_same_generation(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Batches, prompts, negative prompts, CFG off
# ----------------------------------------------------------------------------------------------------------------

def test_batch_of_two(ref_pipe) -> None:
    cond = reference_text()
    a = ref_pipe.generate(cond, seed=1, batch=2, schedule=S006)
    b = ref_pipe.generate(cond, seed=1, batch=2, schedule=S006)
    check_image(a, 2, 256, 256)
    for (h, w), bits in zip(S006.grids, a.samples.bits):
        assert bits.shape == (2, h * w, 32)
    assert a.samples.summed_codes.shape == (2, 32, 16, 16)
    assert_same_generation(a, b)
    assert not torch.equal(a.samples.bits[-1][0], a.samples.bits[-1][1])
    assert not np.array_equal(a.images[0], a.images[1])


def test_list_of_prompts(ref_pipe) -> None:
    prompts = ["a red apple on a wooden table", "alien spaceship enterprise"]
    r = ref_pipe.generate(prompts, seed=2, schedule=S006)
    check_image(r, 2, 256, 256)
    assert not np.array_equal(r.images[0], r.images[1])
    again = ref_pipe.generate(prompts, seed=2, schedule=S006)
    assert_same_generation(r, again)
    r4 = ref_pipe.generate(prompts, seed=2, schedule=S006, batch=2)
    assert r4.images.shape == (4, 256, 256, 3)
    assert r4.samples.bits[-1].shape == (4, 256, 32)


def test_negative_prompt_changes_the_result(ref_pipe, ref_plain) -> None:
    neg = ref_pipe.generate(reference_text(), negative_prompt=random_text(length=4, seed=9), seed=0, cfg=3.0,
                            tau=0.5, schedule=S006)
    check_image(neg, 1, 256, 256)
    assert bits_differ(ref_plain, neg)
    neg_text = ref_pipe.generate(reference_text(), negative_prompt="blurry, low quality", seed=0, cfg=3.0,
                                 tau=0.5, schedule=S006)
    assert bits_differ(ref_plain, neg_text)
    # An empty negative prompt means "none": the learned unconditional text.
    empty = ref_pipe.generate(reference_text(), negative_prompt="  ", seed=0, cfg=3.0, tau=0.5, schedule=S006)
    assert_same_generation(ref_plain, empty)


def test_one_negative_prompt_serves_the_whole_batch(ref_pipe) -> None:
    neg = random_text(length=4, seed=9)
    one = ref_pipe.generate(reference_text(), negative_prompt=neg, seed=1, cfg=3.0, batch=2, schedule=S006)
    each = ref_pipe.generate(reference_text(), negative_prompt=neg.concat(neg), seed=1, cfg=3.0, batch=2,
                             schedule=S006)
    assert_same_generation(one, each)
    plain = ref_pipe.generate(reference_text(), seed=1, cfg=3.0, batch=2, schedule=S006)
    assert bits_differ(plain, one)
    with pytest.raises(ValueError, match="3 negative prompts for a batch of 2"):
        ref_pipe.generate(reference_text(), negative_prompt=neg.repeat_each(3), seed=1, batch=2, schedule=S006)


def test_cfg_one_runs_without_the_cfg_batch(ref_pipe, ref_plain) -> None:
    a = ref_pipe.generate(reference_text(), seed=0, cfg=1.0, tau=0.5, schedule=S006)
    check_image(a, 1, 256, 256)
    # Without CFG the unconditional branch is never used, so a negative prompt cannot matter.
    b = ref_pipe.generate(reference_text(), negative_prompt=random_text(length=4, seed=9), seed=0, cfg=[1.0] * 7,
                          tau=0.5, schedule=S006)
    assert_same_generation(a, b)
    assert bits_differ(a, ref_plain)


def test_per_scale_lists(ref_pipe, ref_plain) -> None:
    same = ref_pipe.generate(reference_text(), seed=0, cfg=[3.0] * 7, tau=[0.5] * 7, schedule=S006)
    assert_same_generation(ref_plain, same)
    mixed = ref_pipe.generate(reference_text(), seed=0, cfg=[1.0, 1.0, 2.0, 3.0, 3.0, 4.0, 4.0],
                              tau=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], schedule=S006)
    check_image(mixed, 1, 256, 256)


# ----------------------------------------------------------------------------------------------------------------
# bf16 blocks
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_pipe() -> InfinityPipeline:
    return InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, precision="bf16")


def test_bf16_keeps_embeddings_text_path_and_head_in_fp32(bf16_pipe) -> None:
    m = bf16_pipe.transformer
    for name, p in m.named_parameters():
        want = torch.bfloat16 if name.startswith("block_chunks.") else torch.float32
        assert p.dtype == want, name
    for prefix in ("head.", "head_nm.", "word_embed.", "text_norm.", "text_proj_for_sos.", "text_proj_for_ca.",
                   "shared_ada_lin.", "lvl_embed.", "cfg_uncond", "pos_start"):
        assert any(n.startswith(prefix) for n, _ in m.named_parameters()), prefix
    assert m.block_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16_pipe.vae.parameters())


def test_bf16_generates(bf16_pipe, ref_pipe) -> None:
    a = bf16_pipe.generate(reference_text(), seed=0, cfg=3.0, tau=0.5, schedule=S006)
    check_image(a, 1, 256, 256)
    assert torch.isfinite(a.samples.summed_codes).all()
    for (h, w), bits in zip(S006.grids, a.samples.bits):
        assert bits.shape == (1, h * w, 32) and int(bits.max()) <= 1
    b = bf16_pipe.generate(reference_text(), seed=0, cfg=3.0, tau=0.5, schedule=S006)
    assert_same_generation(a, b)
    # bf16 is an approximation of the fp32 model, not a different one: first-scale logits stay close.
    l16 = bf16_pipe.generate(reference_text(), seed=0, cfg=1.0, tau=1.0, schedule=S006, keep_logits=True)
    l32 = ref_pipe.generate(reference_text(), seed=0, cfg=1.0, tau=1.0, schedule=S006, keep_logits=True)
    diff = (l16.samples.logits[0] - l32.samples.logits[0]).abs().max().item()
    spread = l32.samples.logits[0].abs().max().item()
    assert 0 < diff < 0.1 * spread
    agree = torch.cat([(x == y).flatten() for x, y in zip(l16.samples.bits, l32.samples.bits)]).float().mean()
    assert agree > 0.9


# ----------------------------------------------------------------------------------------------------------------
# Every checkpoint layout gives the same images
# ----------------------------------------------------------------------------------------------------------------

def test_all_layouts_generate_identically(tmp_path, ref_plain) -> None:
    from safetensors.torch import load_file

    folder = save_sharded(load_file(str(TINY_TRANSFORMER)), tmp_path / "shards", n_shards=2)
    results = []
    for transformer, vae in ((TINY_TRANSFORMER_PTH, TINY_VAE_PTH), (folder, TINY_VAE)):
        pipe = InfinityPipeline.from_files(transformer, vae)
        results.append(pipe.generate(reference_text(), seed=0, cfg=3.0, tau=0.5, schedule=S006))
    for r in results:
        assert_same_generation(ref_plain, r)
