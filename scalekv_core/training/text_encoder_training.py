"""The default model's text encoder: a small T5 encoder trained jointly with the transformer.

It is a `transformers.T5EncoderModel`, saved as a folder `T5TextEncoder.from_folder` loads unchanged, with
the sentencepiece vocabulary of tests/data/infinity-tiny/t5_tiny (512 pieces, data, not weights). Joint
training is the simplest objective that makes its features useful: the transformer's bit loss backpropagates
into it, so it learns to bind each colour word to its shape and position words.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..model.text_encoder import TEXT_MAXLEN, TextConditioning

#: Where the tokenizer files come from.
TOKENIZER_SOURCE = Path(__file__).resolve().parents[2] / "tests" / "data" / "infinity-tiny" / "t5_tiny"
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")  # tokenizer.json: no protobuf needed


def t5_config(d_model: int = 128, layers: int = 2, heads: int = 4, d_ff: int = 256, vocab: int = 512):
    """A small T5 encoder config in flan-t5's layout (gated-gelu feed-forward, relative position buckets)."""
    from transformers import T5Config
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=True,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_t5(seed: int, **kwargs):
    """A freshly initialised T5EncoderModel whose weights depend only on the seed."""
    from transformers import T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(t5_config(**kwargs)).float()


def load_tokenizer(folder: Path = TOKENIZER_SOURCE):
    """The tokenizer exactly as T5TextEncoder.from_folder builds it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, legacy=True, model_max_length=TEXT_MAXLEN, local_files_only=True)


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask padded to the longest caption; T5's outputs on valid tokens equal those of 512-padding."""
    tok = tokenizer(text=list(captions), padding="longest", truncation=True, max_length=TEXT_MAXLEN,
                    return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def features(module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padded (B, T, C) T5 features, differentiable; the binding probe reads these."""
    return module(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()


def encode(module, ids: torch.Tensor, mask: torch.Tensor) -> TextConditioning:
    """Packed T5 features, differentiable (T5TextEncoder.encode is the no-grad inference twin)."""
    return TextConditioning.from_padded(features(module, ids, mask), mask)


def save_t5(module, folder: Path) -> Path:
    """config.json + model.safetensors + the tokenizer files, the layout of a downloaded T5 folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(folder, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("architectures") != ["T5EncoderModel"]:
        raise RuntimeError(f"{folder / 'config.json'}: unexpected architectures {cfg.get('architectures')}")
    return folder
