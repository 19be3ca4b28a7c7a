"""T5 text conditioning for Infinity: prompts -> packed (varlen) encoder states the transformer cross-attends to."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..limits import check, shown
from ..safe_files import is_apple_double

#: Infinity always pads/truncates prompts to this many T5 tokens (run_infinity.encode_prompt).
TEXT_MAXLEN = 512

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; ComfyUI installs span both."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@dataclass
class TextConditioning:
    """Packed T5 states of B prompts (valid tokens only, incl. </s>), the layout of the original text_cond_tuple."""

    kv_compact: Tensor  # (sum_L, C_text) float32
    lens: list[int]  # valid tokens per prompt
    cu_seqlens: Tensor  # (B+1,) int32, cumulative lens starting at 0
    max_len: int  # max(lens)

    @property
    def batch_size(self) -> int:
        """Number of prompts packed here (the transformer's B before CFG doubling)."""
        return len(self.lens)

    @property
    def text_channels(self) -> int:
        """C_text, which must equal the transformer's text_channels."""
        return int(self.kv_compact.shape[-1])

    def as_tuple(self) -> tuple[Tensor, list[int], Tensor, int]:
        """Same tuple order as the original encode_prompt, for code written against it."""
        return self.kv_compact, self.lens, self.cu_seqlens, self.max_len

    def to(self, device: torch.device | str) -> TextConditioning:
        """Move to the transformer's device (dtype stays float32; the model casts where it needs)."""
        return TextConditioning(self.kv_compact.to(device), list(self.lens), self.cu_seqlens.to(device), self.max_len)

    def concat(self, other: TextConditioning) -> TextConditioning:
        """Append other's prompts after ours (e.g. CFG negative prompts), so both run as one packed batch."""
        if other.text_channels != self.text_channels:
            raise ValueError(f"cannot concat text conditionings with {self.text_channels} and {other.text_channels} channels")
        kv = torch.cat([self.kv_compact, other.kv_compact.to(self.kv_compact.device)], dim=0)
        return TextConditioning._from_parts(kv, list(self.lens) + list(other.lens), self.cu_seqlens.device)

    def repeat_each(self, times: int) -> TextConditioning:
        """p1, p2 -> p1, p1, p2, p2: the order a prompt list with `times` images per prompt gets."""
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        rows = torch.split(self.kv_compact, list(self.lens), dim=0)
        kv = torch.cat([r for r in rows for _ in range(times)], dim=0)
        return TextConditioning._from_parts(kv, [n for n in self.lens for _ in range(times)], self.cu_seqlens.device)

    @classmethod
    def _from_parts(cls, kv_compact: Tensor, lens: list[int], device: torch.device) -> TextConditioning:
        """Derive cu_seqlens/max_len from lens so the three can never disagree."""
        if sum(lens) != kv_compact.shape[0]:
            raise ValueError(f"lens sum to {sum(lens)} but kv_compact has {kv_compact.shape[0]} rows")
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(kv_compact, lens, cu.to(device), max(lens))

    @classmethod
    def from_padded(cls, hidden: Tensor, mask: Tensor) -> TextConditioning:
        """Pack right-padded encoder output exactly as encode_prompt does (first mask.sum() tokens of each row)."""
        if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
            raise ValueError(f"expected hidden (B,L,C) and mask (B,L), got {tuple(hidden.shape)} and {tuple(mask.shape)}")
        lens = [int(n) for n in mask.sum(dim=-1).tolist()]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one valid token (T5 always adds </s>)")
        hidden = hidden.float()
        kv = torch.cat([h[:n] for n, h in zip(lens, hidden.unbind(0))], dim=0)
        return cls._from_parts(kv, lens, hidden.device)

    @classmethod
    def from_numpy_file(cls, path: str | Path) -> TextConditioning:
        """Load precomputed encodings of ONE prompt, a (L, C) float .npy, to skip loading T5 (CLI --text-kv)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text encoding file not found: {path}")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or arr.shape[0] < 1:
            raise ValueError(f"{path}: expected a 2-D float array (L tokens, C channels) of one prompt, "
                             f"got shape {arr.shape} dtype {arr.dtype}")
        kv = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return cls._from_parts(kv, [int(arr.shape[0])], kv.device)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load-time progress bars and info chatter, restoring the host's settings afterwards."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_folder(folder: Path) -> None:
    """Fail early with the folder's name instead of a deep HF error (or a silent Hub download attempt)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"T5 folder {folder} has no config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES) and not any(
            not is_apple_double(f.name) for f in folder.glob("*.safetensors")):
        raise FileNotFoundError(f"T5 folder {folder} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    _check_tokenizer_folder(folder, "T5 folder")


def _check_tokenizer_folder(folder: Path, what: str) -> None:
    """Fail early, naming `what` and the path, when it is no folder holding a T5 tokenizer (instead of the Hub's
    repo-id complaint, or a read of a FIFO or a device)."""
    try:
        is_dir, exists = folder.is_dir(), folder.exists()
    except OSError as e:  # a name too long for the file system, say
        raise FileNotFoundError(f"{what}: {e.strerror}: {folder}") from None
    if not is_dir:
        raise FileNotFoundError(f"{what} {folder} is not a folder" if exists else f"{what} not found: {folder}")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{what} {folder} has no tokenizer (expected {' or '.join(_TOKENIZER_FILES)})")


#: A key every T5 encoder file has; a single file without it is not listed as a text encoder.
T5_PROBE_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"


def single_file_t5_config(path: str | Path):
    """The T5Config of a single-file T5 encoder, read from its tensor shapes (header only): width, depth, heads,
    feed-forward width and kind, vocabulary; an error naming the file and the missing tensor otherwise."""
    from safetensors import safe_open
    from transformers import T5Config

    from ..checkpoint import CheckpointError

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a broken header
        raise CheckpointError(f"{path}: not a readable .safetensors file: {_one_line(str(e))[:200]}") from e
    try:
        vocab, d_model = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
        inner = shapes[T5_PROBE_KEY][0]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a T5 encoder file: no tensor {e}") from None
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    sizes = {"vocabulary": vocab, "width": d_model, "attention width": inner, "relative buckets": buckets,
             "heads": heads, "feed-forward width": d_ff}
    empty = [name for name, n in sizes.items() if n <= 0]
    if empty or inner % heads:
        why = f"its {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} 0" if empty else \
            f"its attention width {inner} does not split into {heads} heads"
        raise CheckpointError(f"{path}: not a usable T5 encoder file: {why}")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                    num_heads=heads, relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
                    use_cache=False, tie_word_embeddings=False)


