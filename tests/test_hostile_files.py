"""Hostile files: pickles that carry code, truncated files, safetensors headers that lie, shard indexes that
escape their folder, and special files (a FIFO, /dev/zero, a folder) where a checkpoint or budget file belongs.

Every case must end in an error that names the file, without running code from it (a marker file proves it),
without blocking (FIFO cases run in a thread with a deadline) and without reading without end (the /dev/zero
cases run in a child process with a memory limit).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny import T5_TINY, TINY_TRANSFORMER, save_safetensors, save_sharded
from scalekv_core import checkpoint
from scalekv_core.checkpoint import CheckpointError, load_state_dict, shard_files, shard_index
from scalekv_core.kvcache.budget import BudgetError, load_budget_file, read_budget_json
from scalekv_core.limits import InputError
from scalekv_core.loader import load_transformer
from scalekv_core.model.text_encoder import T5TextEncoder
from scalekv_core.safe_files import read_bytes
from scalekv_core.schedules import get_schedule

REPO = Path(__file__).resolve().parent.parent
S006 = get_schedule(1.0, "0.06M")
DEADLINE_S = 20


class _RunsCode:
    """Unpickling this runs arbitrary code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _evil_pickle(path: Path, marker: Path, zipped: bool, tensors: dict | None = None) -> Path:
    payload = dict(tensors or {"w": torch.zeros(2)})
    payload["evil"] = _RunsCode(marker)
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    assert not marker.exists()
    return path


def _assert_names(error: pytest.ExceptionInfo, *names: str) -> None:
    message = str(error.value)
    for name in names:
        assert name in message, (name, message)


