"""The pack as ComfyUI sees it: entry point, node list, every schema, and the real custom-node loader."""
from __future__ import annotations

import asyncio
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

EXPECTED = {
    # weight_format and t5_weights are optional: API prompts saved before it existed stay valid on hosts that require every input
    "InfinityModelLoader": (["transformer", "vae", "text_encoder", "precision"], ["weight_format", "t5_weights"],
                            ["INFINITY_MODEL", "INFINITY_T5"]),
    "InfinityTextEncode": (["t5", "prompt"], [], ["INFINITY_CONDITIONING"]),
    "ScaleKVCacheConfig": (["policy", "budget_unit", "budget", "window", "kernel", "pooling", "scoring", "kv_dtype",
                            "budget_source", "refiner_decay"], ["budget_file"], ["SCALEKV_CACHE_CONFIG"]),
    # decode_tile is optional and last, for the same reason (and saved workflows keep their widget order)
    "InfinitySampler": (["model", "positive", "seed", "cfg", "tau", "top_k", "top_p", "resolution", "batch"],
                        ["negative", "cache_config", "decode_tile", "memory", "attention"], ["IMAGE"]),
    "ScaleKVCalibrate": (["model", "t5", "prompts", "resolution", "budget", "num_drafters", "seed", "filename_prefix"],
                         ["memory"], ["STRING"]),
    "InfinityMemory": (["block_swap"], [], ["INFINITY_MEMORY"]),
}
OUR_TYPES = ("INFINITY_MODEL", "INFINITY_T5", "INFINITY_CONDITIONING", "SCALEKV_CACHE_CONFIG", "INFINITY_MEMORY")


def test_entry_point_is_v3_only(pack):
    assert pack.WEB_DIRECTORY == "./web"
    assert callable(pack.comfy_entrypoint)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # it would shadow comfy_entrypoint


def test_every_schema_builds_with_prefixed_ids_and_types(node_classes):
    assert set(node_classes) == set(EXPECTED)
    for node_id, cls in node_classes.items():
        assert node_id.startswith(("Infinity", "ScaleKV"))
        schema = cls.GET_SCHEMA()
        v1 = cls.GET_NODE_INFO_V1()
        required, optional, outputs = EXPECTED[node_id]
        assert list(v1["input"]["required"]) == required
        assert list(v1["input"].get("optional", {})) == optional
        assert v1["output"] == outputs and v1["name"] == node_id  # (GET_NODE_INFO_V3 is broken in 0.3.75, gone in 0.33)
        assert schema.display_name and schema.description and schema.category.startswith("Infinity")
        types = [t for t, _ in list(v1["input"]["required"].values()) + list(v1["input"].get("optional", {}).values())]
        custom = [t for t in types + outputs if isinstance(t, str) and t not in ("INT", "FLOAT", "STRING", "IMAGE",
                                                                                   "BOOLEAN", "COMBO")]
        assert all(t in OUR_TYPES for t in custom), custom
        json.dumps(v1)  # /object_info serialises it


def test_widget_defaults_work_out_of_the_box(node_classes):
    v1 = {k: c.GET_NODE_INFO_V1()["input"] for k, c in node_classes.items()}
    sampler = v1["InfinitySampler"]["required"]
    assert sampler["resolution"][1]["default"] == "auto (the model's own size)"  # 256 embedded, 1024 released
    assert sampler["resolution"][1]["options"][:2] == ["auto (the model's own size)", "1024x1024 (1:1)"]
    assert "256x256 (1:1)" in sampler["resolution"][1]["options"]
    assert sampler["seed"][1]["control_after_generate"] is True
    assert (sampler["top_k"][1]["default"], sampler["top_p"][1]["default"]) == (900, 0.97)
    cfg = v1["ScaleKVCacheConfig"]["required"]
    assert cfg["policy"][1]["default"] == "scalekv" and cfg["budget"][1]["default"] == 10.0
    assert cfg["budget_unit"][1]["default"] == "percent" and cfg["window"][1]["default"] == 16
    assert cfg["budget_source"][1]["options"][:3] == ["generated", "preset:infinity-2b-10pct", "preset:infinity-8b-10pct"]
    loader = v1["InfinityModelLoader"]["required"]
    assert loader["transformer"][1]["options"][0] == "infinity_tiny.safetensors"  # the first entry is the default
    assert loader["vae"][1]["options"][0] == "vae_tiny.safetensors"
    assert loader["text_encoder"][1]["options"] == ["t5_tiny"]
    assert loader["precision"][1]["options"] == ["auto", "fp32", "bf16", "fp16"]
    weight_format = v1["InfinityModelLoader"]["optional"]["weight_format"]
    assert weight_format[1]["options"] == ["none", "fp8_e4m3fn", "int8", "int4"]
    assert weight_format[1]["default"] == "none" and "int4" in weight_format[1]["tooltip"]
    t5_weights = v1["InfinityModelLoader"]["optional"]["t5_weights"]
    assert t5_weights[1]["options"] == ["none", "fp8_e4m3fn", "int8"] and t5_weights[1]["default"] == "none"
    assert v1["InfinityTextEncode"]["required"]["prompt"][1]["multiline"] is True
    assert node_classes["ScaleKVCalibrate"].GET_SCHEMA().is_output_node


def test_class_clones_carry_the_hidden_inputs(clone):
    """PREPARE_CLASS_CLONE in the installed version's form (0.3.75: hidden dict; 0.33+: {"hidden_inputs": ...})."""
    node = clone("InfinitySampler", "42")
    assert node.hidden.unique_id == "42" and node.GET_SCHEMA().node_id == "InfinitySampler"


