"""generate and calibrate take T5 as one .safetensors file (as ComfyUI keeps text encoders) with --t5-tokenizer,
and give the same picture as from the Hugging Face folder; a missing or misplaced tokenizer is refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_tiny import T5_TINY, TINY_TRANSFORMER, TINY_VAE
from scalekv_core import cli

SINGLE = T5_TINY / "model.safetensors"  # the folder's weights file is a single-file T5 encoder on its own


def _gen(out: Path, *t5: str) -> list[str]:
    return ["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--width", "256",
            "--height", "256", "--prompt", "a red apple", "--seed", "3", "--out", str(out), *t5]


def test_single_file_t5_gives_the_folders_picture(tmp_path: Path, capsys) -> None:
    assert cli.main(_gen(tmp_path / "folder.png", "--text-encoder", str(T5_TINY))) == 0
    assert cli.main(_gen(tmp_path / "file.png", "--text-encoder", str(SINGLE), "--t5-tokenizer", str(T5_TINY))) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("folder", "file"))
    assert np.array_equal(a, b)
    other = tmp_path / "other.png"  # guard: another prompt changes the picture, so equality above means something
    assert cli.main(_gen(other, "--text-encoder", str(SINGLE), "--t5-tokenizer", str(T5_TINY), "--prompt",
                         "a blue boat")) == 0
    assert not np.array_equal(a, np.asarray(Image.open(other)))


@pytest.mark.parametrize("t5, words", [
    (["--text-encoder", str(SINGLE)], ["model.safetensors", "single file", "tokenizer", "--t5-tokenizer"]),
    (["--text-encoder", str(T5_TINY), "--t5-tokenizer", str(T5_TINY)], ["single-file", "t5_tiny"]),
    (["--text-encoder", str(SINGLE), "--t5-tokenizer", "/nonexistent/tok"], ["model.safetensors", "/nonexistent/tok"]),
])
def test_tokenizer_mistakes_are_refused_by_name(tmp_path: Path, capsys, t5: list[str], words: list[str]) -> None:
    rc = cli.main(_gen(tmp_path / "x.png", *t5))
    err = capsys.readouterr().err
    assert rc == 2 and all(w in err for w in words), err
    assert not (tmp_path / "x.png").exists()


def test_calibrate_takes_a_single_file_t5(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue boat\n")
    out = tmp_path / "budget.json"
    rc = cli.main(["calibrate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--text-encoder",
                   str(SINGLE), "--t5-tokenizer", str(T5_TINY), "--prompts", str(prompts), "--width", "256",
                   "--height", "256", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())