def _within_deadline(fn, *args, fifo: Path | None = None):
    """fn(*args) in a thread; fail (after unblocking a FIFO reader) if it is still running at the deadline."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        if fifo is not None:  # a blocked reader wakes up (and sees EOF) once a writer opens and closes the FIFO
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)}({args}) blocked for {DEADLINE_S} s")
    assert time.monotonic() - start < DEADLINE_S
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_TRANSFORMER))


# ------------------------------------------------------------------------------------------ pickles with code


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy_pth", "zip_pth"])
def test_pth_that_carries_code_is_refused_and_never_runs(tmp_path, zipped) -> None:
    marker = tmp_path / "code_ran"
    path = _evil_pickle(tmp_path / "evil_model.pth", marker, zipped)
    for load in (load_state_dict, load_transformer):
        with pytest.raises(CheckpointError) as e:
            load(path)
        _assert_names(e, "evil_model.pth", "pickled code")
        assert not marker.exists(), "loading the checkpoint executed code from it"
    torch.load(path, weights_only=False)  # control: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy_bin", "zip_bin"])
def test_t5_folder_whose_weights_carry_code_is_refused_naming_the_file(tmp_path, zipped) -> None:
    marker = tmp_path / "code_ran"
    folder = tmp_path / "t5_evil"
    shutil.copytree(T5_TINY, folder)
    (folder / "model.safetensors").unlink()
    _evil_pickle(folder / "pytorch_model.bin", marker, zipped, load_file(str(T5_TINY / "model.safetensors")))
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(folder)
    _assert_names(e, str(folder / "pytorch_model.bin"), "pickled code")
    assert "\n" not in str(e.value)  # one line, not transformers' page of advice
    assert not marker.exists()


def test_t5_folder_with_corrupt_safetensors_names_the_file(tmp_path) -> None:
    folder = tmp_path / "t5_truncated"
    shutil.copytree(T5_TINY, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(folder)
    _assert_names(e, str(folder), "model.safetensors")


def test_t5_folder_copied_by_a_mac_loads_past_its_appledouble_files(tmp_path) -> None:
    """macOS writes `._NAME` metadata beside each file it copies to an exFAT, FAT or SMB drive: not weights."""
    folder = tmp_path / "t5_from_a_mac"
    shutil.copytree(T5_TINY, folder)
    (folder / "._model.safetensors").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble magic
    (folder / "._config.json").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    got = T5TextEncoder.from_folder(folder).encode(["a red circle"])
    want = T5TextEncoder.from_folder(T5_TINY).encode(["a red circle"])
    assert got.lens == want.lens and torch.equal(got.kv_compact, want.kv_compact)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_t5_folder_with_a_fifo_does_not_block(tmp_path, name) -> None:
    """transformers only opens regular files: a FIFO in a T5 folder is skipped or named, never waited on."""
    folder = tmp_path / "t5_fifo"
    shutil.copytree(T5_TINY, folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    try:
        _within_deadline(T5TextEncoder.from_folder, folder, fifo=folder / name)
    except (CheckpointError, FileNotFoundError) as e:  # the weights or config are then missing: named
        assert str(folder) in str(e)


def test_shard_that_carries_code_is_refused(tmp_path, tiny_sd) -> None:
    marker = tmp_path / "code_ran"
    folder = save_sharded(tiny_sd, tmp_path / "sharded")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    keys = [k for k, s in index["weight_map"].items() if s == first]
    _evil_pickle(folder / "model-00001.bin", marker, True, {k: tiny_sd[k] for k in keys})
    index["weight_map"].update({k: "model-00001.bin" for k in keys})
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_state_dict(folder)
    _assert_names(e, "model-00001.bin", "pickled code")
    assert not marker.exists()


@pytest.mark.parametrize("text", ["a red \ud800 apple", "nul \x00 inside", "z" * 60_000])
def test_t5_refuses_a_prompt_that_is_not_valid_text(text) -> None:
    encoder = T5TextEncoder.from_folder(T5_TINY)
    with pytest.raises(InputError, match="prompt"):
        encoder.encode([text])
    with pytest.raises(InputError, match="prompt 2 of 2"):
        encoder.tokenize(["fine", text])


# ------------------------------------------------------------------------------------------ truncated files


@pytest.mark.parametrize("kind", ["safetensors", "zip_pth", "legacy_pth"])
@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint_names_the_file(tmp_path, tiny_sd, kind, keep) -> None:
    full = tmp_path / f"full.{kind}"
    if kind == "safetensors":
        save_safetensors(tiny_sd, full)
    else:
        torch.save(tiny_sd, full, _use_new_zipfile_serialization=kind == "zip_pth")
    cut = tmp_path / f"cut_{kind}{'.safetensors' if kind == 'safetensors' else '.pth'}"
    data = full.read_bytes()
    cut.write_bytes(data[: max(16, int(len(data) * keep))])
    with pytest.raises(CheckpointError) as e:
        load_state_dict(cut)
    _assert_names(e, cut.name)


# ------------------------------------------------------------------------------------------ lying headers


def _safetensors(path: Path, header: object, data: bytes = b"\0" * 8, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _tensor(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADERS = {
    "offset_2_62": ({"w": _tensor(offsets=(0, 2**62))}, {}),
    "offset_past_end": ({"w": _tensor(offsets=(0, 8))}, {"data": b"\0" * 4}),
    "offsets_reversed": ({"w": _tensor(offsets=(8, 0))}, {}),
    "offsets_overlap": ({"a": _tensor(), "b": _tensor()}, {}),
    "shape_overflows": ({"w": _tensor(shape=(2**31, 2**31, 2**31))}, {}),
    "shape_1tb": ({"w": _tensor(shape=(2**38,), offsets=(0, 2**40))}, {}),
    "shape_negative": ({"w": _tensor(shape=(-2,))}, {}),
    "shape_text": ({"w": _tensor(shape=("2",))}, {}),
    "dtype_unknown": ({"w": _tensor(dtype="Q99")}, {}),
    "dtype_object": ({"w": _tensor(dtype={"x": 1})}, {}),
    "header_length_2_60": ({"w": _tensor()}, {"length": 2**60}),
    "header_length_past_file": ({"w": _tensor()}, {"length": 5000}),
    "header_length_zero": ({"w": _tensor()}, {"length": 0}),
    "header_not_json": (b"{not json at all}", {}),
    "header_a_list": ([1, 2, 3], {}),
    "header_nested_deeply": (b"{\"w\": " + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
    # what the planner route summed from headers (review of 2026-12-07, third session): 8,000 dimensions of 10^99
    # (seconds of big-number products per request, the GIL held), Infinity, and shapes that are no whole numbers
    "shape_huge_dims": ({"w": _tensor(shape=[10**99] * 8000)}, {}),
    "shape_huge_behind_zero": ({"w": _tensor(shape=[0, 10**99], offsets=(0, 0))}, {"data": b""}),
    "shape_infinity": (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', {}),
    "shape_float": ({"w": _tensor(shape=(2.0,))}, {}),
    "shape_bool": ({"w": _tensor(shape=(True, True))}, {}),
    "shape_bytes_differ": ({"w": _tensor(shape=(3,))}, {}),
    "data_gap": ({"w": _tensor(offsets=(4, 12))}, {"data": b"\0" * 12}),
    "data_left_over": ({"w": _tensor()}, {"data": b"\0" * 16}),
}

#: The reason our own header check (`tensor_shapes`, what the planner and the loader's checks read) gives for each
#: lie; loading the weights goes through safetensors, whose reasons are its own ("not a readable safetensors file").
_SHAPE = "has no usable shape"
_COVER = "bytes of data but the file holds"
_SAFETENSORS_OWN = "not a readable safetensors file"
REASONS = {
    "offset_2_62": "declares shape [2] of F32 but 4611686018427387904 bytes of data",
    "offset_past_end": _COVER, "shape_1tb": _COVER, "data_left_over": _COVER,
    "offsets_reversed": "has no usable data_offsets",
    "offsets_overlap": "tensor 'b' overlaps another tensor's data", "data_gap": "leaves a gap before it",
    "shape_overflows": "declares shape [2147483648, 2147483648, 2147483648] of F32 but 8 bytes",
    "shape_bytes_differ": "declares shape [3] of F32 but 8 bytes of data",
    "shape_negative": _SHAPE, "shape_text": _SHAPE, "shape_huge_dims": _SHAPE, "shape_huge_behind_zero": _SHAPE,
    "shape_infinity": _SHAPE, "shape_float": _SHAPE, "shape_bool": _SHAPE,
    "dtype_unknown": "unknown dtype 'Q99'", "dtype_object": "unknown dtype {'x': 1}",
    "header_not_json": "not valid JSON", "header_nested_deeply": "JSON nested too deeply",
    # too long, past the file, empty or not an object: safetensors' own reader refuses them for both
    "header_length_2_60": "header too large", "header_length_past_file": "invalid header length",
    "header_length_zero": _SAFETENSORS_OWN, "header_a_list": _SAFETENSORS_OWN,
}


@pytest.mark.parametrize("read", ["load_state_dict", "tensor_shapes"])
@pytest.mark.parametrize("name", sorted(HEADERS))
def test_safetensors_header_that_lies_is_a_named_error(tmp_path, name, read) -> None:
    """Loading the weights and reading the shapes alone (what the planner and the loader's checks use) refuse the
    same headers, as safetensors itself would, quickly and naming the file."""
    header, kw = HEADERS[name]
    path = _safetensors(tmp_path / f"{name}.safetensors", header, **kw)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        getattr(checkpoint, read)(path)
    _assert_names(e, path.name)
    assert (REASONS[name] if read == "tensor_shapes" else _SAFETENSORS_OWN) in str(e.value)
    assert time.monotonic() - start < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB on Linux
    assert grown_mb < 256, f"reading {name} grew the process by {grown_mb:.0f} MB"


# ------------------------------------------------------------------------------------------ shard indexes


@pytest.fixture
def shard_folder(tmp_path, tiny_sd) -> Path:
    folder = save_sharded(tiny_sd, tmp_path / "models" / "sharded")
    # A valid checkpoint outside the folder: what an escaping entry would reach.
    save_safetensors({"secret": torch.zeros(2)}, tmp_path / "models" / "outside.safetensors")
    return folder


def _redirect_first_shard(folder: Path, entry: str) -> tuple[Path, str]:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (entry if s == first else s) for k, s in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return index_path, first


ESCAPES = {
    "dotdot": "../outside.safetensors",
    "dotdot_deep": "../../../../../../../../etc/passwd",
    "dotdot_inside_then_out": "sub/../../outside.safetensors",
    "etc_passwd": "/etc/passwd",
    "absolute_to_a_checkpoint": "ABSOLUTE",  # the outside file's absolute path
    "windows_dotdot": "..\\outside.safetensors",
    "windows_drive": "C:\\outside.safetensors",
    "windows_unc": "\\\\server\\share\\x.safetensors",
    "nul": "model\x00.safetensors",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_index_entry_that_leaves_the_folder_is_refused_before_opening_anything(shard_folder, monkeypatch,
                                                                               case) -> None:
    entry = ESCAPES[case]
    if entry == "ABSOLUTE":
        entry = str(shard_folder.parent / "outside.safetensors")
    index_path, _ = _redirect_first_shard(shard_folder, entry)
    opened: list[Path] = []
    monkeypatch.setattr(checkpoint, "_load_file", lambda path, **kw: opened.append(path))
    for fn in (load_state_dict, shard_files):
        with pytest.raises(CheckpointError) as e:
            fn(shard_folder)
        _assert_names(e, str(index_path), repr(entry)[1:-1][:40])
    assert opened == [], "a shard was opened before the index was checked"


def test_symlinked_shards_and_index_load_like_the_hugging_face_cache(shard_folder, tiny_sd) -> None:
    """The HF cache keeps each file of a snapshot as a link to ../../blobs/<hash>: a link made by the user may point
    anywhere a regular file is; only the index's own entries must stay in the folder."""
    blobs = shard_folder.parent / "blobs"
    blobs.mkdir()
    for path in sorted(shard_folder.iterdir()):
        target = blobs / path.name
        path.replace(target)
        path.symlink_to(target)
    sd = load_state_dict(shard_folder)
    assert sorted(sd) == sorted(tiny_sd) and torch.equal(sd["pos_start"], tiny_sd["pos_start"])


def test_symlinks_that_stay_inside_are_fine(shard_folder, tiny_sd) -> None:
    """Control: a symlink to another file of the same folder, and a symlinked folder, load as before."""
    _, first = _redirect_first_shard(shard_folder, "alias.safetensors")
    (shard_folder / "alias.safetensors").symlink_to(shard_folder / first)
    linked = shard_folder.parent / "linked_folder"
    linked.symlink_to(shard_folder, target_is_directory=True)
    for folder in (shard_folder, linked):
        assert [p.name for p in shard_files(folder)][0] == "alias.safetensors"
        sd = load_state_dict(folder)
        assert sorted(sd) == sorted(tiny_sd) and torch.equal(sd["pos_start"], tiny_sd["pos_start"])
    idx = shard_index(shard_folder)
    assert idx.path.name == "model.safetensors.index.json" and set(idx.files) == set(idx.weight_map.values())


def test_missing_shard_names_the_index_and_entry(shard_folder) -> None:
    index_path, first = _redirect_first_shard(shard_folder, "model-gone.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        shard_files(shard_folder)
    _assert_names(e, str(index_path), "model-gone.safetensors")


@pytest.mark.parametrize("special", ["fifo", "folder"])
def test_shard_entry_that_is_a_special_file_is_refused(shard_folder, special) -> None:
    target = shard_folder / "special.safetensors"
    os.mkfifo(target) if special == "fifo" else target.mkdir()
    index_path, _ = _redirect_first_shard(shard_folder, "special.safetensors")
    with pytest.raises(CheckpointError) as e:
        _within_deadline(load_state_dict, shard_folder, fifo=target if special == "fifo" else None)
    _assert_names(e, "special.safetensors", "FIFO" if special == "fifo" else "folder")


def test_index_that_is_a_fifo_does_not_block(tmp_path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    os.mkfifo(index)
    with pytest.raises(CheckpointError) as e:
        _within_deadline(shard_files, folder, fifo=index)
    _assert_names(e, str(index), "FIFO")


def test_index_that_is_huge_is_refused(tmp_path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    with open(index, "wb") as f:
        f.truncate(checkpoint.MAX_INDEX_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CheckpointError) as e:
        shard_files(folder)
    _assert_names(e, str(index), "too large")


# ------------------------------------------------------------------------------------------ special files


@pytest.mark.parametrize("special", ["fifo", "folder_without_index", "symlink_loop"])
def test_special_file_as_checkpoint_is_refused_without_blocking(tmp_path, special) -> None:
    path = tmp_path / "model.safetensors"
    if special == "fifo":
        os.mkfifo(path)
    elif special == "folder_without_index":
        path.mkdir()
    else:
        path.symlink_to(path)  # a link to itself: stat fails with ELOOP
    for fn in (load_state_dict, load_transformer):
        with pytest.raises(CheckpointError) as e:
            _within_deadline(fn, path, fifo=path if special == "fifo" else None)
        _assert_names(e, str(path))


@pytest.mark.parametrize("special", ["fifo", "folder"])
def test_special_file_as_budget_file_is_refused_without_blocking(tmp_path, special) -> None:
    path = tmp_path / "budget.json"
    os.mkfifo(path) if special == "fifo" else path.mkdir()
    with pytest.raises(BudgetError) as e:
        _within_deadline(load_budget_file, path, S006, 4, 50, fifo=path if special == "fifo" else None)
    _assert_names(e, str(path), "FIFO" if special == "fifo" else "folder")


def test_budget_file_too_large_or_not_text(tmp_path) -> None:
    big = tmp_path / "big_budget.json"
    with open(big, "wb") as f:
        f.truncate(2 * 2**20)
    with pytest.raises(BudgetError) as e:
        read_budget_json(big)
    _assert_names(e, str(big), "too large")
    binary = tmp_path / "binary_budget.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BudgetError) as e:
        read_budget_json(binary)
    _assert_names(e, str(binary), "UTF-8")
    nested = tmp_path / "nested_budget.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BudgetError) as e:
        read_budget_json(nested)
    _assert_names(e, str(nested))
    with pytest.raises(FileNotFoundError, match="missing_budget.json"):
        read_budget_json(tmp_path / "missing_budget.json")


_DEV_ZERO_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # a reader that never stops fails fast, not the host
from pathlib import Path
from scalekv_core.checkpoint import load_state_dict
from scalekv_core.kvcache.budget import load_budget_file
from scalekv_core.safe_files import read_bytes
from scalekv_core.schedules import get_schedule
folder = Path(sys.argv[1])
cases = {
    "checkpoint": lambda: load_state_dict("/dev/zero"),
    "budget_file": lambda: load_budget_file("/dev/zero", get_schedule(1.0, "0.06M"), 4, 50),
    "read_bytes": lambda: read_bytes("/dev/zero", 1024),
    "symlinked_checkpoint": lambda: load_state_dict(folder / "zero.safetensors"),
    "shard_in_folder": lambda: load_state_dict(folder / "sharded"),
}
out = {}
for name, fn in cases.items():
    try:
        fn()
        out[name] = ["loaded", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def test_dev_zero_is_refused_everywhere(tmp_path) -> None:
    """In a child with an 8 GB address-space limit and a timeout, so a regression cannot take the host down."""
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "zero.safetensors").symlink_to("/dev/zero")  # a link out of the folder, to a device
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "zero.safetensors"}}))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _DEV_ZERO_CHILD, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = {"checkpoint": ("CheckpointError", "/dev/zero"), "budget_file": ("BudgetError", "/dev/zero"),
                "read_bytes": ("ValueError", "/dev/zero"),
                "symlinked_checkpoint": ("CheckpointError", "zero.safetensors"),
                "shard_in_folder": ("CheckpointError", "zero.safetensors")}
    for name, (kind, named) in expected.items():
        assert out[name][0] == kind and named in out[name][1], (name, out[name])
    assert "character device" in out["checkpoint"][1] and "character device" in out["shard_in_folder"][1]


