"""The node side of Windows and macOS names: menu names under Windows' path rules (3.11's and 3.13's ntpath), names
Windows cannot create refused before Calibrate's work, folders on two drives, and macOS's AppleDouble files."""
from __future__ import annotations

import importlib
import ntpath
import os
import pathlib
import shutil
import types

import pytest

import folder_paths


def _isabs_313(path: str) -> bool:
    """Python 3.13's ntpath.isabs: a drive and a root both ('\\x' and 'C:x' are not absolute)."""
    drive, rest = ntpath.splitdrive(path)
    return bool(drive) and rest[:1] in ("\\", "/")


def windows_os(isabs=ntpath.isabs, **overrides) -> types.SimpleNamespace:
    """nodes/paths.py's `os` as it is on Windows: ntpath's rules (with 3.13's isabs if asked), '\\' as separator."""
    names = {n: getattr(ntpath, n) for n in dir(ntpath) if not n.startswith("__")}
    return types.SimpleNamespace(path=types.SimpleNamespace(**{**names, "isabs": isabs, **overrides}), sep="\\",
                                 environ=os.environ, listdir=os.listdir, walk=os.walk)


@pytest.fixture
def on_windows(paths, monkeypatch):
    """folder_paths' scalekv key on C:, and paths.os with Windows' rules; on_windows(isabs) picks 3.11 or 3.13."""
    fnp = dict(folder_paths.folder_names_and_paths)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    fnp["scalekv"] = ([r"C:\ComfyUI\models\scalekv"], {".json"})

    def use(isabs=ntpath.isabs, **overrides):
        monkeypatch.setattr(paths, "os", windows_os(isabs, **overrides))
        return fnp

    return use


ESCAPES = [r"\Users\Public\evil", "/Windows/evil", "D:evil", r"D:\evil", "C:evil", "//srv/share/evil",
           r"\\srv\share\evil", "../evil", r"sub\..\..\evil",
           "./C:/Windows/evil", "./D:evil", r".\D:evil", ".. /evil"]  # Windows' normpath: 'C:\Windows\evil', '..'



@pytest.mark.parametrize("isabs", [ntpath.isabs, _isabs_313], ids=["py311", "py313"])
@pytest.mark.parametrize("prefix", ESCAPES)
def test_a_budget_file_name_cannot_leave_models_scalekv_under_windows_rules(paths, on_windows, isabs, prefix):
    """3.13's ntpath.isabs('\\x') is False, and 'D:evil' is relative on any version: both wrote outside."""
    on_windows(isabs)
    with pytest.raises(ValueError, match="is not a name inside a model folder"):
        paths.budget_output_path(f"{prefix}_1024x1024_10pct.json")
    with pytest.raises(ValueError, match="is not a name inside a model folder"):  # a linked budget_file: no reading
        paths.resolve_budget_file(f"{prefix}.json")
    with pytest.raises(ValueError):  # the /scalekv/plan report's path
        paths.budget_file_from_report(f"{prefix}.json")


@pytest.mark.parametrize("name", ["D:evil.json", "C:x/y.json", "c:secret.json", r"\\srv\share\x.json"])
def test_drive_names_are_refused_on_this_os_too(paths, name):
    """One rule on every OS: 'D:evil.json' is a plain relative name on Linux, but a workflow with it escapes on
    Windows."""
    with pytest.raises(ValueError, match="is not a name inside a model folder"):
        paths.resolve_budget_file(name)


def test_a_report_on_the_second_of_two_drives_is_found(paths, on_windows):
    """extra_model_paths.yaml's folder on D:, ComfyUI's on C:: commonpath raised "Paths don't have the same drive"
    for the first folder, which ended the search and refused a valid file."""
    target = r"C:\ComfyUI\models\scalekv\mine_1024x1024_10pct.json"
    fnp = on_windows(isfile=lambda p: ntpath.normcase(p) == ntpath.normcase(target))
    fnp["scalekv"] = ([r"D:\AI\models\scalekv", r"C:\ComfyUI\models\scalekv"], {".json"})
    assert paths.budget_file_from_report(target) == target
    assert paths.budget_file_from_report(r"c:\comfyui\Models\ScaleKV\mine_1024x1024_10pct.json").lower() == \
        target.lower()  # Windows compares names without case
    with pytest.raises(ValueError, match="is not in models/scalekv"):
        paths.budget_file_from_report(r"E:\elsewhere\mine.json")


# ------------------------------------------------------------------------------ names Windows cannot create

@pytest.mark.parametrize("prefix, words", [
    ("portrait v2: final", "':'"), ("what?", "'?'"), ("a|b", "'|'"), ("a<b", "'<'"), ('say "hi"', "'\"'"),
    ("star*", "'*'"), ("CON/x", "'CON'"), ("sub/aux.v1/x", "'aux.v1'"), ("LPT1 /x", "'LPT1 '"),
    ("sub./x", "ending in a dot"), ("sub /x", "ending in a space"),
])
def test_calibrate_refuses_names_windows_cannot_create_before_any_work(node_classes, prefix, words):
    cls = node_classes["ScaleKVCalibrate"]
    message = cls.validate_inputs(budget=10.0, filename_prefix=prefix)
    assert isinstance(message, str) and message.startswith("filename_prefix: ") and repr(prefix) in message
    assert words in message and len(message) < 300


