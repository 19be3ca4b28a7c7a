"""Soak: 30 runs of the tiny model through the real server's POST /prompt, each with its own seed.

It starts its own server, so what the fuzz before it did neither warms nor burdens the measurement.

Properties:
  * every run succeeds;
  * the server's RSS after the last 20 runs stays within 256 MB of its RSS after the first 10 (the warm-up: the
    model loads, the allocator and ComfyUI's caches fill) — measured from /proc/<pid>/status VmRSS after each run.
    The engine itself holds level (40 in-process generations of the tiny model, memory report on: +4 MB); the
    server's RSS rises for its first 40-50 runs and then levels off (a 70-run probe: 649 -> 967 MB, flat after
    run ~45), so the bound is set to catch a leak of about 13 MB a run, not that one-time growth;
  * the seed of the first run, repeated as the last run, gives pixel-identical images (and the sampler really ran
    again, not replayed from ComfyUI's cache).
"""
from __future__ import annotations

import numpy as np

import harness

harness.skip_without_host()

RUNS = 30
WARMUP = 10
GROWTH_MB = 256
FIRST_SEED = 31000


def test_soak_rss_bounded_and_first_seed_reproduces(box):
    server = box.restart()  # a fresh server: one warmed by the fuzz would hide the early growth
    seeds = [FIRST_SEED + i for i in range(RUNS - 1)] + [FIRST_SEED]
    rss, images = [], {}
    for i, seed in enumerate(seeds):
        prompt_id, entry = server.run(harness.graph(seed=seed))
        assert harness.outcome(entry) == "success", (i, seed, entry["status"])
        assert harness.ran(entry, "5"), f"run {i} (seed {seed}) was replayed from the cache"
        rss.append(server.rss_mb())
        if i in (0, RUNS - 1):
            images[i] = server.image(entry)
    base = rss[WARMUP - 1]
    growth = max(rss[WARMUP:]) - base
    trace = ", ".join(f"{r:.0f}" for r in rss)
    print(f"\nsoak RSS (MB) after each of {RUNS} runs: {trace}; growth after warm-up {growth:+.0f} MB")
    assert growth < GROWTH_MB, f"RSS grew {growth:.0f} MB after the {WARMUP}-run warm-up (bound {GROWTH_MB}): {trace}"
    assert np.array_equal(images[0], images[RUNS - 1]), f"seed {FIRST_SEED} gave different pixels at the end"
    assert server.serving()
