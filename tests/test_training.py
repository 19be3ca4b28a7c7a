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


def test_smoke_recipe_writes_loadable_files(tmp_path):
    """The whole recipe in seconds: files in the users' layout that InfinityPipeline.from_files loads and runs."""
    from scalekv_core.pipeline import InfinityPipeline
    from scalekv_core.training.train_default import T5_FOLDER, TRANSFORMER_FILE, VAE_FILE, preset, train_default
    record = train_default(tmp_path, preset("smoke"), threads=1, log=lambda s: None)
    assert record["seconds"]["total_s"] > 0
    pipe = InfinityPipeline.from_files(tmp_path / TRANSFORMER_FILE, tmp_path / VAE_FILE, tmp_path / T5_FOLDER)
    res = pipe.generate("a large red circle at the top left on a blue background", width=256, height=256, seed=1)
    assert res.images.shape == (1, 256, 256, 3)
    for name in ("config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
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