def check_vocabulary(tokens: int, rows: int, encoder: str, tokenizer: str) -> None:
    """A tokenizer whose ids the encoder's embedding can look up, else an error naming both: the mismatch showed
    as a bare `IndexError: index out of range in self` at the first prompt."""
    if tokens > rows:
        from ..checkpoint import CheckpointError
        raise CheckpointError(f"{encoder} has {rows} token embeddings, but {tokenizer} has {tokens} tokens: the "
                              f"encoder was trained with another tokenizer; use the T5 folder it came in (config, "
                              f"weights and tokenizer), or flan-t5-xl")


def fp32_modules(module: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Module names Hugging Face's from_pretrained keeps in float32 when loading in `dtype` (T5: `wo` in fp16, where
    its outputs overflow), so a single-file T5 computes what the same weights in a folder compute."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return keep


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load_error(folder: Path, error: Exception, tokenizer_loaded: bool) -> Exception:
    """One line naming the folder and the file that could not be loaded (transformers' messages span pages)."""
    import pickle

    from ..checkpoint import CheckpointError, refused_pickle

    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"could not load the T5 folder {folder}: {_one_line(str(error))}")
    detail = _one_line(str(error))
    if isinstance(error, pickle.UnpicklingError):  # torch's weights-only unpickler refused it: nothing ran
        files = sorted(p.name for p in folder.glob("*.bin")) or ["pytorch_model.bin"]
        where = folder / files[0] if len(files) == 1 else f"{folder} ({', '.join(files)})"
        return CheckpointError(f"{where}: refused to load the T5 weights: {refused_pickle(error)}")
    if tokenizer_loaded:
        files = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json")))
        part = f"T5 encoder weights ({', '.join(files)})" if files else "T5 encoder weights"
    else:
        part = "T5 tokenizer (spiece.model / tokenizer.json)"
    return CheckpointError(f"{folder}: could not load the {part}: {type(error).__name__}: {detail[:500]}")


