"""Fuzz the budget widget's planner route, POST /scalekv/plan, on the real server.

Bodies: the settings mode (the cache-config widgets plus resolution, batch, cfg, transformer/model, precision,
budget_file) and the report mode ({"report": ...} shaped like a real sampler's scalekv_memory UI output, read from
/history after a run), each as one mutation of a known-good body; raw bytes that are not JSON (or not an object);
JSON nested 100k deep; 20 MB strings; budget files that are absolute paths, '../' paths, a directory, /dev/zero, a
FIFO, a 1 GiB sparse file.

Properties, per answer:
  * status 200 or 400 (never 500, never a dropped connection), within 2 s; a body over 1 MiB may instead be
    refused unread with 413 (the route's documented cap), with the same JSON error shape;
  * a 400's body is a JSON object {"error": "..."} that names the mutated field, under 4 KB (a 413's too, less
    the field);
  * no answer repeats more than 200 consecutive characters of a huge input;
  * the server's peak RSS grows by less than 512 MB while answering (budget files are size-capped);
  * a budget file outside models/scalekv is never opened: the first key of one planted outside never appears in an
    answer, a FIFO never blocks;
  * GET / answers (200 within 2 s) during the whole module, polled every 0.2 s, and after every example.
"""
from __future__ import annotations

import copy
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from fuzzing import (ANSWER_SECONDS, MAX_ERROR_BYTES, SPECIAL_NUMBERS, check, echoes, examples, fail,
                     hostile, huge_input, names, short_text, widget_inputs)

harness.skip_without_host()

ROUTE = "/scalekv/plan"
PEAK_GROWTH_MB = 512
#: A body over this size may be refused unread with 413 (the route caps bodies at 1 MiB); smaller ones get 200/400.
BODY_CAP = 1 << 20
WAIT_SECONDS = 5  # how long a request may hang before it is a violation for sure (the bound is ANSWER_SECONDS)
SETTINGS_BASE = dict(policy="scalekv", budget_unit="percent", budget=10.0, window=16, kernel=5, pooling="maxpool",
                     scoring="improved", kv_dtype="auto", budget_source="generated", refiner_decay=0.0,
                     resolution=harness.RES, batch=1, cfg=3.0, transformer="infinity_tiny.safetensors",
                     precision="auto")
