"""Safe, loud reading of checkpoint files: safetensors, weights-only .pth, and sharded folders.

Pickles are read with `torch.load(weights_only=True)`, so a file that carries code is refused, never run.
Every error names the file, and key checks name the keys.
"""
from __future__ import annotations

import os
import pickle
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, TypeVar

import torch

from .limits import shown
from .safe_files import (JSONNumberError, atomic_path, is_apple_double, open_regular, parse_json, read_text,
                         regular_file, relative_name_problem)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrappers the original releases and training scripts put around a state dict.
_WRAPPER_KEYS = ("vae", "state_dict", "model", "module", "ema")
#: A shard index lists tensor names and file names (the 8B's is about 100 KB); anything far larger is not one.
MAX_INDEX_BYTES = 64 * 2**20
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def refused_pickle(error: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler refused a file, in one line: what it means, then torch's own reason
    (without its advice to load the file unsafely).

    A class/function reference ("GLOBAL ... not an allowed global") is code; other refusals (unsupported opcodes)
    come from corrupt files or hand-made pickles. Neither runs anything.
    """
    text = str(error)
    reason = next((line.split("WeightsUnpickler error:", 1)[1] for line in text.splitlines()
                   if "WeightsUnpickler error:" in line), text)
    reason = " ".join(reason.split(" Please use `torch.serialization.add_safe_globals", 1)[0].split())
    what = ("the file contains pickled code or objects other than tensors, and loading it could run arbitrary code"
            if "global" in reason.lower() else
            "the pickle is corrupt or uses constructs that a plain state dict never needs")
    return f"{what}. Only plain state dicts are accepted. Details: {reason[:300]}"


def _load_pickle(path: Path, zipped: bool) -> object:
    try:
        # mmap only works for torch's zip format; legacy (pre-1.6) files are read in full.
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {refused_pickle(e)}") from e
    except Exception as e:  # zip/stream errors (RuntimeError), EOFError, OSError, KeyError from garbage, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


#: The released files wrap their state dict at most two deep ({'trainer': {'gpt_fsdp': ...}}).
_MAX_WRAPPERS = 8


def _unwrap(obj: object, path: Path, strip_module: bool = True) -> dict[str, torch.Tensor]:
    """Find the state dict inside the original's wrappers ({'vae': ...}, training checkpoints)."""
    seen: set[int] = set()
    while isinstance(obj, Mapping) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # a pickle may hold a dict inside itself ({'model': <itself>}): weights_only accepts it, so stop on a repeat
        if id(obj) in seen or len(seen) >= _MAX_WRAPPERS:
            raise CheckpointError(f"{path}: no state dict found: its wrappers nest more than {_MAX_WRAPPERS} deep "
                                  f"or contain themselves")
        seen.add(id(obj))
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
    return _strip_module(sd) if strip_module else sd


def _strip_module(sd: dict[str, T]) -> dict[str, T]:
    """Remove a DDP/FSDP 'module.' prefix carried by every key (a partial prefix is left for check_keys to name)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _find_index(folder: Path) -> Path:
    """The folder's one `*.index.json`; macOS's AppleDouble `._NAME` files (left beside every file copied to an
    exFAT, FAT or SMB drive) are not indexes."""
    indexes = sorted(p for p in folder.glob("*.index.json") if not is_apple_double(p.name))
    if not indexes:
        raise CheckpointError(f"{folder}: a folder checkpoint needs a '*.index.json' (e.g. "
                              f"model.safetensors.index.json) listing its shards; none found")
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[p.name for p in indexes]}; keep one")
    return indexes[0]


def _shard_entry(index: Path, folder: Path, name: str) -> Path:
    """The file a weight_map entry names, if it is a plain relative name that stays inside the folder."""
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{index}: shard entry {shown(name)} {why}; entries must name files inside {folder}")

    problem = relative_name_problem(name)  # the rule the node menus' names follow too
    if problem is not None:
        raise refuse(problem)
    # A symlink in the folder is the user's own doing (the Hugging Face cache keeps every shard as a link to
    # ../../blobs): it may point anywhere, as long as it reaches a regular file. The index's text may not.
    path = folder / name
    try:
        regular_file(path, "shard file", CheckpointError)
    except FileNotFoundError:
        raise FileNotFoundError(f"{index}: shard {shown(name)} is listed but missing from {folder}") from None
    return path


@dataclass(frozen=True)
class ShardIndex:
    """A shard folder's index, checked: every file it names is a regular file inside the folder."""

    path: Path  # the *.index.json
    weight_map: dict[str, str]  # tensor name -> shard entry as written in the index
    files: dict[str, Path]  # shard entry -> its path (folder / entry), sorted by entry


def shard_index(folder: str | Path) -> ShardIndex:
    """Read and check a shard folder's `*.index.json` before any shard is opened.

    An entry that is empty, absolute or contains '..' or a NUL is a CheckpointError naming the index file and
    the entry; so is an index or shard that is not a regular file (links are followed: the Hugging Face cache
    links every shard to its blob store), and an index of insane size.
    """
    folder = Path(folder)
    index = _find_index(folder)
    text = read_text(index, MAX_INDEX_BYTES, "shard index", CheckpointError)
    try:
        weight_map = parse_json(text)["weight_map"]
    except JSONNumberError as e:
        raise CheckpointError(f"{index}: not a valid shard index: {e}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: JSONDecodeError, bad UTF-8
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object): "
                              f"{type(e).__name__}: {shown(str(e), 200)}") from None
    if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    files = {name: _shard_entry(index, folder, name) for name in sorted(set(weight_map.values()))}
    return ShardIndex(index, dict(weight_map), files)


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files a folder's index lists, each checked to be a regular file inside the folder."""
    return list(shard_index(folder).files.values())