def test_comfyui_custom_node_loader_registers_the_pack(monkeypatch):
    """nodes.load_custom_node, as ComfyUI runs it on custom_nodes/<pack>: V3 entry point, web dir, five nodes."""
    import nodes

    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", dict(nodes.NODE_DISPLAY_NAME_MAPPINGS))
    monkeypatch.setattr(nodes, "EXTENSION_WEB_DIRS", dict(nodes.EXTENSION_WEB_DIRS))
    before = set(sys.modules)
    try:
        assert asyncio.run(nodes.load_custom_node(str(REPO))) is True
        for node_id in EXPECTED:
            assert node_id in nodes.NODE_CLASS_MAPPINGS
            assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert nodes.EXTENSION_WEB_DIRS[REPO.name] == str(REPO / "web")
    finally:
        for name in set(sys.modules) - before:  # the second copy of the pack ComfyUI's loader imported
            if name.startswith(str(REPO).replace(".", "_x_")):
                del sys.modules[name]


def test_engine_imports_without_comfyui():
    """`import scalekv_core` never needs ComfyUI (the pack's __init__ only imports the nodes inside ComfyUI)."""
    import subprocess

    code = ("import sys, importlib.util; import scalekv_core.pipeline, scalekv_core.kvcache; "
            "assert importlib.util.find_spec('comfy_api') is None; "
            "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    spec = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('pk', 'REPO/__init__.py', "
            "submodule_search_locations=['REPO']); m = importlib.util.module_from_spec(s); sys.modules['pk'] = m; "
            "s.loader.exec_module(m); assert m.WEB_DIRECTORY == './web' and not hasattr(m, 'comfy_entrypoint')")
    subprocess.run([sys.executable, "-c", spec.replace("REPO", str(REPO))], cwd="/", check=True)


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_node_methods_are_classmethods(node_classes, node_id):
    """V3 nodes are never instantiated for their logic: no instance state, classmethods only."""
    cls = node_classes[node_id]
    own = [k for k in ("define_schema", "execute", "validate_inputs", "fingerprint_inputs") if k in vars(cls)]
    assert "define_schema" in own and "execute" in own
    assert all(isinstance(vars(cls)[k], classmethod) for k in own)
    assert not any(callable(v) and not isinstance(v, (classmethod, staticmethod)) and not k.startswith("_")
                   for k, v in vars(cls).items())


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_every_input_explains_itself(node_classes, node_id):
    """Every input has a tooltip and every node a description written out (issue 21: batch, seed, pooling and
    prompt had none)."""
    info = node_classes[node_id].GET_NODE_INFO_V1()
    assert len(info["description"]) > 80, info["description"]
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            assert len(options.get("tooltip", "")) >= 20, (node_id, name)


def test_search_finds_every_node_by_both_names(node_classes):
    """Searching "ScaleKV" or "Infinity" finds every node: by search aliases where the host's schema takes them
    (0.33+); on 0.3.75, whose frontend searches names and display names only, by the display name."""
    import dataclasses

    from comfy_api.latest import io

    aliases = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
    for node_id, cls in node_classes.items():
        info = cls.GET_NODE_INFO_V1()
        if aliases:  # frontends 1.49+ search name, display name and aliases
            assert {"Infinity", "ScaleKV"} <= set(info["search_aliases"]), node_id
        else:  # frontend 1.32 (0.3.75) searches name and display name only: the display name carries both words
            assert "Infinity" in info["display_name"] and "ScaleKV" in info["display_name"], info["display_name"]


def test_advanced_inputs_where_the_host_has_them(node_classes):
    """The cache config's expert inputs are folded away where ComfyUI supports it; policy and budget stay up front."""
    from comfy_api.latest import io
    import inspect

    info = node_classes["ScaleKVCacheConfig"].GET_NODE_INFO_V1()["input"]["required"]
    supported = "advanced" in inspect.signature(io.Input.__init__).parameters
    for name in ("window", "kernel", "pooling", "scoring", "kv_dtype", "refiner_decay"):
        assert bool(info[name][1].get("advanced")) == supported, name
    for name in ("policy", "budget_unit", "budget", "budget_source"):
        assert not info[name][1].get("advanced"), name


@pytest.mark.parametrize("node_id", list(EXPECTED))
def test_every_node_has_a_help_page_naming_its_inputs(node_classes, node_id):
    """web/docs/<node>.md is the frontend's help page for the node (ComfyUI's convention); it covers each input."""
    page = REPO / "web" / "docs" / f"{node_id}.md"
    text = page.read_text()
    assert text.startswith("# ") and len(text) > 400
    info = node_classes[node_id].GET_NODE_INFO_V1()["input"]
    for name in [*info["required"], *info.get("optional", {})]:
        assert f"**{name}**" in text or f"`{name}`" in text, (node_id, name)


def test_cache_config_inputs_carry_the_policies_that_read_them(node_classes):
    """The frontend greys out inputs the chosen policy does not read (web/js/scalekv_policy_inputs.js), from
    `scalekv_policies` on each input: the engine's POLICY_SETTINGS."""
    from scalekv_core.kvcache.config import POLICY_SETTINGS

    info = node_classes["ScaleKVCacheConfig"].GET_NODE_INFO_V1()["input"]
    specs = {**info["required"], **info.get("optional", {})}
    for name in ("budget", "window", "kernel", "pooling", "scoring", "kv_dtype", "refiner_decay", "budget_file"):
        assert specs[name][1]["scalekv_policies"] == list(POLICY_SETTINGS[name]), name
    assert specs["budget_unit"][1]["scalekv_policies"] == list(POLICY_SETTINGS["budget"])
    assert specs["budget_source"][1]["scalekv_policies"] == list(POLICY_SETTINGS["budget_file"])
    assert "scalekv_policies" not in specs["policy"][1]
