"""With the full cache a generation never makes the host wait for the device (issue 22): the launch census on meta
sees every host read and host-to-device copy, and the one multinomial check it cannot see is gone from sampling."""
from __future__ import annotations

import pytest
import torch

from scalekv_core.bench.launches import Census, run_census
from scalekv_core.kvcache import CacheConfig
from scalekv_core.model.config import InfinityConfig
from scalekv_core.model.transformer import Infinity
from scalekv_core.sampler import SamplerSettings, sample, sample_bits
from scalekv_core.schedules import get_schedule

from helpers_tiny import make_tiny_transformer_state, random_text

#: Narrow, but every path of the 2B's: QKV and FFN slices at scales 10-12, CFG, bf16 blocks.
TINY = InfinityConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=2, ffn_hidden=256, text_channels=64,
                      text_maxlen=64, pool_heads=2, d_vae=32)
SCHEDULE = get_schedule(1.0, "1M")


@pytest.fixture(scope="module")
def first() -> Census:
    return run_census(TINY, SCHEDULE, CacheConfig(policy="full"), device="meta")


def test_first_generation_only_copies_the_rope_table_once(first: Census) -> None:
    """The model builds its RoPE table on the host and copies it once per schedule, in setup; nothing else."""
    assert [(s["phase"], s["op"]) for s in first.syncs] == [("setup", "_to_copy")], first.syncs


def test_second_generation_has_no_host_sync_or_host_work() -> None:
    """Once the model holds the table, a whole generation (setup, every scale, sampling) never waits for the device
    and runs nothing on the host."""
    warm = run_census(TINY, SCHEDULE, CacheConfig(policy="full"), device="meta", warm=True)
    assert warm.syncs == []
    assert not any(warm.host_ops.values())
    assert warm.total() > 1000


def test_sampling_has_no_multinomial(first: Census) -> None:
    """torch.multinomial reads two values back to validate its input (its meta kernel does not show it)."""
    assert first.by_op()["multinomial"] == 0
    assert first.by_op("sample")["exponential_"] == SCHEDULE.num_scales


def _multinomial_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """The sampler as it was before issue 22: top-k, top-p, then torch.multinomial (the original's draw)."""
    B, L, V = logits.shape
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(order.ndim - 1, order, drop), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, L)


@pytest.mark.parametrize("shape,top_k,top_p", [((1, 4, 2), 900, 0.97), ((2, 300, 2), 900, 0.97),
                                               ((1, 64, 13), 5, 0.9), ((3, 17, 50), 0, 0.0), ((1, 9, 7), 2, 0.0)])
def test_sample_bits_draws_what_multinomial_draws(shape: tuple[int, int, int], top_k: int, top_p: float) -> None:
    """Same draws and the same generator state afterwards, over many seeds and logit scales."""
    for seed in range(40):
        logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * (seed % 5 + 0.1)
        ours, ref = torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(1000 + seed)
        got = sample_bits(logits.clone(), top_k, top_p, ours)
        want = _multinomial_bits(logits.clone(), top_k, top_p, ref)
        assert torch.equal(got, want), seed
        assert torch.equal(ours.get_state(), ref.get_state()), seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not yet run on one)")
def test_cuda_second_generation_never_synchronizes() -> None:
    """On a GPU, under torch's sync debug mode, a second generation with the text on the device runs through."""
    model = Infinity(TINY)
    model.load_state_dict(make_tiny_transformer_state(TINY, seed=5))
    model = model.set_block_dtype(torch.bfloat16).eval().requires_grad_(False).to("cuda")
    cond = random_text(9, TINY.text_channels).to("cuda")
    settings = SamplerSettings(seed=0)
    first_bits = sample(model, cond, SCHEDULE, settings, vae_patchify=False).bits  # copies the RoPE table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(model, cond, SCHEDULE, settings, vae_patchify=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(out.bits, first_bits))
