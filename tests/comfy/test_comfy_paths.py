"""Model folders: registration that respects extra_model_paths.yaml, menu choices, and lookups that name the file."""
from __future__ import annotations

import os
import pathlib

import pytest

import folder_paths

from helpers_tiny import TINY_TRANSFORMER, save_sharded
from safetensors.torch import load_file


def test_registration_merges_with_a_users_yaml(paths, monkeypatch, tmp_path):
    """A key the user configured keeps their folders first; ours is appended once; extensions are unioned."""
    fnp = dict(folder_paths.folder_names_and_paths)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", "")  # no embedded model: see the default-model tests below
    fnp["infinity"] = ([str(tmp_path / "user_infinity")], {".gguf"})  # as extra_model_paths.yaml would leave it
    fnp.pop("scalekv", None)
    paths.register_folders()
    paths.register_folders()  # idempotent (ComfyUI may import the pack twice)
    dirs, exts = fnp["infinity"]
    assert dirs == [str(tmp_path / "user_infinity"), os.path.join(folder_paths.models_dir, "infinity")]
    assert ".gguf" in exts and ".safetensors" in exts and ".pth" in exts
    assert fnp["scalekv"] == ([os.path.join(folder_paths.models_dir, "scalekv")], {".json"})
    assert fnp["vae"] == folder_paths.folder_names_and_paths["vae"]  # core keys untouched


def test_test_session_folders_come_first(paths, models_dir, without_embedded_model):
    """conftest registered the temporary models folder like a user's yaml; the pack appended ComfyUI/models/*."""
    for key in ("infinity", "scalekv"):
        dirs = folder_paths.get_folder_paths(key)
        assert dirs[0] == str(models_dir / key)
        assert dirs[-1] == os.path.join(folder_paths.models_dir, key)
    assert paths.budget_output_path("x.json") == str(models_dir / "scalekv" / "x.json")


def isolate_folders(paths, monkeypatch) -> dict:
    """For one test: a copy of the registered folders less the embedded model's (the pack added them at import)
    and an empty file-list cache (ComfyUI's cache would otherwise keep listing a removed folder's files)."""
    root = paths.default_model_dir()
    fnp = dict(folder_paths.folder_names_and_paths)
    if root is not None:
        for key, sub in paths.DEFAULT_MODEL_SUBDIRS.items():
            dirs, exts = fnp.get(key, ([], set()))
            fnp[key] = ([d for d in dirs if d != os.path.join(root, sub)], exts)
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", fnp)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return fnp


@pytest.fixture
def without_embedded_model(paths, monkeypatch):
    """The menus as they are without default_model/ (whether or not its trained files are checked out)."""
    isolate_folders(paths, monkeypatch)


def test_choices_list_files_shard_folders_and_t5_folders(paths, models_dir, without_embedded_model):
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


def test_infinity_transformers_in_diffusion_models_are_listed_and_load(paths, monkeypatch, tmp_path, run):
    """Artists keep image models in models/diffusion_models: the Infinity ones (by name) join the menu, one entry
    per shard folder; other models there stay out of it; models/infinity comes first on a name clash."""
    fnp = isolate_folders(paths, monkeypatch)
    diffusion = tmp_path / "diffusion_models"
    diffusion.mkdir()
    fnp["diffusion_models"] = ([str(diffusion)], set(folder_paths.supported_pt_extensions))
    sd = load_file(str(TINY_TRANSFORMER))
    (diffusion / "Infinity-tiny-copy.safetensors").write_bytes(TINY_TRANSFORMER.read_bytes())
    (diffusion / "flux1-dev.safetensors").write_bytes(b"not ours")
    folder = save_sharded(sd, diffusion / "infinity_tiny_shards", n_shards=2)
    transformers = paths.transformer_choices()
    assert "Infinity-tiny-copy.safetensors" in transformers and "infinity_tiny_shards" in transformers
    assert "flux1-dev.safetensors" not in transformers
    assert not any(n.startswith("infinity_tiny_shards/") for n in transformers)
    assert paths.resolve_transformer("infinity_tiny_shards") == str(folder)
    model, _ = run("InfinityModelLoader", transformer="Infinity-tiny-copy.safetensors",
                   vae="vae_tiny.safetensors", text_encoder="t5_tiny", precision="auto").result
    assert model.info["transformer"] == str(diffusion / "Infinity-tiny-copy.safetensors")
    with pytest.raises(FileNotFoundError, match="models/infinity or models/diffusion_models"):
        paths.resolve_transformer("missing_infinity.safetensors")


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


