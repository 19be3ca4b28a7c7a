"""Windows and macOS file names on any OS: one rule for names inside a folder, the names Windows cannot create, the
probe before a long job's output, a rename another program blocks, AppleDouble files, and UTF-8 workflows."""
from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path

import pytest

from scalekv_core import safe_files
from scalekv_core.checkpoint import CheckpointError, shard_files, shard_index
from scalekv_core.safe_files import (ReplaceBlockedError, atomic_path, check_writable, portable_name_problem,
                                     relative_name_problem, write_text)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ names inside a folder

ABSOLUTE, UP, DOTS = "is an absolute path", "leaves the folder ('..')", "a part of only dots and spaces"
#: name -> the reason it is refused (written here, not taken from the rule under test)
OUTSIDE = {"D:evil.json": ABSOLUTE, "C:\\Windows\\x.json": ABSOLUTE, "c:x": ABSOLUTE,
           "\\Users\\Public\\evil.json": ABSOLUTE, "/etc/passwd": ABSOLUTE, "//srv/share/x.json": ABSOLUTE,
           "\\\\srv\\share\\x.json": ABSOLUTE, "\\\\?\\C:\\x.json": ABSOLUTE,
           "./C:/Windows/evil.json": ABSOLUTE, "./D:evil.json": ABSOLUTE,  # Windows' normpath: 'C:\\Windows\\...'
           "../x": UP, "..\\x": UP, "a/../../b": UP, "sub/../x": UP,
           "x/.. .": DOTS, "...": DOTS, ".. /x": DOTS,  # Windows trims trailing dots and spaces: '..'
           "": "is empty", "a\x00b": "contains a NUL character"}
INSIDE = ["x.json", "sub/x.json", "sub\\x.json", "my..model.pth", "model:v2.pth", "._x", "./x.json"]


@pytest.mark.parametrize("name", OUTSIDE)
def test_names_that_leave_a_folder_on_some_os_are_refused_on_every_os(name):
    assert OUTSIDE[name] in (relative_name_problem(name) or "")


@pytest.mark.parametrize("name", INSIDE)
def test_names_inside_a_folder_pass(name):
    assert relative_name_problem(name) is None


