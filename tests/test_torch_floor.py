"""An old torch is refused when the engine is imported, naming what it lacks and what to do (not an error deep in a
module): each missing feature is simulated in a fresh interpreter, since only one torch is installed here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each case removes one feature from this torch before the engine is imported, as an older release lacks it.
HIDE = {
    "torch.nn.attention": "import sys; sys.modules['torch.nn.attention'] = None",
    "SDPBackend.CUDNN_ATTENTION": ("import torch.nn.attention as a\n"
                                   "class SDPBackend: MATH = 0; FLASH_ATTENTION = 1; EFFICIENT_ATTENTION = 2\n"
                                   "a.SDPBackend = SDPBackend"),
    "torch.float8_e4m3fn": "del torch.float8_e4m3fn",
}


def _import_engine(prelude: str, module: str = "scalekv_core") -> subprocess.CompletedProcess:
    code = f"import torch\n{prelude}\nimport {module}\nprint('imported')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("feature", sorted(HIDE))
def test_an_old_torch_is_refused_at_import_naming_what_it_lacks(feature: str) -> None:
    run = _import_engine(HIDE[feature], "scalekv_core.kvcache")  # the nodes' first engine import
    assert run.returncode != 0 and "imported" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ComfyUI-ScaleKV needs PyTorch 2.3 or newer"), run.stderr
    assert f"lacks {feature}." in last and "Update torch" in last


def test_this_torch_imports_the_engine() -> None:
    run = _import_engine("", "scalekv_core.kvcache")
    assert run.returncode == 0 and "imported" in run.stdout, run.stderr
