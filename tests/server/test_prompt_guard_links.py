"""The prompt guard against the real server: a link-shaped value that names no node of the prompt is checked like
any other value.

`"cfg": ["A" * 2_000_000, 0]` on the sampler passed the guard as a link; ComfyUI answered a 4 MB HTTP 400 quoting
the id and wrote a 2,000,044-character line to its log.
"""
from __future__ import annotations

import harness
from fuzzing import MAX_ERROR_BYTES, echoes

harness.skip_without_host()


def test_a_huge_link_shaped_value_is_refused_briefly_and_logged_briefly(box):
    server = box.get()
    huge = "A" * 2_000_000
    log_before = server.log_path.stat().st_size
    r = server.queue(harness.graph(sampler={"cfg": [huge, 0]}))
    assert r.status == 400, r
    assert len(r.body) < MAX_ERROR_BYTES, f"{len(r.body)} bytes"
    assert not echoes(r.body, huge)
    errors = r.json()["node_errors"]["5"]["errors"]
    assert any("cfg" in str(e) and "too long" in str(e) for e in errors), errors
    with open(server.log_path, "rb") as f:
        f.seek(log_before)
        longest = max((len(line) for line in f.read().splitlines()), default=0)
    assert longest < 10_000, f"a {longest}-byte line in the server log"
    # a real link still passes, and the known-good graph still runs
    prompt_id, entry = server.run(harness.graph(seed=11))
    assert harness.outcome(entry) == "success", entry["status"]
