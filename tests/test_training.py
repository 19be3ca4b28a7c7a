"""Training code: the teacher-forced objective sees exactly what inference feeds, the quantizer, and smoke runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalekv_core.model.config import InfinityConfig
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.sampler import SamplerSettings, sample
from scalekv_core.schedules import get_schedule
from scalekv_core.training.dataset import TokenSet
from scalekv_core.training.quantizer import quantize_multiscale, teacher_inputs
from scalekv_core.training.teacher_forcing import bit_loss, block_causal_mask, teacher_forced_logits
from scalekv_core.training.transformer_training import (Phase, TransformerTrainConfig, init_transformer,
                                                        train_transformer)

SCHEDULE = get_schedule(1.0, "0.06M")  # 1, 2, 4, 6, 8, 12, 16: the default model's 256x256
TINY = InfinityConfig(depth=2, embed_dim=32, num_heads=2, block_chunks=2, ffn_hidden=64, text_channels=24,
                      text_maxlen=64, pool_heads=2, d_vae=8)


def _random_model(seed: int = 0):
    model = init_transformer(TINY, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every weight off its init so no term of the forward is trivially zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _text(lens: list[int], seed: int = 0) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    return TextConditioning._from_parts(torch.randn(sum(lens), TINY.text_channels, generator=g), lens,
                                        torch.device("cpu"))


def test_teacher_forcing_equals_the_sampler():
    """Feed the sampler's own bits back: the one-pass training logits equal the sampler's logits at every scale."""
    model = _random_model()
    cond = _text([5, 9])  # two prompts of different lengths: padding and masking are exercised
    out = sample(model, cond, SCHEDULE, SamplerSettings(cfg=1.0, tau=1.0, top_k=0, top_p=0.0, seed=3),
                 vae_patchify=False, keep_logits=True)
    with torch.no_grad():
        logits = teacher_forced_logits(model, cond.kv_compact, cond.lens, [b.long() for b in out.bits], SCHEDULE)
    offsets = SCHEDULE.offsets
    for si, n in enumerate(SCHEDULE.tokens_per_scale):
        ref = out.logits[si].reshape(2, n, -1)
        got = logits[:, offsets[si]:offsets[si] + n]
        assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (si, float((got - ref).abs().max()))
    # the bits are not constant, so later scales really depend on the inputs built from them
    assert 0.2 < float(torch.cat(out.bits, 1).float().mean()) < 0.8


def test_prefix_pass_equals_full_pass():
    model = _random_model(1)
    cond = _text([7])
    bits = [torch.randint(0, 2, (1, h * w, TINY.d_vae), generator=torch.Generator().manual_seed(si))
            for si, (h, w) in enumerate(SCHEDULE.grids)]
    with torch.no_grad():
        full = teacher_forced_logits(model, cond.kv_compact, cond.lens, bits, SCHEDULE)
        part = teacher_forced_logits(model, cond.kv_compact, cond.lens, bits, SCHEDULE, num_scales=4)
    assert part.shape[1] == 1 + 4 + 16 + 36
    assert torch.allclose(part, full[:, :part.shape[1]], atol=1e-5)


def test_block_causal_mask():
    m = block_causal_mask(SCHEDULE)
    assert m.shape == (521, 521)
    assert m[0].sum() == 1  # the start token sees itself only
    assert m[1:5, :5].all() and not m[1:5, 5:].any()  # scale 1 sees scales 0-1, all of its own tokens
    assert m[-1].all()


def test_quantizer_bits_and_refinement():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 16, 16, generator=g) * 0.5 + torch.tensor([1.0, -1.0] * 4).view(1, 8, 1, 1)
    q = quantize_multiscale(z, SCHEDULE)
    assert [b.shape for b in q.bits] == [(2, h * w, 8) for h, w in SCHEDULE.grids]
    # the 1x1 scale's bits are the signs of the latent's mean per channel
    assert torch.equal(q.bits[0][:, 0].bool(), z.mean((2, 3)) > 0)
    # each scale codes the residual: adding scales brings the sum closer to z (first few scales)
    errors = []
    for k in range(1, SCHEDULE.num_scales + 1):
        summed = sum(_up(b, SCHEDULE.grids[i]) for i, b in enumerate(q.bits[:k]))
        errors.append(float((summed - z).pow(2).mean()))
    assert errors[-1] < 0.5 * errors[0]
    assert torch.allclose(summed, q.summed, atol=1e-6)


def _up(bits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Unit codes of one scale, bilinearly upsampled to 16x16 (a trilinear resize with depth 1)."""
    B, _, d = bits.shape
    codes = (bits.float() * 2 - 1).reshape(B, *hw, d).permute(0, 3, 1, 2) / math.sqrt(d)
    return torch.nn.functional.interpolate(codes, size=(16, 16), mode="bilinear", align_corners=False)


