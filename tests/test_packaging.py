"""What the registry shows and what users download: pyproject's registry fields and the .comfyignore'd archive."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The registry's accepted classifier values (comfy-cli's config parser), for the two families it reads.
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
RAW = "https://raw.githubusercontent.com/scalekv/ComfyUI-ScaleKV/main/"


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_fields():
    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    urls = project["urls"]
    assert {"Repository", "Documentation", "Bug Tracker"} <= set(urls)
    assert urls["Bug Tracker"] == urls["Repository"] + "/issues"
    assert comfy["Icon"].startswith(RAW) and (ROOT / comfy["Icon"][len(RAW):]).is_file()  # the icon is in the repo
    for c in project["classifiers"]:
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].startswith(REGISTRY_OS), c
        elif c.startswith("Environment :: "):
            assert c[len("Environment :: "):] in REGISTRY_ACCELERATORS, c
    assert "ComfyUI" not in project["name"]  # the registry's naming rule


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line]


def test_comfyignore_leaves_tests_and_tools_out_and_keeps_what_runs():
    tracked = set(_git("ls-files"))
    ignored = set(_git("ls-files", "-c", "-i", "--exclude-from=.comfyignore"))
    shipped = tracked - ignored
    assert not any(p.startswith(("tests/", ".ci/", "scripts/workflows/")) for p in shipped)
    assert "requirements-dev.txt" not in shipped and "scripts/run_workflow.py" in shipped  # the README's runner
    needed = [p for p in tracked if p.startswith(("nodes/", "scalekv_core/", "web/", "default_model/", "workflows/"))]
    assert needed and set(needed) <= shipped
    assert {"__init__.py", "requirements.txt", "pyproject.toml", "README.md", "LICENSE"} <= shipped
    size = sum((ROOT / p).stat().st_size for p in shipped if (ROOT / p).is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MB shipped"  # was 48 MB with tests/data