def _load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    idx = shard_index(folder)
    sd: dict[str, torch.Tensor] = {}
    for shard, path in idx.files.items():
        # The prefix is stripped once for the whole checkpoint, so index and shards agree on the key names.
        part = _load_file(path, strip_module=False)
        listed = {k for k, s in idx.weight_map.items() if s == shard}
        missing = listed - set(part)
        if missing:
            raise CheckpointError(f"{path}: keys listed in {idx.path.name} are absent: {sorted(missing)[:10]}")
        sd.update({k: part[k] for k in listed})
    return _strip_module(sd)


def _sniff(path: Path, size: int) -> str | None:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save) from the first bytes, or None if unknown.

    Renamed files are common (a .safetensors saved as .pth, ...), so content wins over the suffix.
    """
    with open_regular(path, "checkpoint file", CheckpointError) as (f, _):
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2, how legacy torch.save files start
        return "pickle"
    return None


def _load_file(path: Path, strip_module: bool = True) -> dict[str, torch.Tensor]:
    # Regular files only: a FIFO would block the open, /dev/zero would be read forever.
    size = regular_file(path, "checkpoint", CheckpointError).st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    kind = _sniff(path, size)
    if kind is None:
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            kind = "safetensors"  # let safetensors name what is wrong with the header
        elif suffix in PICKLE_SUFFIXES:
            kind = "pickle"
        else:
            raise CheckpointError(f"{path}: not a recognised checkpoint (expected a .safetensors file or a "
                                  f"PyTorch .pth/.bin/.ckpt file)")
    if kind == "safetensors":
        return _unwrap(_load_safetensors(path), path, strip_module)
    return _unwrap(_load_pickle(path, zipped=kind == "zip"), path, strip_module)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (file or sharded folder) into a flat {name: tensor} dict on the CPU, safely."""
    path = Path(path)
    try:
        is_folder = stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        is_folder = False  # _load_file names what is wrong (missing, NUL in the name, ...)
    if is_folder:
        return _load_sharded(path)
    return _load_file(path)


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


