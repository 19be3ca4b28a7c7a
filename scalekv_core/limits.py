"""The one table of input limits: every number and text a user can set, with its range.

The ComfyUI nodes declare their widgets' min/max from here and enforce them in `validate_inputs` (ComfyUI skips
its own range check for any input a `validate_inputs` names), the planner route's pydantic model takes its bounds
from here, and the CLI parses its flags through here. A value outside its range is an `InputError` that names the
input and quotes at most a short prefix of what was sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Longest prefix of a user's value that an error message quotes.
QUOTE_CHARS = 60
#: Most values a per-scale list may hold (13 scales at 1024x1024): the CLI's lists and the plan route's reports.
MAX_SCALES = 64


class InputError(ValueError):
    """A user input outside its declared limits; the message names the input."""


#: Put by the ComfyUI pack's prompt guard in place of a value that must not reach ComfyUI whole (a megabyte string
#: would be echoed in its errors and /history) or raw (a lone surrogate breaks its logging); the checks below refuse
#: it with the reason that follows the mark.
GUARD_MARK = "\x00scalekv-refused: "


def guarded(reason: str) -> str:
    """The stand-in for a refused value: the mark, then why (checks raise InputError with the reason)."""
    return GUARD_MARK + reason


def _refuse_guarded(value: Any, field: str) -> None:
    if isinstance(value, str) and value.startswith(GUARD_MARK):
        raise InputError(f"{field}: {value[len(GUARD_MARK):]}")


def shown(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to `limit` characters so an error never echoes a huge input."""
    size = len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else None
    if isinstance(value, (str, bytes)) and size > 4 * limit:
        value = value[: 4 * limit]  # repr of a 20 MB string is itself 20 MB: cut before quoting
    elif size is not None and size > limit and not isinstance(value, (str, bytes)):
        return f"<a {type(value).__name__} of {size} items>"
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, bytes) else "items"
        text = f"{text[:limit]}... ({type(value).__name__}" + (f", {size} {unit})" if size is not None else ")")
    return text


def brief(message: str, limit: int = 500) -> str:
    """A message (not a value) cut to `limit` characters: its quoted values are already short."""
    return message if len(message) <= limit else message[:limit] + "..."


