"""The shipped T5 tokenizer files: tokenizer.json must tokenize exactly as spiece.model does.

Every T5 folder in the repository ships `tokenizer.json` (the fast tokenizer) next to `spiece.model`. Without it,
transformers 5 converts spiece.model on load, which needs protobuf; a stock ComfyUI (its own requirements.txt:
sentencepiece, no protobuf) then fails with "`tiktoken` is required to read a `tiktoken` file".

tokenizer.json was written from spiece.model by transformers' sentencepiece -> tokenizers conversion (transformers
5.24.0, tokenizers 0.23.3, in the engine venv):

    tok = AutoTokenizer.from_pretrained(folder_with_only_spiece_model, legacy=True, model_max_length=512)
    tok.save_pretrained(tmp)  # then copy tmp/tokenizer.json into the folder; tokenizer_config.json stays as it was

These tests require identical input_ids and attention masks, padded/truncated to 512 by T5TextEncoder.tokenize,
from tokenizer.json alone, from spiece.model alone (the conversion; needs sentencepiece and protobuf), and from
sentencepiece itself plus </s> (needs sentencepiece), the reference the conversion must reproduce.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalekv_core.model.text_encoder import TEXT_MAXLEN, T5TextEncoder

ROOT = Path(__file__).resolve().parents[1]
T5_FOLDERS = {
    "default_model": ROOT / "default_model" / "text_encoders" / "t5_shapes",
    "t5_tiny": ROOT / "tests" / "data" / "infinity-tiny" / "t5_tiny",
}
EOS_ID, PAD_ID = 1, 0

PROMPTS = [
    # the training captions' style
    "a large red circle at the top left on a blue background",
    "a small yellow star at the center and a large green square at the bottom right on a black background",
    "a purple triangle at the top right on a white to orange gradient background",
    "A LARGE Red Circle At The Top Left On A Blue Background.",
    # the parity references' prompts
    "a red apple on a wooden table",
    "alien spaceship enterprise",
    # punctuation and digits
    "Hello, world! (really?) -- yes; no: maybe... 'quoted' \"double\"",
    "#$%^&*()[]{}<>|\\/~`@+=_",
    "3 circles, 12 squares, 0.5 opacity, 1e-3, -7, 2024-12-06, 50% off, #1",
    # unicode: accents, NFKC-folded forms, CJK, emoji, typographic marks, zero-width and no-break spaces
    "café naïve Zürich São Paulo Ångström",
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ ™ ½ ²",
    "日本語のテキスト 中文 한국어 Русский Ελληνικά عربى",
    "emoji 😀🎨 and a red ❤ heart",
    "quotes “smart” ‘single’ — dash … ellipsis",
    "zero\u200bwidth and\u00a0no-break space",
    # empty and whitespace
    "",
    " ",
    "\t\n",
    "multiple    spaces   between  words",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand a\u3000wide space",
    # longer than 512 tokens: truncated to 511 pieces + </s>
    " ".join(["a large red circle at the top left on a blue background"] * 60),
    "x" * 2000,
]
# Special-token strings in the text: the transformers tokenizers match them, sentencepiece itself does not.
SPECIAL_PROMPTS = ["</s> in text <pad> and <unk> x</s>y", "<pad>"]


def _encoder(tokenizer) -> T5TextEncoder:
    """A T5TextEncoder around `tokenizer`, for its tokenize (the module is a stand-in, never run)."""
    return T5TextEncoder(tokenizer, torch.nn.Linear(1, 1))


def _tokenizer(folder: Path):
    """The tokenizer exactly as T5TextEncoder.from_folder builds it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, legacy=True, model_max_length=TEXT_MAXLEN, local_files_only=True)


def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    shutil.copytree(src, dst)
    (dst / drop).unlink()
    return dst


