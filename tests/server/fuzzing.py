"""Strategies and property checks shared by the server fuzz tests.

Values come from three pools: what an input declares (its menu, a number inside its min/max), the edges of that
declaration (min/max and the numbers just outside, NaN, ±inf), and a hostile pool (wrong JSON types, huge numbers,
1 MB strings, lone surrogates, NUL bytes, newlines, paths).

`fail(message, example, response)` raises AssertionError with the example and the server's answer, so hypothesis
prints both. With SCALEKV_FUZZ_KEEP_GOING=<file> it instead appends one JSON line per violation to that file and
returns, so one run lists every violation (not only the first of each test); tests/server/conftest.py then fails
the session if the file has lines.
"""
from __future__ import annotations

import json
import math
import os
import re

from hypothesis import strategies as st

def examples(n: int) -> int:
    """max_examples for a test sized for the ci profile's time budget (5x under the thorough profile)."""
    return n * (5 if os.environ.get("SCALEKV_HYPOTHESIS_PROFILE") == "thorough" else 1)


#: The size of the largest strings, and the answer size a rejection of a huge one must stay under.
HUGE = 1 << 20
MAX_ERROR_BYTES = 4096
#: No answer may contain this many consecutive characters of a huge input (a short prefix is fine).
ECHO_CHUNK = 200
#: Every answer of the planner route within this many seconds.
ANSWER_SECONDS = 2.0


def _huge(seed: str, size: int = HUGE) -> str:
    """A long string whose every ECHO_CHUNK-long slice is recognisable (its pattern repeats every 16 chars)."""
    return (seed * (size // len(seed) + 1))[:size]


#: Strings at least this long count as huge: an answer may quote a short prefix of them, never the whole.
HUGE_MIN = 4096
#: One line each (a 1 MiB string of newlines would be 2^16 prompts for ScaleKV Calibrate, minutes of encoding):
#: 1 MiB (three kinds), and 8 KiB and 512 KiB ones that stay under the planner route's 1 MiB body cap.
HUGE_STRINGS = [
    _huge("HUGEINPUT0123456"),
    "\udc80" + _huge("SURROGATE-HUGE.."),  # a lone surrogate first: not valid UTF-8 if encoded naively
    _huge("NUL\x00BYTES\x00....."),
    _huge("HALFMEBIBYTE-123", HUGE // 2),
    _huge("EIGHTKIBIBYTES-1", 8192),
]
SPECIAL_STRINGS = ["", " ", "\x00", "a\x00b", "\n", "line1\nline2", "\r\n", "\ud800", "a\udfffb", "\udc00\ud800",
                   "../../../../etc/passwd", "/etc/passwd", "..", ".", "/", "C:\\Windows\\win.ini", "~",
                   "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "12", "3.5", "0x10", "true", "null", "[]", "{}",
                   "%s%n", "{0}", "é" * 3, "\u202e", "\ufeff", "😀"]
SPECIAL_NUMBERS = [math.nan, math.inf, -math.inf, 0, -0.0, -1, 1, 0.5, -1e-300, 5e-324, 1e308, -1e308, 1e18,
                   2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, -(10 ** 30),
                   10 ** 400]
WRONG_TYPES = [None, True, False, [], [1], [1, 2, 3], ["a"], {}, {"a": 1}, {"__value__": [1, 2]},
               {"__value__": None}, [[[]]]]

text_chars = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("\x00\n\r\t/.\\"))
short_text = st.text(text_chars, max_size=40)


def hostile() -> st.SearchStrategy:
    """Values of any JSON type that no input declares as such (plus strings of every kind)."""
    return st.one_of(
        st.sampled_from(SPECIAL_NUMBERS),
        st.sampled_from(WRONG_TYPES),
        st.sampled_from(SPECIAL_STRINGS),
        st.sampled_from(HUGE_STRINGS),
        short_text,
        st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.integers(), max_size=4).filter(lambda v: len(v) != 2),  # a 2-list is a link in the API format
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )


# ------------------------------------------------------------------------------------------------ declarations


def widget_inputs(object_info: dict, node: str) -> dict[str, tuple]:
    """{input name: (type, options)} for the inputs of `node` that take a value (not a link to another node's
    output): INT, FLOAT, STRING (force_input ones too: the API format accepts a value there), BOOLEAN, COMBO."""
    out = {}
    for category in ("required", "optional"):
        for name, spec in object_info[node]["input"].get(category, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):
                out[name] = ("COMBO", {**opts, "options": kind})
            elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out[name] = (kind, opts)
    return out


def pixel_count(label: str) -> int:
    m = re.match(r"\s*(\d+)x(\d+)", label)
    return int(m.group(1)) * int(m.group(2)) if m else 1 << 62


#: In-menu and in-range values that would make one example run for long are capped (the out-of-range draws are
#: not): resolutions up to 256x320 pixels, batches up to 3. Everything else draws from its whole declared range.
CHEAP_PIXELS = 256 * 320
CHEAP_MAX = {"batch": 3}


def in_domain(name: str, kind: str, opts: dict) -> st.SearchStrategy:
    if kind == "COMBO":
        options = opts["options"]
        if name == "resolution":
            options = [o for o in options if pixel_count(o) <= CHEAP_PIXELS] or options[-1:]
        return st.sampled_from(options) if options else st.just("")
    if kind == "INT":
        lo, hi = int(opts.get("min", -(2 ** 63))), int(opts.get("max", 2 ** 63 - 1))
        hi = min(hi, CHEAP_MAX.get(name, hi))
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, opts.get("default", lo)]))
    if kind == "FLOAT":
        lo, hi = float(opts.get("min", -1e300)), float(opts.get("max", 1e300))
        return st.one_of(st.floats(lo, hi), st.sampled_from([lo, hi, float(opts.get("default", lo))]))
    if kind == "BOOLEAN":
        return st.booleans()
    return st.one_of(short_text, st.sampled_from(SPECIAL_STRINGS))


