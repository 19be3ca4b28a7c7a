"""A whole graph through ComfyUI's own validator and PromptExecutor, in-process: caching, fingerprints, interrupts."""
from __future__ import annotations

import asyncio
import copy
import gc
import pathlib

import pytest

import comfy.model_management as mm
import comfy.utils
import folder_paths

RES = "256x256 (1:1)"
BUDGET_FILE = "graph_256x256_10pct.json"


@pytest.fixture
def executor(node_classes, prompt_server, monkeypatch):
    import execution
    import nodes

    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", {**nodes.NODE_CLASS_MAPPINGS, **node_classes})
    scalekv_dir = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])
    # Classic cache (0.3.75's default; 0.33 acts the same across prompts). "ram_inactive" is new in 0.33.
    yield execution.PromptExecutor(prompt_server, cache_type=execution.CacheType.CLASSIC,
                                   cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    for p in scalekv_dir.glob("graph_*"):
        p.unlink()


@pytest.fixture
def graph(config_inputs, sampler_inputs):
    return {
        "1": {"class_type": "InfinityModelLoader", "inputs": {"transformer": "infinity_tiny.safetensors",
                                                              "vae": "vae_tiny.safetensors", "text_encoder": "t5_tiny",
                                                              "precision": "auto"}},
        "2": {"class_type": "InfinityTextEncode", "inputs": {"t5": ["1", 1], "prompt": "a red fox in the snow"}},
        "3": {"class_type": "ScaleKVCalibrate", "inputs": {"model": ["1", 0], "t5": ["1", 1],
                                                           "prompts": "a red fox\na lighthouse", "resolution": RES,
                                                           "budget": 10.0, "num_drafters": 0, "seed": 0,
                                                           "filename_prefix": "graph"}},
        "4": {"class_type": "ScaleKVCacheConfig", "inputs": {**config_inputs(), "budget_file": ["3", 0]}},
        "5": {"class_type": "InfinitySampler", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                          "cache_config": ["4", 0], **sampler_inputs()}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},  # a core node takes our IMAGE
    }


def execute(executor, server, prompt, prompt_id):
    """Validate and run a prompt as the server does, on a fresh copy (the executor stores fingerprints in it)."""
    import execution

    prompt = copy.deepcopy(prompt)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, (error, node_errors)
    server.messages.clear()
    executor.execute(prompt, prompt_id, {"client_id": "test"}, outputs)
    ran = [d["node"] for d in server.events("executing") if d["node"] is not None]
    return ran


def test_graph_runs_caches_and_reruns_on_a_lost_budget_file(executor, prompt_server, graph):
    ran = execute(executor, prompt_server, graph, "p1")
    assert executor.success and sorted(ran) == ["1", "2", "3", "4", "5", "6"]
    outputs = executor.history_result["outputs"]
    assert outputs["3"]["scalekv_calibration"][0]["budget_file"] == BUDGET_FILE
    preview = outputs["6"]["images"][0]
    assert (pathlib.Path(folder_paths.get_temp_directory()) / preview["subfolder"] / preview["filename"]).is_file()
    report = outputs["5"]["scalekv_memory"][0]
    assert report["policy"]["budget_file"].endswith(BUDGET_FILE)
    assert all(s["held_tokens"] == s["planned_tokens"] for s in report["scales"][:-1])

    assert execute(executor, prompt_server, graph, "p2") == []  # identical prompt: everything cached
    assert executor.success

    path = pathlib.Path(folder_paths.get_full_path("scalekv", BUDGET_FILE))
    path.unlink()  # the file the cached result names is gone: calibrate again, and what uses it
    assert sorted(execute(executor, prompt_server, graph, "p3")) == ["3", "4", "5", "6"]
    assert path.is_file()
    assert execute(executor, prompt_server, graph, "p4") == []  # and then cached again

    graph["5"]["inputs"]["seed"] = 8
    assert execute(executor, prompt_server, graph, "p5") == ["5", "6"]  # a new seed: the sampler (and preview) only


