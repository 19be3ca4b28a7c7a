"""The KV benchmark command runs (reduced: one policy, one budget) and prints ratios measured in that run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kv_benchmark_reduced_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "scalekv_core.bench", "kv", "--model", "tiny", "--window", "4",
                        "--policies", "scalekv,snapkv", "--budgets", "10%", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "stored KV" in r.stdout and "scalekv" in r.stdout
    data = json.loads(out.read_text())
    rows = {row["policy"]: row for row in data["rows"]}
    assert set(rows) == {"scalekv", "snapkv"}
    for row in rows.values():
        assert 0.09 <= row["stored_ratio"] <= 0.105
        assert 0 < row["peak_ratio"] < 1
        assert row["seconds"] > 0 and 0 <= row["eviction_fraction"] < 1
    assert any(line.startswith("target") for line in data["targets"])