@pytest.mark.parametrize("name", ["D:model-1.safetensors", "\\Users\\x.safetensors", "sub/../model-1.safetensors"])
def test_a_shard_index_follows_the_same_rule(tmp_path, name):
    """checkpoint._shard_entry uses relative_name_problem: a drive-relative entry is refused, naming it."""
    (tmp_path / "model-1.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}), encoding="utf-8")
    with pytest.raises(CheckpointError) as e:
        shard_index(tmp_path)
    assert (UP if ".." in name else ABSOLUTE) in str(e.value) and name in str(e.value).replace("\\\\", "\\")


# ------------------------------------------------------------------------------ names Windows cannot create

@pytest.mark.parametrize("name, words", [
    ("portrait v2: final.json", "':'"), ("what?.json", "'?'"), ("a|b.json", "'|'"), ('say "hi".json', "'\"'"),
    ("a<b>.json", "'<'"), ("star*.json", "'*'"), ("tab\there.json", "'\\t'"), ("bell\x07.json", "'\\x07'"),
    ("CON", "'CON'"), ("con.json", "'con.json'"), ("CON/x.json", "'CON'"), ("Aux.tar.gz", "'Aux.tar.gz'"),
    ("nul .json", "'nul .json'"), ("COM1.json", "'COM1.json'"), ("lpt9", "'lpt9'"), ("COM\u00b9.json", "COM"),
    ("sub./x.json", "'sub.' ending in a dot"), ("x.json.", "ending in a dot"), ("sub /x.json", "ending in a space"),
])
def test_names_windows_cannot_create_are_named_with_the_reason(name, words):
    problem = portable_name_problem(name)
    assert problem is not None and words in problem


@pytest.mark.parametrize("name", ["x.json", "CONFIG.json", "console/x.json", "COM10.json", "LPT0.json", "a.b.json",
                                  "sub/dir/x_1024x1024_10pct.json", "caf\u00e9 \u6771\u4eac.json"])
def test_names_windows_can_create_pass(name):
    assert portable_name_problem(name) is None


def test_a_prefix_is_judged_with_the_text_that_follows_it():
    """Calibrate appends '_WxH_Bpct.json': 'CON' or 'v2.' as a prefix make a good name; a bad character never does."""
    for prefix in ("CON", "v2.", "v2 ", "sub/CON"):
        assert portable_name_problem(prefix, prefix=True) is None
    for prefix in ("CON/x", "sub./x", "a|b"):
        assert portable_name_problem(prefix, prefix=True) is not None


# ------------------------------------------------------------------------------ probing an output before the work

def test_check_writable_creates_and_removes_a_file_as_long_as_the_longest_name_written(tmp_path, monkeypatch):
    made: list[str] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kw):
        made.append(os.path.basename(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(safe_files.os, "open", spy)
    for length in (10, 200, 230, 255):
        check_writable(tmp_path / "sub" / ("x" * (length - 5) + ".json"))
    monkeypatch.undo()
    assert [len(n) for n in made] == [27, 217, 230, 255]  # NAME.XXXXXXXX.partial up to 200 + 17, else the final name
    assert all(n.endswith(".partial") for n in made)
    assert list((tmp_path / "sub").iterdir()) == []


def test_check_writable_names_the_output_when_the_os_refuses(tmp_path, monkeypatch):
    def refuse(path, *a, **kw):
        raise OSError(22, "Invalid argument")  # what Windows answers for 'a:b.json'

    monkeypatch.setattr(safe_files.os, "open", refuse)
    with pytest.raises(OSError, match=r"prefix 'a': cannot write .*out\.json: Invalid argument") as e:
        check_writable(tmp_path / "out.json", "prefix 'a': cannot write")
    monkeypatch.undo()
    assert e.value.errno == 22
    with pytest.raises(OSError, match="cannot write .*: File name too long"):  # Linux's own refusal
        check_writable(tmp_path / ("x" * 300))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ a rename another program blocks

class Blocked:
    """os.replace as Windows answers it while another program holds the target open: PermissionError (WinError 32)
    `times` times, then the real rename."""

    def __init__(self, times: int) -> None:
        self.times, self.calls, self.real = times, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls <= self.times:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return self.real(src, dst)


@pytest.fixture
def windows(monkeypatch):
    monkeypatch.setattr(safe_files, "_on_windows", lambda: True)
    monkeypatch.setattr(safe_files, "REPLACE_WAITS", (0.0,) * len(safe_files.REPLACE_WAITS))


def test_windows_retries_a_rename_another_program_blocks(tmp_path, monkeypatch, windows):
    target = tmp_path / "budget.json"
    target.write_text("old", encoding="utf-8")
    blocked = Blocked(3)
    monkeypatch.setattr(safe_files.os, "replace", blocked)
    write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new" and blocked.calls == 4
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"]


def test_windows_keeps_a_finished_file_when_the_rename_stays_blocked(tmp_path, monkeypatch, windows):
    target = tmp_path / "budget.json"
    target.write_text("old", encoding="utf-8")
    blocked = Blocked(10 ** 6)
    monkeypatch.setattr(safe_files.os, "replace", blocked)
    with pytest.raises(ReplaceBlockedError) as e:
        write_text(target, "an hour of calibration")
    assert blocked.calls == len(safe_files.REPLACE_WAITS) + 1
    assert isinstance(e.value, PermissionError) and e.value.errno == 13
    kept = e.value.partial
    assert kept.read_text(encoding="utf-8") == "an hour of calibration"
    assert str(target) in str(e.value) and str(kept) in str(e.value) and "rename it to budget.json" in str(e.value)
    assert target.read_text(encoding="utf-8") == "old"


def test_windows_removes_an_unfinished_file(tmp_path, windows):
    """A PermissionError from the writer itself is not a blocked rename: nothing finished, nothing kept."""
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "out.bin"):
            raise PermissionError(13, "denied")
    assert list(tmp_path.iterdir()) == []


def test_other_systems_do_not_retry_and_keep_no_partial(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_files, "_on_windows", lambda: False)
    blocked = Blocked(1)
    monkeypatch.setattr(safe_files.os, "replace", blocked)
    with pytest.raises(PermissionError, match="cannot write .*out.json") as e:
        write_text(tmp_path / "out.json", "x")
    assert not isinstance(e.value, ReplaceBlockedError) and blocked.calls == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ macOS AppleDouble files

def test_apple_double_files_beside_a_shard_folders_index_are_not_indexes(tmp_path):
    folder = tmp_path / "infinity_8b_weights"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}),
                                                         encoding="utf-8")
    (folder / "model-1.safetensors").write_bytes(b"x")
    (folder / "._model.safetensors.index.json").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS on exFAT
    (folder / "._model-1.safetensors").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    assert shard_files(folder) == [folder / "model-1.safetensors"]
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="none found"):  # the AppleDouble file alone is no index
        shard_index(folder)


