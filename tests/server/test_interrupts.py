"""Interrupts: 10 POST /interrupt at random moments (a fixed seed) during runs on the real server.

Properties:
  * each interrupted prompt ends, as interrupted or (when the interrupt came before or after its work) as a
    success, never as an execution error; at least a few interrupts land mid-run, so the test is not vacuous;
  * afterwards a run identical to the one before the interrupts executes again and gives the same pixels;
  * nothing is left queued or running (GET /queue is empty) and the RSS is within 150 MB of where it was before
    the interrupted runs (an interrupted run frees its cache).
"""
from __future__ import annotations

import random
import time

import numpy as np

import harness

harness.skip_without_host()

INTERRUPTS = 10
RES = "512x512 (1:1)"  # 10 scales: a run of a couple of seconds, room for an interrupt to land inside it
GROWTH_MB = 150
SEED = 20261207


def big(seed: int) -> dict:
    return harness.graph(seed=seed, sampler={"resolution": RES})


def test_random_interrupts_leave_the_server_clean(box):
    server = box.get()
    rng = random.Random(SEED)
    t0 = time.monotonic()
    prompt_id, entry = server.run(big(5150))
    duration = time.monotonic() - t0
    assert harness.outcome(entry) == "success", entry["status"]
    reference = server.image(entry)
    server.run(big(5151))  # warm: a second run at this size, so the RSS below is past the first-run allocations
    rss0 = server.rss_mb()
    outcomes = []
    for i in range(INTERRUPTS):
        r = server.queue(big(6000 + i))
        assert r.status == 200, r
        delay = rng.uniform(0.0, duration)
        time.sleep(delay)
        assert server.interrupt().status == 200
        entry = server.wait(r.json()["prompt_id"], 120)
        result = harness.outcome(entry)
        outcomes.append((round(delay, 2), result))
        assert result in ("interrupted", "success"), (i, delay, harness.status_messages(entry))
        assert server.serving()
    print(f"\ninterrupts (delay s, outcome), runs take {duration:.1f} s: {outcomes}")
    assert sum(o == "interrupted" for _, o in outcomes) >= 3, f"too few interrupts landed mid-run: {outcomes}"
    prompt_id, entry = server.run(big(5150))
    assert harness.outcome(entry) == "success", entry["status"]
    assert harness.ran(entry, "5"), "the repeated run was replayed from the cache, not run"
    assert np.array_equal(server.image(entry), reference), "the run after the interrupts gave different pixels"
    state = server.queue_state()
    assert state["queue_running"] == [] and state["queue_pending"] == [], state
    growth = server.rss_mb() - rss0
    assert growth < GROWTH_MB, f"RSS grew {growth:.0f} MB over {INTERRUPTS} interrupted runs"