def test_teacher_inputs_are_resized_sums():
    g = torch.Generator().manual_seed(1)
    bits = [torch.randint(0, 2, (1, h * w, 4), generator=g, dtype=torch.uint8) for h, w in SCHEDULE.grids]
    inputs = teacher_inputs(bits, SCHEDULE)
    assert len(inputs) == SCHEDULE.num_scales - 1
    # scale 1 (2x2) gets the 1x1 code upsampled to 16x16 and resized to 2x2: the constant code itself
    code0 = (bits[0].float() * 2 - 1) / 2.0
    assert torch.allclose(inputs[0], code0.expand(1, 4, 4), atol=1e-6)


def _token_set(n: int = 24) -> TokenSet:
    """Bits that depend on the caption (colour word -> first bit of every token), so there is something to learn."""
    g = torch.Generator().manual_seed(5)
    captions = [f"a small {'red' if i % 2 else 'blue'} circle" for i in range(n)]
    bits = []
    for h, w in SCHEDULE.grids:
        b = torch.randint(0, 2, (n, h * w, TINY.d_vae), generator=g, dtype=torch.uint8)
        b[:, :, 0] = torch.tensor([i % 2 for i in range(n)], dtype=torch.uint8)[:, None]
        bits.append(b)
    return TokenSet(captions=captions, bits=bits)


def _train(seed: int, steps: int = 12):
    tc = TransformerTrainConfig(phases=[Phase(steps, 8, 3)], warmup=2, seed=seed, lr=3e-3, log_every=1000)
    return train_transformer(_token_set(), SCHEDULE, tc, TINY, t5_kwargs={"layers": 1, "heads": 2, "d_ff": 32},
                             log=lambda s: None)


def test_training_reduces_loss_and_is_reproducible():
    model, t5, hist = _train(seed=0)
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < first - 0.02, (first, last)
    model2, t52, _ = _train(seed=0)
    for a, b in ((model, model2), (t5, t52)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    model3, _, _ = _train(seed=1, steps=2)
    assert not torch.equal(model.head.weight, model3.head.weight)


def test_bit_loss_weighs_scales_equally():
    logits = torch.zeros(1, 521, 2 * 3)
    bits = [torch.zeros(1, h * w, 3, dtype=torch.uint8) for h, w in SCHEDULE.grids]
    logits[:, 0, 0::2] = 10.0  # only the 1x1 token is confidently right (bit 0)
    loss, per_scale = bit_loss(logits, bits, SCHEDULE)
    assert per_scale[0] < 1e-3 and all(abs(v - math.log(2)) < 1e-6 for v in per_scale[1:])
    assert abs(float(loss) - 6 / 7 * math.log(2)) < 1e-4


def test_bit_loss_shape_weight_counts_shape_tokens_more():
    d, w = 3, 4.0
    logits = torch.zeros(1, 521, 2 * d)
    logits[..., 0::2] = 5.0  # every bit confidently right (the targets are all 0) ...
    bits = [torch.zeros(1, h * w_, d, dtype=torch.uint8) for h, w_ in SCHEDULE.grids]
    last = 521 - 256
    logits[0, last:last + 4, 0::2] = 0.0
    logits[0, last:last + 4, 1::2] = 10.0  # ... except 4 tokens of the last scale, confidently wrong
    focus = [torch.zeros(1, n, dtype=torch.bool) for n in SCHEDULE.tokens_per_scale]
    focus[-1][0, :4] = True  # and those 4 touch a shape
    good, bad = math.log1p(math.exp(-5.0)), math.log1p(math.exp(10.0))
    plain, per_scale = bit_loss(logits, bits, SCHEDULE)
    weighted, per_scale_w = bit_loss(logits, bits, SCHEDULE, focus, shape_weight=w)
    assert per_scale_w == per_scale  # the logged per-scale means stay plain
    assert abs(per_scale[-1] - (4 * bad + 252 * good) / 256) < 1e-4
    last_weighted = (4 * (1 + w) * bad + 252 * good) / (4 * (1 + w) + 252)
    assert abs(float(weighted) - (6 * good + last_weighted) / 7) < 1e-4
    assert float(weighted) > float(plain)
    assert float(bit_loss(logits, bits, SCHEDULE, focus, shape_weight=0.0)[0]) == float(plain)
    with pytest.raises(ValueError, match="shape_tokens"):
        bit_loss(logits, bits, SCHEDULE, None, shape_weight=w)


def test_requantize_corrects_the_history_it_is_given():
    from scalekv_core.training.quantizer import requantize
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 16, 16, generator=g)
    q = quantize_multiscale(z, SCHEDULE)
    # the latent's own bits as history: the targets are its bits
    same = requantize(z, SCHEDULE, q.bits[:-1])
    assert all(torch.equal(a, b) for a, b in zip(same, q.bits))
    # flip every bit of the 1x1 scale: scale 0's target is unchanged, scale 1's now points back the other way
    wrong = [q.bits[0] ^ 1] + q.bits[1:-1]
    fixed = requantize(z, SCHEDULE, wrong)
    assert torch.equal(fixed[0], q.bits[0])
    assert not torch.equal(fixed[1], q.bits[1])
    # and the codes summed with the corrected scale 1 end closer to the latent than with its old bits
    from scalekv_core.training.quantizer import teacher_inputs
    target = torch.nn.functional.interpolate(z, size=SCHEDULE.grids[2], mode="area").reshape(2, 4, -1).transpose(1, 2)

    def err(b1):
        return float((teacher_inputs(wrong[:1] + [b1], SCHEDULE, 3)[1] - target).square().sum())

    assert err(fixed[1]) < err(q.bits[1])
    with pytest.raises(ValueError, match="history"):
        requantize(z, SCHEDULE, q.bits + q.bits)


