"""Fuzz, soak and interrupt tests against a real ComfyUI server with this pack mounted (see harness.py).

`pytest tests` leaves this folder out unless SCALEKV_SERVER_TESTS is set (tests/conftest.py); naming it runs it.
About 3.5 minutes on 2 shared cores while properties fail (each hypothesis test stops at its first violation),
5 to 7 when all hold:

    SCALEKV_SERVER_TESTS=1 .venv/bin/python -m pytest tests/server -q

Hypothesis profiles (SCALEKV_HYPOTHESIS_PROFILE):
  ci (default)  derandomized (the same examples every run), no example database, no deadline, no shrinking: each
                example is already one mutation of a known-good prompt or body, and shrinking against a server can
                take minutes; the first violation of each test is reported as generated.
  dev           the same examples, shrunk to a minimal one on failure.
  thorough      random examples (a new seed each run), 5x as many, shrunk.
SCALEKV_FUZZ_KEEP_GOING=<file> records every violation there instead of stopping at the first (fuzzing.fail).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import harness  # noqa: E402

_common = dict(deadline=None, database=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.large_base_example, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, phases=[Phase.explicit, Phase.generate], **_common)
settings.register_profile("dev", derandomize=True, **_common)
settings.register_profile("thorough", derandomize=False, **_common)
PROFILE = os.environ.get("SCALEKV_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


class ServerBox:
    """The session's server; a test that finds it dead gets a fresh one (the death is reported where it happened)."""

    def __init__(self) -> None:
        self.server: harness.Server | None = None
        self.restarts = 0
        self.restarting = False

    def __repr__(self) -> str:
        return f"<server box: {self.server.url if self.server else 'no server'}, {self.restarts} restarts>"

    def get(self) -> harness.Server:
        if self.server is None or not self.server.alive():
            self.restarting = True
            try:
                if self.server is not None:
                    self.server.stop()
                    self.restarts += 1
                self.server = harness.Server().start()
            finally:
                self.restarting = False
        return self.server

    def restart(self) -> harness.Server:
        """A server that is alive but wedged (a request thread stuck or spinning) is replaced."""
        self.restarting = True
        try:
            if self.server is not None:
                self.server.stop()
                self.server = None
                self.restarts += 1
            return self.get()
        finally:
            self.restarting = False

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def box():
    problem = harness.host_problem()
    if problem:
        pytest.skip(problem)
    b = ServerBox()
    b.get()
    yield b
    b.close()


@pytest.fixture(scope="session")
def object_info(box) -> dict:
    """The pack's node schemas as the server publishes them."""
    return {node: box.get().get_json(f"/object_info/{node}")[node] for node in harness.PACK_NODES}


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SCALEKV_FUZZ_KEEP_GOING")
    if path and os.path.exists(path):
        lines = pathlib.Path(path).read_text().splitlines()
        if lines:
            props = sorted({json.loads(line)["property"] for line in lines})
            print(f"\n{len(lines)} recorded violations in {path}:\n  " + "\n  ".join(props))
            session.exitstatus = 1