# ------------------------------------------------------------------------------------------- embedded default model

TINY = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "infinity-tiny"


def make_default_model(root: pathlib.Path) -> pathlib.Path:
    """default_model/'s layout (infinity/, vae/, text_encoders/) with the tiny files under the shipped names."""
    for sub in ("infinity", "vae", "text_encoders"):
        (root / sub).mkdir(parents=True)
    os.symlink(TINY / "infinity_tiny.safetensors", root / "infinity" / "infinity_shapes.safetensors")
    os.symlink(TINY / "vae_tiny.safetensors", root / "vae" / "infinity_shapes_vae.safetensors")
    os.symlink(TINY / "t5_tiny", root / "text_encoders" / "t5_shapes")
    return root


@pytest.fixture
def embedded(paths, monkeypatch, tmp_path):
    """A default_model folder with the tiny files, registered as the pack does at import (on a copy of the folders)."""
    isolate_folders(paths, monkeypatch)
    root = make_default_model(tmp_path / "default_model")
    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", str(root))
    paths.register_folders()
    return root


def test_embedded_model_folders_come_after_the_users_and_comfyuis(paths, embedded, models_dir):
    paths.register_folders()  # a second import adds nothing
    dirs = folder_paths.get_folder_paths("infinity")
    assert dirs[0] == str(models_dir / "infinity")  # conftest's folders, registered like a user's yaml
    assert dirs[-1] == str(embedded / "infinity") and dirs.count(str(embedded / "infinity")) == 1
    assert dirs[-2] == os.path.join(folder_paths.models_dir, "infinity")
    for key, sub in ((paths.DEFAULT_VAE_KEY, "vae"), (paths.DEFAULT_TEXT_ENCODERS_KEY, "text_encoders")):
        assert folder_paths.get_folder_paths(key) == [str(embedded / sub)]
    assert ".safetensors" in folder_paths.folder_names_and_paths["vae"][1]  # core extensions kept


def test_comfyuis_own_loaders_do_not_list_the_embedded_vae_and_t5(paths, embedded):
    """VAELoader and CLIPLoader read ComfyUI's "vae" and "text_encoders": the embedded files are not there (they
    were listed beside the user's SD and Flux files), while our own menus have them."""
    for key in ("vae", "text_encoders"):
        assert str(embedded) not in " ".join(folder_paths.get_folder_paths(key))
    assert "infinity_shapes_vae.safetensors" not in folder_paths.get_filename_list("vae")
    assert not [f for f in folder_paths.get_filename_list("text_encoders") if "t5_shapes" in f]
    assert "infinity_shapes_vae.safetensors" in paths.vae_choices() and "t5_shapes" in paths.text_encoder_choices()


def test_embedded_model_is_in_the_menus_and_resolves(paths, embedded):
    assert "infinity_shapes.safetensors" in paths.transformer_choices()
    assert "infinity_shapes_vae.safetensors" in paths.vae_choices()
    assert "t5_shapes" in paths.text_encoder_choices()
    assert paths.resolve_transformer("infinity_shapes.safetensors") == str(embedded / "infinity" / "infinity_shapes.safetensors")
    assert paths.resolve_vae("infinity_shapes_vae.safetensors") == str(embedded / "vae" / "infinity_shapes_vae.safetensors")
    assert paths.resolve_text_encoder("t5_shapes") == str(embedded / "text_encoders" / "t5_shapes")


def test_a_users_file_of_the_same_name_wins_over_the_embedded_one(paths, embedded, models_dir):
    mine = models_dir / "infinity" / "infinity_shapes.safetensors"
    mine.write_bytes(b"the user's own")
    try:
        assert paths.transformer_choices().count("infinity_shapes.safetensors") == 1
        assert paths.resolve_transformer("infinity_shapes.safetensors") == str(mine)
    finally:
        mine.unlink()


def test_the_embedded_model_folder_is_the_packs_unless_overridden(paths, monkeypatch, tmp_path):
    fnp = isolate_folders(paths, monkeypatch)
    monkeypatch.delenv("SCALEKV_DEFAULT_MODEL_DIR", raising=False)
    assert paths.default_model_dir() == str(pathlib.Path(__file__).resolve().parents[2] / "default_model")
    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", str(tmp_path))
    assert paths.default_model_dir() == str(tmp_path)
    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", "")
    assert paths.default_model_dir() is None
    before = {k: list(fnp[k][0]) for k in ("vae", "text_encoders")}
    paths.register_folders()
    assert {k: fnp[k][0] for k in ("vae", "text_encoders")} == before  # nothing embedded registered


