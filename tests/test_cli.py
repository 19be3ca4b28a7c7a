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