# ------------------------------------------------------------------------------ scripts/run_workflow.py

def _import_run_workflow():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        sys.modules.pop("run_workflow", None)
        import run_workflow
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return run_workflow


def test_run_workflow_reads_utf8_and_writes_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Windows' open() defaults to the ANSI code page (cp1252): every text open must name its encoding."""
    run_workflow = _import_run_workflow()
    real_open = builtins.open
    defaulted: list[str] = []

    def windows_open(file, mode="r", *a, encoding=None, **kw):
        if "b" not in mode and encoding is None:
            defaulted.append(str(file))
            encoding = "cp1252"
        return real_open(file, mode, *a, encoding=encoding, **kw)

    sent: list[str] = []
    monkeypatch.setattr(run_workflow, "open", windows_open, raising=False)  # the module's lookup of open()
    monkeypatch.setattr(run_workflow, "object_info", lambda base: {})
    monkeypatch.setattr(run_workflow, "ui_to_api", lambda wf, info: {"1": {"inputs": {"text": wf["nodes"][0]["w"]}}})
    monkeypatch.setattr(run_workflow, "apply_overrides", lambda api, **kw: None)
    monkeypatch.setattr(run_workflow, "queue", lambda base, api, wf: sent.append(api["1"]["inputs"]["text"]) or "id")
    monkeypatch.setattr(run_workflow, "wait", lambda base, pid, timeout: {
        "outputs": {"3": {run_workflow.MEMORY_KEY: [{"prompt": sent[-1]}]}}})
    monkeypatch.setattr(run_workflow, "download_images", lambda base, entry, out: [])
    prompts = ["\u6771\u4eac\u306e\u591c\u666f", "caf\u00e9 cr\u00e8me"]
    for prompt in prompts:
        path = tmp_path / "wf.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"nodes": [{"w": prompt}]}, ensure_ascii=False).encode("utf-8"))
        argv = [str(path), "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "out"),
                "--api-out", str(tmp_path / "api.json")]
        assert run_workflow.main(argv) == 0
        assert json.loads((tmp_path / "api.json").read_text(encoding="utf-8"))["1"]["inputs"]["text"] == prompt
        report = json.loads((tmp_path / "out" / "memory_report.json").read_text(encoding="utf-8"))
        assert report == {"prompt": prompt}
    assert sent == prompts and defaulted == []


def test_run_workflow_names_a_workflow_that_is_not_utf8(tmp_path, capsys):
    run_workflow = _import_run_workflow()
    path = tmp_path / "wf.json"
    path.write_bytes('{"prompt": "caf\u00e9"}'.encode("cp1252"))
    assert run_workflow.main([str(path), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot read the workflow" in capsys.readouterr().err


def test_check_writable_probes_where_a_linked_output_is_written(tmp_path):
    """atomic_path writes beside a symlinked output's target, so the probe goes there (a read-only target folder
    is refused before the work)."""
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    (target_dir / "budget.json").write_text("{}", encoding="utf-8")
    link = tmp_path / "budget.json"
    link.symlink_to(target_dir / "budget.json")
    seen = []
    real_open = safe_files.os.open
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safe_files.os, "open", lambda p, *a: seen.append(Path(p).parent) or real_open(p, *a))
        check_writable(link)
    assert seen == [target_dir]