def _sentencepiece_reference(folder: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """sentencepiece's own pieces, truncated to 511, + </s>, right-padded with <pad> to 512."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    ids = torch.full((len(prompts), TEXT_MAXLEN), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), TEXT_MAXLEN), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        seq = sp.encode(prompt)[:TEXT_MAXLEN - 1] + [EOS_ID]
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


def _assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], prompts: list[str]):
    for row, prompt in enumerate(prompts):
        assert torch.equal(a[0][row], b[0][row]), f"input_ids differ for {prompt[:60]!r}"
        assert torch.equal(a[1][row], b[1][row]), f"attention_mask differs for {prompt[:60]!r}"
    assert a[0].shape == a[1].shape == b[0].shape == b[1].shape == (len(prompts), TEXT_MAXLEN)


@pytest.fixture(scope="module", params=sorted(T5_FOLDERS))
def folder(request) -> Path:
    return T5_FOLDERS[request.param]


@pytest.fixture(scope="module")
def json_only(folder, tmp_path_factory) -> T5TextEncoder:
    """T5TextEncoder.from_folder on a copy of the folder without spiece.model: only tokenizer.json can serve."""
    copy = _copy_without(folder, tmp_path_factory.mktemp("json_only") / folder.name, "spiece.model")
    enc = T5TextEncoder.from_folder(copy)
    assert enc.tokenizer.is_fast
    return enc


def test_folders_ship_both_tokenizer_files(folder):
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "Unigram"


def test_tokenizer_json_vocab_is_spiece_vocab(folder):
    """Same pieces, ids and scores as spiece.model (what the Unigram model segments with)."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert [(piece, score) for piece, score in vocab] == \
        [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_json_only_matches_sentencepiece(folder, json_only):
    _assert_same(json_only.tokenize(PROMPTS), _sentencepiece_reference(folder, PROMPTS), PROMPTS)


def test_json_only_matches_spiece_conversion(folder, json_only, tmp_path):
    """tokenizer.json alone vs spiece.model alone (how the folders loaded before tokenizer.json was shipped)."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    slow = _encoder(_tokenizer(_copy_without(folder, tmp_path / folder.name, "tokenizer.json")))
    prompts = PROMPTS + SPECIAL_PROMPTS
    _assert_same(json_only.tokenize(prompts), slow.tokenize(prompts), prompts)


def test_shipped_folder_matches_json_only(folder, json_only):
    """The folder as shipped (both files) tokenizes as tokenizer.json alone, batched or one prompt at a time."""
    shipped = _encoder(_tokenizer(folder))
    prompts = PROMPTS + SPECIAL_PROMPTS
    _assert_same(shipped.tokenize(prompts), json_only.tokenize(prompts), prompts)
    ids, mask = shipped.tokenize(PROMPTS[0])
    assert torch.equal(ids[0], json_only.tokenize(PROMPTS)[0][0]) and int(mask.sum()) == int(mask[0].sum())


def test_long_prompt_truncates_to_512(json_only):
    ids, mask = json_only.tokenize([PROMPTS[-1]])
    assert int(mask.sum()) == TEXT_MAXLEN and int(ids[0, -1]) == EOS_ID
    ids, mask = json_only.tokenize([""])
    assert int(mask.sum()) == 1 and int(ids[0, 0]) == EOS_ID and int(ids[0, 1:].abs().sum()) == PAD_ID


def test_shipped_folders_load_without_protobuf_and_sentencepiece():
    """A stock ComfyUI's environment: neither protobuf nor sentencepiece importable; the shipped folders load."""
    code = """
import sys
sys.modules["google.protobuf"] = None
sys.modules["sentencepiece"] = None
from scalekv_core.model.text_encoder import T5TextEncoder
for path in sys.argv[1:]:
    enc = T5TextEncoder.from_folder(path)
    ids, mask = enc.tokenize(["a large red circle at the top left on a blue background"])
    print(path, int(mask.sum()), ids[0, :int(mask.sum())].tolist())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, *map(str, T5_FOLDERS.values())], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(T5_FOLDERS)
    expected = _encoder(_tokenizer(T5_FOLDERS["t5_tiny"])).tokenize([PROMPTS[0]])
    n = int(expected[1].sum())
    for line in lines:
        assert line.split(" ", 2)[1:] == [str(n), str(expected[0][0, :n].tolist())], line
