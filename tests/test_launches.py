"""Launch census (scalekv_core/bench/launches.py): the fake run counts what a real run dispatches, and the 2B
1024x1024 counts stay at or below today's (a regression fence; the issue's targets are strict xfails below)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from scalekv_core.bench.launches import TARGETS, Census, extra_per_evicting_layer, main, run_census
from scalekv_core.kvcache import CacheConfig
from scalekv_core.model.config import KNOWN_MODELS, InfinityConfig
from scalekv_core.schedules import get_schedule

#: A narrow model that still takes every path of the 2B's: slices at scales 10-12, CFG, bf16 blocks.
TINY = InfinityConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=2, ffn_hidden=256, text_channels=64,
                      text_maxlen=64, pool_heads=2, d_vae=32)
SCHEDULE_1M = get_schedule(1.0, "1M")

# Today's 2B 1024x1024 census (batch 1 + CFG, bf16 blocks, meta device), measured at the commit that added this
# file (full: after issue 22's transformer pass, which took it from 68/67/107/146/187 and 36,098). Lower is fine
# (update the numbers); higher fails: a change added launches.
# Full's keys and queries are made in bf16 since nothing but attention reads them (auto storage; two casts per layer
# per scale fewer: 19,659 -> 18,827, and a third less cache).
TODAY_FULL_LAYER_MAX = [46, 33, 33, 33, 33, 33, 33, 33, 33, 33, 55, 76, 98]  # per scale, max over layers
# Then +13 for both: one sum of the logits per scale, so NaN or infinite logits are an error, not a black image.
TODAY_FULL_PER_IMAGE = 18_840
# ScaleKV: after issue 22's ScaleKV pass (was 40,204 per image, +24 per evicting layer, +3 elsewhere, 11 syncs).
TODAY_SCALEKV_PER_IMAGE = 21_454  # 21,697 until its queries were made in bf16 at the steps that do not score
TODAY_SCALEKV_OVER_FULL = 2_614  # ScaleKV's whole-image ops minus full's, whatever the transformer costs
# ScaleKV keeps float32 keys (it scores them), so attention casts them where full's bf16 keys need no cast: +1 at
# every layer and scale on top of ScaleKV's own ops; +1 more where it scores (float32 queries, cast for attention).
TODAY_SCALEKV_EXTRA_EVICTING = 14  # most ops a ScaleKV layer adds over full's at a scale where it evicts
TODAY_SCALEKV_EXTRA_OTHER = 2  # ... and where it does not (scale 0: + ids written into each layer's first buffer)
TODAY_SCALEKV_SYNCS = 1  # the RoPE table's copy in setup, as full's; none from ScaleKV


def _merged(c: Census) -> dict:
    """Device and host ops per phase with attention kernels under one name and the accelerator's extra copies
    taken out: what a CPU run and an accelerator run must agree on."""
    copies = Counter((s["scale"], s["phase"], s["layer"]) for s in c.syncs if s["op"] == "_to_copy")
    out = {}
    for key in set(c.kernels) | set(c.host_ops):
        ops = Counter(c.kernels.get(key, {})) + Counter(c.host_ops.get(key, {}))
        for name in [n for n in ops if "scaled_dot_product" in n]:
            ops["sdpa"] += ops.pop(name)
        if c.device == "meta":
            ops.pop("h2d_copy", None)
            ops["_to_copy"] -= copies.get(key[:3], 0) if key[3] == "" else 0
            # `t[...] = python_scalar` fills from a CPU scalar on the CPU; on an accelerator it makes a device
            # scalar and copies it (two launches, as CUDA's indexing does too)
            fills = ops.pop("scalar_tensor", 0)
            ops["copy_"] -= fills
            ops["fill_"] += fills
        out[key] = +ops
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_fake_census_counts_what_a_real_cpu_run_dispatches(policy: str) -> None:
    """Same tiny shape, same dispatch mode: real CPU tensors and fake ones give identical op counts per phase."""
    config = CacheConfig(policy=policy, budget="10%")
    torch.manual_seed(0)
    real = run_census(TINY, SCHEDULE_1M, config, device="cpu", fake=False, seed=0)
    fake = run_census(TINY, SCHEDULE_1M, config, device="cpu", fake=True)
    assert real.total() > 1000
    assert dict(fake.kernels) == dict(real.kernels)
    assert dict(fake.others) == dict(real.others)
    assert dict(fake.flops) == dict(real.flops)
    assert dict(fake.bytes_moved) == dict(real.bytes_moved)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.syncs == real.syncs == []


@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_meta_census_differs_from_cpu_only_by_device(policy: str) -> None:
    """The accelerator stand-in runs the same ops; only attention's fused kernel, host-side tables (not launches
    there) and the host-to-device copies those need differ."""
    config = CacheConfig(policy=policy, budget="10%")
    cpu = run_census(TINY, SCHEDULE_1M, config, device="cpu")
    meta = run_census(TINY, SCHEDULE_1M, config, device="meta")
    assert _merged(meta) == _merged(cpu)
    assert abs(meta.peak_bytes - cpu.peak_bytes) <= 1024  # device scalars (indexing, masks) differ by bytes
    layer_kernels = meta.by_op("layer")
    assert layer_kernels["_scaled_dot_product_flash_attention"] == 2 * TINY.depth * SCHEDULE_1M.num_scales
    assert not meta.host_ops.get((5, "layer", 0, ""))  # nothing in a layer runs on the host for full...
    assert [s for s in meta.syncs if s["phase"] != "setup"] == []  # ScaleKV's tables are built on the device


def test_cli_writes_json(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    """The subcommand runs end to end on a small shape and writes per-scale, per-layer and per-op figures."""
    out = tmp_path / "launches.json"
    assert main(["--model", "layer12", "--depth", "2", "--size", "0.06M", "--policies", "full,scalekv",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    full = data["policies"]["full"]
    assert len(full["per_scale"]) == 7 and len(full["layers"]) == 7 * 2
    assert full["total_ops"] == sum(full["ops_by_phase"].values()) == sum(full["by_op"].values())
    assert full["total_flops"] > 0 and full["peak_bytes"] > 0
    assert "scalekv 10%" in data["extra_over_full"]


# ------------------------------------------------------------------ the real 2B shape (about a minute)

@pytest.fixture(scope="module")
def census_2b() -> dict[str, Census]:
    """Full and ScaleKV 10% on the 2B at 1024x1024, batch 1 + CFG, bf16 blocks, as the command prints them."""
    cfg = KNOWN_MODELS["2b"]
    return {p: run_census(cfg, SCHEDULE_1M, CacheConfig(policy=p, budget="10%")) for p in ("full", "scalekv")}


def test_2b_full_counts_at_most_today(census_2b: dict[str, Census]) -> None:
    full = census_2b["full"]
    maxima = [r["max"] for r in full.per_scale()]
    assert all(m <= t for m, t in zip(maxima, TODAY_FULL_LAYER_MAX)), (maxima, TODAY_FULL_LAYER_MAX)
    assert full.total() <= TODAY_FULL_PER_IMAGE
    # the KV cache dominates: 5,269 MiB with float32 keys (performance.md's tracked peak), 3,572 with bf16 ones
    assert abs(full.peak_bytes / 2**20 - 3572) < 30


def test_2b_scalekv_counts_at_most_today(census_2b: dict[str, Census]) -> None:
    extra = extra_per_evicting_layer(census_2b["scalekv"], census_2b["full"])
    evicting = [r["extra_evicting_max"] for r in extra if r["evicting_layers"]]
    other = [r["extra_other_median"] for r in extra if r["extra_other_median"] is not None]
    assert evicting and max(evicting) <= TODAY_SCALEKV_EXTRA_EVICTING
    assert max(other) <= TODAY_SCALEKV_EXTRA_OTHER
    assert census_2b["scalekv"].total() <= TODAY_SCALEKV_PER_IMAGE
    assert census_2b["scalekv"].total() - census_2b["full"].total() <= TODAY_SCALEKV_OVER_FULL
    assert len(census_2b["scalekv"].syncs) <= TODAY_SCALEKV_SYNCS


def test_2b_scalekv_has_no_host_sync_after_setup(census_2b: dict[str, Census]) -> None:
    """ScaleKV's layers and sampling never wait for the device or copy from the host: windows and canvas cells are
    built on the device in setup, once per process (was a copy per evicting scale and per neighbour table)."""
    assert [s for s in census_2b["scalekv"].syncs if s["phase"] != "setup"] == []
    assert len(census_2b["scalekv"].syncs) == len(census_2b["full"].syncs)


@pytest.mark.parametrize("scoring", ["improved", "original"])
def test_scalekv_second_generation_has_no_sync_of_its_own(scoring: str) -> None:
    """A warm generation (tables cached) syncs exactly as full does, in both scoring modes."""
    full = run_census(TINY, SCHEDULE_1M, CacheConfig(policy="full"), device="meta", warm=True)
    skv = run_census(TINY, SCHEDULE_1M, CacheConfig(policy="scalekv", budget="10%", scoring=scoring), device="meta",
                     warm=True)
    assert [s for s in skv.syncs if s["phase"] != "setup"] == []
    assert len(skv.syncs) == len(full.syncs)
    assert skv.phase_ops("setup") == full.phase_ops("setup")  # tables come from the process-wide cache


def test_2b_full_has_no_host_sync_after_setup(census_2b: dict[str, Census]) -> None:
    """Full's layers and sampling never wait for the device (the RoPE table's one copy is in setup)."""
    assert [s for s in census_2b["full"].syncs if s["phase"] != "setup"] == []


def test_target_full_per_layer(census_2b: dict[str, Census]) -> None:
    """Issue 22: at most 54 ops per layer per scale for full where a scale runs in one piece (scales 0-9; 10-12 run
    their QKV and FFN in 1024-token slices, which costs 22, 43 and 66 ops per layer there)."""
    rows = census_2b["full"].per_scale()[:10]
    assert max(r["max"] for r in rows) <= TARGETS["full_per_layer_per_scale"]


def test_target_full_per_image(census_2b: dict[str, Census]) -> None:
    """Issue 22: at most 26,000 kernel-like ops per image for full."""
    assert census_2b["full"].total() <= TARGETS["full_per_image"]


@pytest.mark.xfail(strict=True, reason="issue 22 target not met: ScaleKV adds at most 8 ops per evicting layer "
                   "(14 today: 2 to move rows, 10 to score, each a kernel of its own with stock torch ops, and the "
                   "casts of the float32 keys and queries scoring needs, which full no longer has; the split "
                   "attention of item 4 costs more; docs/launches.md has the table)")
def test_target_scalekv_extra(census_2b: dict[str, Census]) -> None:
    extra = extra_per_evicting_layer(census_2b["scalekv"], census_2b["full"])
    assert max(r["extra_evicting_max"] for r in extra if r["evicting_layers"]) <= \
        TARGETS["scalekv_extra_per_evicting_layer"]
