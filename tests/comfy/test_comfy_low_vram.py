"""Low VRAM in ComfyUI: the sampler's decode_tile input, and T5 evicted by ComfyUI's memory manager when the
sampler needs the room (T5 lives in its own ModelPatcher)."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.model_management as mm

from scalekv_core.limits import LIMITS
from scalekv_core.schedules import schedule_from_label


def sampler_widgets(cls) -> list[str]:
    info = cls.GET_NODE_INFO_V1()["input"]
    specs = {**info["required"], **info.get("optional", {})}
    return [name for name, spec in specs.items() if spec[0] in ("INT", "FLOAT") or isinstance(spec[0], list)
            or spec[0] == "COMBO"]


def test_decode_tile_keeps_its_widget_place_with_0_for_the_whole_decode(node_classes):
    cls = node_classes["InfinitySampler"]
    spec = cls.GET_NODE_INFO_V1()["input"]["optional"]["decode_tile"]
    assert spec[0] == "INT" and spec[1]["default"] == 0
    assert spec[1]["min"] == LIMITS["decode_tile"].min == 0 and spec[1]["max"] == LIMITS["decode_tile"].max
    assert "whole" in spec[1]["tooltip"] and "tiles" in spec[1]["tooltip"]
    # saved workflows' widgets_values keep their order: inputs added later (attention) come after decode_tile
    assert sampler_widgets(cls)[-2:] == ["decode_tile", "attention"]


@pytest.mark.parametrize("value", [1, 4, 7, -1, 513, float("nan"), "8"])
def test_small_or_bad_tiles_are_refused_by_name(node_classes, value):
    problem = node_classes["InfinitySampler"].validate_inputs(decode_tile=value)
    assert isinstance(problem, str) and problem.startswith("decode_tile")


def test_linked_bad_tile_is_refused_at_execution(run, loaded, encoded, sampler_inputs):
    with pytest.raises(ValueError, match="decode_tile: 4 is too small"):
        run("InfinitySampler", model=loaded[0], positive=encoded, decode_tile=4, **sampler_inputs())


def test_tiled_decode_gives_the_whole_decodes_image(run, loaded, encoded, sampler_inputs):
    whole = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs()).result[0]
    tiled = run("InfinitySampler", model=loaded[0], positive=encoded, decode_tile=8, **sampler_inputs()).result[0]
    assert tiled.shape == whole.shape == (1, 256, 256, 3)
    mse = float((tiled.double() - whole.double()).pow(2).mean())
    assert mse == 0 or 10 * math.log10(1 / mse) > 80


def test_the_sampler_plans_the_tiled_decode(loaded, monkeypatch):
    model = loaded[0]
    schedule = schedule_from_label("1024x1024 (1:1)")
    whole = model.plan(schedule, 1, None, True)
    tiled = model.plan(schedule, 1, None, True, decode_tile=32)
    assert tiled.decode_peak_mb < whole.decode_peak_mb and tiled.sampling_peak_mb == whole.sampling_peak_mb


def test_the_sampler_plans_its_previews_beside_the_cache(loaded):
    """The per-scale preview decodes while the cache is held: the memory asked of ComfyUI covers sampling plus one
    preview decode (16x16 latent positions of the tiny VAE: a 256-pixel image, 8 fp32 maps of its base width)."""
    model = loaded[0]
    schedule = schedule_from_label("1024x1024 (1:1)")
    plan = model.plan(schedule, 1, None, True, decode_tile=8)
    vae = model.pipeline.vae.cfg
    side = 16 * vae.patch_size
    preview = side * side * vae.base_ch * 4 * 8
    assert model.preview_bytes(schedule) == preview
    need = model.memory_required(schedule, 1, None, True, decode_tile=8)
    assert need == int(max(plan.sampling_peak_mb * 2**20 + preview, plan.decode_peak_mb * 2**20))


class _Stop(Exception):
    pass


def test_a_short_device_lets_the_memory_manager_evict_t5_for_the_sampler(run, loaded, monkeypatch):
    """On this CPU there is no GPU to evict from, so the test gives both patchers a (pretend) CUDA load device and
    a full card, then lets the sampler's model.load ask ComfyUI's real load_models_gpu for the room: it calls
    free_memory, which unloads the T5 patcher that Text Encode left loaded. Loading stops right there."""
    model, t5 = loaded
    run("InfinityTextEncode", t5=t5, prompt="a red fox")
    assert any(lm.model is t5.patcher for lm in mm.current_loaded_models)  # Text Encode leaves T5 loaded

    gpu = torch.device("cuda", 0)
    for patcher in (t5.patcher, model.patcher):
        monkeypatch.setattr(patcher, "load_device", gpu)
    for lm in mm.current_loaded_models:  # entries remember the device they were loaded for
        if lm.model is t5.patcher or lm.model is model.patcher:
            monkeypatch.setattr(lm, "device", gpu)
    full = 64 * 2**20  # 64 MiB free: less than the sampler asks for
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False, *a, **k: (full, full) if torch_free_too else full)
    asked = []
    real_free_memory = mm.free_memory

    def free_memory(memory_required, device, *args, **kwargs):
        unloaded = real_free_memory(memory_required, device, *args, **kwargs)
        asked.append((memory_required, device, [lm.model for lm in unloaded]))
        raise _Stop  # before anything moves to the pretend device

    monkeypatch.setattr(mm, "free_memory", free_memory)
    schedule = schedule_from_label("1024x1024 (1:1)")
    need = model.memory_required(schedule, 1, None, True)
    with pytest.raises(_Stop):
        model.load(need)
    (required, device, unloaded), = asked
    assert device == gpu and required >= need
    assert any(p is t5.patcher for p in unloaded)
    assert not any(lm.model is t5.patcher for lm in mm.current_loaded_models)
    assert all(p.device.type == "cpu" for p in t5.encoder.module.parameters())  # back on its offload device