def quantize_linears(module: torch.nn.Module, fmt: str) -> int:
    """Replace every nn.Linear under `module` by a quant.QuantLinear of format `fmt`, in place; returns how many.

    Each layer is quantized where its weight is and its full-precision weight dropped as soon as it is replaced,
    so the peak stays near the module's own size. T5's feed-forward reads `wo.weight.dtype` to cast its input;
    a QuantLinear's weight is the dequantized one, so that check sees the compute dtype.
    """
    from .quant import QuantLinear

    targets = [(name, m) for name, m in module.named_modules() if type(m) is torch.nn.Linear]
    for name, layer in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, QuantLinear.from_linear(layer, fmt, name=f"{name}.weight"))
    return len(targets)


def _check_float_weights(folder: Path) -> None:
    """Integer tensors in a folder's .safetensors weights are refused (read from the headers): Hugging Face's
    loader casts them to the model's dtype without a word, and the pictures come out wrong."""
    from safetensors import safe_open

    from ..checkpoint import CheckpointError
    from ..loader import check_float_tensors
    from ..safe_files import regular_file

    for file in sorted(f for f in folder.glob("*.safetensors") if not is_apple_double(f.name)):
        regular_file(file, "T5 weights file", CheckpointError)  # a FIFO would block safe_open: named instead
        try:
            with safe_open(str(file), "pt") as f:
                dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a broken header
            raise CheckpointError(f"{file}: not a readable .safetensors file: {_one_line(str(e))[:200]}") from e
        check_float_tensors(None, dtypes, str(file))  # a T5 encoder holds floating-point tensors only


