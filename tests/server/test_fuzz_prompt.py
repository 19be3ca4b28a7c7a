"""Fuzz every widget input of every node of the pack through the real server's POST /prompt.

Each example takes a known-good prompt and replaces one widget value of one pack node (or leaves it out) with a
generated one: in menu/range, at and just past its declared min/max, NaN/±inf, huge and negative numbers, wrong
JSON types, 1 MiB strings, lone surrogates, NUL bytes, newlines, paths. The input lists come from GET /object_info.

Properties, per example:
  * POST /prompt answers 200 or 400 (never 500, never a dropped connection), the server keeps serving GET / and
    ComfyUI's prompt worker thread lives on (its death leaves a server that queues prompts and never runs them).
  * A 400's node_errors name the input (ComfyUI's own per-input errors by extra_info.input_name; a node's
    validate_inputs failure by its message, which ComfyUI repeats for every input of the validation function).
  * A number outside its declared min/max, or not finite, is refused with HTTP 400 (never queued).
  * A value outside a menu never runs to success (400, or an execution error naming it).
  * A rejection of a 1 MiB input stays under 4 KB and no error (400 body or /history's status messages)
    repeats more than 200 consecutive characters of it.
  * An accepted prompt ends (success, or an execution_error whose message names the input or its value) within
    90 s, and the server's peak RSS (VmHWM, reset before each prompt) grows by less than 1.5 GB: the tiny model
    plans a few MB at the resolutions drawn here.
  * After the fuzz, the known-good prompt gives the same pixels as before it.
"""
from __future__ import annotations

import collections
import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from fuzzing import (MAX_ERROR_BYTES, MISSING, check, echoes, examples, fail, huge_input, must_refuse_at_validation,
                     names, outside_declaration, prompt_value, short, widget_inputs)

harness.skip_without_host()

#: Where each pack node sits in the graph it is fuzzed in (harness.graph / harness.calibrate_graph).
NODE_IDS = {"InfinityModelLoader": "1", "InfinityTextEncode": "2", "ScaleKVCacheConfig": "4",
            "InfinitySampler": "5", "ScaleKVCalibrate": "7"}
#: Examples per node: most are refused in milliseconds; the accepted ones run the tiny model (about a second).
EXAMPLES = {"InfinityModelLoader": 40, "InfinityTextEncode": 30, "ScaleKVCacheConfig": 120, "InfinitySampler": 120,
            "ScaleKVCalibrate": 60}
RUN_SECONDS = 90
PEAK_GROWTH_MB = 1536
REFERENCE: dict = {}
#: What the examples of each node came to (HTTP 400, or the run's outcome), printed after each node's fuzz.
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def base_prompt(node: str) -> dict:
    return harness.calibrate_graph() if node == "ScaleKVCalibrate" else harness.graph()


def error_names_input(error: dict, name: str) -> bool:
    """Whether one node_errors entry names the input. ComfyUI's own checks (type, range, missing, link) carry the
    input in extra_info.input_name; a validate_inputs failure is repeated once per input of the validation function
    ('<input> - <reason>'), so there the reason itself must name it."""
    details = str(error.get("details", ""))
    if error.get("type") == "custom_validation_failed":
        reason = details.split(" - ", 1)[1] if " - " in details else ""
        return names(reason, name)
    extra = error.get("extra_info") or {}
    return extra.get("input_name") == name or names(details + " " + str(error.get("message", "")), name)


def names_problem(message: str, name: str, value) -> bool:
    """An execution error names the problem: the input, or 8 consecutive characters of the value (or all of a
    shorter one)."""
    if names(message, name):
        return True
    if value is MISSING:
        return False
    text = value if isinstance(value, str) else repr(value)
    text = text[:4096]
    if len(text) < 8:
        return bool(text.strip()) and text in message
    return any(text[i:i + 8] in message for i in range(len(text) - 7))