def test_read_bytes_caps_what_it_reads(tmp_path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100)
    assert read_bytes(path, 100) == b"x" * 100
    with pytest.raises(ValueError, match="data.bin"):
        read_bytes(path, 99)
    with pytest.raises(ValueError, match="NUL"):
        read_bytes(str(tmp_path / "a\x00b"), 10)
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        read_bytes(tmp_path / "nothing.bin", 10)


# ------------------------------------------------------------------------------------------ files that exhaust


@pytest.mark.parametrize("zipped", [False, True], ids=["legacy_pth", "zip_pth"])
def test_pth_whose_wrapper_contains_itself_is_refused(tmp_path, zipped) -> None:
    """{'model': <itself>} passes the weights-only unpickler; unwrapping it must end with an error, not loop."""
    wrapper: dict = {}
    wrapper["model"] = wrapper
    path = tmp_path / "cyclic_vae.pth"
    torch.save(wrapper, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError) as e:
        _within_deadline(load_state_dict, path)
    _assert_names(e, path.name, "contain themselves")


@pytest.mark.parametrize("key", ["block_chunks.0.module.999999999.pad", "block_chunks.999999999.module.0.pad"])
def test_one_stray_block_key_does_not_build_a_billion_blocks(tmp_path, tiny_sd, key) -> None:
    """A key naming block 999,999,999 in a small file is refused at once (its architecture cannot be that deep),
    instead of a set of a billion indices that ran the loader out of memory."""
    path = save_safetensors({**tiny_sd, key: torch.zeros(0)}, tmp_path / "infinity_stray.safetensors")
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        load_transformer(path)
    assert time.monotonic() - start < 5
    _assert_names(e, path.name, "999999999", "at most 256 blocks")


