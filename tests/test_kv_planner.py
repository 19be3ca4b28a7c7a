"""The memory planner counts the cache's bytes as the cache allocates them: padded rows with ids, workspace and
staging, for every storage format, so a plan never under-counts what a run holds (issue 20)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.cache import KVCache
from scalekv_core.kvcache.config import KV_DTYPES
from scalekv_core.kvcache.memory import KINETO_LOG_LEVEL_ENV, MiB, _peak_from_profile, plan_memory
from scalekv_core.schedules import get_schedule

SCHEDULE = get_schedule(1.0, "0.25M")
DEPTH, HEADS, HEAD_DIM, FFN, D_VAE = 3, 2, 8, 64, 8
ROWS = 2  # one image with CFG
BLOCK = torch.bfloat16

#: Called at each point of a run with (scale, layer or None, what just happened).
Probe = Callable[[int, int | None, str], None]
Inputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _make_cache(config: CacheConfig, block_dtype: torch.dtype) -> KVCache:
    """A real CPU cache for the test's shapes, as the sampler builds it."""
    policy, plan = config.build(SCHEDULE, DEPTH, HEADS, HEAD_DIM, ROWS, block_dtype)
    k_dtype, v_dtype = config.storage_dtypes(block_dtype)
    return KVCache(plan, policy, SCHEDULE, ROWS, HEADS, HEAD_DIM, "cpu", k_dtype, v_dtype)


def _inputs() -> Inputs:
    """Every scale's keys, values and queries, made up front so a measured run allocates none of them."""
    torch.manual_seed(0)
    return [(torch.nn.functional.normalize(torch.randn(ROWS, HEADS, n, HEAD_DIM), dim=-1),
             torch.randn(ROWS, HEADS, n, HEAD_DIM), torch.randn(ROWS, HEADS, n, HEAD_DIM))
            for n in SCHEDULE.tokens_per_scale]


def _drive(cache: KVCache, inputs: Inputs, probe: Probe) -> None:
    """A generation's cache steps (every scale, every layer), calling `probe` after each of them."""
    for si, n in enumerate(SCHEDULE.tokens_per_scale):
        k_in, v_in, q = inputs[si]
        probe(si, None, "start")
        cache.begin_scale(si)
        probe(si, None, "begin_scale")
        for layer in range(DEPTH):
            k, v = cache.new_slots(layer, n)
            probe(si, layer, "new_slots")
            k.copy_(k_in)
            v.copy_(v_in)
            cache.attend(layer, q, torch.float32)
            probe(si, layer, "attend")
        cache.end_scale()
        probe(si, None, "end_scale")


def _run(config: CacheConfig, block_dtype: torch.dtype) -> tuple[KVCache, list[int]]:
    """Drive a real cache through a generation's steps; the most bytes its tensors hold at any point, per scale."""
    cache = _make_cache(config, block_dtype)
    peaks = [0] * SCHEDULE.num_scales

    def probe(si: int, layer: int | None, what: str) -> None:
        peaks[si] = max(peaks[si], cache.nbytes())

    _drive(cache, _inputs(), probe)
    return cache, peaks


@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_planned_cache_bytes_equal_a_real_run(policy: str, kv_dtype: str) -> None:
    block = BLOCK
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


# ------------------------------------------------------------------ what the allocator really holds


def _cache_storages(cache: KVCache) -> set[int]:
    """Base addresses of every storage the cache references now (buffers, their field views, workspace, staging)."""
    tensors: list[torch.Tensor | None] = [*cache.rows, *cache.keys, *cache.values, *cache.positions,
                                          *cache.k_scales, *cache.v_scales, cache._ws_raw, cache._ws_pos]
    for pair in (cache._ws, cache._ws_scales, cache._stage):
        tensors += list(pair or ())
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.untyped_storage().nbytes()}


@dataclass
class _Block:
    """One CPU allocation seen by the profiler: its address, size and lifetime (profiler clock, ns)."""

    ptr: int
    nbytes: int
    born: int
    freed: float  # math.inf while still alive when the trace stopped


@dataclass
class _Point:
    """A probe point: where the run was, when (profiler clock), and which storages the cache held then."""

    scale: int
    layer: int | None
    what: str
    t: int
    storages: set[int]


