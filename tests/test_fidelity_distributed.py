"""A 2-process gloo run of the fidelity benchmark (torchrun) gathers exactly the rows of a single-process run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "infinity-tiny"


def _bench_args(prompts: Path, out: Path) -> list[str]:
    return ["-m", "scalekv_core.bench", "fidelity",
            "--transformer", str(TINY / "infinity_tiny.safetensors"), "--vae", str(TINY / "vae_tiny.safetensors"),
            "--text-encoder", str(TINY / "t5_tiny"), "--prompts", str(prompts), "--num-pairs", "3",
            "--budgets", "10%", "--policies", "sliding_window,scalekv-improved,scalekv-calibrated",
            "--calibration-captions", "2", "--device", "cpu",
            "--out", str(out)]


def test_two_gloo_ranks_gather_the_single_process_rows(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on grey\na yellow triangle and a dot\n")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    r1 = subprocess.run([sys.executable, *_bench_args(prompts, single)], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # Three pairs over two ranks: rank 0 evaluates pairs 0 and 2, rank 1 pair 1, so the gather must reorder.
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         *_bench_args(prompts, sharded)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    assert "[rank 1/2] pair 1/1 (#1 seed 1)" in r2.stdout
    assert "[rank 0/2] pair 2/2 (#2 seed 2)" in r2.stdout
    a = json.loads((single / "fidelity.json").read_text())
    b = json.loads((sharded / "fidelity.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(a["rows"]) == 9
    assert [(r["pair"], r["policy"]) for r in b["rows"]] == [(p, l) for p in range(3) for l in
                                                           ("sliding_window", "scalekv-improved", "scalekv-calibrated")]
    # rank 0 calibrates once (one budget) and every rank uses its drafters
    assert r2.stdout.count("scalekv-calibrated: measuring attention") == 1
    assert b["meta"]["calibrated_drafters"] == a["meta"]["calibrated_drafters"] is not None
    assert b["rows"] == a["rows"]  # every metric and memory figure, bit for bit
    assert b["aggregate"] == a["aggregate"]
    # only rank 0 writes: one set of outputs in the folder
    assert sorted(p.name for p in sharded.iterdir()) == ["fidelity.json", "fidelity.md", "fidelity_psnr.png"]