def _num(value: float) -> str:
    """A number as a person writes it: 999999999, not 1e+09; 0.5, not 0.500000."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class Limit:
    """The range of one numeric input; `check` returns the value as `kind` or raises InputError naming it."""

    name: str
    kind: type  # int or float
    min: float
    max: float
    odd: bool = False  # pooling kernels are centred
    min_exclusive: bool = False  # the value must be strictly above min

    def describe(self) -> str:
        low = f"above {_num(self.min)}" if self.min_exclusive else _num(self.min)
        return f"{'an odd whole number' if self.odd else 'a whole number' if self.kind is int else 'a number'} " \
               f"from {low} to {_num(self.max)}"

    def check(self, value: Any, field: str | None = None) -> int | float:
        """`value` as an int or float within range; InputError naming `field` (default: the limit's name)."""
        field = field or self.name
        _refuse_guarded(value, field)
        if not _is_number(value):
            raise InputError(f"{field}: expected {self.describe()}, got {shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{field}: expected {self.describe()}, got {value}")
        if self.kind is int:
            if value != int(value):
                raise InputError(f"{field}: expected {self.describe()}, got {_num(value)}")
            value = int(value)
        else:
            value = float(value)
        low_ok = value > self.min if self.min_exclusive else value >= self.min
        if not (low_ok and value <= self.max):
            raise InputError(f"{field}: {_num(value)} is out of range; expected {self.describe()}")
        if self.odd and value % 2 == 0:
            raise InputError(f"{field}: {_num(value)} is even; expected {self.describe()}")
        return value

    def parse(self, text: str, field: str | None = None) -> int | float:
        """A command-line string -> checked value (for argparse types)."""
        try:
            number: int | float = int(text) if self.kind is int else float(text)
        except (TypeError, ValueError):
            raise InputError(f"{field or self.name}: expected {self.describe()}, got {shown(text)}") from None
        return self.check(number, field)


@dataclass(frozen=True)
class TextLimit:
    """A text input: a string of at most `max_chars` characters, valid UTF-8, optionally one printable line."""

    name: str
    max_chars: int
    single_line: bool = False
    allow_empty: bool = True

    def check(self, value: Any, field: str | None = None) -> str:
        field = field or self.name
        _refuse_guarded(value, field)
        if not isinstance(value, str):
            raise InputError(f"{field}: expected text, got {shown(value)}")
        if len(value) > self.max_chars:
            raise InputError(f"{field}: {len(value)} characters is too long; at most {self.max_chars}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{field}: not valid text (character {e.start} is an unpaired surrogate "
                             f"{shown(value[e.start])})") from None
        if "\x00" in value:
            raise InputError(f"{field}: contains a NUL character (position {value.index(chr(0))})")
        if self.single_line:
            bad = next((i for i, c in enumerate(value) if not c.isprintable()), None)
            if bad is not None:
                raise InputError(f"{field}: contains a line break or control character {shown(value[bad])} at "
                                 f"position {bad}; use one line of printable characters")
        if not self.allow_empty and not value.strip():
            raise InputError(f"{field}: must not be empty")
        return value


MAX_BATCH = 64
#: Seeds span signed and unsigned 64-bit: ComfyUI's integer node (PrimitiveInt) randomises over signed 64-bit and
#: feeds samplers' seeds, KSampler's seeds go to 2^64 - 1; torch's generator takes every one of them.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1

#: Every numeric input, by name (node input names; the CLI's flags map onto them).
LIMITS: dict[str, Limit] = {lim.name: lim for lim in (
    # sampler
    Limit("seed", int, MIN_SEED, MAX_SEED),
    Limit("cfg", float, 0.0, 30.0),
    Limit("tau", float, 0.01, 5.0),
    Limit("top_k", int, 0, 100_000),
    Limit("top_p", float, 0.0, 1.0),
    Limit("batch", int, 1, MAX_BATCH),
    Limit("width", int, 64, 8192),
    Limit("height", int, 64, 8192),
    # cache config
    Limit("budget", float, 0.0, 1e6, min_exclusive=True),
    Limit("budget_percent", float, 0.0, 100.0, min_exclusive=True),
    Limit("window", int, 1, 4096),
    Limit("kernel", int, 1, 63, odd=True),
    Limit("refiner_decay", float, 0.0, 1000.0),
    # calibration
    Limit("calibration_budget", float, 0.1, 100.0),
    Limit("calibration_prompts", int, 1, 256),  # prompts (lines) in one calibration: one generation each
    Limit("num_drafters", int, 0, 100_000),
    Limit("max_queries", int, 1, 4096),
    Limit("topk_fraction", float, 0.0, 1.0, min_exclusive=True),
    # process
    Limit("threads", int, 0, 1024),
    # the whole job's planner: the card's memory
    Limit("vram_gib", float, 0.0, 4096.0, min_exclusive=True),
    # VAE decode: latent positions per tile side (0 = the whole latent at once; 1..7 are refused by the VAE)
    Limit("decode_tile", int, 0, 512),
    # block swap: transformer blocks kept in CPU memory (two always stay on the device; the model's depth decides)
    Limit("block_swap", int, 0, 254),
    # memory reports and model shapes (the planner route's report mode)
    Limit("depth", int, 1, 256),
    Limit("heads", int, 1, 256),
    Limit("model_width", int, 1, 32768),
    Limit("batch_rows", int, 1, 2 * MAX_BATCH),
    Limit("layer_tokens", int, 0, 10_000_000),
    Limit("layer_bytes", int, 0, 2**50),
    Limit("report_mb", float, 0.0, 1e9),
)}

#: Every text input, by name.
TEXTS: dict[str, TextLimit] = {lim.name: lim for lim in (
    TextLimit("prompt", 50_000),
    TextLimit("prompts", 500_000),
    TextLimit("filename_prefix", 100, single_line=True, allow_empty=False),
    TextLimit("name", 1024, single_line=True),  # model, budget-file and resolution names
)}


def check(name: str, value: Any, field: str | None = None) -> Any:
    """Check `value` against the limit called `name` (numeric or text); InputError names `field` or `name`."""
    if name in LIMITS:
        return LIMITS[name].check(value, field)
    return TEXTS[name].check(value, field)


def check_choice(field: str, value: Any, options: Any) -> str:
    """`value` if it is one of `options` (a menu); InputError naming `field` and the choices otherwise."""
    _refuse_guarded(value, field)
    if not isinstance(value, str) or value not in options:
        names = list(options)
        listed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise InputError(f"{field}: unknown value {shown(value)}; choose one of {listed}")
    return value