def write_safetensors(tensors: Mapping[str, torch.Tensor], dst: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write a .safetensors file readable as an ordinary file is (safetensors alone makes it owner-only, which a
    ComfyUI service account cannot read), never leaving a half-written file under the final name."""
    from safetensors.torch import save_file

    dst = Path(dst)
    with atomic_path(dst) as tmp:  # no half-written (or whole but unnamed) file is left behind
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata))
        umask = os.umask(0)  # read by setting it back at once (no caller runs in ComfyUI's threads)
        os.umask(umask)
        try:
            os.chmod(tmp, 0o666 & ~umask)
        except OSError:  # a file system without Unix modes (vfat, some network mounts): its own rules apply
            pass
    return dst


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a .pth (or sharded folder, or .safetensors) as one .safetensors file with the same keys and tensors;
    a safetensors source keeps its metadata, so a pre-quantized file stays one."""
    sd = load_state_dict(src)
    meta = safetensors_metadata(src) if Path(src).is_file() else {}
    return write_safetensors(unshared(sd), dst, {**meta, "format": "pt"})


def unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with a copy of each tensor whose storage another key shares (tied weights), which safetensors refuses;
    the others as they are, so a 16 GB checkpoint is not held twice while it is rewritten."""
    owners: dict[int, int] = {}
    for v in sd.values():
        key = v.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    return {k: v.clone() if owners[v.untyped_storage().data_ptr()] > 1 else v for k, v in sd.items()}


#: Largest safetensors header read for its metadata (safetensors itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 100 * 2**20


def _header_and_data(path: Path) -> tuple[dict, int] | None:
    """A safetensors file's JSON header and the size of the data after it; None for a file of another kind."""
    with open_regular(path, "checkpoint file", CheckpointError) as (f, size):
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            return None
        text = f.read(length)
    if text[:1] != b"{":
        return None
    try:
        header = parse_json(text)
    except JSONNumberError as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable safetensors header: JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: not UTF-8 (byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError
        raise CheckpointError(f"{path}: unreadable safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header: not a JSON object")
    return header, size - 8 - length


def safetensors_header(path: Path) -> dict | None:
    """A safetensors file's JSON header, read alone (8-byte length + JSON); None for a file of another kind."""
    found = _header_and_data(path)
    return None if found is None else found[0]


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata (`__metadata__`) of a safetensors file, read from its header alone; {} for a file of
    another kind or without metadata (pre-quantized files are recognised by theirs)."""
    header = safetensors_header(Path(path))
    meta = header.get("__metadata__") if header is not None else None
    if not isinstance(meta, dict):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


#: Bits per element of each safetensors dtype name, as the format defines them.
SAFETENSORS_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
                    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
                    "F8_E5M2FNUZ": 8,
                    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                    "C64": 64, "I64": 64, "U64": 64, "F64": 64}


def _is_count(n: object) -> bool:
    """A JSON whole number safetensors accepts as a dimension or offset (bool is an int in Python, not in JSON)."""
    return type(n) is int and 0 <= n < 2**63


def _checked_shapes(header: dict, data_bytes: int, path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header, checked as safetensors checks a file before it loads one:
    a known dtype, whole non-negative dimensions, and data offsets that tile the data exactly, each tensor's
    bytes equal to its shape times its dtype. Anything else is a CheckpointError naming the key (a header that
    lies could make a planner sum 10^99-element tensors, or negative ones)."""
    def refuse(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: unreadable safetensors header: tensor {shown(key)} {why}")

    spans = []
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise refuse(key, "is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise refuse(key, f"has an unknown dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise refuse(key, "has no usable shape (a list of whole numbers from 0 to 2^63)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
                and offsets[0] <= offsets[1]):
            raise refuse(key, "has no usable data_offsets ([begin, end], whole numbers, begin <= end)")
        size = offsets[1] - offsets[0]
        bits = 0 if 0 in shape else SAFETENSORS_BITS[dtype]
        for n in shape:  # stops as soon as the product passes the tensor's bytes: never a huge product
            bits *= n
            if bits > 8 * size:
                break
        if bits != 8 * size:
            raise refuse(key, f"declares shape {shown(shape)} of {dtype} but {size} bytes of data")
        shapes[str(key)] = tuple(shape)
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise refuse(key, "overlaps another tensor's data or leaves a gap before it")
        end = stop
    if end != data_bytes:
        raise CheckpointError(f"{path}: unreadable safetensors header: its tensors cover {end} bytes of data but "
                              f"the file holds {data_bytes}")
    return shapes


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    found = _header_and_data(path)
    if found is None:  # torch.save's zip is memory-mapped: only the pickle's metadata is read (legacy ones whole)
        return {k: tuple(v.shape) for k, v in _load_file(path, strip_module=False).items()}
    return _checked_shapes(*found, path)


def file_version(path: str | Path) -> tuple:
    """A file's path, modification and change times (ns), size and inode, or a folder's for each file in it (entries
    that cannot be read left out): what a cache of something read from it is keyed by, so a file rewritten in place
    is read again."""
    def version(p: Path) -> tuple:
        st = p.stat()  # ctime and the inode too: a file swapped for one of the same size and mtime (cp -p) differs
        return str(p), st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_dev, st.st_ino

    path = Path(path)
    if not path.is_dir():
        return version(path)
    found = []
    for entry in sorted(path.rglob("*")):
        try:
            if entry.is_file():
                found.append(version(entry))
        except OSError:  # a broken link or an entry that vanished: not a file the loader reads
            continue
    return (str(path), *found)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint file or shard folder, keys as load_state_dict gives them, without
    reading the weights: what a planner or a compatibility check needs before a 16 GB load."""
    path = Path(path)
    if path.is_dir():
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in shard_files(path):  # refuses entries that leave the folder
            shapes.update(_file_shapes(shard))
        return _strip_module(shapes)
    return _strip_module(_file_shapes(path))
