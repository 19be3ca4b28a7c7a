"""Shortens what a prompt sends to this pack's nodes before ComfyUI validates it: oversized or invalid values.

ComfyUI quotes an input's value whole in its own validation errors ("Failed to convert an input value to a FLOAT
value: <value>") and keeps it in /history, so a megabyte string sent as `cfg` came back as a 4 MB answer; and a
lone surrogate in a value breaks its logging, which stopped the prompt worker for good. Registered as an
on-prompt handler (it runs before validation), this replaces such a value of our nodes with `limits.guarded`'s
short stand-in, which every check of the one limits table refuses with the reason; nothing else is changed.
"""
from __future__ import annotations

from typing import Any, Container, Iterable

from ..scalekv_core.limits import TEXTS, guarded

#: Longest value a non-text input may carry (names, menu values, numbers written as text).
DEFAULT_MAX_CHARS = TEXTS["name"].max_chars


def _size(value: Any, stop: int) -> int:
    """Characters or items in a value, counted only up to `stop` (a huge value is not walked whole)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        total = len(value)
        for item in (value.values() if isinstance(value, dict) else value):
            if total > stop:
                break
            total += _size(item, stop - total)
        return total
    return 1


def _has_surrogate(value: Any) -> int | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.start
    return None


#: Longest node id a link may name (ComfyUI's ids are short: "5", or "12:34:5" inside a subgraph).
MAX_NODE_ID_CHARS = 256


def _is_link(value: Any, node_ids: Container[str] | None) -> bool:
    """Whether `value` is a link [node id, output index] to a node of the prompt. Only such a value is let through
    whole: a link-shaped value naming no node (["A" * 2_000_000, 0]) is checked like any other value, since ComfyUI
    quotes its id in the error. Without `node_ids` (no prompt to look in) only the shape and id length count."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return False
    if len(value[0]) > MAX_NODE_ID_CHARS:
        return False
    return node_ids is None or value[0] in node_ids


def stand_in(name: str, value: Any, node_ids: Container[str] | None = None) -> Any:
    """The value itself, or a short stand-in that the input's check refuses with the reason. `node_ids`: the ids of
    the prompt's nodes, which a link must name to pass unchecked."""
    if _is_link(value, node_ids):
        return value
    limit = TEXTS[name].max_chars if name in TEXTS else DEFAULT_MAX_CHARS
    size = _size(value, limit + 1)
    if size > limit:
        what = f"a text of {len(value)} characters" if isinstance(value, str) else f"a {type(value).__name__} " \
               f"of more than {limit} items"
        return guarded(f"{what} is too long; at most {limit}")
    bad = _has_surrogate(value)
    if bad is not None:
        return guarded(f"not valid text (character {bad} is an unpaired surrogate)")
    return value


def guard_prompt(json_data: Any, node_ids: Iterable[str]) -> Any:
    """The prompt with our nodes' oversized or invalid values replaced by stand-ins (others' nodes untouched)."""
    ours = set(node_ids)
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    present = {key for key in prompt if isinstance(key, str)}
    for node in prompt.values():
        if not isinstance(node, dict) or node.get("class_type") not in ours:
            continue
        inputs = node.get("inputs")
        if isinstance(inputs, dict):
            for name, value in list(inputs.items()):
                inputs[name] = stand_in(str(name), value, present)
    return json_data


def register(node_ids: Iterable[str], server=None) -> bool:
    """Install the guard as an on-prompt handler of the running PromptServer; False when there is none (tests)."""
    if server is None:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
    add = getattr(server, "add_on_prompt_handler", None)
    if add is None:
        return False
    ids = frozenset(node_ids)
    add(lambda json_data: guard_prompt(json_data, ids))
    return True