class T5TextEncoder:
    """Tokenizer + T5EncoderModel (e.g. flan-t5-xl) producing Infinity's TextConditioning."""

    def __init__(self, tokenizer, module: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.module = module.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, weights: str = "none") -> T5TextEncoder:
        """Load strictly from a local HF folder (never the Hub); fp16 on CUDA is what the original runs.

        `weights` stores every linear layer of the encoder in a quant.WEIGHT_FORMATS format (e.g. "fp8_e4m3fn":
        1 byte per weight, a float32 scale per output channel), dequantized to `dtype` at each use, so T5-XL takes
        about half the memory of fp16; embeddings and norms stay in `dtype`. Quantized on the CPU, then moved.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        from .quant import check_format
        weights = check_format(weights, "weights")
        folder = Path(path).expanduser()
        _check_folder(folder)
        _check_float_weights(folder)
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, legacy=True, model_max_length=TEXT_MAXLEN,
                                                          local_files_only=True)
                module = T5EncoderModel.from_pretrained(folder, local_files_only=True, **_dtype_kwarg(dtype))
            except Exception as e:  # transformers/torch/safetensors/sentencepiece each raise their own types
                raise _load_error(folder, e, tokenizer_loaded="tokenizer" in locals()) from e
        check_vocabulary(len(tokenizer), module.shared.num_embeddings, f"the T5 folder {folder}", "its tokenizer")
        if weights != "none":
            quantize_linears(module, weights)
        return cls(tokenizer, module.to(device))

    @classmethod
    def from_single_file(cls, path: str | Path, tokenizer_folder: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, weights: str = "none") -> T5TextEncoder:
        """A T5 encoder saved as one .safetensors file (as ComfyUI keeps text encoders), with a tokenizer from
        `tokenizer_folder` (the host's T5 tokenizer: flan-t5 uses T5's vocabulary); the shape comes from the file."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, T5EncoderModel

        from .quant import check_format
        weights = check_format(weights, "weights")
        path = Path(path).expanduser()
        tokenizer_folder = Path(tokenizer_folder).expanduser()
        _check_tokenizer_folder(tokenizer_folder, f"T5 tokenizer folder (for {path.name})")
        config = single_file_t5_config(path)
        sd = load_file(str(path))
        sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
        sd.setdefault("shared.weight", sd["encoder.embed_tokens.weight"])
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, legacy=True,
                                                          model_max_length=TEXT_MAXLEN, local_files_only=True)
            except Exception as e:  # transformers and tokenizers raise their own types
                raise FileNotFoundError(f"no T5 tokenizer for {path.name} in {tokenizer_folder}: "
                                        f"{_one_line(str(e))[:300]}") from e
            check_vocabulary(len(tokenizer), config.vocab_size, str(path), f"the tokenizer in {tokenizer_folder}")
            with torch.device("meta"):
                module = T5EncoderModel(config)
        from ..loader import check_float_tensors
        check_float_tensors(module.state_dict(), {k: v.dtype for k, v in sd.items()}, str(path))
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            from ..checkpoint import CheckpointError
            raise CheckpointError(f"{path}: not a T5 encoder of the shape its tensors give: missing "
                                  f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                                  f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        keep = fp32_modules(module, dtype)  # as from_pretrained: T5's `wo` overflows in fp16
        module.load_state_dict({k: v.to(torch.float32 if keep & set(k.split(".")) else dtype)
                                for k, v in sd.items()}, strict=True, assign=True)
        module.encoder.embed_tokens = module.shared  # tied, as from_pretrained leaves them
        if weights != "none":
            quantize_linears(module, weights)
        return cls(tokenizer, module.to(device))

    @property
    def weights(self) -> str:
        """The storage format of the encoder's linear layers ("none" when they are plain nn.Linear)."""
        from .quant import QuantLinear
        return next((m.fmt for m in self.module.modules() if isinstance(m, QuantLinear)), "none")

    @property
    def device(self) -> torch.device:
        """Where input ids must go (follows the module if a host app moves it)."""
        return next(self.module.parameters()).device

    @property
    def text_channels(self) -> int:
        """d_model, which the transformer's text_channels must match (2048 for flan-t5-xl)."""
        return int(self.module.config.d_model)

    def to(self, device: torch.device | str) -> T5TextEncoder:
        """Move the encoder (e.g. offload to CPU after encoding); returns self for chaining."""
        self.module.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask (B, 512), padded/truncated exactly as the original encode_prompt."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        for i, prompt in enumerate(prompts):  # before the tokenizer sees it: a lone surrogate, NUL, not text
            where = "" if len(prompts) == 1 else f" {i + 1} of {len(prompts)}"
            quoted = shown(prompt[:40]) + ("..." if len(prompt) > 40 else "") if isinstance(prompt, str) else ""
            check("prompt", prompt, f"prompt{where} {quoted}".rstrip())
        tokens = self.tokenizer(text=list(prompts), max_length=TEXT_MAXLEN, padding="max_length",
                                truncation=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def truncation_notes(self, prompts: list[str]) -> list[str]:
        """A note for each prompt longer than the TEXT_MAXLEN tokens T5 reads: the original drops the rest without a
        word, and so does this encoder (same features), but the artist should know that the end of the prompt is
        not drawn."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        notes = []
        for i, prompt in enumerate(prompts):
            n = len(self.tokenizer(text=prompt, truncation=False).input_ids)
            if n > TEXT_MAXLEN:
                which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
                notes.append(f"{which} is {n} T5 tokens; Infinity reads the first {TEXT_MAXLEN} (as the original), "
                             f"so its last {n - TEXT_MAXLEN} are not drawn: shorten it to keep what matters")
        return notes

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextConditioning:
        """Encode prompts into the packed conditioning (float32 states, valid tokens only)."""
        input_ids, mask = self.tokenize(prompts)
        device = self.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = self.module(input_ids=input_ids, attention_mask=mask)["last_hidden_state"].float()
        return TextConditioning.from_padded(hidden, mask)
