"""ScaleKV calibration: ASI measurement against a by-hand recomputation, drafter ranking, and the written budget file."""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.budget import load_budget_file
from scalekv_core.kvcache.calibration import (AsiTable, calibrate, compressing_scales, measure_asi, query_rows,
                                              select_drafters)
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.sampler import SamplerSettings, sample
from scalekv_core.schedules import get_schedule

TINY = pathlib.Path(__file__).parent / "data" / "infinity-tiny"
S006 = get_schedule(1.0, "0.06M")  # 7 scales: 1, 4, 16, 36, 64, 144, 256 tokens
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
BUDGET = 48  # cumulative 57 > 48 from scale 3: scales 3, 4, 5 compress


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                       TINY / "t5_tiny")


@pytest.fixture(scope="module")
def result(pipe):
    return calibrate(pipe, PROMPTS, S006, BUDGET, seed=0)


def test_table_shape_and_ranges(result, pipe):
    t = result.table
    layers = pipe.transformer.cfg.depth
    assert (t.num_scales, t.num_layers) == (S006.num_scales, layers) == (7, 4)
    for grid in (t.current, t.history, t.asi):
        assert len(grid) == 7 and all(len(row) == layers for row in grid)
    for s in range(7):
        for l in range(layers):
            c, h = t.current[s][l], t.history[s][l]
            assert 0.0 <= c <= 1.0 + 1e-6 and 0.0 <= h <= 1.0 + 1e-6
            assert c + h <= 1.0 + 1e-5  # top-K history mass and current mass are disjoint parts of one softmax
            assert t.asi[s][l] == pytest.approx(c * h)
    assert t.history[0] == [0.0] * layers and t.current[0] == pytest.approx([1.0] * layers)
    assert any(h > 0 for row in t.history[1:] for h in row)
    assert t.combine == "product"
    assert AsiTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def _by_hand(q: torch.Tensor, keys: torch.Tensor, stored: int, rows: list[int], frac: float) -> tuple[float, float]:
    """Loop over heads and queries in float64; only batch row 0 (the conditional branch of the CFG pair)."""
    cur, hist, count = 0.0, 0.0, 0
    for h in range(q.shape[1]):
        for i in rows:
            a = torch.softmax(q[0, h, i].double() @ keys[0, h].double().T, dim=0)
            cur += float(a[stored:].sum())
            if stored:
                k = max(1, math.ceil(round(frac * stored, 9)))
                hist += float(sum(sorted(a[:stored].tolist(), reverse=True)[:k]))
            count += 1
    return cur / count, hist / count