def test_self_correction_trains_and_is_reproducible():
    from scalekv_core.training.transformer_training import _own_history
    data = _token_set(16)
    g = torch.Generator().manual_seed(9)
    data.latents = torch.randn(16, TINY.d_vae, 16, 16, generator=g)
    data.bits = quantize_multiscale(data.latents, SCHEDULE).bits
    tc = TransformerTrainConfig(phases=[Phase(4, 8, 4)], warmup=1, seed=0, lr=3e-3, log_every=1000,
                                self_correct=0.5)
    kw = {"t5_kwargs": {"layers": 1, "heads": 2, "d_ff": 32}, "log": lambda s: None}
    m1, _, h1 = train_transformer(data, SCHEDULE, tc, TINY, **kw)
    m2, _, h2 = train_transformer(data, SCHEDULE, tc, TINY, **kw)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    # rows chosen for self-correction get the model's bits as history and re-quantized targets; the others keep theirs
    model = _random_model(0)
    cond = _text([5] * 4)
    bits = [b[:4] for b in data.bits]
    own = torch.tensor([True, False, True, False])
    history, targets = _own_history(model, cond, bits, data.latents[:4], own, SCHEDULE, 4,
                                    torch.Generator().manual_seed(0))
    assert len(history) == 4 and len(targets) == 4
    for k in range(3):
        assert torch.equal(history[k][~own], bits[k][~own]) and torch.equal(targets[k][~own], bits[k][~own])
    assert any(not torch.equal(history[k][own], bits[k][own]) for k in range(3))  # a random model errs
    from scalekv_core.training.quantizer import requantize
    assert all(torch.equal(t[own], r) for t, r in zip(targets, requantize(data.latents[:4][own], SCHEDULE,
                                                                           [h[own] for h in history[:3]])))


def test_shape_tokens_are_the_patches_a_shape_touches():
    from scalekv_core.training import shapes
    from scalekv_core.training.dataset import shape_tokens
    scene = shapes.Scene(shapes=(shapes.Shape("square", "red", "top left", "small"),), background=("blue",))
    masks = shape_tokens(scene, SCHEDULE)
    assert [m.shape[0] for m in masks] == list(SCHEDULE.tokens_per_scale)
    assert bool(masks[0][0])  # the single 1x1 token sees every shape
    assert masks[1].tolist() == [True, False, False, False]  # 2x2: only the top-left quadrant
    # 16x16: exactly the 16-pixel patches that hold a pixel of the square
    pix = shapes.shape_mask(scene.shapes[0], 256).reshape(16, 16, 16, 16).any(axis=(1, 3))
    assert 0 < pix.sum() < 40
    assert torch.equal(masks[-1].reshape(16, 16), torch.from_numpy(pix))


