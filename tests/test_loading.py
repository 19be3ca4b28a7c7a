"""Checkpoint loading: architecture detection against the original's key lists and counts, every file layout the
releases use (safetensors, weights-only .pth, {'vae': ...}, 'module.' prefixes, HF shard folders), conversion,
and loud, named errors for every kind of bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny import (
    KEYS,
    TINY14_VAE,
    TINY56_TRANSFORMER,
    TINY_TRANSFORMER,
    TINY_TRANSFORMER_PTH,
    TINY_VAE,
    TINY_VAE_PTH,
    make_tiny_transformer_state,
    make_tiny_vae_state,
    random_text,
    save_safetensors,
    save_sharded,
)
from scalekv_core.checkpoint import (CheckpointError, check_keys, convert_to_safetensors, load_state_dict,
                                     tensor_shapes)
from scalekv_core.loader import (build_transformer_on_meta, load_transformer, load_vae, transformer_config_of,
                                 vae_patchify_for)
from scalekv_core.model.config import InfinityConfig, detect_infinity_config
from scalekv_core.model.transformer import Infinity
from scalekv_core.model.vae import VAEConfig
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule, schedule_for_pixels

REPO = pathlib.Path(__file__).resolve().parent.parent
SUMMARY = json.loads((KEYS / "infinity_all_models_summary.json").read_text())
S006 = get_schedule(1.0, "0.06M")


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "scalekv_core", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_TRANSFORMER))


@pytest.fixture(scope="module")
def tiny_pipe() -> InfinityPipeline:
    return InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE)


@pytest.fixture(scope="module")
def files14(tmp_path_factory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("tiny14")
    return {
        "transformer": save_safetensors(make_tiny_transformer_state(TINY56_TRANSFORMER, 11), folder / "t56.safetensors"),
        "vae": save_safetensors(make_tiny_vae_state(TINY14_VAE, 12), folder / "vae14_patch8.safetensors"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Architecture against the original's own key lists and counts
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["infinity_2b", "infinity_8b"])
def test_key_list_builds_the_right_architecture_on_meta(name: str) -> None:
    ref = json.loads((KEYS / f"{name}_keys.json").read_text())
    shapes = {t["name"]: tuple(t["shape"]) for t in ref["tensors"]}
    assert len(shapes) == ref["num_tensors"]
    model = build_transformer_on_meta(shapes, name)  # raises on any missing / unexpected / wrongly shaped key
    cfg = model.cfg
    kw = ref["constructor_kwargs"]
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.block_chunks) == (
        ref["depth"], ref["C"], ref["num_heads"], ref["num_block_chunks"])
    assert (cfg.ffn_hidden, cfg.d_vae, cfg.vocab, cfg.pool_heads) == (
        ref["ffn_hidden"], ref["d_vae"], ref["V"], ref["text_pool_heads"])
    assert (cfg.head_dim, cfg.blocks_per_chunk) == (ref["head_dim"], ref["blocks_per_chunk"])
    assert (cfg.text_channels, cfg.text_maxlen) == (kw["text_channels"], kw["text_maxlen"])
    assert ref["C"] // ref["text_pool_heads"] == ref["text_pool_head_dim"]
    sd = model.state_dict()
    assert set(sd) == set(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert all(v.dtype == torch.float32 for v in sd.values())
    buffers = {t["name"] for t in ref["tensors"] if t["kind"] == "buffer"}
    assert {k for k, _ in model.named_buffers()} == buffers
    # Nothing was allocated: every parameter and buffer lives on the meta device.
    assert all(t.is_meta for t in sd.values())
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SUMMARY))
def test_every_released_size_matches_the_original_counts(name: str) -> None:
    ref = SUMMARY[name]
    kw = ref["constructor_kwargs"]
    # The FFN width rule of the original (basic.py:472): round(C*mlp_ratio/256)*256.
    assert ref["ffn_hidden"] == round(ref["C"] * kw["mlp_ratio"] / 256) * 256
    cfg = InfinityConfig(depth=ref["depth"], embed_dim=ref["C"], num_heads=ref["num_heads"],
                         block_chunks=ref["num_block_chunks"], ffn_hidden=ref["ffn_hidden"],
                         text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                         pool_heads=ref["text_pool_heads"], d_vae=ref["d_vae"])
    with torch.device("meta"):
        model = Infinity(cfg)
    sd = model.state_dict()
    assert len(sd) == ref["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_param_elements"]
    assert sum(b.numel() for b in model.buffers()) == ref["num_buffer_elements"]
    assert cfg.head_dim == ref["head_dim"] and cfg.vocab == ref["V"]
    assert detect_infinity_config({k: tuple(v.shape) for k, v in sd.items()}, name) == cfg


def test_tiny_reference_detects_its_builder_config(tiny_sd) -> None:
    conf = json.loads((TINY_TRANSFORMER.parent / "config.json").read_text())
    mk, fixed, der = conf["infinity_model_kwargs"], conf["load_infinity_fixed_kwargs"], conf["derived"]
    cfg = detect_infinity_config({k: v.shape for k, v in tiny_sd.items()})
    assert cfg == InfinityConfig(depth=mk["depth"], embed_dim=mk["embed_dim"], num_heads=mk["num_heads"],
                                 block_chunks=mk["block_chunks"], ffn_hidden=der["ffn_hidden"],
                                 text_channels=fixed["text_channels"], text_maxlen=fixed["text_maxlen"],
                                 pool_heads=der["text_pool_heads"], d_vae=der["d_vae"])


# ----------------------------------------------------------------------------------------------------------------
# File layouts
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["reference_2b_layout", "patchify_8b_layout"])
def test_sharded_folder_loads_like_the_single_file(tmp_path, tiny_sd, files14, which) -> None:
    single = TINY_TRANSFORMER if which == "reference_2b_layout" else files14["transformer"]
    sd = tiny_sd if which == "reference_2b_layout" else load_file(str(single))
    folder = save_sharded(sd, tmp_path / "infinity_8b_weights", n_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert len(set(index["weight_map"].values())) == 2  # really two shards, each with part of the keys
    _assert_same_tensors(load_state_dict(folder), sd)
    a = load_transformer(folder)
    b = load_transformer(single)
    assert a.cfg == b.cfg
    _assert_same_tensors(a.state_dict(), b.state_dict())


def test_sharded_folder_errors_name_the_problem(tmp_path, tiny_sd) -> None:
    empty = tmp_path / "no_index"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="index.json") as e:
        load_state_dict(empty)
    assert str(empty) in str(e.value)

    folder = save_sharded(tiny_sd, tmp_path / "sharded", n_shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["ghost.weight"] = shard  # the index lists a key the shard doesn't hold
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight") as e:
        load_state_dict(folder)
    assert shard in str(e.value)

    del index["weight_map"]["ghost.weight"]
    index_path.write_text(json.dumps(index))
    (folder / shard).unlink()
    with pytest.raises((FileNotFoundError, CheckpointError)) as e:
        load_state_dict(folder)
    assert shard in str(e.value)

    index_path.write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(folder)
    assert index_path.name in str(e.value)


def test_module_prefixed_pth_loads(tmp_path, tiny_sd) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in tiny_sd.items()}, path)
    _assert_same_tensors(load_state_dict(path), tiny_sd)
    _assert_same_tensors(load_transformer(path).state_dict(), load_transformer(TINY_TRANSFORMER).state_dict())


def test_plain_pth_equals_safetensors(tiny_sd) -> None:
    _assert_same_tensors(load_state_dict(TINY_TRANSFORMER_PTH), tiny_sd)


def test_vae_wrapper_and_prefix_load(tmp_path) -> None:
    raw = torch.load(TINY_VAE_PTH, weights_only=True, map_location="cpu")
    assert list(raw) == ["vae"]  # the released layout
    ref = load_file(str(TINY_VAE))
    _assert_same_tensors(load_state_dict(TINY_VAE_PTH), ref)
    wrapped = tmp_path / "vae_ddp.pth"
    torch.save({"vae": {f"module.{k}": v for k, v in ref.items()}}, wrapped)
    _assert_same_tensors(load_state_dict(wrapped), ref)
    _assert_same_tensors(load_vae(TINY_VAE_PTH).state_dict(), load_vae(TINY_VAE).state_dict())


def test_renamed_files_are_recognised_by_content(tmp_path, tiny_sd) -> None:
    """A .safetensors file saved under a .pth name (and a torch zip under an unknown suffix) still loads."""
    renamed = tmp_path / "infinity_tiny.pth"
    renamed.write_bytes(TINY_TRANSFORMER.read_bytes())
    _assert_same_tensors(load_state_dict(renamed), tiny_sd)
    odd = tmp_path / "infinity_tiny.weights"
    odd.write_bytes(TINY_TRANSFORMER_PTH.read_bytes())
    _assert_same_tensors(load_state_dict(odd), tiny_sd)


def test_legacy_pth_loads_and_its_truncation_is_reported_as_such(tmp_path, tiny_sd) -> None:
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny_sd, legacy, _use_new_zipfile_serialization=False)
    _assert_same_tensors(load_state_dict(legacy), tiny_sd)
    data = legacy.read_bytes()
    cut = tmp_path / "legacy_cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="legacy_cut.pth") as e:
        load_state_dict(cut)
    assert "truncated or corrupt" in str(e.value)
    assert "mmap" not in str(e.value)  # the real cause, not an error of a retry strategy


def test_shapes_from_headers_are_the_loaded_tensors_shapes(tmp_path, tiny_sd) -> None:
    """tensor_shapes (what the planner and the loader node's width check read) agrees with a full load for every
    layout the loader takes: safetensors, zip and legacy .pth, a 'module.' prefix, a shard folder."""
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny_sd, legacy, _use_new_zipfile_serialization=False)
    prefixed = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in tiny_sd.items()}, prefixed)
    folder = save_sharded({f"module.{k}": v for k, v in tiny_sd.items()}, tmp_path / "shards", n_shards=2)
    want = {k: tuple(v.shape) for k, v in tiny_sd.items()}
    for path in (TINY_TRANSFORMER, TINY_TRANSFORMER_PTH, legacy, prefixed, folder):
        assert tensor_shapes(path) == want, path
        assert transformer_config_of(path) == load_transformer(TINY_TRANSFORMER).cfg, path


def test_shapes_of_a_broken_header_name_the_file(tmp_path, tiny_sd) -> None:
    path = tmp_path / "bad_shape.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": "four", "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="bad_shape.safetensors.*shape"):
        tensor_shapes(path)
    with pytest.raises(CheckpointError, match="not_a_checkpoint"):
        (tmp_path / "not_a_checkpoint.txt").write_text("hello")
        tensor_shapes(tmp_path / "not_a_checkpoint.txt")


def test_sharded_module_prefix_and_bad_weight_map(tmp_path, tiny_sd) -> None:
    folder = save_sharded({f"module.{k}": v for k, v in tiny_sd.items()}, tmp_path / "ddp_shards", n_shards=2)
    _assert_same_tensors(load_state_dict(folder), tiny_sd)
    index = folder / "model.safetensors.index.json"
    for bad in ({"weight_map": ["a", "b"]}, {"weight_map": {"a": 5}}, ["weight_map"]):
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="index.json"):
            load_state_dict(folder)


@pytest.mark.parametrize("src", [TINY_TRANSFORMER_PTH, TINY_VAE_PTH], ids=["transformer", "vae"])
def test_convert_api_gives_identical_tensors(tmp_path, src) -> None:
    dst = tmp_path / "out" / "converted.safetensors"
    assert convert_to_safetensors(src, dst) == dst
    safe = TINY_TRANSFORMER if src == TINY_TRANSFORMER_PTH else TINY_VAE
    _assert_same_tensors(load_file(str(dst)), load_file(str(safe)))  # the shipped .safetensors twin
    assert not list(dst.parent.glob("*.partial"))


def test_convert_sharded_folder(tmp_path, tiny_sd) -> None:
    folder = save_sharded(tiny_sd, tmp_path / "shards", n_shards=2)
    dst = convert_to_safetensors(folder, tmp_path / "single.safetensors")
    _assert_same_tensors(load_file(str(dst)), tiny_sd)


def test_convert_refuses_corrupt_input_and_writes_nothing(tmp_path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(TINY_TRANSFORMER_PTH.read_bytes()[:1000])
    dst = tmp_path / "never.safetensors"
    with pytest.raises(CheckpointError, match="bad.pth"):
        convert_to_safetensors(bad, dst)
    assert not dst.exists()


def test_a_failed_write_leaves_no_partial_file_and_a_modeless_mount_is_fine(tmp_path, monkeypatch) -> None:
    """A write that fails midway (disk full) leaves neither dst nor its .partial; a file system that refuses chmod
    (vfat, some network mounts) still gets the file."""
    import safetensors.torch as st

    from scalekv_core import checkpoint

    real = st.save_file

    def disk_full(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_safetensors({"a": torch.zeros(3)}, tmp_path / "x.safetensors", {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(st, "save_file", real)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "chmod", refuse)
    out = checkpoint.write_safetensors({"a": torch.ones(3)}, tmp_path / "y.safetensors", {"k": "v"})
    assert torch.equal(load_file(str(out))["a"], torch.ones(3)) and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_convert(tmp_path) -> None:
    dst = tmp_path / "cli.safetensors"
    r = _run_cli("convert", TINY_TRANSFORMER_PTH, dst)
    assert r.returncode == 0, r.stderr
    _assert_same_tensors(load_file(str(dst)), torch.load(TINY_TRANSFORMER_PTH, weights_only=True))
    assert "copying" in r.stderr and "wrote" in r.stdout  # a line before the long part, as the quantizing one


def test_convert_copies_only_tied_tensors(tmp_path, tiny_sd) -> None:
    """safetensors refuses tensors that share storage, so those (tied weights) are copied; every other tensor is
    written as it was read (it cloned all of them: a second 16 GB copy of the 8B in memory)."""
    from scalekv_core.checkpoint import unshared

    sd = load_state_dict(TINY_TRANSFORMER_PTH)
    out = unshared(sd)
    assert all(out[k] is sd[k] for k in sd)
    tied = dict(sd, **{"tied.weight": sd["head.weight"]})
    out = unshared(tied)
    assert out["tied.weight"] is not tied["tied.weight"] and out["head.weight"] is not tied["head.weight"]
    assert all(out[k] is tied[k] for k in sd if k != "head.weight")
    src = tmp_path / "tied.pth"
    torch.save(tied, src)
    dst = convert_to_safetensors(src, tmp_path / "tied.safetensors")
    _assert_same_tensors(load_file(str(dst)), tied)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src", [TINY_TRANSFORMER, TINY_TRANSFORMER_PTH, TINY_VAE_PTH],
                         ids=["safetensors", "pth", "vae_pth"])
def test_truncated_file_names_the_file(tmp_path, src) -> None:
    data = src.read_bytes()
    bad = tmp_path / f"truncated_{src.name}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_state_dict(bad)
    assert str(bad) in str(e.value)
    loader = load_vae if "vae" in src.name else load_transformer
    with pytest.raises(CheckpointError, match=bad.name):
        loader(bad)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_empty_file(tmp_path, suffix) -> None:
    bad = tmp_path / f"empty{suffix}"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as e:
        load_state_dict(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("name", ["weights.data", "weights.pth", "weights.safetensors"])
def test_garbage_file(tmp_path, name) -> None:
    bad = tmp_path / name
    bad.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=name) as e:
        load_state_dict(bad)
    assert "pickled code" not in str(e.value)  # corrupt, not mistaken for a malicious pickle


@pytest.mark.parametrize("key", ["block_chunks.1.module.0.ffn.fc1.bias", "block_chunks.0.module.1.sa.q_bias",
                                 "text_proj_for_ca.2.weight"])
def test_wrong_shape_names_the_key(tmp_path, tiny_sd, key) -> None:
    sd = dict(tiny_sd)
    sd[key] = torch.zeros(*[s + 1 for s in sd[key].shape])
    path = save_safetensors(sd, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert key in msg and "wrong_shape.safetensors" in msg
    # Only the edited key is reported.
    assert msg.count("block_chunks.") + msg.count("text_proj") == 1


def test_wrong_shape_of_a_key_the_detector_reads(tmp_path, tiny_sd) -> None:
    sd = dict(tiny_sd)
    sd["head.weight"] = torch.zeros(63, 128)
    path = save_safetensors(sd, tmp_path / "bad_head.safetensors")
    with pytest.raises(ValueError, match="head.weight"):
        load_transformer(path)


@pytest.mark.parametrize("key", ["block_chunks.1.module.1.ca_norm.bias", "lvl_embed.weight",
                                 "text_proj_for_sos.ca.zero_k_bias"])
def test_missing_key_is_named(tmp_path, tiny_sd, key) -> None:
    sd = {k: v for k, v in tiny_sd.items() if k != key}
    path = save_safetensors(sd, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError) as e:
        load_transformer(path)
    assert key in str(e.value) and "missing" in str(e.value)


def test_key_detection_needs_cfg_uncond(tmp_path, tiny_sd) -> None:
    sd = {k: v for k, v in tiny_sd.items() if k != "cfg_uncond"}
    path = save_safetensors(sd, tmp_path / "no_uncond.safetensors")
    with pytest.raises(ValueError, match="cfg_uncond"):
        load_transformer(path)


def test_unexpected_key_is_named(tmp_path, tiny_sd) -> None:
    sd = dict(tiny_sd)
    sd["extra_head.weight"] = torch.zeros(3)
    path = save_safetensors(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_transformer(path)
    assert "extra_head.weight" in str(e.value)


def test_partial_module_prefix_is_not_silently_accepted(tmp_path, tiny_sd) -> None:
    """Only a consistent 'module.' prefix is stripped; a mix must surface as missing/unexpected keys."""
    sd = dict(tiny_sd)
    sd["module.head.bias"] = sd.pop("head.bias")
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    assert "module.head.bias" in str(e.value) and "head.bias" in str(e.value)


def test_vae_missing_and_wrong_keys_named(tmp_path) -> None:
    ref = load_file(str(TINY_VAE))
    sd = {k: v for k, v in ref.items() if k != "decoder.mid.block_2.norm2.norm.bias"}
    with pytest.raises(CheckpointError, match="decoder.mid.block_2.norm2.norm.bias"):
        load_vae(save_safetensors(sd, tmp_path / "vae_missing.safetensors"))
    sd = dict(ref)
    sd["decoder.conv_out.conv.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match="decoder.conv_out.conv.bias"):
        load_vae(save_safetensors(sd, tmp_path / "vae_wrong.safetensors"))


def test_transformer_file_is_not_a_vae(tiny_sd) -> None:
    with pytest.raises(CheckpointError, match="infinity_tiny.safetensors"):
        load_vae(TINY_TRANSFORMER)
    with pytest.raises(ValueError, match="vae_tiny.safetensors"):
        load_transformer(TINY_VAE)


class _RunsCode:
    """Unpickling this runs arbitrary code (here: creates a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _CustomObject:
    """A custom class whose __setstate__ runs on unpickling."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state):
        pathlib.Path(state["marker"]).write_text("pwned")
        self.__dict__.update(state)


@pytest.mark.parametrize("payload", [_RunsCode, _CustomObject], ids=["reduce_exec", "custom_class"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".weights"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, payload, zipped, suffix) -> None:
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / f"evil{suffix}"
    torch.save({"w": torch.zeros(2), "x": payload(str(marker))}, path, _use_new_zipfile_serialization=zipped)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    assert str(path) in str(e.value)
    assert "refused" in str(e.value)
    assert not marker.exists(), "loading the checkpoint executed code from it"
    with pytest.raises(CheckpointError):
        load_transformer(path)
    assert not marker.exists()
    # Control: the payload is live, so the assertions above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_tensor_entries_are_refused(tmp_path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "step": 7}, path)  # an int is allowed by weights_only, but is not a weight
    with pytest.raises(CheckpointError, match="step"):
        load_state_dict(path)


def test_vae_that_does_not_fit_the_transformer(files14) -> None:
    # 2B-style transformer (32 bits, no patchify) with the 14-bit patch-8 VAE.
    with pytest.raises(ValueError) as e:
        InfinityPipeline.from_files(TINY_TRANSFORMER, files14["vae"])
    msg = str(e.value)
    assert str(TINY_TRANSFORMER) in msg and str(files14["vae"]) in msg
    assert "14" in msg and "32" in msg
    # 8B-style transformer (56 bits) with the 32-bit patch-16 VAE.
    with pytest.raises(ValueError) as e:
        InfinityPipeline.from_files(files14["transformer"], TINY_VAE)
    msg = str(e.value)
    assert str(files14["transformer"]) in msg and str(TINY_VAE) in msg
    assert "56" in msg and "32" in msg


def test_vae_patchify_for() -> None:
    cfg32 = detect_infinity_config({k: v.shape for k, v in load_file(str(TINY_TRANSFORMER)).items()})
    vae32 = VAEConfig(codebook_dim=32, patch_size=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2))
    assert vae_patchify_for(cfg32, vae32) is False
    assert vae_patchify_for(TINY56_TRANSFORMER, TINY14_VAE) is True
    for t, v in ((cfg32, TINY14_VAE), (TINY56_TRANSFORMER, vae32)):
        with pytest.raises(ValueError) as e:
            vae_patchify_for(t, v)
        msg = str(e.value)
        assert "transformer" in msg and "VAE" in msg
        assert str(t.d_vae) in msg and str(v.codebook_dim) in msg
    # 14 bits at patch 16 (no patchify) cannot drive a 56-bit transformer, nor a 14-bit one at patch 8.
    vae14_p16 = VAEConfig(codebook_dim=14, patch_size=16, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2, 2))
    with pytest.raises(ValueError):
        vae_patchify_for(TINY56_TRANSFORMER, vae14_p16)
    with pytest.raises(ValueError):
        vae_patchify_for(dataclasses.replace(TINY56_TRANSFORMER, d_vae=14), TINY14_VAE)


def test_pipeline_constructor_checks_the_pair(files14, tiny_pipe) -> None:
    vae14 = load_vae(files14["vae"])
    with pytest.raises(ValueError, match="transformer"):
        InfinityPipeline(tiny_pipe.transformer, vae14)


@pytest.mark.parametrize("w,h", [(64, 4096), (4096, 64), (10, 10), (8000, 8000), (0, 256), (256, -1)])
def test_unsupported_resolution(w, h) -> None:
    with pytest.raises(ValueError, match="unsupported resolution") as e:
        schedule_for_pixels(w, h)
    assert f"{w}x{h}" in str(e.value)


def test_unknown_template_or_size() -> None:
    with pytest.raises(ValueError, match="1.7"):
        get_schedule(1.7, "1M")
    with pytest.raises(ValueError, match="2M"):
        get_schedule(1.0, "2M")


def test_generate_rejects_unsupported_resolution(tiny_pipe) -> None:
    with pytest.raises(ValueError, match="10x10"):
        tiny_pipe.generate(random_text(), seed=0, width=10, height=10)


@pytest.mark.parametrize("kw,name", [({"cfg": [3.0] * 6}, "cfg"), ({"tau": [0.5] * 8}, "tau"),
                                     ({"cfg": [3.0] * 13, "tau": 1.0}, "cfg")])
def test_per_scale_lists_of_the_wrong_length(tiny_pipe, kw, name) -> None:
    n_given = len(kw[name])
    with pytest.raises(ValueError) as e:
        tiny_pipe.generate(random_text(), seed=0, schedule=S006, **kw)
    msg = str(e.value)
    assert name in msg and str(S006.num_scales) in msg and str(n_given) in msg


def test_missing_paths_are_named(tmp_path) -> None:
    missing = tmp_path / "infinity_2b_reg.pth"
    for fn in (load_state_dict, load_transformer, load_vae):
        with pytest.raises(FileNotFoundError, match="infinity_2b_reg.pth"):
            fn(missing)
    with pytest.raises(FileNotFoundError, match="infinity_2b_reg.pth"):
        InfinityPipeline.from_files(missing, TINY_VAE)
    with pytest.raises(FileNotFoundError, match="no_vae.pth"):
        InfinityPipeline.from_files(TINY_TRANSFORMER, tmp_path / "no_vae.pth")
    with pytest.raises(FileNotFoundError, match="no_t5"):
        InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, tmp_path / "no_t5")


def test_check_keys_reports_all_three_kinds() -> None:
    with pytest.raises(CheckpointError) as e:
        check_keys({"a": (2,), "b": (3,), "c": (4,)}, {"a": (2,), "c": (5,), "d": (1,)}, "somefile")
    msg = str(e.value)
    assert "somefile" in msg and "missing keys: b" in msg and "unexpected keys: d" in msg and "c: file [5]" in msg
    check_keys({"a": (2,)}, {"a": torch.zeros(2)}, "ok")  # no error when everything fits


def test_cli_corrupt_checkpoint_exits_2(tmp_path) -> None:
    bad = tmp_path / "corrupt_model.safetensors"
    data = TINY_TRANSFORMER.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    kv = tmp_path / "text.npy"
    np.save(kv, np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32))
    r = _run_cli("generate", "--transformer", bad, "--vae", TINY_VAE, "--text-kv", kv, "--width", "256",
                 "--height", "256", "--out", tmp_path / "img.png")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error:" in r.stderr and "corrupt_model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "img.png").exists()


def test_cli_missing_vae_exits_2(tmp_path) -> None:
    kv = tmp_path / "text.npy"
    np.save(kv, np.zeros((5, 256), np.float32))
    r = _run_cli("generate", "--transformer", TINY_TRANSFORMER, "--vae", tmp_path / "nowhere_vae.pth",
                 "--text-kv", kv, "--width", "256", "--height", "256", "--out", tmp_path / "img.png")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error:" in r.stderr and "nowhere_vae.pth" in r.stderr and "Traceback" not in r.stderr


def test_bf16_checkpoint_loads_without_a_float32_copy_of_the_blocks(tmp_path):
    """The 8B's bf16 blocks used to pass through a float32 copy of the whole model on load (31 GiB of host memory);
    now the load holds the file's tensors plus the non-block parts in float32, and nothing else."""
    from scalekv_core.kvcache.memory import PeakMeter

    sd = {k: v.to(torch.bfloat16) for k, v in load_file(TINY_TRANSFORMER).items()}
    path = save_safetensors(sd, tmp_path / "bf16.safetensors")
    file_bytes = sum(v.numel() * 2 for v in sd.values())
    other_fp32 = sum(v.numel() * 4 for k, v in sd.items() if not k.startswith("block_chunks."))
    meter = PeakMeter("cpu")
    with meter.measure():
        model = load_transformer(path, precision="bf16")
    assert meter.peak_bytes <= 1.02 * (file_bytes + other_fp32), (meter.peak_bytes, file_bytes, other_fp32)
    state = model.state_dict()
    for key, value in sd.items():
        want = value if key.startswith("block_chunks.") else value.float()
        assert state[key].dtype == want.dtype and torch.equal(state[key], want), key


def test_native_resolution_of_the_embedded_and_released_models():
    """The embedded model's file says it was trained at 256x256 (1:1); a file without that metadata is taken for a
    released model (1024x1024-class sizes, any aspect). A note names sizes outside training."""
    from scalekv_core.loader import native_resolution, resolution_note
    from scalekv_core.schedules import schedule_from_label

    root = pathlib.Path(__file__).resolve().parents[1]
    embedded = native_resolution(root / "default_model" / "infinity" / "infinity_shapes.safetensors")
    assert embedded == ("256x256 (1:1)", False)
    assert native_resolution(TINY_TRANSFORMER) == ("1024x1024 (1:1)", True)
    assert resolution_note(embedded, schedule_from_label("256x256 (1:1)")) is None
    assert "512x512 is outside" in resolution_note(embedded, schedule_from_label("512x512 (1:1)"))
    released = native_resolution(TINY_TRANSFORMER)
    assert resolution_note(released, schedule_from_label("896x1120 (1:1.25)")) is None  # any aspect at 1M
    assert "256x256 is outside" in resolution_note(released, schedule_from_label("256x256 (1:1)"), "Infinity-2B")


def test_file_version_follows_rewrites_and_skips_broken_entries(tmp_path) -> None:
    """What caches of header reads are keyed by: a file's time and size, or every file of a folder; a broken link
    in a folder is left out rather than failing a model that would load."""
    import os

    from scalekv_core.checkpoint import file_version

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    os.symlink(tmp_path / "gone", folder / "broken")
    before = file_version(folder)
    assert [entry[0] for entry in before[1:]] == [str(folder / "config.json")]
    (folder / "config.json").write_text('{"d_model": 8}')  # rewritten in place: the folder's own mtime may not move
    assert file_version(folder) != before
    single = tmp_path / "x.safetensors"
    single.write_bytes(b"12345")
    st = single.stat()
    assert file_version(single) == (str(single), st.st_mtime_ns, 5, st.st_ctime_ns, st.st_dev, st.st_ino)