def edges(name: str, kind: str, opts: dict) -> st.SearchStrategy:
    """min, max and the values just outside them, plus NaN and ±inf.

    A capped input's max side (CHEAP_MAX) is drawn too: ComfyUI's int() turns 64.5 or the next float above 64 into
    a batch of 64, which is valid and heavy; the admission check counts the harness's RLIMIT_AS cap and refuses it
    before any work (test_a_batch_the_capped_server_cannot_hold_is_refused).
    """
    values: list = [math.nan, math.inf, -math.inf]
    for key, direction in (("min", -1), ("max", 1)):
        if key in opts:
            b = opts[key]
            values += [b, b + direction, b + direction * 0.5, math.nextafter(float(b), direction * math.inf),
                       b + direction * 10 ** 6, str(b + direction)]
    if kind == "COMBO":
        options = opts["options"]
        values += [o.upper() for o in options[:3]] + [o + " " for o in options[:2]] + [" " + o for o in options[:1]]
    return st.sampled_from(values)


MISSING = object()  # "leave the input out of the prompt"


def prompt_value(name: str, kind: str, opts: dict) -> st.SearchStrategy:
    return st.one_of(in_domain(name, kind, opts), edges(name, kind, opts), hostile(), st.just(MISSING))


def comfy_coerce(kind: str, value):
    """What ComfyUI's validate_inputs makes of a widget value before any range check: ('ok', value) or
    ('refuse', why). Lists (other than {"__value__": [...]}) are links; ComfyUI refuses a malformed one."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    elif isinstance(value, list):
        return "refuse", "a list is a link"
    try:
        if kind == "INT":
            return "ok", int(value)
        if kind == "FLOAT":
            return "ok", float(value)
        if kind == "STRING":
            return "ok", str(value)
        if kind == "BOOLEAN":
            return "ok", bool(value)
    except Exception as e:  # noqa: BLE001  (what ComfyUI catches)
        return "refuse", f"{type(e).__name__}"
    return "ok", value


def outside_declaration(kind: str, opts: dict, value) -> str | None:
    """Why `value` (as ComfyUI coerces it) lies outside what the input declares, or None. Such a value must never
    run to success: a number outside min/max or not finite must be refused at validation (HTTP 400); a name not in
    a menu may instead fail at execution with an error naming it."""
    if value is MISSING:
        return None
    verdict, v = comfy_coerce(kind, value)
    if verdict == "refuse":
        return v
    if kind in ("INT", "FLOAT"):
        if isinstance(v, float) and not math.isfinite(v):
            return f"{v} is not finite"
        if "min" in opts and v < opts["min"]:
            return f"{v} < min {opts['min']}"
        if "max" in opts and v > opts["max"]:
            return f"{v} > max {opts['max']}"
    if kind == "COMBO" and not (isinstance(v, str) and v in opts["options"]):
        return "not in the menu"
    return None


def must_refuse_at_validation(kind: str, value) -> bool:
    """Numbers outside their declaration can be checked without running anything: they must give HTTP 400."""
    return kind in ("INT", "FLOAT") and value is not MISSING


# ------------------------------------------------------------------------------------------------ checks


def huge_input(value) -> str | None:
    """The huge string inside a value, if any."""
    if isinstance(value, str) and len(value) >= HUGE_MIN:
        return value
    if isinstance(value, dict):
        for v in value.values():
            found = huge_input(v)
            if found:
                return found
    if isinstance(value, list):
        for v in value:
            found = huge_input(v)
            if found:
                return found
    return None


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def echoes(body: bytes, huge: str) -> bool:
    """Whether an answer holds ECHO_CHUNK consecutive characters of `huge` (as written or as its repr), in any of
    the strings of a JSON body or anywhere in a body that is not JSON."""
    try:
        texts = list(_strings(json.loads(body)))
    except ValueError:
        texts = [body.decode("utf-8", "replace")]
    chunks = set()
    for k in range(32):  # every alignment of the 16-character pattern, past a leading odd character
        chunk = huge[k:k + ECHO_CHUNK]
        chunks |= {chunk, repr(chunk)[1:-1]}
    return any(c in t for t in texts for c in chunks)


def names(text: str, name: str) -> bool:
    """Whether an error text names an input or field: 'budget_unit', 'budget unit' or 'budget-unit'."""
    low = text.lower()
    n = name.lower()
    return any(form in low for form in {n, n.replace("_", " "), n.replace("_", "-")})


def short(value, limit: int = 300) -> str:
    """A printable, bounded description of a value for failure messages."""
    if isinstance(value, str) and len(value) > limit:
        return f"<str of {len(value)} chars starting {value[:40]!r}>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... <{len(text)} chars>"


def shorten(value, limit: int = 200):
    """A copy of a JSON value with long strings replaced by a description (for printing examples)."""
    if isinstance(value, str):
        return value if len(value) <= limit else short(value)
    if isinstance(value, dict):
        return {k: shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten(v, limit) for v in value[:20]] + ([f"... {len(value)} items"] if len(value) > 20 else [])
    return value


KEEP_GOING = os.environ.get("SCALEKV_FUZZ_KEEP_GOING")


def fail(prop: str, example, response=None) -> None:
    """A violated property: raise (default) or record (SCALEKV_FUZZ_KEEP_GOING=<file>)."""
    record = {"property": prop, "example": shorten(example), "response": short(response, 1500)}
    if KEEP_GOING:
        with open(KEEP_GOING, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return
    raise AssertionError(json.dumps(record, indent=1, default=str))


def check(condition: bool, prop: str, example, response=None) -> bool:
    if not condition:
        fail(prop, example, response)
    return condition