@pytest.mark.parametrize("prefix", ["CON", "v2.", "console", "my budget", "sub/COM10", "caf\u00e9"])
def test_calibrate_accepts_a_prefix_that_makes_a_good_name(node_classes, prefix):
    """Calibrate appends '_WxH_Bpct.json': a prefix 'CON' or 'v2.' makes a name Windows creates."""
    assert node_classes["ScaleKVCalibrate"].validate_inputs(budget=10.0, filename_prefix=prefix) is True


def test_calibrate_refuses_an_unwritable_destination_before_calibrating(run, loaded, pack, monkeypatch):
    """The destination's files are created and removed first: what the OS refuses (here as Windows refuses a name,
    or as a read-only folder does) is an error in seconds, not after the whole calibration."""
    cache = importlib.import_module(f"{pack.__name__}.nodes.cache")
    scalekv_dir = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])
    calibrated: list[int] = []
    monkeypatch.setattr(cache, "calibrate", lambda *a, **kw: calibrated.append(1))
    real_open = os.open

    def refuse(path, flags, *a, **kw):
        if str(path).startswith(str(scalekv_dir)) and str(path).endswith(".partial"):
            raise PermissionError(13, "Access is denied")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError) as e:
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], prompts="a red fox", resolution="256x256 (1:1)",
            budget=10.0, num_drafters=0, seed=0, filename_prefix="tiny_locked")
    monkeypatch.setattr(os, "open", real_open)
    assert calibrated == []
    assert "filename_prefix 'tiny_locked': cannot write the budget file" in str(e.value)
    assert str(scalekv_dir / "tiny_locked_256x256_10pct.json") in str(e.value) and "Access is denied" in str(e.value)
    assert not list(scalekv_dir.glob("tiny_locked*"))


def test_calibrate_leaves_no_probe_behind(run, loaded, pack, monkeypatch):
    cache = importlib.import_module(f"{pack.__name__}.nodes.cache")
    scalekv_dir = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])
    seen: list[list[str]] = []

    def fake_calibrate(*a, **kw):
        seen.append(sorted(p.name for p in scalekv_dir.glob("tiny_probe*")))
        raise RuntimeError("stop here")

    monkeypatch.setattr(cache, "calibrate", fake_calibrate)
    with pytest.raises(RuntimeError, match="stop here"):
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], prompts="a red fox", resolution="256x256 (1:1)",
            budget=10.0, num_drafters=0, seed=0, filename_prefix="tiny_probe")
    assert seen == [[]] and not list(scalekv_dir.glob("tiny_probe*"))


# ------------------------------------------------------------------------------ macOS AppleDouble files

def test_apple_double_files_are_not_in_the_menus(paths, models_dir, monkeypatch):
    """macOS writes `._NAME` beside every file it copies to exFAT, FAT or SMB drives: a `._x.index.json` made a
    shard folder of anything, and `._*` files were offered as models and budget files."""
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    made = []
    only_double = models_dir / "infinity" / "copied_by_a_mac"
    only_double.mkdir()
    made.append(only_double)
    (only_double / "._model.safetensors.index.json").write_bytes(b"\x00\x05\x16\x07")
    real = models_dir / "infinity" / "infinity_8b_weights"
    real.mkdir()
    made.append(real)
    (real / "model.safetensors.index.json").write_text('{"weight_map": {}}', encoding="utf-8")
    (real / "._model.safetensors.index.json").write_bytes(b"\x00\x05\x16\x07")
    doubles = [models_dir / "infinity" / "._infinity_tiny.safetensors", models_dir / "vae" / "._vae_tiny.safetensors",
               models_dir / "scalekv" / "._mine.json", models_dir / "scalekv" / "mine.json"]
    for p in doubles:
        p.write_bytes(b"{}")
    t5_double = models_dir / "text_encoders" / "._t5_copy"
    t5_double.mkdir()
    (t5_double / "config.json").write_text("{}", encoding="utf-8")
    made.append(t5_double)
    try:
        transformers = paths.transformer_choices()
        assert "infinity_8b_weights" in transformers and "copied_by_a_mac" not in transformers
        assert not any(n.rsplit("/", 1)[-1].startswith("._") for n in transformers)
        assert not any(n.rsplit("/", 1)[-1].startswith("._") for n in paths.vae_choices())
        assert "mine.json" in paths.budget_file_choices() and "._mine.json" not in paths.budget_file_choices()
        assert "._t5_copy" not in paths.text_encoder_choices()
        assert not paths._is_shard_folder(str(only_double)) and paths._is_shard_folder(str(real))
    finally:
        for p in doubles:
            p.unlink()
        for d in made:
            shutil.rmtree(d)