SETTINGS_KEYS = sorted([*SETTINGS_BASE, "budget_file", "model"])
TWENTY_MB = "TWENTYMB-0123456" * (20 * 2 ** 20 // 16)


# ------------------------------------------------------------------------------------------------ fixtures


class RootPoller:
    """GET / every 0.2 s in a thread while the module runs; records every answer that is not 200 within 2 s."""

    def __init__(self, box) -> None:
        self.box, self.problems, self.polls = box, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            server = self.box.server
            if server is None or not server.alive():
                continue
            restarts = self.box.restarts
            try:
                r = server.request("GET", "/", timeout=WAIT_SECONDS)
                ok = r.status == 200 and r.seconds <= ANSWER_SECONDS
                what = r
            except OSError as e:
                ok, what = False, repr(e)
            if self.box.restarting or self.box.restarts != restarts or not server.alive():
                continue  # a server the tests are replacing (after a recorded violation) is not counted
            self.polls += 1
            if not ok:
                self.problems.append((time.strftime("%H:%M:%S"), repr(what)[:300]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(WAIT_SECONDS + 5)


@pytest.fixture(scope="module")
def poller(box):
    with RootPoller(box) as p:
        yield p


@pytest.fixture(scope="module")
def report(box) -> dict:
    """A real scalekv_memory report, from a sampler run read back through /history."""
    prompt_id, entry = box.get().run(harness.graph(seed=99))
    assert harness.outcome(entry) == "success", entry["status"]
    return entry["outputs"]["5"]["scalekv_memory"][0]


class Context:
    """What the fuzz tests need from fixtures, behind a short repr (hypothesis prints a failing test's arguments)."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)

    def __repr__(self) -> str:
        return "<context: object_info, a real report, a calibrated budget file>"


@pytest.fixture(scope="module")
def ctx(object_info, report, calibrated) -> Context:
    return Context(info=object_info, report=report, calibrated=calibrated)


@pytest.fixture(scope="module")
def calibrated(box) -> str:
    """A budget file ScaleKV Calibrate wrote into models/scalekv (a name the route must accept)."""
    prompt_id, entry = box.get().run(harness.calibrate_graph({"filename_prefix": "route_fuzz"}))
    assert harness.outcome(entry) == "success", entry["status"]
    return entry["outputs"]["7"]["scalekv_calibration"][0]["budget_file"]


def budget_file_names(server: harness.Server, calibrated: str) -> list[str]:
    """Budget file names and paths: inside models/scalekv (good and hostile) and outside it."""
    outside = server.root / "outside"
    secret, fifo = str(server.secret_file), str(server.fifo)
    return [calibrated, "file:" + calibrated, *server.hostile_names, *("file:" + n for n in server.hostile_names),
            secret, fifo, str(outside / "a_directory.json"), str(outside), "/dev/zero", "/dev/urandom",
            "/etc/passwd", "/proc/self/environ", "../../outside/secret_budget.json",
            "../../outside/budget_fifo.json", "file:../../outside/secret_budget.json", "../" * 12 + "etc/passwd",
            "..", ".", "", " ", str(server.scalekv_dir / calibrated), str(server.scalekv_dir / "huge_budget.json")]


# ------------------------------------------------------------------------------------------------ one request


def post(box, body: bytes, example, field: str | list[str] | None, huge: str | None = None
         ) -> harness.Response | None:
    """POST a body and check every per-answer property; None when no answer came. A 400 must name `field` (or one
    of a list of fields)."""
    server = box.get()
    rss0 = server.rss_mb()
    server.reset_peak()
    try:
        r = server.request("POST", ROUTE, body, timeout=WAIT_SECONDS)
    except TimeoutError:
        fail(f"POST {ROUTE} answers within {ANSWER_SECONDS} s", example, f"no answer in {WAIT_SECONDS} s")
        recover(box)
        return None
    except OSError as e:
        fail(f"POST {ROUTE} answers (the connection is not dropped)", example, repr(e))
        recover(box)
        return None
    finally:
        if server.alive():
            server.unblock_fifo()
    growth = server.peak_mb() - rss0
    oversize = len(body) > BODY_CAP
    check(r.status in (200, 400) or (oversize and r.status == 413),
          f"POST {ROUTE} answers 200 or 400 (413 for a body over 1 MiB), never 500", example, r)
    check(r.seconds <= ANSWER_SECONDS, f"POST {ROUTE} answers within {ANSWER_SECONDS} s", example,
          f"{r.seconds:.2f} s: {r!r}")
    check(growth < PEAK_GROWTH_MB, f"POST {ROUTE} grows the peak RSS by less than {PEAK_GROWTH_MB} MB", example,
          f"peak RSS +{growth:.0f} MB: {r!r}")
    check(harness.SECRET_KEY.encode() not in r.body, "a budget file outside models/scalekv is never opened",
          example, r)
    if huge is not None:
        check(not echoes(r.body, huge), "an answer does not repeat more than a short prefix of a huge input",
              example, f"{len(r.body)} bytes: {r!r}")
    if r.status in (400, 413):
        try:
            error = r.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if check(isinstance(error, str) and error, 'a 400 body is JSON {"error": "<message>"}', example, r):
            check(len(r.body) < MAX_ERROR_BYTES, "a 400 body stays under 4 KB", example, f"{len(r.body)} bytes")
            if field is not None and r.status == 400:
                fields = [field] if isinstance(field, str) else field
                check(any(names(error, f) for f in fields), "a 400's error names the field", example, r)
    if not server.serving(timeout=WAIT_SECONDS):
        fail("GET / answers after every request", example, server.log_tail(1500))
        recover(box)
    return r


def recover(box) -> None:
    """After a request that hung or dropped: free a thread stuck on the FIFO; replace a server that stays busy."""
    server = box.server
    if server is None or not server.alive():
        return
    server.unblock_fifo()
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if not server.busy():
            return
    box.restart()


# ------------------------------------------------------------------------------------------------ strategies


def settings_values(key: str, info: dict, files: list[str]) -> st.SearchStrategy:
    """Values for one settings field: its menu or range, its edges, budget file names, and the hostile pool."""
    config = widget_inputs(info, "ScaleKVCacheConfig")
    sampler = widget_inputs(info, "InfinitySampler")
    loader = widget_inputs(info, "InfinityModelLoader")
    declared = {**config, **{k: sampler[k] for k in ("resolution", "batch", "cfg")},
                **{k: loader[k] for k in ("transformer", "precision")}}
    pools = [hostile(), st.sampled_from(SPECIAL_NUMBERS)]
    if key in declared:
        kind, opts = declared[key]
        if kind == "COMBO":
            pools.append(st.sampled_from(opts["options"]))
        elif kind in ("INT", "FLOAT"):
            lo, hi = opts.get("min", 0), opts.get("max", 10 ** 6)
            pools.append(st.integers(int(lo), int(hi)) if kind == "INT" else st.floats(lo, hi))
            pools.append(st.sampled_from([lo, hi, lo - 1, hi + 1, math.nextafter(float(hi), math.inf)]))
    if key == "model":
        pools.append(st.sampled_from(["2b", "8b", "layer12", "layer48", "125m", "2B", "../2b"]))
    if key in ("budget_file", "budget_source", "transformer"):
        pools.append(st.sampled_from(files))
    if key == "transformer":
        pools.append(st.sampled_from(["vae_tiny.safetensors", "infinity_tiny.safetensors/..", "t5_tiny"]))
    if key == "batch":
        pools.append(st.sampled_from([64, 65, 0, -1, 10 ** 6]))
    return st.one_of(pools)


def declared_value(key: str, value, info: dict, calibrated: str) -> bool:
    """Whether a settings value lies inside what its widget declares (menu, min/max) or is a known-good name."""
    declared = {**widget_inputs(info, "ScaleKVCacheConfig"),
                **{k: v for k, v in widget_inputs(info, "InfinitySampler").items() if k in ("resolution", "batch",
                                                                                            "cfg")},
                **{k: v for k, v in widget_inputs(info, "InfinityModelLoader").items() if k in ("transformer",
                                                                                                "precision")}}
    if key == "model":
        return value in ("2b", "8b", "layer12", "layer48")
    if key == "budget_file":
        return value in (calibrated, "file:" + calibrated)
    if key not in declared or isinstance(value, bool):
        return False
    kind, opts = declared[key]
    if kind == "COMBO":
        return isinstance(value, str) and value in opts["options"]
    if kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        if kind == "INT" and value != int(value):
            return False
        return opts.get("min", -math.inf) <= value <= opts.get("max", math.inf)
    return isinstance(value, str)


def leaf_paths(value, prefix=()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), the containers themselves included."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += leaf_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += leaf_paths(v, prefix + (i,))
    return out


def deepest_name(path: tuple) -> str:
    names_ = [p for p in path if isinstance(p, str)]
    return names_[-1] if names_ else "report"


def mutate(report: dict, path: tuple, action: str, value) -> dict:
    out = copy.deepcopy(report)
    parent = out
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "truncate" and isinstance(parent[last], list):
        parent[last] = parent[last][: len(parent[last]) // 2]
    elif action == "extend" and isinstance(parent[last], list):
        parent[last] = parent[last] + parent[last] + [value]
    else:
        parent[last] = value
    return out


def report_values(key: str, files: list[str]) -> st.SearchStrategy:
    numbers = st.sampled_from([0, -1, -(10 ** 9), 10 ** 9, 10 ** 12, 2 ** 63, 10 ** 30, 1e308, math.nan, math.inf,
                               "4", "128", "float32", "bfloat16", "Tensor", "__class__"])
    pools = [hostile(), numbers]
    if key == "budget_file":
        pools.append(st.sampled_from(files))
    if key in ("scales", "planned_tokens", "held_tokens", "stored_bytes", "allocated_bytes", "grid", "pixels",
               "drafters"):
        pools.append(st.lists(st.one_of(st.integers(-5, 10 ** 9), st.none(), short_text, st.floats()),
                              max_size=30))
    return st.one_of(pools)


# ------------------------------------------------------------------------------------------------ tests


def test_known_good_bodies_are_planned(box, report, calibrated):
    server = box.get()
    for body in (SETTINGS_BASE, {k: v for k, v in SETTINGS_BASE.items() if k != "transformer"} | {"model": "2b"},
                 {**SETTINGS_BASE, "budget_file": calibrated}, {**SETTINGS_BASE, "budget_source": "file:" + calibrated},
                 {"report": report}):
        r = server.post_json(ROUTE, body)
        assert r.status == 200, (body, r)
        assert r.json()["scales"], r


@settings(max_examples=examples(800))
@given(data=st.data())
def test_fuzz_settings_mode(box, ctx, poller, data):
    object_info, calibrated = ctx.info, ctx.calibrated
    files = budget_file_names(box.get(), calibrated)
    base = data.draw(st.sampled_from(["transformer", "model"]), label="base")
    body = dict(SETTINGS_BASE)
    if base == "model":
        del body["transformer"]
        body["model"] = "2b"
    key = data.draw(st.sampled_from(SETTINGS_KEYS), label="field")
    action = data.draw(st.sampled_from(["set", "set", "set", "delete"]), label="action")
    if action == "delete":
        body.pop(key, None)
        value = "<deleted>"
    else:
        value = body[key] = data.draw(settings_values(key, object_info, files), label="value")
    # A value outside the field's declaration must be refused by the field's name; a declared one can only clash
    # with another field (a budget below the window, a preset for another depth): then naming any field will do.
    fields = SETTINGS_KEYS if action == "delete" or declared_value(key, value, object_info, calibrated) else key
    post(box, harness.dumps(body), {"field": key, "action": action, "value": value, "body": body}, fields,
         huge_input(body))


@settings(max_examples=examples(800))
@given(data=st.data())
def test_fuzz_report_mode(box, ctx, poller, data):
    report, calibrated = ctx.report, ctx.calibrated
    files = budget_file_names(box.get(), calibrated)
    path = data.draw(st.sampled_from(leaf_paths(report)), label="path")
    action = data.draw(st.sampled_from(["set", "set", "set", "delete", "truncate", "extend"]), label="action")
    value = data.draw(report_values(deepest_name(path), files), label="value")
    mutated = mutate(report, path, action, value)
    example = {"path": list(path), "action": action, "value": value}
    post(box, harness.dumps({"report": mutated}), example, deepest_name(path), huge_input(value))


REPORT_CASES = [
    *[(("model", f), "set", v) for f in ("depth", "heads", "width") for v in (10 ** 9, 2 ** 63, 0, -1, "4", None, 1.5)],
    (("scales",), "truncate", None), (("scales",), "extend", {}), (("scales",), "set", []), (("scales",), "set", {}),
    (("scales",), "set", "scales"), (("scales", 0), "set", None),
    *[(("scales", 1, f), a, v) for f in ("planned_tokens", "held_tokens", "stored_bytes")
      for a, v in (("set", "12"), ("set", None), ("set", {}), ("set", [1.5, "x", None, []]), ("truncate", None),
                   ("extend", 10 ** 12), ("set", [10 ** 18] * 4), ("set", [-5] * 4))],
    *[(("policy",), "set", v) for v in ("scalekv", 5, [], None, True)],
    (("policy", "policy"), "set", "no_such_policy"), (("policy", "budget"), "set", "ten"),
    (("policy", "window"), "set", -16), (("policy", "kernel"), "set", 10 ** 9),
    (("full_analytic_mb",), "set", "abc"), (("full_analytic_mb",), "set", [1]), (("analytic_mb",), "set", "abc"),
    (("bytes_per_token_layer",), "set", "x"), (("bytes_per_token_layer",), "set", 0),
    (("batch_rows",), "set", 10 ** 9), (("schedule", "template"), "set", "nope"),
    (("schedule", "size"), "set", 5), (("model", "block_dtype"), "set", "Tensor"),
    (("model", "block_dtype"), "set", "__class__"),
]


@pytest.mark.parametrize("path, action, value", REPORT_CASES,
                         ids=[f"{'.'.join(map(str, p))}-{a}-{str(v)[:12]}" for p, a, v in REPORT_CASES])
def test_report_field_cases(box, report, poller, path, action, value):
    """The report fields the widget relies on, each broken in the ways a stale or hand-made report breaks them."""
    body = {"report": mutate(report, path, action, value)}
    post(box, harness.dumps(body), {"path": list(path), "action": action, "value": value}, deepest_name(path))


RAW_BODIES = [b"", b"{", b"}", b"not json", b"null", b"[]", b"42", b'"a string"', b"true", b"NaN", b"-Infinity",
              b'{"policy": NaN}', b'{"budget": Infinity}', b'{"report": null}', b'{"report": []}',
              b'{"report": "x"}', b'{"report": {}}', b"\xff\xfe\x00\x00", b"\xc3\x28", b'{"a": "\\ud800"}',
              b"\x00" * 64, b'{"policy": "scalekv",}', b"[" * 50, b'{"budget": 1e999}', b'{"batch": 1e400}',
              b'{"window": 1.5}', b'{"window": true}', b"{}" * 3, b'{"__proto__": {}}']


@settings(max_examples=examples(300))
@given(body=st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=200),
                      hostile().map(harness.dumps),
                      st.dictionaries(st.sampled_from(SETTINGS_KEYS + ["report"]), hostile(), max_size=4)
                      .map(harness.dumps)))
def test_fuzz_raw_bodies(box, poller, body):
    post(box, body, {"raw body": body[:300]}, None)


def deep(n: int, kind: str) -> bytes:
    return (b'{"a":' * n + b"1" + b"}" * n) if kind == "dict" else (b"[" * n + b"]" * n)


@pytest.mark.parametrize("name, body", [
    ("list nested 100k deep", lambda: deep(100_000, "list")),
    ("object nested 100k deep", lambda: deep(100_000, "dict")),
    ("report nested 100k deep", lambda: b'{"report": ' + deep(100_000, "dict") + b"}"),
    ("policy.budget_file nested 100k deep",
     lambda: b'{"report": {"policy": {"budget_file": ' + deep(100_000, "list") + b"}}}"),
    ("settings field nested 100k deep", lambda: b'{"budget": ' + deep(100_000, "list") + b"}"),
])
def test_deeply_nested_json(box, poller, name, body):
    post(box, body(), {"case": name}, None)


@pytest.mark.parametrize("field", ["policy", "resolution", "transformer", "budget_file", "budget_source", "model",
                                   "precision", "kv_dtype"])
def test_twenty_megabyte_string_field(box, poller, field):
    body = {**SETTINGS_BASE, field: TWENTY_MB}
    post(box, harness.dumps(body), {"field": field, "value": "<20 MiB string>"}, field, TWENTY_MB)


@pytest.mark.parametrize("path", [("model", "architecture"), ("policy", "budget_file"), ("schedule", "size"),
                                  ("measurement",), ("model", "block_dtype")])
def test_twenty_megabyte_string_in_report(box, report, poller, path):
    body = {"report": mutate(report, path, "set", TWENTY_MB)}
    post(box, harness.dumps(body), {"path": list(path), "value": "<20 MiB string>"}, deepest_name(path), TWENTY_MB)


def test_twenty_megabyte_string_body(box, poller):
    post(box, harness.dumps(TWENTY_MB), {"body": "<a 20 MiB JSON string>"}, None, TWENTY_MB)


@pytest.mark.parametrize("kind", ["secret", "secret-relative", "fifo", "fifo-in-scalekv", "directory",
                                  "directory-in-scalekv", "dev-zero", "dev-zero-in-scalekv", "huge-in-scalekv",
                                  "etc-passwd"])
@pytest.mark.parametrize("mode", ["settings budget_file", "settings budget_source", "report policy.budget_file"])
def test_hostile_budget_files(box, report, poller, kind, mode):
    """Each hostile file, by path or name, in each place a budget file can be named: answered within 2 s, never
    opened when outside models/scalekv, never read whole when huge."""
    server = box.get()
    outside = server.root / "outside"
    name = {"secret": str(server.secret_file), "secret-relative": "../../outside/secret_budget.json",
            "fifo": str(server.fifo), "fifo-in-scalekv": "fifo_budget.json",
            "directory": str(outside / "a_directory.json"), "directory-in-scalekv": "dir_budget.json",
            "dev-zero": "/dev/zero", "dev-zero-in-scalekv": "zero_budget.json",
            "huge-in-scalekv": "huge_budget.json", "etc-passwd": "/etc/passwd"}[kind]
    if mode == "settings budget_file":
        body = {**SETTINGS_BASE, "budget_file": name}
    elif mode == "settings budget_source":
        body = {**SETTINGS_BASE, "budget_source": "file:" + name}
    else:
        path = name if name.startswith("/") else str(server.scalekv_dir / name)
        body = {"report": mutate(report, ("policy", "budget_file"), "set", path)}
    field = "budget_source" if mode == "settings budget_source" else "budget_file"
    r = post(box, harness.dumps(body), {"mode": mode, "budget file": name}, None)
    if r is not None and kind != "huge-in-scalekv" and r.status == 400:
        check(names(r.json().get("error", ""), field) or names(r.json().get("error", ""), "budget file"),
              "a refused budget file is named in the error", {"mode": mode, "budget file": name}, r)


def test_root_answered_throughout(box, poller):
    """GET / was polled every 0.2 s through the whole module: every answer 200 within 2 s."""
    assert box.get().serving()
    assert poller.polls > 0
    assert not poller.problems, poller.problems[:10]
