"""Infinity Memory (block swap) in ComfyUI: the node, the sampler's memory input, same image, weights put back."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management as mm


def test_memory_node_declares_block_swap_from_the_table(node_classes):
    info = node_classes["InfinityMemory"].GET_NODE_INFO_V1()
    spec = info["input"]["required"]["block_swap"]
    assert spec[0] == "INT" and (spec[1]["min"], spec[1]["max"], spec[1]["default"]) == (0, 254, 0)
    assert "CPU memory" in spec[1]["tooltip"] and info["output"] == ["INFINITY_MEMORY"]
    sampler = node_classes["InfinitySampler"].GET_NODE_INFO_V1()["input"]["optional"]
    assert sampler["memory"][0] == "INFINITY_MEMORY" and "block swap" in sampler["memory"][1]["tooltip"]


@pytest.mark.parametrize("value, words", [(-1, "block_swap: -1"), (255, "block_swap: 255"),
                                          (float("nan"), "block_swap"), ("2", "block_swap")])
def test_memory_node_refuses_values_outside_the_table(node_classes, value, words):
    message = node_classes["InfinityMemory"].validate_inputs(block_swap=value)
    assert isinstance(message, str) and words in message, message


def test_block_swap_gives_the_same_image_and_puts_the_weights_back(run, loaded, encoded, sampler_inputs):
    model = loaded[0]
    plain = run("InfinitySampler", model=model, positive=encoded, **sampler_inputs(seed=5)).result[0]
    memory = run("InfinityMemory", block_swap=2).result[0]  # the tiny model has 4 blocks: 2 may swap
    swapped = run("InfinitySampler", model=model, positive=encoded, memory=memory, **sampler_inputs(seed=5)).result[0]
    assert torch.equal(plain, swapped)
    transformer = model.pipeline.transformer
    assert getattr(transformer, "block_swap", None) is None  # the swap ended with the call
    homes = {p.device for p in transformer.parameters()} | {p.device for p in model.pipeline.vae.parameters()}
    assert homes == {torch.device(model.patcher.offload_device)}  # back where ComfyUI keeps them between runs
    rerun = run("InfinitySampler", model=model, positive=encoded, **sampler_inputs(seed=5)).result[0]
    assert torch.equal(plain, rerun)  # the memory manager loads the model whole again afterwards
    mm.unload_all_models()


def test_more_blocks_than_the_model_allows_is_refused_naming_the_depth(run, loaded, encoded, sampler_inputs):
    memory = run("InfinityMemory", block_swap=3).result[0]
    with pytest.raises(ValueError, match=r"block_swap: 3 blocks, but the model has 4; swap at most 2"):
        run("InfinitySampler", model=loaded[0], positive=encoded, memory=memory, **sampler_inputs())


def test_block_swap_in_the_executors_inference_mode_leaves_later_runs_working(run, encoded, sampler_inputs):
    """ComfyUI runs every prompt inside torch.inference_mode(): the model loads as inference tensors there, and a
    block-swap run must put every weight back as the same kind, so a later run without the swap still works."""
    with torch.inference_mode():
        model = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                    text_encoder="t5_tiny", precision="auto").result[0]
        plain = run("InfinitySampler", model=model, positive=encoded, **sampler_inputs(seed=5)).result[0]
    with torch.inference_mode():  # a second prompt
        memory = run("InfinityMemory", block_swap=2).result[0]
        swapped = run("InfinitySampler", model=model, positive=encoded, memory=memory,
                      **sampler_inputs(seed=5)).result[0]
    kinds = {p.is_inference() for p in model.pipeline.transformer.parameters()}
    with torch.inference_mode():  # a third, without the swap
        rerun = run("InfinitySampler", model=model, positive=encoded, **sampler_inputs(seed=5)).result[0]
    assert torch.equal(plain, swapped) and torch.equal(plain, rerun)
    assert kinds == {True}
    mm.unload_all_models()


class _Stop(Exception):
    pass


def test_novram_streams_every_swappable_block(run, loaded, encoded, sampler_inputs, monkeypatch):
    """Under --novram ComfyUI's loader moves none of our weights (no partial-load casts), so the sampler streams
    the blocks itself: every block that can swap, unless the Memory node asks for a number; on other VRAM states,
    or a CPU device, nothing changes. (A pretend CUDA device: generate is stopped before anything moves.)"""
    model = loaded[0]
    assert model.block_swap_for(0) == 0  # this CPU
    monkeypatch.setattr(model.patcher, "load_device", torch.device("cuda", 0))
    assert mm.vram_state != mm.VRAMState.NO_VRAM and model.block_swap_for(0) == 0
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    assert (model.block_swap_for(0), model.block_swap_for(1)) == (2, 1)  # 4 blocks, 2 stay as swap slots
    free = 64 << 30
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False, *a, **k: (free, free) if torch_free_too else free)
    asked = []

    def generate(*args, block_swap=0, **kwargs):
        asked.append(block_swap)
        raise _Stop

    monkeypatch.setattr(model.pipeline, "generate", generate)
    monkeypatch.setattr(type(model), "vae_on_device", lambda self, swap: __import__("contextlib").nullcontext())
    with pytest.raises(_Stop):
        run("InfinitySampler", model=model, positive=encoded, **sampler_inputs())
    memory = run("InfinityMemory", block_swap=1).result[0]
    with pytest.raises(_Stop):
        run("InfinitySampler", model=model, positive=encoded, memory=memory, **sampler_inputs())
    assert asked == [2, 1]


def test_block_swap_makes_room_as_comfyuis_loader_does(loaded, monkeypatch):
    """With block swap the weights are placed by the engine, not by load_models_gpu: the room asked of ComfyUI's
    memory manager is what it would ask itself (weights + 10%, and the run plus its reserve, at least its inference
    minimum); it asked for the bare sum. None on a CPU. (A pretend CUDA device: free_memory is stopped.)"""
    model = loaded[0]
    asked = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, *a, **k: asked.append((need, device)) or [])
    model.load(0, 2)  # the CPU: nothing to free
    assert asked == []
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(model.patcher, "load_device", gpu)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 400 * 2**20)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 1200 * 2**20)
    weights = model.swapped_weight_bytes(2)
    for run_bytes, extra in ((10 * 2**20, 1200 * 2**20), (2 * 2**30, 2 * 2**30 + 400 * 2**20)):
        asked.clear()
        model.load(run_bytes, 2)
        assert asked == [(weights * 1.1 + extra, gpu)]


def test_block_swap_is_ignored_where_the_weights_wait_on_the_gpu(loaded, monkeypatch, caplog):
    """--highvram and --gpu-only keep the weights on the compute device: a swapped block would stream from where it
    already is, and the admission would count its bytes out twice. The swap is dropped with a warning saying why."""
    model = loaded[0]
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(model.patcher, "load_device", gpu)
    assert model.block_swap_for(2) == 2  # offloaded to the CPU, as ComfyUI does by default
    monkeypatch.setattr(model.patcher, "offload_device", gpu)
    with caplog.at_level("WARNING"):
        assert model.block_swap_for(2) == 0 and model.block_swap_for(0) == 0
    assert "block_swap 2 ignored" in caplog.text and "--highvram" in caplog.text
