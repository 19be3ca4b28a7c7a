"""The fidelity benchmark: its metrics against hand-computed and independently computed values, and a reduced run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scalekv_core.bench import distributed, fidelity
from scalekv_core.bench.metrics import (LPIPS, bits_agreement, find_weights, frechet_distance, psnr, ssim,
                                        to_unit)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "infinity-tiny"
TINY_FLAGS = ["--transformer", str(TINY / "infinity_tiny.safetensors"), "--vae", str(TINY / "vae_tiny.safetensors"),
              "--text-encoder", str(TINY / "t5_tiny")]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_identical_images_is_infinite() -> None:
    x = _rand(2, 3, 16, 16)
    out = psnr(x, x.clone())
    assert out.shape == (2,) and torch.isinf(out).all() and (out > 0).all()


def test_psnr_hand_computed() -> None:
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    # every value off by 0.1: MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert float(psnr(x, x + 0.1)[0]) == pytest.approx(20.0, abs=1e-9)
    # one of 192 values off by 1: MSE 1/192 -> 10 log10(192)
    y = x.clone()
    y[0, 1, 2, 3] = 1.0
    assert float(psnr(x, y)[0]) == pytest.approx(10 * math.log10(192), abs=1e-9)


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ------------------------------------------------------------------------------------------ SSIM


def test_ssim_of_an_image_with_itself_is_one() -> None:
    x = _rand(2, 3, 24, 20)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_ssim_is_symmetric() -> None:
    x, y = _rand(1, 3, 24, 24, seed=1), _rand(1, 3, 24, 24, seed=2)
    assert float(ssim(x, y)[0]) == pytest.approx(float(ssim(y, x)[0]), abs=1e-14)


def test_ssim_decreases_with_noise() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32, dtype=torch.float64), torch.linspace(0, 1, 32, dtype=torch.float64),
                            indexing="ij")
    clean = torch.stack([xx, yy, (xx + yy) / 2])[None]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores = [float(ssim(clean, (clean + s * noise).clamp(0, 1))[0]) for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert scores[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.5


def test_ssim_of_constant_images_hand_computed() -> None:
    # No variance anywhere: the contrast-structure factor is C2/C2 = 1, leaving (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    assert float(ssim(x, y)[0]) == pytest.approx(expected, abs=1e-12)


def _numpy_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 written out directly: for every window position, weighted centred moments, then the mean."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r**2 / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                px, py = x[c, i:i + size, j:j + size], y[c, i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_numpy_computation() -> None:
    x = _rand(3, 17, 15, seed=4)
    y = (x + 0.15 * (_rand(3, 17, 15, seed=5) - 0.5)).clamp(0, 1)
    assert float(ssim(x, y)[0]) == pytest.approx(_numpy_ssim(x.numpy(), y.numpy()), abs=1e-10)


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="smaller than the 11-pixel"):
        ssim(torch.zeros(1, 3, 10, 30), torch.zeros(1, 3, 10, 30))


def test_to_unit_converts_uint8_hwc() -> None:
    img = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = to_unit(img)
    assert out.shape == (1, 3, 1, 1)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(ValueError, match="uint8"):
        to_unit(img.astype(np.float32))


# ------------------------------------------------------------------------------------------ bits, FID, LPIPS


def test_bits_agreement_counts_over_all_scales() -> None:
    a = [torch.tensor([[[1, 0]]], dtype=torch.uint8), torch.tensor([[[1, 1], [0, 0]]], dtype=torch.uint8)]
    b = [torch.tensor([[[1, 1]]], dtype=torch.uint8), torch.tensor([[[1, 1], [0, 1]]], dtype=torch.uint8)]
    assert bits_agreement(a, a) == 1.0
    assert bits_agreement(a, b) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="scales"):
        bits_agreement(a, b[:1])


def test_frechet_distance_hand_cases() -> None:
    feats = torch.randn(64, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift.pow(2).sum()), abs=1e-8)
    # scaling the centred set by 2: covariance 4S, and tr(S + 4S - 2 (4 S^2)^1/2) = tr(S)
    centred = feats - feats.mean(0)
    expected = float(torch.cov(centred.T).trace())
    assert frechet_distance(centred, 2 * centred) == pytest.approx(expected, rel=1e-8)


def test_lpips_with_random_weight_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    template = LPIPS()
    trunk = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in template.net.features.state_dict().items()}
    lins = {f"lin{i}.model.1.weight": torch.rand((1, c, 1, 1), generator=g) for i, c in enumerate(LPIPS.CHANNELS)}
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "alex.pth")
    model = LPIPS.from_files(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    x, y = _rand(1, 3, 64, 64, seed=8), _rand(1, 3, 64, 64, seed=9)
    assert float(model(x, x)[0]) == pytest.approx(0.0, abs=1e-9)
    d = float(model(x, y)[0])
    assert d > 0 and d == pytest.approx(float(model(y, x)[0]), rel=1e-5)
    torch.save({"lin0.model.1.weight": lins["lin0.model.1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lin1.model.1.weight"):
        LPIPS.from_files(tmp_path / "alexnet.pth", tmp_path / "partial.pth")


def test_find_weights_explicit_and_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_weights(None, ["alex.pth"]) is None
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        find_weights(str(tmp_path / "nothing.pth"), ["alex.pth"])
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "alex.pth").write_bytes(b"x")
    assert find_weights(None, ["other.pth", "alex.pth"]) == hub / "alex.pth"


# ------------------------------------------------------------------------------------------ pairs, sharding, CLI


def test_prompt_file_pairs_use_line_index_as_seed(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na bird\n")
    assert fidelity.load_pairs(str(f), 2, 0) == [("a cat", 0), ("a dog", 1)]
    assert fidelity.load_pairs(str(f), 10, 0) == [("a cat", 0), ("a dog", 1), ("a bird", 2)]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        fidelity.load_pairs(str(tmp_path / "missing.txt"), 2, 0)


def test_pairs_come_from_eval_pairs_without_a_prompt_file(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def eval_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
        calls.append((n, seed))
        return [(f"caption {i}", 100 + i) for i in range(n)]

    fake = types.ModuleType("scalekv_core.training.shapes")
    fake.eval_pairs = eval_pairs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "scalekv_core.training.shapes", fake)
    assert fidelity.load_pairs(None, 3, 5) == [("caption 0", 100), ("caption 1", 101), ("caption 2", 102)]
    assert calls == [(3, 5)]


def test_shards_cover_every_item_once_deterministically() -> None:
    items = [f"p{i}" for i in range(7)]
    for world in (1, 2, 3, 8):
        shares = [distributed.shard_items(items, r, world) for r in range(world)]
        flat = sorted(i for share in shares for i, _ in share)
        assert flat == list(range(7))
        assert shares == [distributed.shard_items(items, r, world) for r in range(world)]
    assert distributed.shard_items(items, 1, 3) == [(1, "p1"), (4, "p4")]
    with pytest.raises(ValueError):
        distributed.shard_items(items, 3, 3)


def test_merge_restores_the_single_process_order() -> None:
    labels, budgets = ["snapkv", "scalekv-improved"], ["4%", "10%"]
    single = [{"pair": p, "budget": b, "policy": l} for p in range(3) for b in budgets for l in labels]
    parts = [{"rows": [r for r in single if r["pair"] % 2 == rank][::-1], "features": {}} for rank in (1, 0)]
    rows, _ = fidelity.merge(parts, labels, budgets)
    assert rows == single


def _row(pair: int, policy: str, value: float | None, budget: str = "10%") -> dict:
    return {"pair": pair, "policy": policy, "budget": budget, "psnr": value}


def test_paired_psnr_counts_and_gap_by_hand() -> None:
    rows = [_row(0, "a", 30.0), _row(1, "a", 20.0), _row(2, "a", 25.0), _row(3, "a", None),
            _row(0, "b", 28.0), _row(1, "b", 21.0), _row(2, "b", 22.0), _row(3, "b", 24.0),
            _row(0, "a", 1.0, "4%"), _row(0, "b", 2.0, "4%")]
    c = fidelity.paired_psnr(rows, "a", "b", "10%")
    assert c is not None
    # gaps +2, -1, +3 over the finite pairs; pair 3 is identical for a (null PSNR), so a is ahead there
    assert (c["pairs"], c["ahead"], c["behind"], c["finite_pairs"]) == (4, 3, 1, 3)
    assert c["mean_db"] == pytest.approx(4 / 3)
    sd = math.sqrt(((2 - 4 / 3) ** 2 + (-1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 2)
    assert c["se_db"] == pytest.approx(sd / math.sqrt(3))
    assert fidelity.paired_psnr(rows, "a", "missing", "10%") is None


def test_paired_comparisons_put_each_budgets_leader_first() -> None:
    labels = ["snapkv", "scalekv-original", "scalekv-improved", "scalekv-calibrated"]
    offsets = {"snapkv": 1.0, "scalekv-original": 0.0, "scalekv-improved": 3.0, "scalekv-calibrated": 2.0}
    rows = [_row(p, label, 20.0 + offsets[label] + 0.1 * p) for p in range(3) for label in labels]
    result = {"budgets": ["10%"], "rows": rows,
              "aggregate": [{"policy": label, "budget": "10%", "psnr": 20.1 + offsets[label]} for label in labels]}
    got = [(c["first"], c["second"]) for c in fidelity.paired_comparisons(result)]
    assert got == [("scalekv-improved", "scalekv-calibrated"), ("scalekv-improved", "snapkv"),
                   ("scalekv-improved", "scalekv-original"), ("scalekv-calibrated", "scalekv-improved")]
    table = fidelity.paired_table(fidelity.paired_comparisons(result))
    assert "| 10% | scalekv-improved | snapkv | 3/3 | 0/3 | +2.00 | 0.00 |" in table


def test_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fidelity.main([*TINY_FLAGS, "--policies", "snapkv,h2o"]) == 2
    assert "h2o" in capsys.readouterr().err
    assert fidelity.main(["--transformer", str(tmp_path / "nope.safetensors"), "--prompts", "x"]) == 2
    err = capsys.readouterr().err
    assert "--transformer" in err and "nope.safetensors" in err


def test_optional_metrics_are_skipped_with_a_note_without_weights(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    a = fidelity.build_parser().parse_args([])
    opt = fidelity._Optional(a, "cpu")
    assert opt.lpips is None and opt.inception is None
    assert any(n.startswith("LPIPS skipped") for n in opt.notes)
    assert any(n.startswith("FID skipped") for n in opt.notes)


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception-V3 (same call signature), so the FID plumbing runs without it."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)


def _fake_metric_weights(folder: Path) -> list[str]:
    g = torch.Generator().manual_seed(10)
    template = LPIPS()
    torch.save({f"features.{k}": torch.randn(v.shape, generator=g) * 0.05
                for k, v in template.net.features.state_dict().items()}, folder / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand((1, c, 1, 1), generator=g)
                for i, c in enumerate(LPIPS.CHANNELS)}, folder / "alex.pth")
    with warnings.catch_warnings():  # scripting is deprecated, but the real Inception file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_FakeInception()).save(str(folder / "inception.pt"))
    return ["--alexnet-weights", str(folder / "alexnet.pth"), "--lpips-weights", str(folder / "alex.pth"),
            "--inception-weights", str(folder / "inception.pt")]


def _run_bench(tmp_path: Path, captions: list[str], *flags: str) -> tuple[str, dict]:
    """The benchmark as a user runs it, on the tiny model with these captions (seed = line index): stdout, JSON."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(c + "\n" for c in captions))
    r = subprocess.run([sys.executable, "-m", "scalekv_core.bench", "fidelity", *TINY_FLAGS, "--prompts", str(prompts),
                        "--num-pairs", str(len(captions)), "--budgets", "10%", *flags, "--out", str(tmp_path / "fid")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads((tmp_path / "fid" / "fidelity.json").read_text())


def test_reduced_benchmark_run(tmp_path: Path) -> None:
    out = tmp_path / "fid"
    stdout, data = _run_bench(tmp_path, ["a red circle on a blue background", "a small green square"],
                              "--policies", "full,snapkv,scalekv-improved", *_fake_metric_weights(tmp_path))
    assert "skipped" not in stdout
    rows = data["rows"]
    assert [(x["pair"], x["policy"]) for x in rows] == [(p, l) for p in (0, 1)
                                                      for l in ("full", "snapkv", "scalekv-improved")]
    assert [(x["caption"], x["seed"]) for x in rows[::3]] == [("a red circle on a blue background", 0),
                                                              ("a small green square", 1)]
    for row in rows:
        if row["policy"] == "full":  # the same generation twice: every bit and pixel agrees
            assert row["bits_equal"] == 1.0 and row["identical"] is True
            assert row["psnr"] is None and row["ssim"] == pytest.approx(1.0, abs=1e-12)
            assert row["stored_ratio"] == 1.0
        else:
            assert 0.5 < row["bits_equal"] < 1.0 and row["identical"] is False
            assert math.isfinite(row["psnr"]) and 0 < row["ssim"] < 1
            assert 0.09 <= row["stored_ratio"] <= 0.105
            assert 0 < row["peak_ratio"] < 1 and row["peak_mb"] < row["full_peak_mb"]
    agg = {a["policy"]: a for a in data["aggregate"]}
    snap = [x for x in rows if x["policy"] == "snapkv"]
    assert agg["snapkv"]["psnr"] == pytest.approx(np.mean([x["psnr"] for x in snap]))
    assert agg["snapkv"]["bits_equal"] == pytest.approx(np.mean([x["bits_equal"] for x in snap]))
    assert agg["full"]["psnr"] is None and agg["full"]["identical"] == 1.0
    # the optional metrics, with stand-in networks: zero for the full cache against itself, positive otherwise
    assert all((x["lpips"] == 0.0) == (x["policy"] == "full") and x["lpips"] >= 0 for x in rows)
    assert agg["full"]["fid"] == pytest.approx(0.0, abs=1e-6) and agg["snapkv"]["fid"] > 0
    table = (out / "fidelity.md").read_text()
    assert "| budget | policy | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ |" in table
    assert "| 10% (27 tok) | scalekv-improved |" in table and "| 10% | full | ∞ |" in table
    assert "## Per pair" in table
    leader, other = sorted(["snapkv", "scalekv-improved"], key=lambda label: -agg[label]["psnr"])
    assert [(c["first"], c["second"], c["pairs"]) for c in data["paired"]] == [(leader, other, 2)]
    assert f"| 10% | {leader} | {other} | " in table
    from PIL import Image

    with Image.open(out / "fidelity_psnr.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_calibration_captions_never_overlap_the_evaluated_pairs() -> None:
    from scalekv_core.training import shapes
    calib = set(fidelity.calibration_captions(64))
    assert len(calib) > 32
    assert calib.isdisjoint(c for c, _ in shapes.eval_pairs(200, 0))


def test_calibrated_row_uses_the_drafters_calibrate_picks(tmp_path: Path) -> None:
    """The scalekv-calibrated row runs ScaleKV with the drafters `calibrate` measures on training captions."""
    from scalekv_core.kvcache import CacheConfig
    from scalekv_core.kvcache.calibration import calibrate
    from scalekv_core.pipeline import InfinityPipeline
    from scalekv_core.schedules import schedule_for_pixels
    _, data = _run_bench(tmp_path, ["a red circle on a blue background"],
                         "--policies", "scalekv-improved,scalekv-calibrated", "--calibration-captions", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bench's --threads default: same floats, same choice
    try:
        pipe = InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                           TINY / "t5_tiny")
        schedule = schedule_for_pixels(256, 256)
        tokens, window = data["meta"]["budget_tokens"]["10%"], data["meta"]["window"]
        want = calibrate(pipe, fidelity.calibration_captions(2), schedule, tokens, window=window, cfg=3.0, tau=1.0,
                         top_k=900, top_p=0.97).drafters
        row = next(x for x in data["rows"] if x["policy"] == "scalekv-calibrated")
        caption, seed = row["caption"], row["seed"]
        full = pipe.generate(caption, seed=seed, cfg=3.0, tau=1.0, schedule=schedule, cache=CacheConfig(policy="full"))
        mine = pipe.generate(caption, seed=seed, cfg=3.0, tau=1.0, schedule=schedule,
                             cache=CacheConfig(policy="scalekv", budget="10%", window=window, drafters=want))
    finally:
        torch.set_num_threads(threads)
    assert data["meta"]["calibrated_drafters"] == {"10%": want}
    assert row["psnr"] == pytest.approx(float(psnr(to_unit(mine.images), to_unit(full.images))[0]))


def test_weight_format_axis(tmp_path: Path) -> None:
    """--weights: each quantized format against the unquantized full cache, on the same pairs; --policies none."""
    stdout, data = _run_bench(tmp_path, ["a red circle on a blue background", "a small green square"],
                              "--policies", "none", "--weights", "none,int8,int4")
    assert data["rows"] == [] and data["weights"] == ["int8", "int4"]
    assert [(r["pair"], r["weights"]) for r in data["weight_rows"]] == [(0, "int8"), (0, "int4"), (1, "int8"),
                                                                        (1, "int4")]
    agg = {a["weights"]: a for a in data["weights_aggregate"]}
    for fmt, a in agg.items():
        rows = [r for r in data["weight_rows"] if r["weights"] == fmt]
        assert a["bits_equal"] == pytest.approx(np.mean([r["bits_equal"] for r in rows])) and 0.5 < a["bits_equal"] < 1
        assert a["pairs"] == 2 and 0 < a["ssim"] < 1 and math.isfinite(a["psnr"])
    assert agg["int8"]["bits_equal"] > agg["int4"]["bits_equal"]
    assert 0.3 < agg["int4"]["weight_ratio"] < agg["int8"]["weight_ratio"] < 0.5  # the tiny model: a third not blocks
    md = (tmp_path / "fid" / "fidelity.md").read_text()
    assert md.startswith("## Weight formats") and "| int8 |" in md and "budget" not in md
    assert not (tmp_path / "fid" / "fidelity_psnr.png").exists()


def test_bad_weight_formats_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert fidelity.main([*TINY_FLAGS, "--weights", "int8,nf4"]) == 2
    assert "--weights: unknown value 'nf4'" in capsys.readouterr().err
    assert fidelity.main([*TINY_FLAGS, "--policies", "none"]) == 2
    assert "--policies none leaves nothing to compare" in capsys.readouterr().err
