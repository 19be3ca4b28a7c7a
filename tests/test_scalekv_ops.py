"""ScaleKV's lean step (issue 22): canvas pooling equals pooling inside each token map, device-built tables equal the
host ones, and one row buffer moves keys, values and ids together. Fast, no model."""
from __future__ import annotations

import pytest
import torch

from scalekv_core.kvcache.cache import KVCache, RowLayout
from scalekv_core.kvcache.policies.base import StepContext
from scalekv_core.kvcache.policies import scalekv as scalekv_policy
from scalekv_core.kvcache.policies.scalekv import ScaleKV
from scalekv_core.kvcache.scoring import grid_window, pool_in_canvas, schedule_tables
from scalekv_core.schedules import get_schedule

SCHEDULES = [get_schedule(1.0, "0.06M"), get_schedule(1.0, "0.25M"), get_schedule(1.0, "1M"),
             get_schedule(0.5, "0.25M")]


def _reference_pool(scores: torch.Tensor, positions: torch.Tensor, grids: list[tuple[int, int]], kernel: int,
                    pooling: str) -> torch.Tensor:
    """The previous implementation: a (L+1, k²) table of absolute neighbour positions, looked up per token."""
    L = sum(h * w for h, w in grids)
    r = kernel // 2
    offs = torch.arange(-r, r + 1)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)
    parts, start = [], 0
    for h, w in grids:
        y = torch.arange(h).repeat_interleave(w)[:, None] + dy
        x = torch.arange(w).repeat(h)[:, None] + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        parts.append(torch.where(inside, start + y * w + x, torch.full_like(y, L)))
        start += h * w
    parts.append(torch.full((1, dy.numel()), L, dtype=torch.long))
    table = torch.cat(parts)
    B, H, T = scores.shape
    canvas = scores.new_full((B, H, L + 1), -torch.inf if pooling == "maxpool" else 0.0)
    canvas.scatter_(-1, positions, scores)
    nbr = table[positions]
    vals = canvas.gather(-1, nbr.reshape(B, H, -1)).reshape(B, H, T, -1)
    if pooling == "maxpool":
        return vals.amax(-1)
    present = torch.zeros_like(canvas, dtype=torch.bool)
    present.scatter_(-1, positions, True)
    count = present.gather(-1, nbr.reshape(B, H, -1)).reshape(B, H, T, -1).sum(-1).clamp_min(1)
    return vals.sum(-1) / count


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("kernel", [2, 3, 5, 7])
@pytest.mark.parametrize("schedule", SCHEDULES[:2] + SCHEDULES[3:], ids=["0.06M", "0.25M", "aspect0.5"])
def test_canvas_pooling_equals_pooling_inside_each_map(schedule, kernel: int, pooling: str) -> None:  # noqa: ANN001
    """Same values, bit for bit, for any subset of tokens still present (kept tokens are in position order)."""
    g = torch.Generator().manual_seed(kernel)
    B, H = 2, 3
    for scale in range(1, schedule.num_scales):
        grids = list(schedule.grids[: scale + 1])
        L = sum(h * w for h, w in grids)
        T = max(1, int(L * 0.4))
        positions = torch.stack([torch.randperm(L, generator=g)[:T].sort().values for _ in range(B * H)]).view(B, H, T)
        scores = torch.rand(B, H, T, generator=g)
        tables = schedule_tables(tuple(schedule.grids), 4, kernel, pooling, B, H, "cpu")
        got = pool_in_canvas(scores, tables.slots[positions], tables, scale, pooling)
        want = _reference_pool(scores, positions, grids, kernel, pooling)
        assert torch.equal(got, want), (scale, kernel, pooling)


@pytest.mark.parametrize("window", [4, 9, 16])
def test_device_windows_equal_the_host_grid_windows(window: int) -> None:
    for schedule in SCHEDULES:
        tables = schedule_tables(tuple(schedule.grids), window, 5, "maxpool", 1, 1, "cpu")
        for (h, w), got in zip(schedule.grids, tables.windows):
            assert got.tolist() == grid_window(h, w, window), (h, w)


def test_tables_build_on_the_device_without_host_data() -> None:
    """Built on meta (no values exist there): a table made on the host and copied over could not be."""
    schedule_tables.cache_clear()
    tables = schedule_tables(tuple(SCHEDULES[2].grids), 16, 5, "maxpool", 2, 16, "meta")
    assert tables.slots.device.type == "meta" and tables.slots.numel() == sum(SCHEDULES[2].tokens_per_scale)
    assert all(w.device.type == "meta" for w in tables.windows)
    schedule_tables.cache_clear()


def test_row_layout_views_do_not_overlap_and_rows_stay_aligned() -> None:
    lay = RowLayout([("k", torch.float32, 128), ("v", torch.bfloat16, 128), ("id", torch.int32, 1)], 16)
    assert lay.row_bytes == 784 and lay.row_bytes % 16 == 0  # 772 bytes of data, padded for attention's loads
    raw = torch.zeros(2, 3, 5, lay.units, dtype=lay.unit)
    k, v, ids = lay.view(raw, "k"), lay.view(raw, "v"), lay.view(raw, "id")
    k.fill_(1.5)
    v.fill_(-2.0)
    ids.fill_(7)
    assert (k == 1.5).all() and (v == -2.0).all() and (ids == 7).all()
    assert k.shape == (2, 3, 5, 128) and v.shape == (2, 3, 5, 128) and ids.shape == (2, 3, 5, 1)


