"""ScaleKV Cache Config: the CacheConfig it builds, validate_inputs, and its fingerprint for budget files."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re

import pytest

import folder_paths

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"


@pytest.fixture
def budget_file():
    """A budget file in models/scalekv (the tiny model's calibrated 10% file at 256x256)."""
    path = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0]) / "tiny_budget.json"
    path.write_text((TINY / "scalekv_budget_tiny.json").read_text())
    yield path
    path.unlink(missing_ok=True)


def validate(node_classes, **inputs):
    """validate_inputs called with what ComfyUI passes it: only the inputs it names."""
    cls = node_classes["ScaleKVCacheConfig"]
    import inspect

    names = inspect.getfullargspec(cls.validate_inputs).args[1:]
    return cls.validate_inputs(**{k: v for k, v in inputs.items() if k in names})


def test_defaults_build_the_engine_default(run, config_inputs):
    config = run("ScaleKVCacheConfig", **config_inputs()).result[0]
    from scalekv_core.kvcache import CacheConfig

    assert config.to_dict() == CacheConfig().to_dict()  # scalekv, 10%, window 16, kernel 5, maxpool, improved, auto


@pytest.mark.parametrize("unit, budget, expected", [("percent", 10.0, "10%"), ("percent", 2.5, "2.5%"),
                                                    ("tokens", 650.0, 650), ("MB", 900.0, "900MB")])
def test_budget_units(run, config_inputs, unit, budget, expected):
    config = run("ScaleKVCacheConfig", **config_inputs(budget_unit=unit, budget=budget)).result[0]
    assert config.budget == expected


def test_every_field_reaches_the_config(run, config_inputs):
    config = run("ScaleKVCacheConfig", **config_inputs(policy="snapkv", window=10, kernel=7, pooling="avgpool",
                                                       scoring="original", kv_dtype="fp16",
                                                       refiner_decay=3.0)).result[0]
    assert (config.policy, config.window, config.kernel, config.pooling, config.scoring, config.kv_dtype,
            config.refiner_decay, config.budget_file) == ("snapkv", 10, 7, "avgpool", "original", "fp16", 3.0, None)


def test_budget_sources(run, config_inputs, budget_file):
    preset = run("ScaleKVCacheConfig", **config_inputs(budget_source="preset:infinity-2b-10pct")).result[0]
    assert preset.budget_file == "infinity-2b-10pct"  # the engine resolves preset names
    from_menu = run("ScaleKVCacheConfig", **config_inputs(budget_source="file:tiny_budget.json")).result[0]
    assert from_menu.budget_file == str(budget_file)
    linked = run("ScaleKVCacheConfig", **config_inputs(), budget_file="tiny_budget.json").result[0]
    assert linked.budget_file == str(budget_file)  # the Calibrate node's output overrides the menu


def test_menu_lists_presets_and_files(node_classes, budget_file):
    options = node_classes["ScaleKVCacheConfig"].GET_NODE_INFO_V1()["input"]["required"]["budget_source"][1]["options"]
    assert options == ["generated", "preset:infinity-2b-10pct", "preset:infinity-8b-10pct", "file:tiny_budget.json"]


def test_validate_accepts_good_settings(node_classes, config_inputs, budget_file):
    for overrides in [{}, dict(budget_unit="tokens", budget=650.0), dict(budget_unit="MB", budget=0.5),
                      dict(budget=100.0), dict(policy="snapkv", window=10), dict(policy="full"),
                      dict(budget_source="preset:infinity-8b-10pct"), dict(budget_source="file:tiny_budget.json"),
                      dict(window=9, kernel=1)]:
        assert validate(node_classes, **config_inputs(**overrides)) is True, overrides


@pytest.mark.parametrize("overrides, words", [
    (dict(budget=0.0), "budget: 0 is out of range"),
    (dict(budget=-5.0), "budget: -5 is out of range"),
    (dict(budget=150.0), "budget: 150 is out of range"),
    (dict(budget=float("nan")), "budget: expected a number"),
    (dict(budget_unit="MB", budget=float("inf")), "budget: expected a number"),
    (dict(budget="abc"), "budget: expected a number from above 0"),
    (dict(budget_unit="tokens", budget=64.5), "whole number"),
    (dict(budget_unit="tokens", budget=8.0), "budget: 8 tokens cannot hold the observation window of 16"),
    (dict(budget_unit="bytes"), "budget_unit: unknown value 'bytes'"),
    (dict(window=10), "window: 10 is not a square number"),
    (dict(window=0), "window: 0 is out of range"),
    (dict(window=float("nan")), "window: expected a whole number"),
    (dict(kernel=4), "kernel: 4 is even"),
    (dict(kernel=0), "kernel: 0 is out of range"),
    (dict(kernel=401), "kernel: 401 is out of range; expected an odd whole number from 1 to 63"),
    (dict(kernel=999999999), "kernel: 999999999 is out of range"),
    (dict(refiner_decay=float("nan")), "refiner_decay: expected a number"),
    (dict(refiner_decay=-5.0), "refiner_decay: -5 is out of range"),
    (dict(policy="h2o"), "policy: unknown value 'h2o'"),
    (dict(policy="x" * 100_000), "policy: unknown value 'xxxxxxxx"),
    (dict(budget_source="file:nowhere.json"), "nowhere.json"),
    (dict(budget_source="preset:infinity-20b"), "budget_source: unknown"),
])
def test_validate_rejects_impossible_settings_with_a_message(node_classes, run, config_inputs, overrides, words):
    message = validate(node_classes, **config_inputs(**overrides))
    assert isinstance(message, str) and words in message and len(message) < 400
    with pytest.raises(ValueError, match=re.escape(words)):  # and execute refuses them too (an API prompt may skip validation)
        run("ScaleKVCacheConfig", **config_inputs(**overrides))


