"""The command-line generator writes the image and the reference-layout dump, equal to the original's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "infinity-tiny"
CASE = "p1_spaceship_s99_cfg4_tau1"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalekv_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_generate_with_text_kv_dumps_the_original_bits(tmp_path: Path) -> None:
    ref = DATA / "full_kv" / CASE
    r = _run("generate", "--transformer", str(DATA / "infinity_tiny.pth"), "--vae", str(DATA / "vae_tiny.pth"),
             "--text-kv", str(ref / "text_kv_compact.npy"), "--seed", "99", "--cfg", "4", "--tau", "1",
             "--width", "256", "--height", "256", "--out", str(tmp_path / "img.png"), "--dump", str(tmp_path / "dump"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["images"] == [str(tmp_path / "img.png")]
    assert "scale 7/7" in r.stderr  # progress per scale
    dump = tmp_path / "dump"
    for si in range(7):
        for name in ("bits", "bits_vae", "token_ids"):
            f = f"scale_{si:02d}_{name}.npy"
            np.testing.assert_array_equal(np.load(dump / f), np.load(ref / f), err_msg=f)
    assert np.abs(np.load(dump / "decoded.npy") - np.load(ref / "decoded.npy")).max() <= 1e-4
    np.testing.assert_allclose(np.load(dump / "summed_codes.npy"), np.load(ref / "summed_codes.npy"), atol=1e-5)
    assert (dump / "image.png").stat().st_size > 0 and (tmp_path / "img.png").stat().st_size > 0


def test_per_scale_cfg_list_and_batch(tmp_path: Path) -> None:
    ref = DATA / "full_kv" / CASE
    r = _run("generate", "--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae",
             str(DATA / "vae_tiny.safetensors"), "--text-kv", str(ref / "text_kv_compact.npy"), "--seed", "99",
             "--cfg", "4,4,4,4,4,4,4", "--tau", "1", "--width", "256", "--height", "256", "--batch", "2",
             "--out", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("b_*.png")) == ["b_00.png", "b_01.png"]


def test_wrong_cfg_list_length_is_a_clear_error(tmp_path: Path) -> None:
    r = _run("generate", "--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae",
             str(DATA / "vae_tiny.safetensors"), "--text-kv", str(DATA / "full_kv" / CASE / "text_kv_compact.npy"),
             "--cfg", "3,3", "--width", "256", "--height", "256", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert "cfg list has 2 values" in r.stderr and "7 scales" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_scalekv_original_dump_and_memory_report(tmp_path: Path) -> None:
    """The generator's ScaleKV flags reproduce the original patch's kept positions and write a memory report."""
    case = "p0_apple_s0_cfg3_tau0.5"
    ref = DATA / "scalekv" / case
    r = _run("generate", "--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae",
             str(DATA / "vae_tiny.safetensors"), "--text-kv", str(ref / "text_kv_compact.npy"), "--seed", "0",
             "--cfg", "3", "--tau", "0.5", "--width", "256", "--height", "256", "--kv-policy", "scalekv",
             "--scoring", "original", "--budget", "50", "--budget-file", str(DATA / "scalekv_budget_tiny.json"),
             "--out", str(tmp_path / "img.png"), "--dump", str(tmp_path / "dump"),
             "--memory-report", str(tmp_path / "mem.json"))
    assert r.returncode == 0, r.stderr
    kept = sorted((tmp_path / "dump").glob("scalekv_kept_*.npy"))
    assert [p.name for p in kept] == sorted(p.name for p in ref.glob("scalekv_kept_*.npy"))
    for p in kept:
        np.testing.assert_array_equal(np.load(p), np.load(ref / p.name), err_msg=p.name)
    for si in range(7):
        f = f"scale_{si:02d}_bits.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "dump" / f), np.load(ref / f))
    report = json.loads((tmp_path / "mem.json").read_text())
    assert report["policy"]["policy"] == "scalekv" and report["measured_peak_mb"] > 0
    assert [s["held_tokens"] for s in report["scales"][3:6]] == [[48, 40, 40, 48], [96, 64, 64, 96], [160, 96, 96, 160]]
    assert "measured peak" in r.stderr
    assert "USDT" not in r.stdout + r.stderr and "profiler_start" not in r.stdout  # the CPU meter's profiler is quiet


def test_unknown_policy_is_rejected_by_the_cli(tmp_path: Path) -> None:
    r = _run("generate", "--transformer", "x", "--vae", "y", "--text-kv", "z", "--kv-policy", "h2o")
    assert r.returncode == 2 and "h2o" in r.stderr


def test_plan_command_predicts_memory() -> None:
    r = _run("plan", "--model", "2b", "--kv-policy", "scalekv", "--budget", "10%", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert 0.095 < plan["analytic_mb"] / plan["full_analytic_mb"] < 0.105
    # Table 1's MB column: the 2B full cache at batch 1 with CFG is 6425 tokens x 32 layers x 2048 x 6 bytes x 2.
    assert abs(plan["full_analytic_mb"] - 6425 * 32 * 2048 * 6 * 2 / 2**20) < 1e-6


def test_calibrate_command_writes_a_budget_file_that_generate_accepts(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a wooden table\n\nalien spaceship enterprise\n")
    out = tmp_path / "budget.json"
    common = ["--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae", str(DATA / "vae_tiny.safetensors"),
              "--text-encoder", str(DATA / "t5_tiny"), "--width", "256", "--height", "256"]
    r = _run("calibrate", *common, "--prompts", str(prompts), "--budget", "48", "--window", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["budget_file"] == str(out) and summary["budget_tokens"] == 48
    data = json.loads(out.read_text())
    assert data and all(k.startswith("Scale ") for k in data)
    assert (tmp_path / "budget.asi.json").exists()
    r2 = _run("generate", *common, "--prompt", "a red apple", "--kv-policy", "scalekv", "--budget-file", str(out),
              "--budget", "48", "--window", "4", "--out", str(tmp_path / "img.png"),
              "--memory-report", str(tmp_path / "mem.json"))
    assert r2.returncode == 0, r2.stderr
    report = json.loads((tmp_path / "mem.json").read_text())
    assert all(s["held_tokens"] == s["planned_tokens"] for s in report["scales"][:-1])


def test_plan_table_lists_every_model_size_and_batch() -> None:
    r = _run("plan", "--table")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| Infinity-")]
    assert len(rows) == 12
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        full_kv, skv20_kv, skv10_kv = (float(cells[i].split(" / ")[0]) for i in (3, 4, 5))
        assert skv10_kv < skv20_kv < full_kv


def _calibrated(tmp_path: Path, capsys, *extra: str) -> dict:
    from scalekv_core import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a wooden table\n")
    rc = cli.main(["calibrate", "--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae",
                   str(DATA / "vae_tiny.safetensors"), "--text-encoder", str(DATA / "t5_tiny"), "--prompts",
                   str(prompts), "--budget", "48", "--out", str(tmp_path / "my budget.json"), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_the_use_line_calibrate_prints_runs_as_generate_flags(tmp_path: Path, capsys) -> None:
    """The printed flags left out --window (generate failed: 'keeps fewer tokens than the observation window of
    16') and the calibrated size (generate ran at the model's own size, another schedule)."""
    import shlex

    from scalekv_core import cli

    summary = _calibrated(tmp_path, capsys, "--window", "4", "--width", "256", "--height", "256")
    use = shlex.split(summary["use"])
    assert use[use.index("--budget-file") + 1] == str(tmp_path / "my budget.json")  # a path with a space, quoted
    out = tmp_path / "img.png"
    text_kv = DATA / "full_kv" / CASE / "text_kv_compact.npy"
    rc = cli.main(["generate", "--transformer", str(DATA / "infinity_tiny.safetensors"), "--vae",
                   str(DATA / "vae_tiny.safetensors"), "--text-kv", str(text_kv), "--out", str(out), *use])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert out.exists() and not [n for n in notes if "calibrated" in n or "ignored" in n], notes  # as calibrated


def test_the_use_line_leaves_out_what_generate_already_defaults_to(tmp_path: Path, capsys, monkeypatch) -> None:
    """Window 16 is generate's default, and without --width/--height calibrate ran at the model's own size."""
    from scalekv_core import cli
    from scalekv_core.schedules import schedule_for_pixels

    monkeypatch.setattr(cli, "_schedule", lambda a: (schedule_for_pixels(256, 256), None))  # the tiny's own: 1024
    use = _calibrated(tmp_path, capsys, "--window", "16")["use"].split()
    assert "--window" not in use and "--width" not in use and "--height" not in use
