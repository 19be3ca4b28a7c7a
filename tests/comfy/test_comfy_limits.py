"""The whole class of "a declared limit that nobody enforces", checked over every node of the pack from its schema.

ComfyUI checks a widget's min/max and menu itself, except for inputs that the node's `validate_inputs` names: those
it passes through unchecked (kernel 401 cost +4 GB that way). So for every node, every numeric widget must take its
min/max from the one table (scalekv_core.limits), and every input a `validate_inputs` names must be refused, by
name, below its min, above its max, as NaN/inf and as a wrong type, while its default passes.
"""
from __future__ import annotations

import inspect

import pytest

from scalekv_core.limits import LIMITS

#: Widgets whose table entry has another name than the input.
ALIASES = {("ScaleKVCalibrate", "budget"): "calibration_budget"}


def widget_inputs(cls) -> dict[str, dict]:
    info = cls.GET_NODE_INFO_V1()["input"]
    out = {}
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            out[name] = {"kind": kind, **opts}
    return out


def named_inputs(cls) -> list[str]:
    fn = getattr(cls, "validate_inputs", None)
    if fn is None or not fn.__qualname__.startswith(cls.__name__ + "."):  # ComfyUI's base: not overridden
        return []
    return [p for p in inspect.signature(fn).parameters if p != "cls"]


def default_value(spec: dict):
    if "default" in spec:
        return spec["default"]
    if isinstance(spec["kind"], list):
        return spec["kind"][0]
    return spec.get("options", [None])[0]


def test_every_numeric_widget_declares_the_tables_limits(node_classes):
    checked = 0
    for node_id, cls in node_classes.items():
        for name, spec in widget_inputs(cls).items():
            if spec["kind"] not in ("INT", "FLOAT"):
                continue
            limit = LIMITS[ALIASES.get((node_id, name), name)]
            if limit.name == "budget" and node_id == "ScaleKVCacheConfig":
                assert spec["min"] == 0.0  # exclusive: 0 itself is refused by validate_inputs
            else:
                assert spec["min"] == limit.min, (node_id, name)
            assert spec["max"] == limit.max, (node_id, name)
            checked += 1
    assert checked >= 12


def bad_values(spec: dict, limit) -> list:
    values = [float("nan"), float("inf"), float("-inf"), "abc", [1], True]
    if spec["kind"] in ("INT", "FLOAT"):
        values += [limit.max + 1, limit.min - 1, 1e308, -1e308]
        if spec["kind"] == "INT":
            values += [999999999999]
    return values


def test_every_named_input_enforces_what_it_declares(node_classes):
    """Defaults and each named number's declared min and max pass; each bad value of each named input is refused
    with the input's name in the message."""
    tried = 0
    for node_id, cls in node_classes.items():
        names = named_inputs(cls)
        if not names:
            continue
        widgets = widget_inputs(cls)
        defaults = {n: default_value(widgets[n]) for n in names if n in widgets}
        assert cls.validate_inputs(**defaults) is True, (node_id, defaults)
        for name in names:
            spec = widgets[name]
            if spec["kind"] in ("INT", "FLOAT"):
                limit = LIMITS[ALIASES.get((node_id, name), name)]
                values = bad_values(spec, limit)
            elif spec["kind"] == "STRING":
                values = [12, ["a"], "\ud800", "a\x00b"]
            else:  # a menu
                values = ["not-an-option", 3, "x" * 100_000]
            if spec["kind"] in ("INT", "FLOAT"):  # the declared ends themselves are accepted (no off-by-one)
                for value in (spec["min"], spec["max"]):
                    given = {**defaults, name: value}
                    if node_id == "ScaleKVCacheConfig" and name == "budget":
                        if value == 0.0:
                            continue  # the widget's 0 is an exclusive end (checked above)
                        given["budget_unit"] = "tokens"  # percent ends at 100; tokens and MB reach the widget's max
                    answer = cls.validate_inputs(**given)
                    assert answer is True, (node_id, name, value, answer)
            for value in values:
                message = cls.validate_inputs(**{**defaults, name: value})
                assert isinstance(message, str), (node_id, name, value)
                assert message.startswith(f"{name}:"), (node_id, name, value, message)
                assert len(message) < 1200, (node_id, name, len(message))
                tried += 1
    assert tried >= 40


@pytest.mark.parametrize("node_id", ["ScaleKVCacheConfig", "InfinitySampler", "ScaleKVCalibrate",
                                     "InfinityTextEncode"])
def test_nodes_that_take_numbers_or_text_validate_them(node_classes, node_id):
    """A node with NaN-able floats or free text must have a validate_inputs: ComfyUI lets NaN and surrogates in."""
    cls = node_classes[node_id]
    widgets = widget_inputs(cls)
    floats_and_text = [n for n, s in widgets.items() if s["kind"] in ("FLOAT", "STRING") and not s.get("forceInput")]
    assert set(floats_and_text) <= set(named_inputs(cls)), (node_id, floats_and_text, named_inputs(cls))
