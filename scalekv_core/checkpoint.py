"""Safe, loud reading of checkpoint files: safetensors, weights-only .pth, and sharded folders.

Pickles are read with `torch.load(weights_only=True)`, so a file that carries code is refused, never run.
Every error names the file, and key checks name the keys.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrappers the original releases and training scripts put around a state dict.
_WRAPPER_KEYS = ("vae", "state_dict", "model", "module", "ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled code or objects other than tensors, and "
            f"loading it could run arbitrary code. Only plain state dicts are accepted. Details: {e}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        # mmap needs the zip format; retry without it for legacy files before calling the file corrupt.
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e2:
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled code or objects other than tensors. "
                f"Details: {e2}") from e2
        except Exception:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside the original's wrappers ({'vae': ...}, training checkpoints)."""
    while isinstance(obj, Mapping) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in _WRAPPER_KEYS if k in obj]
        if "trainer" in obj and isinstance(obj["trainer"], Mapping) and "gpt_fsdp" in obj["trainer"]:
            obj = obj["trainer"]["gpt_fsdp"]
        elif len(inner) >= 1:
            obj = obj[inner[0]]
        else:
            raise CheckpointError(f"{path}: no state dict found; top-level keys are {sorted(map(str, obj))[:10]}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _find_index(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        raise CheckpointError(f"{folder}: a folder checkpoint needs a '*.index.json' (e.g. "
                              f"model.safetensors.index.json) listing its shards; none found")
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[p.name for p in indexes]}; keep one")
    return indexes[0]


def _load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    index = _find_index(folder)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object): {e}") from e
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_state_dict(folder / shard)
        listed = {k for k, s in weight_map.items() if s == shard}
        missing = listed - set(part)
        if missing:
            raise CheckpointError(f"{folder / shard}: keys listed in {index.name} are absent: {sorted(missing)[:10]}")
        sd.update({k: part[k] for k in listed})
    return sd


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (file or sharded folder) into a flat {name: tensor} dict on the CPU, safely."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _load_sharded(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _unwrap(_load_safetensors(path), path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _unwrap(_load_pickle(path), path)
    # Unknown suffix: sniff the content. Zip (torch) files start with 'PK'.
    head = path.read_bytes()[:4]
    if head[:2] == b"PK":
        return _unwrap(_load_pickle(path), path)
    return _unwrap(_load_safetensors(path), path)


def check_keys(expected: Mapping[str, Sequence[int]], got: Mapping[str, torch.Tensor | Sequence[int]],
               source: str) -> None:
    """Raise one error listing every missing, unexpected and wrongly shaped key (the original silently skips them)."""
    def shape(v: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v)

    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: file {list(shape(got[k]))} vs model {list(shape(expected[k]))}"
                   for k in set(expected) & set(got) if shape(got[k]) != shape(expected[k]))
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:10])}{more}")
    if problems:
        raise CheckpointError(f"{source}: does not match the detected architecture; " + "; ".join(problems))


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a .pth (or sharded folder) as one .safetensors file with the same keys and tensors."""
    from safetensors.torch import save_file

    sd = load_state_dict(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(dst)  # never leave a half-written file under the final name
    return dst