def test_rewritten_budget_file_reruns_config_and_sampler(executor, prompt_server, graph, run, loaded):
    import os

    name = run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], prompts="a red fox", resolution=RES, budget=10.0,
               num_drafters=0, seed=0, filename_prefix="graph").result[0]
    graph.pop("3")
    graph["4"]["inputs"].pop("budget_file")
    graph["4"]["inputs"]["budget_source"] = f"file:{name}"
    assert sorted(execute(executor, prompt_server, graph, "q1")) == ["1", "2", "4", "5", "6"]
    assert execute(executor, prompt_server, graph, "q2") == []
    path = folder_paths.get_full_path("scalekv", name)
    stamp = os.path.getmtime(path) + 5
    os.utime(path, (stamp, stamp))  # recalibrated in place
    assert sorted(execute(executor, prompt_server, graph, "q3")) == ["4", "5", "6"]


def test_a_model_file_replaced_under_its_name_is_loaded_again(executor, prompt_server, graph, tmp_path):
    """A transformer file replaced under the same name (a new convert, a finished download; here one of the same
    size and modification time, as `cp -p` leaves it) reloads the loader and reruns what follows; ComfyUI's cache
    had kept the old model until an input changed. The budget file's fingerprint is its version too."""
    import os
    import shutil

    for key in ("3",):  # no calibration: the loader, text encode, config, sampler and preview
        graph.pop(key)
    graph["4"]["inputs"].pop("budget_file")
    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    live = folder / "replaced_tiny.safetensors"
    shutil.copy2(folder / "infinity_tiny.safetensors", live)
    graph["1"]["inputs"]["transformer"] = live.name
    try:
        assert sorted(execute(executor, prompt_server, graph, "r1")) == ["1", "2", "4", "5", "6"]
        assert execute(executor, prompt_server, graph, "r2") == []
        swapped = tmp_path / live.name
        shutil.copy2(live, swapped)  # the same bytes, size and time: a new file all the same
        os.replace(swapped, live)
        ran = execute(executor, prompt_server, graph, "r3")
        assert executor.success and "1" in ran and "5" in ran, ran
        assert execute(executor, prompt_server, graph, "r4") == []
    finally:
        live.unlink()


def test_a_cached_samplers_report_stays_in_history(executor, prompt_server, graph, node_classes):
    """A prompt served from ComfyUI's cache (the same settings again, or the same sampler in another workflow)
    keeps the sampler's memory report in /history: the sampler declares intermediate output, which ComfyUI 0.33
    and later send again for cached nodes (0.3.75 has no such field: there only SaveImage's images come back)."""
    from comfy_api.latest import io

    if "has_intermediate_output" not in io.Schema.__dataclass_fields__:
        pytest.skip("this ComfyUI's Schema has no has_intermediate_output")
    graph.pop("3")
    graph["4"]["inputs"].pop("budget_file")
    assert sorted(execute(executor, prompt_server, graph, "c1")) == ["1", "2", "4", "5", "6"]
    first = executor.history_result["outputs"]["5"]["scalekv_memory"][0]
    assert execute(executor, prompt_server, graph, "c2") == []  # everything cached
    assert executor.history_result["outputs"]["5"]["scalekv_memory"][0] == first


def test_invalid_config_is_refused_before_running(executor, prompt_server, graph):
    import execution

    graph["4"]["inputs"]["window"] = 12
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("v1", copy.deepcopy(graph), None))
    assert valid and outputs == ["3"]  # the calibrate branch alone still runs; the preview branch is dropped
    graph.pop("3")
    graph["4"]["inputs"].pop("budget_file")
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("v2", copy.deepcopy(graph), None))
    assert not valid and error["type"] == "prompt_outputs_failed_validation"  # the server answers HTTP 400
    errors = node_errors["4"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and "not a square number" in errors[0]["details"]


def test_interrupt_through_the_executor(executor, prompt_server, graph, monkeypatch):
    graph.pop("3")
    graph["4"]["inputs"].pop("budget_file")

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if value == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    prompt_server.messages.clear()
    executor.execute(copy.deepcopy(graph), "i1", {"client_id": "test"}, ["6"])
    assert not executor.success
    interrupted = prompt_server.events("execution_interrupted")
    assert interrupted and interrupted[0]["node_id"] == "5"
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o).__name__ == "KVCache"]  # no cache left behind
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    prompt_server.messages.clear()
    executor.execute(copy.deepcopy(graph), "i2", {"client_id": "test"}, ["6"])
    assert executor.success and "5" in executor.history_result["outputs"] and "6" in executor.history_result["outputs"]
