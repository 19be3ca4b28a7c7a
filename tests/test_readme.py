"""The README's Python example runs as written."""
from __future__ import annotations

import itertools
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


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _plan(capsys, *argv: str) -> str:
    from scalekv_core import cli

    assert cli.main(["plan", *argv]) == 0
    return capsys.readouterr().out


def test_readme_memory_table_is_what_plan_table_prints(capsys) -> None:
    """The "Memory to expect" table is the command's output, row for row (it had drifted 0.1-0.2 GB above)."""
    lines = _readme().split("## Memory to expect", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    printed = [line for line in _plan(capsys, "--table").splitlines() if line.startswith("|")]
    assert table == printed


def test_readme_decode_tile_figures_are_what_plan_prints(capsys) -> None:
    """`plan --model 2b --dtype bf16 --offload-t5 [--decode-tile 32]`: the decode figures the README quotes."""
    match = re.search(r"`plan (--model 2b --dtype bf16 --offload-t5) (--decode-tile 32)`: the decode "
                      r"([\d.]+) -> ([\d.]+) GiB", _readme())
    assert match, "the README no longer quotes the tiled decode's figures"
    base, tile, whole, tiled = match.groups()
    decode = re.compile(r"decode ([\d.]+) GiB")
    assert decode.search(_plan(capsys, *base.split())).group(1) == whole
    assert decode.search(_plan(capsys, *base.split(), *tile.split())).group(1) == tiled


def test_readme_whole_job_peaks_are_in_plan_job_table(capsys) -> None:
    paragraph = _readme().split("Planned whole-job peaks", 1)[1].split("\n\n", 1)[0]
    quoted = re.findall(r"([\d.]+) GiB", paragraph)
    peaks = set(re.findall(r"\*\*([\d.]+) GiB\*\*", _plan(capsys, "--job-table")))
    assert quoted and set(quoted) <= peaks, (quoted, peaks)