def test_measurement_matches_hand_computation(pipe):
    captured = {}

    def grab(scale, layer, q, keys, stored):
        if (scale, layer) in ((3, 1), (5, 2)):
            captured[scale, layer] = (q.clone(), keys.clone(), stored)

    cond = pipe.encode(PROMPTS[:1])
    sample(pipe.transformer, cond, S006, SamplerSettings(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=5),
           pipe.vae_patchify, cache_config=CacheConfig(policy="full"), observer=grab)
    table = measure_asi(pipe, PROMPTS[:1], S006, seed=5, max_queries=64, topk_fraction=0.1)
    q, keys, stored = captured[3, 1]
    assert q.shape[0] == 2 and stored == 21 and keys.shape[2] == 57  # CFG pair; 1+4+16 history, 36 current
    # scale 3 has 36 <= 64 queries: every query counts, no subsampling to agree on
    cur, hist = _by_hand(q, keys, stored, list(range(36)), 0.1)
    assert table.current[3][1] == pytest.approx(cur, abs=1e-5)
    assert table.history[3][1] == pytest.approx(hist, abs=1e-5)
    # scale 5 has 144 queries: 64 evenly spaced ones
    q, keys, stored = captured[5, 2]
    rows = [(2 * i + 1) * 144 // 128 for i in range(64)]  # centres of 64 equal segments: 1, 3, 5, 7, 10, ...
    assert query_rows(144, 64) == rows and rows[:5] == [1, 3, 5, 7, 10] and rows[-1] == 142
    cur, hist = _by_hand(q, keys, stored, rows, 0.1)
    assert table.current[5][2] == pytest.approx(cur, abs=1e-5)
    assert table.history[5][2] == pytest.approx(hist, abs=1e-5)
    # the unconditional rows attend differently, so measuring them too would be caught above
    q1 = q[1:2]
    assert _by_hand(q1, keys[1:2], stored, rows, 0.1) != pytest.approx((cur, hist), abs=1e-5)


def test_write_load_and_sample_with_calibrated_file(result, pipe, tmp_path):
    layers = pipe.transformer.cfg.depth
    budget_path, side = result.write(tmp_path / "tiny_calibrated.json")
    assert side.name == "tiny_calibrated.asi.json"
    data = json.loads(budget_path.read_text())
    assert sorted(data) == ["Scale 5", "Scale 6", "Scale 7"]  # compressing 0-based scales 3, 4, 5
    assert compressing_scales(S006, BUDGET) == [3, 4, 5]
    for si in (3, 4, 5):
        entry = data[f"Scale {si + 2}"]
        assert [l for l in range(layers) if entry[f"Block {l}"] == 1] == result.drafters[si]
        assert entry["High"] == len(result.drafters[si]) >= 1
    assert result.drafters[:3] == [[], [], []] and result.drafters[6] == []
    loaded = load_budget_file(budget_path, S006, layers, base_capacity=BUDGET)
    assert loaded.kept == result.plan.kept
    meta = json.loads(side.read_text())
    assert meta["settings"]["prompts"] == PROMPTS and meta["settings"]["seed"] == 0
    assert meta["settings"]["schedule"] == {"template": 1.0, "size": "0.06M"}
    assert AsiTable.from_dict(meta["table"]) == result.table

    out = pipe.generate(PROMPTS[0], schedule=S006, seed=1,
                        cache=CacheConfig(policy="scalekv", budget_file=str(budget_path), budget=BUDGET))
    assert out.samples.plan.kept == result.plan.kept
    for si in range(S006.num_scales - 1):
        assert out.samples.usage[si].tokens == result.plan.kept[si]
    assert any(out.samples.usage[si].tokens[l] < sum(S006.tokens_per_scale[:si + 1])
               for si in (3, 4, 5) for l in range(layers))  # it really compressed



def test_a_calibrated_file_used_at_another_budget_says_so(result, pipe, tmp_path):
    """The file's caps are the calibration's and eviction starts at the config's budget, so a run at another
    budget is neither: the plan, the memory plan and the run's report carry one note naming the file and both
    budgets; at the calibrated budget, or for a file without its measurements, there is none."""
    budget_path, side = result.write(tmp_path / "tiny_calibrated.json")
    depth = pipe.transformer.cfg.depth

    def notes(budget: int) -> list[str]:
        config = CacheConfig(policy="scalekv", budget_file=str(budget_path), budget=budget)
        _, plan = config.build(S006, depth, 4, 32, 2, torch.float32)
        assert pipe.plan_memory(S006, 1, config).notes == plan.notes
        return plan.notes

    assert notes(BUDGET) == []
    [note] = notes(BUDGET + 16)
    assert "tiny_calibrated.json" in note and f"budget of {BUDGET} tokens" in note and f"is {BUDGET + 16}" in note
    out = pipe.generate(PROMPTS[0], schedule=S006, seed=1, memory_report=True,
                        cache=CacheConfig(policy="scalekv", budget_file=str(budget_path), budget=BUDGET + 16))
    assert out.memory.notes == [note] and out.memory.to_dict()["notes"] == [note]
    # at another resolution with as many scales (256x320 has 7 too): the caps were chosen for other token maps
    other = get_schedule(1.25, "0.06M")
    assert other.num_scales == S006.num_scales and other.grids != S006.grids
    _, plan = CacheConfig(policy="scalekv", budget_file=str(budget_path), budget=BUDGET).build(
        other, depth, 4, 32, 2, torch.float32)
    assert plan.notes == ["tiny_calibrated.json was calibrated at 256x256 (1:1), but this run is 256x320 (1:1.25): "
                          "its caps and drafters were chosen for other token maps; calibrate again at this "
                          "resolution"]
    # settings a file fixes are named, not silently dropped
    _, plan = CacheConfig(policy="scalekv", budget_file=str(budget_path), budget=BUDGET, refiner_decay=50).build(
        S006, depth, 4, 32, 2, torch.float32)
    assert plan.notes == ["refiner_decay does not apply with a budget file (tiny_calibrated.json): its caps and "
                          "drafters are used as they are"]
    side.write_text("{not json")  # a broken or missing table is no reason to refuse the run: no note
    assert notes(BUDGET + 16) == []
    side.unlink()
    assert notes(BUDGET + 16) == []

def test_reproducible(result, pipe, tmp_path):
    again = calibrate(pipe, PROMPTS, S006, BUDGET, seed=0)
    a = result.write(tmp_path / "a.json")
    b = again.write(tmp_path / "b.json")
    assert a[0].read_bytes() == b[0].read_bytes()
    assert json.loads(a[1].read_text())["table"] == json.loads(b[1].read_text())["table"]
    assert again.table == result.table


def _synthetic() -> AsiTable:
    asi = [[0.0, 0.0, 0.0, 0.0],  # scale 0: lowest raw values, but not a compressing scale
           [1.0, 2.0, 3.0, 4.0],  # z = -1.342, -0.447, 0.447, 1.342
           [0.5, 0.5, 0.5, 0.0],  # z = 0.577 x3, -1.732
           [0.1, 0.2, 0.2, 0.25],  # z = -1.606, 0.229, 0.229, 1.147
           [9.0, 9.0, 9.0, 9.0]]  # last scale: never ranked by default
    return AsiTable(asi, [[0.0] * 4 for _ in asi], asi)


def test_select_drafters_ranks_by_zscore():
    t = _synthetic()
    z = t.zscores()
    assert z[2][3] == pytest.approx(-1.732, abs=1e-3) and z[3][0] == pytest.approx(-1.606, abs=1e-3)
    # raw ASI would pick (2,3), (3,0), (3,1); per-scale z-scores pick (1,0) third instead
    assert select_drafters(t, 3, [1, 2, 3]) == [[], [0], [3], [0], []]
    assert select_drafters(t, 4, [1, 2, 3]) == [[], [0, 1], [3], [0], []]
    # one drafter globally: the other compressing scales still get their lowest-z layer
    assert select_drafters(t, 1, [1, 2, 3]) == [[], [0], [3], [0], []]
    assert select_drafters(t, 0, [2]) == [[], [], [3], [], []]
    # default scales: all but the last; default count round(0.0656 * 16) = 1, then one per scale
    assert select_drafters(t) == [[0], [0], [3], [0], []]
    with pytest.raises(ValueError):
        select_drafters(t, 2, [7])


def test_zscores_and_sum_combination():
    t = AsiTable([[0.2, 0.6]], [[0.3, 0.1]], [[0.5, 0.7]], combine="sum")
    assert t.zscores()[0] == pytest.approx([-1.0, 1.0], abs=1e-4)
    assert AsiTable.from_dict(t.to_dict()).combine == "sum"
    assert query_rows(10, 64) == list(range(10)) and query_rows(144, 1) == [72]


def test_budget_that_never_compresses_is_rejected(pipe):
    with pytest.raises(ValueError, match="never compresses"):
        calibrate(pipe, PROMPTS, S006, budget_tokens=10_000)


def test_more_prompts_than_the_limit_are_refused_before_any_generation() -> None:
    from scalekv_core.kvcache.calibration import check_prompts
    from scalekv_core.limits import LIMITS, InputError

    most = int(LIMITS["calibration_prompts"].max)
    assert check_prompts(0, most) == 0
    with pytest.raises(InputError, match=f"--prompts: {most + 1} prompts; a calibration takes at most {most}"):
        check_prompts(0, most + 1, "--seed", "--prompts")


def test_a_budget_that_holds_the_whole_cache_says_so() -> None:
    """'1000MB' (or 100%) at a small size keeps everything: the plan says so rather than look like a saving."""
    for budget in ("1000MB", "100%"):
        _, plan = CacheConfig(policy="scalekv", budget=budget, window=4).build(S006, 4, 4, 32, 2, torch.float32)
        [note] = plan.notes
        assert f"({budget}) holds the whole cache at this resolution (265 tokens" in note
    _, plan = CacheConfig(policy="scalekv", budget="10%", window=4).build(S006, 4, 4, 32, 2, torch.float32)
    assert plan.notes == []