@pytest.mark.parametrize("source, linked", [("preset:infinity-2b-10pct", None), ("file:tiny_budget.json", None),
                                             ("file:deleted.json", None), ("preset:unknown", None),
                                             ("generated", "tiny_budget.json")])
def test_a_budget_file_beside_another_policy_is_set_aside(node_classes, run, config_inputs, budget_file, caplog,
                                                           source, linked):
    """Other policies grey budget_source out (the artist cannot change it after switching policy) and read no
    budget file: a chosen, linked, missing or unknown one is set aside with a note, not refused (it was a 400, and a
    linked Calibrate's work was thrown away by an error after it ran)."""
    import logging

    inputs = config_inputs(policy="pyramidkv", budget_source=source)
    assert validate(node_classes, **inputs) is True
    with caplog.at_level(logging.WARNING):
        config = run("ScaleKVCacheConfig", **inputs, **({"budget_file": linked} if linked else {})).result[0]
    assert config.policy == "pyramidkv" and config.budget_file is None
    assert any("is not used: only the scalekv policy reads budget files (policy is pyramidkv)" in r.getMessage()
               for r in caplog.records), caplog.text
    fp = node_classes["ScaleKVCacheConfig"].fingerprint_inputs
    assert fp(**inputs) == ""  # nothing read: no rerun when the file changes


def test_a_blank_linked_budget_file_is_no_file_under_any_policy(run, config_inputs, caplog):
    """A linked budget_file of spaces is no file (budget_file_for reads it so): no "is not used" note about it."""
    import logging

    with caplog.at_level(logging.WARNING):
        config = run("ScaleKVCacheConfig", **config_inputs(policy="pyramidkv"), budget_file="   ").result[0]
    assert config.budget_file is None and "is not used" not in caplog.text


def test_validation_through_comfyui(node_classes, config_inputs, monkeypatch):
    """ComfyUI's own validate_prompt turns the message into a custom_validation_failed error (HTTP 400)."""
    import execution
    import nodes

    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", {**nodes.NODE_CLASS_MAPPINGS, **node_classes})
    prompt = {"1": {"class_type": "ScaleKVCacheConfig", "inputs": config_inputs(window=12)}}
    ok, errors, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
    assert not ok and errors[0]["type"] == "custom_validation_failed" and "not a square number" in errors[0]["details"]
    # validate_inputs names kernel, so ComfyUI skips the widget's max of 63: the pack must enforce it (it cost
    # +4 GB at 401 and tried to allocate 8e18 bytes at 999999999)
    for kernel in (401, 999999999, float("nan")):
        prompt["1"]["inputs"] = config_inputs(kernel=kernel)
        ok, errors, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
        assert not ok and any("kernel:" in e["details"] for e in errors), (kernel, errors)
    prompt["1"]["inputs"] = config_inputs()
    ok, errors, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
    assert ok and not errors


def test_fingerprint_follows_the_budget_file(node_classes, config_inputs, budget_file):
    fp = node_classes["ScaleKVCacheConfig"].fingerprint_inputs
    assert fp(**config_inputs()) == fp(**config_inputs(budget=20.0)) == ""  # no file: inputs alone decide
    first = fp(**config_inputs(budget_source="file:tiny_budget.json"))
    assert first == fp(**config_inputs(budget_source="file:tiny_budget.json"))  # unchanged file: cached result
    stamp = os.path.getmtime(budget_file) + 5
    os.utime(budget_file, (stamp, stamp))  # a new calibration rewrote it: downstream must re-run
    assert fp(**config_inputs(budget_source="file:tiny_budget.json")) != first
    budget_file.unlink()
    assert fp(**config_inputs(budget_source="file:tiny_budget.json")) == "missing"


def test_config_is_json_describable(run, config_inputs):
    """The memory report records the cache settings as JSON: they must come back as the same settings."""
    config = run("ScaleKVCacheConfig", **config_inputs()).result[0]
    again = type(config)(**json.loads(json.dumps(config.to_dict())))  # the pack's own CacheConfig class
    assert again == config and again.policy == "scalekv" and again.budget == config.budget
