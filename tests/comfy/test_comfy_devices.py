"""The nodes on a device without some dtypes (Apple's MPS: no fp8, bf16 from macOS 14 only), simulated on the CPU:
the loader refuses fp8 when queued and when it loads, the sampler refuses an fp8 cache before the weights move,
and the precision tooltip says what auto picks on each device."""
from __future__ import annotations

import importlib

import pytest
import torch

import comfy.model_management as mm

MPS = torch.device("mps")
LOADER_FILES = dict(transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors", text_encoder="t5_tiny")


@pytest.fixture
def devices(pack):
    return importlib.import_module(f"{pack.__name__}.scalekv_core.devices")


@pytest.fixture
def on_mps(monkeypatch):
    """ComfyUI's compute device is MPS (T5 stays on the CPU, as ComfyUI keeps text encoders there by default)."""
    monkeypatch.setattr(mm, "get_torch_device", lambda: MPS)


def test_loader_refuses_fp8_when_queued_on_mps(node_classes, on_mps):
    loader = node_classes["InfinityModelLoader"]
    problem = loader.validate_inputs(**LOADER_FILES, precision="auto", weight_format="fp8_e4m3fn", t5_weights="none")
    assert isinstance(problem, str) and "weight_format fp8_e4m3fn: cannot run on mps" in problem and "int8" in problem
    assert loader.validate_inputs(**LOADER_FILES, precision="auto", weight_format="int8", t5_weights="none") is True


def test_t5_weights_follow_the_text_encoders_device(node_classes, on_mps, monkeypatch):
    loader = node_classes["InfinityModelLoader"]
    ok = loader.validate_inputs(**LOADER_FILES, precision="auto", weight_format="none", t5_weights="fp8_e4m3fn")
    assert ok is True  # T5 runs on the CPU here
    monkeypatch.setattr(mm, "text_encoder_device", lambda: MPS)
    problem = loader.validate_inputs(**LOADER_FILES, precision="auto", weight_format="none", t5_weights="fp8_e4m3fn")
    assert isinstance(problem, str) and problem.startswith("t5_weights fp8_e4m3fn: cannot run on mps")


def test_explicit_bf16_is_refused_on_an_mps_without_it(node_classes, on_mps, devices, monkeypatch):
    monkeypatch.setattr(devices, "_PROBED", {})
    monkeypatch.setattr(devices, "_present", lambda d: True)
    monkeypatch.setattr(devices, "_probe", lambda d, dtype: d.type != "mps")  # macOS 13
    loader = node_classes["InfinityModelLoader"]
    problem = loader.validate_inputs(**LOADER_FILES, precision="bf16", weight_format="none", t5_weights="none")
    assert isinstance(problem, str) and "precision bf16: cannot run on mps" in problem and "macOS 14" in problem
    assert loader.validate_inputs(**LOADER_FILES, precision="auto", weight_format="none", t5_weights="none") is True


def test_loader_refuses_fp8_at_load_not_at_the_sampler(run, on_mps, devices):
    """A linked or API-queued prompt skips validate_inputs: the load itself refuses, before the transformer loads."""
    with pytest.raises(devices.DeviceDtypeError, match="weight_format fp8_e4m3fn: cannot run on mps.*int8"):
        run("InfinityModelLoader", **LOADER_FILES, precision="auto", weight_format="fp8_e4m3fn")


def test_sampler_refuses_an_fp8_cache_on_mps_before_the_weights_move(run, loaded, encoded, config_inputs,
                                                                     sampler_inputs, devices, monkeypatch):
    model = loaded[0]
    monkeypatch.setattr(model.patcher, "load_device", MPS)
    monkeypatch.setattr(type(model), "load", lambda *a, **k: pytest.fail("weights moved before the check"))
    config = run("ScaleKVCacheConfig", **config_inputs(kv_dtype="fp8_e4m3fn")).result[0]
    with pytest.raises(devices.DeviceDtypeError, match="kv_dtype fp8_e4m3fn: cannot run on mps.*int8"):
        run("InfinitySampler", model=model, positive=encoded, cache_config=config, **sampler_inputs())


def test_precision_tooltip_says_what_auto_picks_per_device(node_classes):
    v1 = node_classes["InfinityModelLoader"].GET_NODE_INFO_V1()
    tip = v1["input"]["required"]["precision"][1]["tooltip"]
    assert "fp16 on older" in tip and "MPS" in tip and "macOS 14" in tip and "fp32 on the CPU" in tip
    assert "int8" in v1["input"]["optional"]["weight_format"][1]["tooltip"].split("MPS")[0][-40:]


def test_plan_panel_suggests_weights_the_device_holds(pack):
    """A job that does not fit is told to try fp8 weights, except on a Mac, which has none: int8 there."""
    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    assert routes.compact_weights(torch.device("cpu")) == "fp8 or int4"
    assert routes.compact_weights(MPS) == "int8 or int4"


def test_plan_route_names_a_precision_the_mac_cannot_hold(pack, on_mps, devices, monkeypatch):
    """bf16 on a Mac before macOS 14 is the request's error (a 400 naming precision), not the planner's 500."""
    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    monkeypatch.setattr(devices, "_PROBED", {})
    monkeypatch.setattr(devices, "_present", lambda d: True)
    monkeypatch.setattr(devices, "_probe", lambda d, dtype: d.type != "mps")  # macOS 13
    with pytest.raises(routes.PlanInputError, match="precision bf16: cannot run on mps.*macOS 14"):
        routes.block_dtype_for("bf16")
    assert routes.block_dtype_for("auto") == torch.float32
