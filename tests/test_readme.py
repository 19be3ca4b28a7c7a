"""The README's Python example runs as written."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(monkeypatch, tmp_path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('"out/', f'"{tmp_path}/out/')
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "(1, 256, 256, 3)" in out
    img = np.asarray(Image.open(tmp_path / "out" / "api_example.png"))
    assert img.shape == (256, 256, 3) and img.std() > 0
