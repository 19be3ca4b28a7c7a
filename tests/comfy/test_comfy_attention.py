"""Infinity Sampler's attention input: declared from the engine's table, checked, and it reaches the engine."""
from __future__ import annotations

import dataclasses
import inspect
import sys

import pytest
import torch
from comfy_api.latest import io

ENGINE_CHOICES = ("auto", "sdpa", "flash", "efficient", "cudnn", "math", "flash_attn", "sage")


def _attention_module(pack):
    """The pack's own copy of the engine's attention module (the one the node runs)."""
    return sys.modules[f"{pack.__name__}.scalekv_core.kvcache.attention"]


def test_attention_is_an_optional_advanced_menu_from_the_engines_table(node_classes, pack):
    spec = node_classes["InfinitySampler"].GET_NODE_INFO_V1()["input"]["optional"]["attention"]
    kind, options = spec
    assert kind == "COMBO" and tuple(options["options"]) == ENGINE_CHOICES
    assert tuple(_attention_module(pack).CHOICES) == ENGINE_CHOICES
    assert options["default"] == "auto" and "fastest installed" in options["tooltip"]
    assert bool(options.get("advanced")) == ("advanced" in inspect.signature(io.Input.__init__).parameters)


def test_a_wrong_name_is_refused_with_the_choices(node_classes, run, loaded, encoded, sampler_inputs):
    message = node_classes["InfinitySampler"].validate_inputs(attention="xformers")
    assert message.startswith("attention: unknown value 'xformers'; choose one of auto, sdpa, flash")
    with pytest.raises(ValueError, match="attention: unknown value 'xformers'"):
        run("InfinitySampler", model=loaded[0], positive=encoded, attention="xformers", **sampler_inputs())
    assert node_classes["InfinitySampler"].validate_inputs(attention="math") is True


def test_the_chosen_backend_runs_the_sampling_and_the_picture_stays(run, loaded, encoded, monkeypatch, pack,
                                                                    sampler_inputs):
    attention = _attention_module(pack)
    math_backend = attention.BACKENDS["math"]
    calls: list[float] = []

    def spy(q, k, v, scale, mask=None):
        calls.append(scale)
        return math_backend.attend(q, k, v, scale, mask)

    monkeypatch.setitem(attention.BACKENDS, "math", dataclasses.replace(math_backend, attend=spy))
    default = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs())
    assert not calls and default.ui["scalekv_memory"][0]["attention"] == "sdpa"  # auto on the CPU: today's SDPA
    chosen = run("InfinitySampler", model=loaded[0], positive=encoded, attention="math", **sampler_inputs())
    depth = loaded[0].pipeline.transformer.cfg.depth
    assert calls.count(1.0) == depth * 7  # every block's self-attention at each of the tiny model's 7 scales
    assert chosen.ui["scalekv_memory"][0]["attention"] == "math"
    assert torch.equal(chosen.result[0], default.result[0])  # the math kernel draws the same picture here


def test_a_backend_this_device_cannot_run_is_refused_before_the_weights_move(run, loaded, encoded, monkeypatch,
                                                                            sampler_inputs):
    model = loaded[0]
    if model.patcher.load_device.type == "cuda":
        pytest.skip("on a GPU cudnn may run; the refusal is checked on CPU hosts")

    def no_load(*a, **k):
        raise AssertionError("the weights moved before the attention backend was checked")

    monkeypatch.setattr(model, "load", no_load)
    with pytest.raises(ValueError) as e:
        run("InfinitySampler", model=model, positive=encoded, attention="cudnn", **sampler_inputs())
    assert str(e.value).startswith("attention backend 'cudnn' cannot run here: needs a CUDA device (this run is "
                                   "on cpu); choose one of auto, sdpa, flash, efficient, cudnn, math, flash_attn, sage")