def _cache_allocator_peaks(config: CacheConfig, block_dtype: torch.dtype) -> tuple[list[int], list[str], int]:
    """Run the cache under the profiler's allocator events (as PeakMeter measures on CPU); per scale, the most bytes
    held at once by allocations that the cache referenced at some probe point, with where that peak was reached;
    and the peak of all allocations (the test's inputs are made before the trace, so they are in neither)."""
    cache = _make_cache(config, block_dtype)
    inputs = _inputs()
    marks: list[tuple[int, int | None, str, set[int]]] = []

    def probe(si: int, layer: int | None, what: str) -> None:
        with record_function(f"kvplanner-probe-{len(marks)}"):
            pass
        marks.append((si, layer, what, _cache_storages(cache)))

    os.environ.setdefault(KINETO_LOG_LEVEL_ENV, "6")  # as PeakMeter: keep Kineto's start/stop lines off stdout
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _drive(cache, inputs, probe)
    all_peak = _peak_from_profile(prof)  # PeakMeter's CPU figure: every allocation, the cache's and temporaries

    def dfs(nodes: list) -> list:
        out = []
        for node in nodes:
            out.append(node)
            out += dfs(node.children)
        return out

    events = sorted(dfs(prof.profiler.kineto_results.experimental_event_tree()), key=lambda e: e.start_time_ns)
    times: dict[int, int] = {}
    blocks: list[_Block] = []
    live: dict[int, _Block] = {}
    deltas: list[tuple[int, int]] = []
    for e in events:
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            f = e.typed[1]
            deltas.append((e.start_time_ns, f.alloc_size))
            if f.alloc_size > 0:
                live[f.ptr] = _Block(f.ptr, f.alloc_size, e.start_time_ns, math.inf)
                blocks.append(live[f.ptr])
            elif f.ptr in live:
                live.pop(f.ptr).freed = e.start_time_ns
        elif e.name.startswith("kvplanner-probe-"):
            times[int(e.name.rsplit("-", 1)[1])] = e.start_time_ns
    # The event tree sees the same allocator events PeakMeter sums (a check on the parsing below).
    cur = every = 0
    for _, d in sorted(deltas):
        cur += d
        every = max(every, cur)
    assert every == all_peak

    points = [_Point(si, layer, what, times[i], storages) for i, (si, layer, what, storages) in enumerate(marks)]
    owned: dict[int, _Block] = {}  # id(block) -> block, for every allocation the cache held at a probe point
    for p in points:
        for ptr in p.storages:
            match = [b for b in blocks if b.ptr == ptr and b.born <= p.t < b.freed]
            assert len(match) == 1, f"storage {ptr:#x} held at {p} has no allocation in the trace"
            owned[id(match[0])] = match[0]
    steps = sorted([(b.born, b.nbytes) for b in owned.values()]
                   + [(int(b.freed), -b.nbytes) for b in owned.values() if b.freed != math.inf])

    peaks, where = [], []
    level, i = 0, 0
    for si in range(SCHEDULE.num_scales):
        scale_points = [p for p in points if p.scale == si]
        start, end = scale_points[0].t, scale_points[-1].t
        while i < len(steps) and steps[i][0] < start:
            level += steps[i][1]
            i += 1
        peak, at = level, start
        while i < len(steps) and steps[i][0] <= end:
            level += steps[i][1]
            if level > peak:
                peak, at = level, steps[i][0]
            i += 1
        peaks.append(peak)
        step = next((p for p in scale_points if p.t > at), None)  # the call that was running at the peak
        where.append(f"scale {si}: {peak} B, " + (
            f"reached in {step.what}" + (f" of layer {step.layer}" if step.layer is not None else "")
            if step is not None and at > start else "held when the scale began"))
    cache.release()
    return peaks, where, all_peak


@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_planned_cache_peak_bounds_the_allocator(policy: str, kv_dtype: str) -> None:
    """nbytes() sees only the cache's own references; the allocator also sees an old buffer a local still holds,
    so the plan's per-scale cache peak (last scale included) is checked against the allocator's own events."""
    config = CacheConfig(policy=policy, budget="10%", window=4, kv_dtype=kv_dtype)
    measured, where, all_peak = _cache_allocator_peaks(config, BLOCK)
    planned = plan_memory(DEPTH, HEADS * HEAD_DIM, HEADS, FFN, D_VAE, SCHEDULE, 1, config, BLOCK)
    planned_bytes = [round(mb * MiB) for mb in planned.per_scale_cache_mb]
    over = [w + f" > planned {p} B (+{m - p} B)" for m, p, w in zip(measured, planned_bytes, where) if m > p]
    assert not over, "the allocator held more cache memory than planned:\n" + "\n".join(over)
    # The plan is exact, not only a bound: each scale's planned bytes are all allocated at once at some point.
    assert measured == planned_bytes, "\n".join(where)
    assert max(measured) == round(planned.cache_peak_mb * MiB)
    assert all_peak >= max(measured)  # the cache's allocations are a part of everything the run allocated


def test_scalekv_rows_carry_ids_and_padding_full_rows_do_not() -> None:
    """ScaleKV's rows hold keys, values and an int32 id padded to 16 bytes; full's hold keys and values only.
    Counted by hand, head dim 8, auto storage: ScaleKV fp32 keys and bf16 values, 32 + 16 (+ 4 -> 52 -> 64 with an
    id); full bf16 keys and values, 16 + 16."""
    block = torch.bfloat16
    for policy, row, data in (("full", 32, 32), ("scalekv", 64, 48)):
        config = CacheConfig(policy=policy, budget="10%", window=4)
        cache, _ = _run(config, block)
        assert cache.row_token_bytes == ROWS * HEADS * row
        assert cache.token_bytes == ROWS * HEADS * data  # the stored data a budget divides by has no padding


@pytest.mark.parametrize("sampling_mb, decode_mb, advice, not_advised", [
    (1024.0, 4096.0, "decode in tiles (decode_tile, e.g. 32) or lower the batch (now 3)", "ScaleKV budget"),
    (4096.0, 1024.0, "lower the batch (now 3), the resolution or the ScaleKV budget", "decode_tile"),
])
def test_admission_advises_what_lowers_the_phase_that_sets_the_peak(sampling_mb, decode_mb, advice,
                                                                    not_advised) -> None:
    """A decode-bound run is told to tile the decode (the ScaleKV budget cannot help it), a sampling-bound one to
    lower the batch, resolution or budget; figures in GiB, as computed."""
    from scalekv_core.kvcache.memory import MiB, admission_problem

    message = admission_problem(sampling_mb, decode_mb, 2048 * MiB, "cuda:0", 3)
    assert advice in message and not_advised not in message
    assert "need 4.0 GiB" in message and "only 2.0 GiB free" in message
    assert admission_problem(sampling_mb, decode_mb, 4096 * MiB, "cuda:0", 3) is None
    tiled = admission_problem(sampling_mb, decode_mb, 2048 * MiB, "cuda:0", 3, decode_tile=32,
                              tile_field="--decode-tile")
    if decode_mb > sampling_mb:  # already tiled: a smaller tile, named as the caller names it
        assert "decode in smaller tiles (--decode-tile now 32, e.g. 16)" in tiled