def test_refine_stage_from_a_saved_first_stage_equals_the_whole_run(tmp_path):
    """`stage1_from` skips the first stage only if the folder's log shows this recipe made it; same weights."""
    from safetensors.torch import load_file
    from scalekv_core.training.train_default import T5_FOLDER, TRANSFORMER_FILE, preset, train_default

    def with_refine(seed: int = 0):
        r = preset("smoke", seed)
        r.refine = TransformerTrainConfig(phases=[Phase(2, 2, 7)], warmup=1, shape_weight=2.0, log_every=1,
                                          seed=seed + 1)
        return r

    quiet = {"threads": 1, "log": lambda s: None}
    whole = train_default(tmp_path / "whole", with_refine(), cache=tmp_path / "cache", **quiet)
    assert "refine_s" in whole["seconds"] and len(whole["refine_history"]) == 2
    train_default(tmp_path / "first", preset("smoke"), **quiet)
    # the cached token set (written by the whole run) must carry the shape tokens the refine stage weighs
    resumed = train_default(tmp_path / "resumed", with_refine(), stage1_from=tmp_path / "first",
                            cache=tmp_path / "cache", **quiet)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert resumed["stage1_from"] == str(tmp_path / "first")
    first = load_file(str(tmp_path / "first" / TRANSFORMER_FILE))
    for name in (TRANSFORMER_FILE, T5_FOLDER / "model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(first["head.weight"], load_file(str(tmp_path / "whole" / TRANSFORMER_FILE))["head.weight"])
    with pytest.raises(ValueError, match="'seed'"):
        train_default(tmp_path / "other", with_refine(seed=3), stage1_from=tmp_path / "first", **quiet)
    with pytest.raises(FileNotFoundError, match="no training log"):
        train_default(tmp_path / "other", with_refine(), stage1_from=tmp_path / "nothing", **quiet)


def test_smoke_recipe_writes_loadable_files(tmp_path):
    """The whole recipe in seconds: files in the users' layout that InfinityPipeline.from_files loads and runs."""
    from scalekv_core.pipeline import InfinityPipeline
    from scalekv_core.training.train_default import T5_FOLDER, TRANSFORMER_FILE, VAE_FILE, preset, train_default
    record = train_default(tmp_path, preset("smoke"), threads=1, log=lambda s: None)
    assert record["seconds"]["total_s"] > 0
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    pipe = InfinityPipeline.from_files(tmp_path / TRANSFORMER_FILE, tmp_path / VAE_FILE, tmp_path / T5_FOLDER)
    res = pipe.generate("a large red circle at the top left on a blue background", width=256, height=256, seed=1)
    assert res.images.shape == (1, 256, 256, 3)
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / T5_FOLDER / name).is_file()


def test_colour_codec_init_round_trips_colours():
    """The constructed VAE decodes the multi-scale quantized latent back to the scenes' colours."""
    from scalekv_core.training import shapes
    from scalekv_core.training.prompt_following import check_image
    from scalekv_core.training.vae_init import colour_codec_init
    from scalekv_core.training.vae_training import DEFAULT_VAE, init_vae, reconstruct
    vae = colour_codec_init(init_vae(DEFAULT_VAE, 0)).eval()
    scene_list = shapes.scenes(4, seed=0, split="heldout")
    images = np.stack([shapes.render(s) for s in scene_list])
    rec = reconstruct(vae, images, SCHEDULE)
    checks = [c for s, img in zip(scene_list, rec) for c in check_image(s, img)]
    assert sum(c.ok for c in checks) / len(checks) >= 0.75, checks
    # and a random VAE of the same shape does not: the construction is what carries the colour
    rand = init_vae(DEFAULT_VAE, 0).eval()
    rec = reconstruct(rand, images, SCHEDULE)
    checks = [c for s, img in zip(scene_list, rec) for c in check_image(s, img)]
    assert sum(c.ok for c in checks) / len(checks) < 0.5