@pytest.mark.parametrize("k_dtype,v_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.int8, torch.int8), (torch.float8_e4m3fn, torch.float8_e4m3fn)])
def test_one_gather_keeps_keys_values_and_ids_together(k_dtype: torch.dtype, v_dtype: torch.dtype) -> None:
    """Through a real cache: after every eviction the stored ids are the canvas cells of the kept positions, in
    order, and the stored keys are the kept ones."""
    sched = SCHEDULES[0]
    policy = ScaleKV(budget=12, window=4, kernel=3)
    kept: dict[tuple[int, int], torch.Tensor] = {}
    B, H, c, layers = 1, 2, 8, 2
    cache = KVCache(policy.plan(sched, layers), policy, sched, B, H, c, k_dtype=k_dtype, v_dtype=v_dtype,
                    record_kept=lambda s, l, idx: kept.__setitem__((s, l), idx))
    slots = policy.token_ids()
    history = [torch.empty(B, H, 0, dtype=torch.long)] * layers
    g = torch.Generator().manual_seed(0)
    for si, n in enumerate(sched.tokens_per_scale[:-1]):
        cache.begin_scale(si)
        start = sched.offsets[si]
        for layer in range(layers):
            k, v = cache.new_slots(layer, n)
            k.copy_(torch.nn.functional.normalize(torch.randn(B, H, n, c, generator=g), dim=-1))
            v.copy_(torch.randn(B, H, n, c, generator=g))
            cache.attend(layer, torch.randn(B, H, n, c, generator=g), torch.float32)
            pos = torch.cat([history[layer], torch.arange(start, start + n).expand(B, H, n)], dim=2)
            if (si, layer) in kept:
                pos = pos.gather(2, kept[(si, layer)])
            history[layer] = pos
            assert torch.equal(cache.positions[layer][:, :, :pos.shape[2]], slots[pos]), (si, layer)
        cache.end_scale()
    assert kept, "the budget must make layers evict"


def test_improved_selection_reads_device_tables_only() -> None:
    """select() works from the tables prepare() made; a policy used outside a cache builds them on first use."""
    sched = SCHEDULES[0]
    policy = ScaleKV(budget=12, window=4, kernel=3)
    si = 4
    n = sched.tokens_per_scale[si]
    total = sched.offsets[si] + n
    keys = torch.nn.functional.normalize(torch.randn(1, 2, total, 8), dim=-1)
    q = torch.randn(1, 2, n, 8)
    policy.prepare(sched, 1, 2, torch.device("cpu"))
    ctx = StepContext(layer=0, scale=si, schedule=sched, stored=total - n, q=q,
                      positions=policy.token_ids()[:total].expand(1, 2, total))
    with pytest.MonkeyPatch.context() as mp:  # after prepare(), select() builds no table
        mp.setattr(scalekv_policy, "schedule_tables", lambda *a, **k: pytest.fail("select() built tables"))
        idx = policy.select(ctx, keys, 12)
    assert idx.shape == (1, 2, 12) and (idx[..., 1:] > idx[..., :-1]).all()
    fresh = ScaleKV(budget=12, window=4, kernel=3)  # outside a cache, never prepared: builds them on first use
    assert fresh.token_ids() is None
    assert torch.equal(fresh.select(ctx, keys, 12), idx) and fresh.token_ids() is not None


def _evicting_run(cache: KVCache, sched, layers: int, B: int, H: int, c: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    for si, n in enumerate(sched.tokens_per_scale):
        cache.begin_scale(si)
        for layer in range(layers):
            k, v = cache.new_slots(layer, n)
            k.copy_(torch.nn.functional.normalize(torch.randn(B, H, n, c, generator=g), dim=-1))
            v.copy_(torch.randn(B, H, n, c, generator=g))
            cache.attend(layer, torch.randn(B, H, n, c, generator=g), torch.float32)
        cache.end_scale()


def test_eviction_reads_no_clock_unless_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With timing off no step calls the host clock (a host call inside a step breaks CUDA graphs and
    torch.compile); with it on, eviction time is measured."""
    import scalekv_core.kvcache.cache as cache_mod

    calls = []

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            calls.append(1)
            return float(len(calls))

    monkeypatch.setattr(cache_mod, "time", Clock)
    sched, B, H, c, layers = SCHEDULES[0], 1, 2, 8, 2
    for timed in (False, True):
        policy = ScaleKV(budget=12, window=4, kernel=3)
        cache = KVCache(policy.plan(sched, layers), policy, sched, B, H, c)
        cache.time_eviction = timed
        _evicting_run(cache, sched, layers, B, H, c)
        if timed:
            assert calls and cache.eviction_seconds > 0
        else:
            assert calls == [] and cache.eviction_seconds == 0.0


@pytest.mark.parametrize("forced", [0, 3])
def test_topk_keep_gives_the_best_scored_in_position_order(forced: int) -> None:
    """Against a reference by hand: rank every position by score (distinct scores), take the best, sort them."""
    from scalekv_core.kvcache.policies.base import topk_keep

    g = torch.Generator().manual_seed(2)
    B, H, T, keep = 2, 3, 300, 40
    scores = torch.randperm(B * H * T, generator=g).float().view(B, H, T)  # distinct: one right answer
    force = torch.arange(T - forced, T).expand(B, H, forced)
    if forced:
        scores[..., T - forced:] = -torch.inf
    got = topk_keep(scores, keep, force if forced else None)
    for b in range(B):
        for h in range(H):
            row = scores[b, h].tolist()
            best = sorted(range(T), key=lambda i: -row[i])[:keep - forced]
            assert got[b, h].tolist() == sorted(best + list(range(T - forced, T)))
