"""The prompt guard: our nodes' oversized or invalid values are shortened before ComfyUI validates (and echoes) them.

Against ComfyUI 0.3.75 a 1 MiB string sent as the sampler's cfg came back in a 4 MB HTTP 400 (ComfyUI's own
"Failed to convert" error quotes it whole), and a lone surrogate in a loader name stopped the prompt worker (the
error message broke ComfyUI's logging).
"""
from __future__ import annotations

import asyncio
import importlib
import json

import pytest


@pytest.fixture(scope="module")
def guard(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.prompt_guard")


def prompt(**inputs) -> dict:
    return {"prompt": {"5": {"class_type": "InfinitySampler", "inputs": inputs},
                       "9": {"class_type": "SomeoneElsesNode", "inputs": {"text": "x" * 5000}}}}


def test_oversized_and_invalid_values_get_a_short_stand_in(guard):
    data = prompt(cfg="9" * (1 << 20), resolution="ab\udc80cd", seed=7, model=["1", 0], tau=list(range(100_000)),
                  top_p=0.9)
    out = guard.guard_prompt(data, {"InfinitySampler"})
    inputs = out["prompt"]["5"]["inputs"]
    assert len(json.dumps(out["prompt"]["5"])) < 1000
    assert inputs["seed"] == 7 and inputs["model"] == ["1", 0] and inputs["top_p"] == 0.9  # untouched
    assert out["prompt"]["9"]["inputs"]["text"] == "x" * 5000  # other packs' nodes are not ours to change
    for name in ("cfg", "resolution"):  # short stand-ins that say why, and loggable now
        assert inputs[name].startswith("\x00scalekv-refused: "), (name, inputs[name][:80])
        inputs[name].encode("utf-8")


def test_the_checks_refuse_a_stand_in_with_the_reason(guard, node_classes):
    data = guard.guard_prompt(prompt(cfg="9" * (1 << 20), resolution="ab\udc80cd", tau=0.5, top_p=0.9),
                              {"InfinitySampler"})
    inputs = data["prompt"]["5"]["inputs"]
    sampler = node_classes["InfinitySampler"]
    message = sampler.validate_inputs(cfg=inputs["cfg"], tau=0.5, top_p=0.9, resolution="256x256 (1:1)")
    assert message == "cfg: a text of 1048576 characters is too long; at most 1024"
    message = sampler.validate_inputs(cfg=3.0, tau=0.5, top_p=0.9, resolution=inputs["resolution"])
    assert message == "resolution: not valid text (character 2 is an unpaired surrogate)"
    encode = node_classes["InfinityTextEncode"]
    long_prompt = guard.stand_in("prompt", "a" * 60_000)
    assert encode.validate_inputs(prompt=long_prompt) == "prompt: a text of 60000 characters is too long; at most 50000"
    assert guard.stand_in("prompt", "a" * 50_000) == "a" * 50_000  # within the table's limit: unchanged


def test_comfyui_validation_after_the_guard_quotes_briefly(guard, node_classes, monkeypatch):
    """Through ComfyUI's own validate_inputs: an unnamed INT input gets ComfyUI's error, now about the stand-in."""
    import execution
    import nodes

    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", {**nodes.NODE_CLASS_MAPPINGS, **node_classes})
    data = guard.guard_prompt({"prompt": {"4": {"class_type": "ScaleKVCacheConfig", "inputs": {
        "policy": "scalekv", "budget_unit": "percent", "budget": 10.0, "window": "1" * (1 << 20), "kernel": 5,
        "pooling": "maxpool", "scoring": "improved", "kv_dtype": "auto", "budget_source": "generated",
        "refiner_decay": 0.0}}}}, {"ScaleKVCacheConfig"})
    ok, errors, _ = asyncio.run(execution.validate_inputs("p", data["prompt"], "4", {}))
    assert not ok and len(json.dumps(errors, default=str)) < 20_000
    assert any("window" in json.dumps(e, default=str) for e in errors)


def test_register_needs_a_server(guard):
    assert guard.register(["InfinitySampler"], server=object()) is False
    seen = []

    class Server:
        def add_on_prompt_handler(self, fn):
            seen.append(fn)

    assert guard.register(["InfinitySampler"], server=Server()) is True
    out = seen[0](prompt(cfg="9" * 5000))
    assert out["prompt"]["5"]["inputs"]["cfg"].startswith("\x00scalekv-refused: ")


def test_a_link_shaped_value_passes_whole_only_when_it_names_a_node_of_the_prompt(guard):
    """["A" * 2_000_000, 0] looked like a link and went through whole: ComfyUI's 400 quoted the id (4 MB) and its
    log took a 2,000,044-character line. Only a link to a node of the prompt is let through unchecked."""
    huge = ["A" * 2_000_000, 0]
    data = prompt(cfg=huge, model=["1", 0], positive=["9", 0], negative=["404", 0], top_p=["5", 0])
    data["prompt"]["1"] = {"class_type": "InfinityModelLoader", "inputs": {}}
    inputs = guard.guard_prompt(data, {"InfinitySampler"})["prompt"]["5"]["inputs"]
    assert isinstance(inputs["cfg"], str) and inputs["cfg"].startswith("\x00scalekv-refused: ")
    assert len(inputs["cfg"]) < 200
    assert inputs["model"] == ["1", 0] and inputs["positive"] == ["9", 0] and inputs["top_p"] == ["5", 0]
    assert inputs["negative"] == ["404", 0]  # short: ComfyUI's own "missing node" error quotes it briefly
    # a huge id is refused even where a node of the prompt carries it (nothing quotes 2 MB)
    data = prompt(cfg=list(huge))
    data["prompt"][huge[0]] = {"class_type": "SomeoneElsesNode", "inputs": {}}
    assert guard.guard_prompt(data, {"InfinitySampler"})["prompt"]["5"]["inputs"]["cfg"].startswith("\x00")
    assert guard.stand_in("cfg", huge) != huge  # without a prompt to look in, the id's length still counts
