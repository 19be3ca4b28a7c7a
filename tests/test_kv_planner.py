"""The memory planner counts the cache's bytes as the cache allocates them: padded rows with ids, workspace and
staging, for every storage format, so a plan never under-counts what a run holds (issue 20)."""
from __future__ import annotations

import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.cache import KVCache
from scalekv_core.kvcache.config import KV_DTYPES
from scalekv_core.kvcache.memory import MiB, plan_memory
from scalekv_core.schedules import get_schedule

SCHEDULE = get_schedule(1.0, "0.25M")
DEPTH, HEADS, HEAD_DIM, FFN, D_VAE = 3, 2, 8, 64, 8
ROWS = 2  # one image with CFG


def _run(config: CacheConfig, block_dtype: torch.dtype) -> tuple[KVCache, list[int]]:
    """Drive a real cache through a generation's steps; the most bytes its tensors hold at any point, per scale."""
    torch.manual_seed(0)
    policy, plan = config.build(SCHEDULE, DEPTH, HEADS, HEAD_DIM, ROWS, block_dtype)
    k_dtype, v_dtype = config.storage_dtypes(block_dtype)
    cache = KVCache(plan, policy, SCHEDULE, ROWS, HEADS, HEAD_DIM, "cpu", k_dtype, v_dtype)
    peaks = []
    for si, n in enumerate(SCHEDULE.tokens_per_scale):
        cache.begin_scale(si)
        peak = cache.nbytes()
        for layer in range(DEPTH):
            k, v = cache.new_slots(layer, n)
            peak = max(peak, cache.nbytes())
            k.copy_(torch.nn.functional.normalize(torch.randn(k.shape), dim=-1))
            v.copy_(torch.randn(v.shape))
            cache.attend(layer, torch.randn(ROWS, HEADS, n, HEAD_DIM), torch.float32)
            peak = max(peak, cache.nbytes())
        cache.end_scale()
        peaks.append(peak)
    return cache, peaks


@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_planned_cache_bytes_equal_a_real_run(policy: str, kv_dtype: str) -> None:
    block = torch.bfloat16
    config = CacheConfig(policy=policy, budget="10%", window=4, kv_dtype=kv_dtype)
    cache, measured = _run(config, block)
    planned = plan_memory(DEPTH, HEADS * HEAD_DIM, HEADS, FFN, D_VAE, SCHEDULE, 1, config, block)
    assert [round(mb * MiB) for mb in planned.per_scale_cache_mb] == measured
    assert round(planned.cache_peak_mb * MiB) == max(measured)
    # Stored bytes: the data the budget counts, at the scale that holds the most.
    stored = max(sum(u.stored_bytes) for u in cache.usage)
    assert round(planned.analytic_mb * MiB) == stored
    # What the cache reports allocating after each scale is what its tensors take.
    assert sum(cache.usage[-2].allocated_bytes) + cache.usage[-2].workspace_bytes <= measured[-2]


def test_scalekv_rows_carry_ids_and_padding_full_rows_do_not() -> None:
    """ScaleKV's rows hold keys, values and an int32 id padded to 16 bytes; full's hold keys and values only.
    Counted by hand for fp32 keys and bf16 values, head dim 8: 32 + 16 (+ 4 -> 52 -> 64 with an id)."""
    block = torch.bfloat16
    for policy, row in (("full", 48), ("scalekv", 64)):
        config = CacheConfig(policy=policy, budget="10%", window=4)
        cache, _ = _run(config, block)
        assert cache.row_token_bytes == ROWS * HEADS * row
        assert cache.token_bytes == ROWS * HEADS * 48  # the stored data a budget divides by has no padding
