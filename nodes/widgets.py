"""Widget declarations and their checks, both from the engine's one table of limits (scalekv_core.limits).

ComfyUI skips its own min/max and menu checks for every input a node's `validate_inputs` names, so a node that
names an input must enforce what it declares: `problem` runs the same table the widget's min/max came from.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from comfy_api.latest import io

from ..scalekv_core.limits import LIMITS, TEXTS, InputError, check_choice


#: `advanced=True` for inputs most people leave alone, where this ComfyUI's inputs take it (0.33+: the frontend
#: folds them away); older hosts show them as usual.
ADVANCED: dict[str, bool] = {"advanced": True} if "advanced" in inspect.signature(io.Input.__init__).parameters else {}


def int_input(name: str, limit: str | None = None, **kwargs: Any) -> io.Int.Input:
    """An Int widget whose min/max are the table's."""
    lim = LIMITS[limit or name]
    return io.Int.Input(name, min=int(lim.min), max=int(lim.max), **kwargs)


def float_input(name: str, limit: str | None = None, **kwargs: Any) -> io.Float.Input:
    """A Float widget whose min/max are the table's."""
    lim = LIMITS[limit or name]
    return io.Float.Input(name, min=float(lim.min), max=float(lim.max), **kwargs)


def problem(*checks: Callable[[], Any]) -> str | None:
    """The first check's InputError message, or None when all pass (for `validate_inputs`)."""
    try:
        for run in checks:
            run()
    except InputError as e:
        return str(e)
    return None


def number(name: str, value: Any, limit: str | None = None) -> Callable[[], Any]:
    """A deferred range check of a widget value; a linked input (None) is checked where it is produced."""
    return lambda: None if value is None else LIMITS[limit or name].check(value, name)


def text(name: str, value: Any, limit: str | None = None) -> Callable[[], Any]:
    """A deferred text check (type, length, valid UTF-8, no NUL)."""
    return lambda: None if value is None else TEXTS[limit or name].check(value, name)


def choice(name: str, value: Any, options: Any) -> Callable[[], Any]:
    """A deferred menu check, quoting at most a short prefix of a wrong value."""
    return lambda: None if value is None else check_choice(name, value, options)