def test_zero_size_tensor_in_the_architecture_is_a_named_error(tmp_path, tiny_sd) -> None:
    key = "block_chunks.0.module.0.sa.scale_mul_1H11"
    path = save_safetensors({**tiny_sd, key: torch.zeros(1, 0, 1, 1)}, tmp_path / "infinity_zero_heads.safetensors")
    with pytest.raises(ValueError) as e:
        load_transformer(path)
    _assert_names(e, path.name, key, "[1, 0, 1, 1]")


def test_zero_size_vae_tensor_is_a_named_error(tmp_path) -> None:
    from helpers_tiny import TINY_VAE
    from scalekv_core.loader import load_vae

    key = "encoder.conv_in.conv.weight"
    sd = load_file(str(TINY_VAE))
    path = save_safetensors({**sd, key: torch.zeros(0, *sd[key].shape[1:])}, tmp_path / "vae_zero.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    _assert_names(e, path.name, key)


# ------------------------------------------------------------------------------------------ integer weights


def _as_int(sd: dict[str, torch.Tensor], key: str | None = None) -> dict[str, torch.Tensor]:
    """`sd` with `key` (every float tensor when None) cast to int32, as a careless conversion would leave it."""
    return {k: v.to(torch.int32) if v.is_floating_point() and key in (None, k) else v for k, v in sd.items()}


def test_transformer_with_integer_weights_is_a_named_error(tmp_path, tiny_sd) -> None:
    path = save_safetensors(_as_int(tiny_sd, "head.weight"), tmp_path / "infinity_int.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    _assert_names(e, path.name, "'head.weight' is int32", "floating-point")


def test_prequantized_transformer_with_integer_plain_weights_is_a_named_error(tmp_path) -> None:
    from scalekv_core.checkpoint import safetensors_metadata
    from scalekv_core.model.quant import save_quantized

    good = tmp_path / "infinity_int8.safetensors"
    save_quantized(load_transformer(TINY_TRANSFORMER, weights="int8"), good)
    sd = load_file(str(good))
    bad = tmp_path / "infinity_int8_bad.safetensors"
    from safetensors.torch import save_file
    save_file(_as_int(sd, "word_embed.weight"), str(bad), metadata=safetensors_metadata(good))
    with pytest.raises(CheckpointError) as e:
        load_transformer(bad)
    _assert_names(e, bad.name, "'word_embed.weight' is int32")


def test_vae_with_integer_weights_is_a_named_error(tmp_path) -> None:
    from helpers_tiny import TINY_VAE
    from scalekv_core.loader import load_vae

    path = save_safetensors(_as_int(load_file(str(TINY_VAE))), tmp_path / "vae_int.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    _assert_names(e, path.name, "is int32")


def test_t5_folder_with_integer_weights_is_refused_not_cast(tmp_path) -> None:
    folder = tmp_path / "t5_int"
    shutil.copytree(T5_TINY, folder)
    weights = folder / "model.safetensors"
    save_safetensors(_as_int(load_file(str(weights))), weights)
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(folder)
    _assert_names(e, "model.safetensors", "is I32")  # the header's name: nothing is loaded to find it


def test_single_file_t5_with_integer_weights_is_refused(tmp_path) -> None:
    sd = load_file(str(T5_TINY / "model.safetensors"))
    path = save_safetensors(_as_int({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}),
                            tmp_path / "t5_int.safetensors")
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_single_file(path, T5_TINY)
    _assert_names(e, path.name, "is int32")


def test_fewer_scale_embeddings_than_the_schedule_is_a_named_error_before_sampling(tmp_path, tiny_sd) -> None:
    """A checkpoint whose lvl_embed has 5 rows loads (the shape is consistent) but cannot draw 7 scales: refused
    before the first scale, naming the tensor and both counts (it was an IndexError in the middle of sampling)."""
    from helpers_tiny import TINY_VAE, reference_text
    from scalekv_core.loader import load_vae
    from scalekv_core.pipeline import InfinityPipeline

    path = save_safetensors({**tiny_sd, "lvl_embed.weight": tiny_sd["lvl_embed.weight"][:5]},
                            tmp_path / "infinity_few_levels.safetensors")
    pipe = InfinityPipeline(load_transformer(path), load_vae(TINY_VAE))
    scales = []
    with pytest.raises(ValueError, match=r"has 5 scale embeddings \('lvl_embed.weight' rows\) but 256x256 takes 7"):
        pipe.generate(reference_text(), seed=0, schedule=S006, on_scale=lambda si, *a: scales.append(si))
    assert scales == []


def test_a_checkpoint_given_in_the_wrong_place_is_named_as_what_it_is(tmp_path) -> None:
    """A VAE picked as the transformer, the transformer as the VAE, or a T5 file as either, is refused saying what
    the file is and where it goes (it was "missing key 'word_embed.weight'")."""
    from safetensors.torch import save_file

    from helpers_tiny import T5_TINY, TINY_TRANSFORMER, TINY_VAE
    from scalekv_core.checkpoint import CheckpointError
    from scalekv_core.loader import load_transformer, load_vae, transformer_config_of
    from scalekv_core.model.text_encoder import T5TextEncoder

    with pytest.raises(CheckpointError, match=r"is a BSQ-VAE checkpoint, not an Infinity transformer: give it as "
                                              r"the VAE \(the loader's vae, or --vae\)"):
        load_transformer(TINY_VAE)
    with pytest.raises(CheckpointError, match="is a BSQ-VAE checkpoint, not an Infinity transformer"):
        transformer_config_of(TINY_VAE)
    with pytest.raises(CheckpointError, match=r"is an Infinity transformer checkpoint, not a BSQ-VAE: give it as "
                                              r"the transformer"):
        load_vae(TINY_TRANSFORMER)
    t5 = tmp_path / "t5_single.safetensors"
    save_file({k: v.contiguous() for k, v in T5TextEncoder.from_folder(T5_TINY).module.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(t5))
    with pytest.raises(CheckpointError, match="is a T5 text encoder checkpoint, not a BSQ-VAE: give it as the text "
                                              "encoder"):
        load_vae(t5)


def test_a_file_swapped_for_one_of_the_same_size_and_mtime_is_another_version(tmp_path) -> None:
    """Caches of what is read from a file (headers, loaded models) are keyed by its version: a file replaced by one
    of the same size and modification time (`cp -p`, `rsync -a`, a relinked name) is a new version, not served
    stale (the route said fp8 for an int8 file, and the loader handed back the old model)."""
    first, second = tmp_path / "current.safetensors", tmp_path / "other.safetensors"
    first.write_bytes(b"a" * 64)
    second.write_bytes(b"b" * 64)
    stamp = first.stat().st_mtime_ns
    os.utime(second, ns=(stamp, stamp))
    before = checkpoint.file_version(first)
    os.replace(second, first)
    assert first.stat().st_mtime_ns == stamp and first.stat().st_size == 64
    assert checkpoint.file_version(first) != before
    assert checkpoint.file_version(first) == checkpoint.file_version(first)  # and stable while nothing changes


def test_every_dtype_safetensors_writes_is_read_for_its_shapes(tmp_path) -> None:
    """The header check knows every dtype the installed safetensors writes (the FNUZ fp8 pair was refused as
    unknown): each file it saves, zero-size tensors and a metadata-only file included, gives its shapes back."""
    import safetensors.torch as st

    names = {name: dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)}
    written = 0
    for name, dtype in sorted(names.items()):
        path = tmp_path / f"{name}.safetensors"
        try:
            st.save_file({"a": torch.zeros(4, 2).to(dtype), "empty": torch.zeros(0, 3).to(dtype)}, str(path))
        except (TypeError, ValueError, RuntimeError, KeyError):  # a dtype safetensors has no name for
            continue
        assert checkpoint.tensor_shapes(path) == {"a": (4, 2), "empty": (0, 3)}, name
        written += 1
    assert written >= 12
    st.save_file({}, str(tmp_path / "meta_only.safetensors"), metadata={"k": "v"})
    assert checkpoint.tensor_shapes(tmp_path / "meta_only.safetensors") == {}
