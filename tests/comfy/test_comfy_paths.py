"""Model folders: registration that respects extra_model_paths.yaml, menu choices, and lookups that name the file."""
from __future__ import annotations

import os
import pathlib

import pytest

import folder_paths

from helpers_tiny import TINY_TRANSFORMER, save_sharded
from safetensors.torch import load_file


@pytest.fixture
def paths(pack):
    return pack.nodes.paths


@pytest.fixture
def models_dir():
    return pathlib.Path(folder_paths.get_folder_paths("infinity")[0]).parent


def test_registration_merges_with_a_users_yaml(paths, monkeypatch, tmp_path):
    """A key the user configured keeps their folders first; ours is appended once; extensions are unioned."""
    fnp = dict(folder_paths.folder_names_and_paths)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    fnp["infinity"] = ([str(tmp_path / "user_infinity")], {".gguf"})  # as extra_model_paths.yaml would leave it
    fnp.pop("scalekv", None)
    paths.register_folders()
    paths.register_folders()  # idempotent (ComfyUI may import the pack twice)
    dirs, exts = fnp["infinity"]
    assert dirs == [str(tmp_path / "user_infinity"), os.path.join(folder_paths.models_dir, "infinity")]
    assert ".gguf" in exts and ".safetensors" in exts and ".pth" in exts
    assert fnp["scalekv"] == ([os.path.join(folder_paths.models_dir, "scalekv")], {".json"})
    assert fnp["vae"] == folder_paths.folder_names_and_paths["vae"]  # core keys untouched


def test_test_session_folders_come_first(paths, models_dir):
    """conftest registered the temporary models folder like a user's yaml; the pack appended ComfyUI/models/*."""
    for key in ("infinity", "scalekv"):
        dirs = folder_paths.get_folder_paths(key)
        assert dirs[0] == str(models_dir / key)
        assert dirs[-1] == os.path.join(folder_paths.models_dir, key)
    assert paths.budget_output_path("x.json") == str(models_dir / "scalekv" / "x.json")


def test_choices_list_files_shard_folders_and_t5_folders(paths, models_dir):
    sd = load_file(str(TINY_TRANSFORMER))
    folder = save_sharded(sd, models_dir / "infinity" / "tiny_sharded", n_shards=2)
    vae_copy = models_dir / "infinity" / "my_vae_copy.safetensors"
    vae_copy.write_bytes((models_dir / "vae" / "vae_tiny.safetensors").read_bytes())
    (models_dir / "text_encoders" / "not_a_model").mkdir()
    (models_dir / "text_encoders" / "loose_file.safetensors").write_bytes(b"x")
    try:
        transformers = paths.transformer_choices()
        assert transformers == ["infinity_tiny.safetensors", "tiny_sharded", "my_vae_copy.safetensors"]
        assert not any(name.startswith("tiny_sharded/") for name in transformers)  # shards are one entry
        assert paths.resolve_transformer("tiny_sharded") == str(folder)
        assert paths.vae_choices() == ["my_vae_copy.safetensors", "vae_tiny.safetensors", "infinity_tiny.safetensors"]
        assert paths.resolve_vae("my_vae_copy.safetensors") == str(vae_copy)  # VAEs in models/infinity work too
        assert paths.text_encoder_choices() == ["t5_tiny"]  # folders with config.json only
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        vae_copy.unlink()
        (models_dir / "text_encoders" / "not_a_model").rmdir()
        (models_dir / "text_encoders" / "loose_file.safetensors").unlink()


def test_budget_choices_skip_calibration_side_files(paths, models_dir):
    d = models_dir / "scalekv"
    (d / "mine.json").write_text("{}")
    (d / "mine.asi.json").write_text("{}")
    try:
        assert paths.budget_file_choices() == ["mine.json"]
        assert paths.resolve_budget_file("mine.json") == str(d / "mine.json")
    finally:
        (d / "mine.json").unlink()
        (d / "mine.asi.json").unlink()


@pytest.mark.parametrize("resolver, name, words", [
    ("resolve_transformer", "infinity_2b_reg.pth", ["infinity_2b_reg.pth", "models/infinity"]),
    ("resolve_vae", "infinity_vae_d32reg.pth", ["infinity_vae_d32reg.pth", "models/vae", "models/infinity"]),
    ("resolve_text_encoder", "flan-t5-xl", ["flan-t5-xl", "models/text_encoders"]),
    ("resolve_budget_file", "gone.json", ["gone.json", "models/scalekv"]),
])
def test_missing_names_are_named_with_the_folders_searched(paths, models_dir, resolver, name, words):
    with pytest.raises(FileNotFoundError) as e:
        getattr(paths, resolver)(name)
    for w in words:
        assert w in str(e.value)
    assert str(models_dir) in str(e.value)


@pytest.mark.parametrize("name", ["../vae/vae_tiny.safetensors", "/etc/passwd", "a/../../b"])
def test_names_cannot_leave_the_model_folders(paths, name):
    with pytest.raises(ValueError):
        paths.resolve_vae(name)


@pytest.mark.parametrize("name", ["", None])
def test_an_empty_menu_says_where_the_files_go(paths, name):
    with pytest.raises(FileNotFoundError, match="no Infinity transformer selected.*models/infinity"):
        paths.resolve_transformer(name)


def test_a_shard_folder_without_index_is_not_a_transformer(paths, models_dir):
    folder = models_dir / "infinity" / "half_copied"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    try:
        assert "half_copied" not in paths.transformer_choices()
        with pytest.raises(FileNotFoundError, match="half_copied"):
            paths.resolve_transformer("half_copied")
    finally:
        (folder / "model-00001-of-00002.safetensors").unlink()
        folder.rmdir()