def check_prompt(box, object_info: dict, node: str, name: str, value) -> None:
    server = box.get()
    kind, opts = widget_inputs(object_info, node)[name]
    prompt = server.complete(base_prompt(node))
    node_id = NODE_IDS[node]
    if value is MISSING:
        prompt[node_id]["inputs"].pop(name, None)
    else:
        prompt[node_id]["inputs"][name] = copy.deepcopy(value)
    example = {"node": node, "input": name, "value": value, "declared": [kind, {k: v for k, v in opts.items()
                                                                               if k in ("min", "max")}]}
    outside = outside_declaration(kind, opts, value)
    huge = huge_input(value)
    rss0 = server.rss_mb()
    server.reset_peak()
    try:
        r = server.queue(prompt, complete=False)
    except OSError as e:
        fail("POST /prompt answers (the connection is not dropped)", example, repr(e))
        return
    if not check(r.status in (200, 400), "POST /prompt answers 200 or 400, never 500", example, r):
        return
    OUTCOMES[node][f"HTTP {r.status}"] += 1
    if r.status == 400:
        body = r.json()
        errors = (body.get("node_errors", {}).get(node_id) or {}).get("errors", [])
        check(any(error_names_input(e, name) for e in errors), "a refused prompt's node_errors name the input",
              example, r)
        if huge is not None:
            check(len(r.body) < MAX_ERROR_BYTES, "a rejection of a huge (4 KiB to 1 MiB) input stays under 4 KB",
                  example, f"{len(r.body)} bytes: {r!r}")
            check(not echoes(r.body, huge), "a rejection does not repeat more than a short prefix of a huge input",
                  example, r)
        return
    prompt_id = r.json()["prompt_id"]
    try:
        entry = server.wait(prompt_id, RUN_SECONDS)
    except harness.WorkerDied as e:
        fail("ComfyUI's prompt worker survives every prompt (else nothing runs again)", example,
             str(e)[-1500:])
        box.restart()
        return
    except TimeoutError:
        server.interrupt()
        try:
            server.wait(prompt_id, 30)
        except TimeoutError:
            box.restart()
        fail(f"an accepted prompt ends within {RUN_SECONDS} s", example, "still running; interrupted")
        return
    growth = server.peak_mb() - rss0
    check(growth < PEAK_GROWTH_MB, f"an accepted prompt's peak RSS grows by less than {PEAK_GROWTH_MB} MB",
          example, f"peak RSS +{growth:.0f} MB")
    result = harness.outcome(entry)
    OUTCOMES[node][f"ran: {result}"] += 1
    messages = harness.status_messages(entry)
    error = messages.get("execution_error") or {}
    response = {"status": result, "execution_error": {k: short(error.get(k), 400) for k in
                                                      ("node_id", "exception_type", "exception_message")}}
    if outside is not None:
        if must_refuse_at_validation(kind, value):
            fail("a number outside its declared min/max (or not finite) is refused with HTTP 400",
                 {**example, "why": outside}, response)
        else:
            check(result != "success", "a value outside its menu does not run to success",
                  {**example, "why": outside}, response)
    if result == "error":
        message = str(error.get("exception_message", ""))
        check(names_problem(message, name, value), "an execution error names the input or its value", example,
              response)
    if huge is not None:
        status = json.dumps(entry.get("status")).encode()
        where = [f"{kind}.{key}" for kind, data in messages.items() if isinstance(data, dict)
                 for key, v in data.items() if echoes(json.dumps(v).encode(), huge)]
        check(not echoes(status, huge), "a failed run's /history status does not repeat a huge input", example,
              f"{len(status)} bytes of status messages; the input is repeated in {where}")


def after_example(box, example) -> None:
    server = box.get()
    if server.worker_died():
        fail("ComfyUI's prompt worker survives every prompt (else nothing runs again)", example, server.log_tail(1500))
        box.restart()
    elif not server.serving():
        fail("the server keeps serving GET / after every prompt", example, server.log_tail(1500))
        box.restart()


def test_known_good_prompt_before_the_fuzz(box):
    prompt_id, entry = box.get().run(harness.graph(seed=4242))
    assert harness.outcome(entry) == "success", entry["status"]
    REFERENCE["image"] = box.get().image(entry)


def test_a_batch_the_capped_server_cannot_hold_is_refused(box):
    """The harness caps the server's address space (RLIMIT_AS) at its idle size + 4 GB. A batch of 64, the most the
    sampler takes, plans a 4 GiB decode: the admission check counts the cap and refuses it by name before sampling
    (it used to read only the host's free memory, and the run ran out of memory midway)."""
    server = box.get()
    prompt_id, entry = server.run(harness.graph(sampler={"batch": 64}, seed=4244), timeout=RUN_SECONDS)
    assert harness.outcome(entry) == "error", entry["status"]
    message = harness.status_messages(entry)["execution_error"]["exception_message"]
    assert "planned to need" in message and "this process's RLIMIT_AS of" in message and "now 64" in message, \
        message
    assert server.serving() and not server.worker_died()


@pytest.mark.parametrize("node", list(NODE_IDS))
def test_fuzz_node_inputs(box, object_info, node):
    inputs = widget_inputs(object_info, node)
    assert inputs, f"{node} publishes no widget inputs"

    @settings(max_examples=examples(EXAMPLES[node]))
    @given(data=st.data())
    def fuzz(data):
        name = data.draw(st.sampled_from(sorted(inputs)), label="input")
        kind, opts = inputs[name]
        value = data.draw(prompt_value(name, kind, opts), label="value")
        try:
            check_prompt(box, object_info, node, name, value)
        finally:
            after_example(box, {"node": node, "input": name, "value": value})

    fuzz()
    print(f"{node}: {dict(OUTCOMES[node])}")


def test_known_good_prompt_after_the_fuzz_gives_the_same_pixels(box):
    server = box.get()
    assert "image" in REFERENCE, "the reference run did not happen"
    server.run(harness.graph(seed=4243))  # so the next run cannot be a cache replay
    prompt_id, entry = server.run(harness.graph(seed=4242))
    assert harness.outcome(entry) == "success", entry["status"]
    assert harness.ran(entry, "5"), "the sampler was replayed from ComfyUI's cache, not run"
    after = server.image(entry)
    assert after.shape == REFERENCE["image"].shape
    assert np.array_equal(after, REFERENCE["image"]), "the known-good prompt's pixels changed after the fuzz"