def test_a_missing_embedded_file_is_named_with_every_folder_searched(paths, monkeypatch, tmp_path):
    """A fresh clone before the trained files exist: the error names the default_model folder among the searched."""
    isolate_folders(paths, monkeypatch)
    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", str(tmp_path / "empty_default_model"))
    paths.register_folders()
    assert "infinity_shapes.safetensors" not in paths.transformer_choices()
    with pytest.raises(FileNotFoundError) as e:
        paths.resolve_transformer("infinity_shapes.safetensors")
    assert str(tmp_path / "empty_default_model" / "infinity") in str(e.value)


def test_the_checked_out_default_model_is_complete(paths):
    """default_model/ ships all three parts or none: a half-copied checkout would fail only at the first run."""
    root = pathlib.Path(__file__).resolve().parents[2] / "default_model"
    parts = [root / "infinity" / "infinity_shapes.safetensors", root / "vae" / "infinity_shapes_vae.safetensors",
             root / "text_encoders" / "t5_shapes" / "config.json"]
    present = [p.exists() for p in parts]
    if not any(present):
        pytest.skip("default_model/ holds no trained files yet (bash scripts/train_default.sh writes them)")
    assert all(present), f"default_model/ is incomplete: missing {[str(p) for p, ok in zip(parts, present) if not ok]}"


# ------------------------------------------------------------------------------------------- folders that vanish


def test_a_model_folder_deleted_while_the_server_runs_drops_out_of_the_menus(paths, models_dir, monkeypatch, tmp_path,
                                                                               node_classes):
    """ComfyUI keeps each listing with the mtime of every folder it saw and re-checks them on the next listing; a
    deleted folder made that check raise FileNotFoundError, and /object_info failed for ScaleKV Cache Config."""
    fnp = isolate_folders(paths, monkeypatch)
    extra = tmp_path / "scalekv_extra"
    extra.mkdir()
    (extra / "gone.json").write_text("{}")
    kept = models_dir / "scalekv" / "kept.json"
    kept.write_text("{}")
    fnp["scalekv"] = ([*fnp["scalekv"][0], str(extra)], fnp["scalekv"][1])
    try:
        assert {"gone.json", "kept.json"} <= set(paths.budget_file_choices())
        assert str(extra) in folder_paths.filename_list_cache["scalekv"][1]  # ComfyUI cached it with its mtime
        (extra / "gone.json").unlink()
        extra.rmdir()
        choices = paths.budget_file_choices()
        assert "gone.json" not in choices and "kept.json" in choices
        options = node_classes["ScaleKVCacheConfig"].GET_SCHEMA().inputs
        source = next(i for i in options if i.id == "budget_source")
        assert "file:kept.json" in source.options and "file:gone.json" not in source.options
        extra.mkdir()  # the folder comes back: listed again
        (extra / "back.json").write_text("{}")
        assert "back.json" in paths.budget_file_choices()
    finally:
        kept.unlink()


def test_a_report_names_a_symlinked_budget_file_as_the_node_does(paths, models_dir, tmp_path):
    """models/scalekv/mine.json linking to a file elsewhere: the config node reads it, and the report mode took the
    path the node resolved for 'not in models/scalekv' (it compared the symlink's target with the folder)."""
    d = models_dir / "scalekv"
    target = tmp_path / "elsewhere" / "calibrated.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = d / "mine_linked.json"
    os.symlink(target, link)
    try:
        resolved = paths.resolve_budget_file("mine_linked.json")
        assert resolved == str(link)
        assert paths.budget_file_from_report(resolved) == resolved
        assert paths.budget_file_from_report("mine_linked.json") == resolved
        # climbing out is still refused, whether written with '..' or as the target's own path
        for outside in (str(d / ".." / ".." / "elsewhere" / "calibrated.json"), str(target),
                        str(d / "sub" / ".." / ".." / "scalekv_not" / "x.json")):
            with pytest.raises(ValueError, match="is not in models/scalekv"):
                paths.budget_file_from_report(outside)
        with pytest.raises(ValueError):
            paths.budget_file_from_report("../elsewhere/calibrated.json")
    finally:
        link.unlink()
