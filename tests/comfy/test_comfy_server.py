"""The real ComfyUI server, end to end through its HTTP and websocket API, with this pack mounted.

A module-scoped fixture starts `main.py --cpu` as a subprocess on a free 127.0.0.1 port with a temporary models
folder (the tiny files, plus a 14-bit VAE that does not fit the tiny transformer) and stops it in teardown.
Prompts go in as API-format JSON; results come back through the websocket, /history and /view.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from helpers_tiny import TINY14_VAE, make_tiny_vae_state, save_safetensors
from scalekv_core.kvcache import CacheConfig
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import schedule_from_label

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
COMFYUI = pathlib.Path(os.environ.get("SCALEKV_COMFYUI", "/tmp/scalekv-comfy/ComfyUI"))
RES = "256x256 (1:1)"
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SAMPLER = dict(seed=7, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, resolution=RES, batch=1)
CONFIG = dict(policy="scalekv", budget_unit="tokens", budget=48.0, window=4, kernel=5, pooling="maxpool",
              scoring="improved", kv_dtype="auto", budget_source="generated", refiner_decay=0.0)
TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """HTTP calls plus a websocket listener (aiohttp in a thread) that records every JSON message."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "websocket did not connect"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())

    async def _listen(self) -> None:
        import aiohttp

        self._stop = asyncio.Event()
        ws_url = self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url) as ws:
                self._ready.set()
                reader = asyncio.ensure_future(self._read(ws))
                await self._stop.wait()
                reader.cancel()

    async def _read(self, ws) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                with self._cond:
                    self.messages.append(json.loads(msg.data))
                    self._cond.notify_all()

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- HTTP
    def request(self, path: str, data: dict | None = None) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str):
        status, body = self.request(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def queue(self, prompt: dict) -> tuple[int, dict]:
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(body)

    # -- websocket messages
    def events(self, prompt_id: str, kind: str | None = None) -> list[dict]:
        with self._cond:
            msgs = list(self.messages)
        return [m for m in msgs if (kind is None or m["type"] == kind)
                and isinstance(m.get("data"), dict) and m["data"].get("prompt_id") == prompt_id]

    def wait_for(self, pred, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                assert left > 0, f"no such message within {timeout} s; last: {self.messages[-5:]}"
                self._cond.wait(left)

    def wait_done(self, prompt_id: str, timeout: float = TIMEOUT) -> dict:
        """The message that ends a prompt: execution_success, execution_error or execution_interrupted."""
        ends = ("execution_success", "execution_error", "execution_interrupted")
        return self.wait_for(lambda m: m["type"] in ends and isinstance(m.get("data"), dict)
                             and m["data"].get("prompt_id") == prompt_id, timeout)

    def run(self, prompt: dict) -> tuple[str, dict]:
        status, body = self.queue(prompt)
        assert status == 200, body
        prompt_id = body["prompt_id"]
        return prompt_id, self.wait_done(prompt_id)

    def history(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # history is written just after the final message
            h = self.get_json(f"/history/{prompt_id}")
            if prompt_id in h:
                return h[prompt_id]
            time.sleep(0.05)
        raise AssertionError(f"{prompt_id} not in /history")


#: A frontend other than the host's own (a comfyui-frontend-package's static/ folder), served with --front-end-root:
#: scripts/test.sh runs the browser tests again with the newest one from the registry.
FRONT_END_ROOT = os.environ.get("SCALEKV_FRONT_END_ROOT") or None


@pytest.fixture(scope="module")
def server():
    root = pathlib.Path(tempfile.mkdtemp(prefix="scalekv-comfy-server-"))
    models = root / "models"
    for sub in ("infinity", "vae", "text_encoders", "scalekv"):
        (models / sub).mkdir(parents=True)
    os.symlink(TINY / "infinity_tiny.safetensors", models / "infinity" / "infinity_tiny.safetensors")
    os.symlink(TINY / "vae_tiny.safetensors", models / "vae" / "vae_tiny.safetensors")
    os.symlink(TINY / "t5_tiny", models / "text_encoders" / "t5_tiny")
    save_safetensors(make_tiny_vae_state(TINY14_VAE), models / "vae" / "vae_tiny14.safetensors")
    (root / "custom_nodes").mkdir()
    os.symlink(REPO, root / "custom_nodes" / "ComfyUI-ScaleKV")
    config = root / "extra_model_paths.yaml"
    config.write_text("scalekv_pack:\n  custom_nodes: " + str(root / "custom_nodes") + "\n"
                      + "".join(f"  {k}: {models / k}\n" for k in ("infinity", "vae", "text_encoders", "scalekv")))
    for d in ("user", "output", "temp", "input"):
        (root / d).mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--extra-model-paths-config", str(config), "--database-url", "sqlite:///:memory:",
         "--user-directory", str(root / "user"), "--output-directory", str(root / "output"),
         "--temp-directory", str(root / "temp"), "--input-directory", str(root / "input"),
         *(["--front-end-root", FRONT_END_ROOT] if FRONT_END_ROOT else [])],
        cwd=COMFYUI, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = None
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "server did not answer in 120 s"
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2):
                    break
            except OSError:
                time.sleep(0.25)
        client = Client(url)
        client.log = root / "server.log"
        yield client
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def graph(sampler=None, config=None, loader=None, cache=True) -> dict:
    g = {
        "1": {"class_type": "InfinityModelLoader",
              "inputs": {"transformer": "infinity_tiny.safetensors", "vae": "vae_tiny.safetensors",
                         "text_encoder": "t5_tiny", "precision": "auto", **(loader or {})}},
        "2": {"class_type": "InfinityTextEncode", "inputs": {"t5": ["1", 1], "prompt": PROMPT}},
        "3": {"class_type": "InfinityTextEncode", "inputs": {"t5": ["1", 1], "prompt": NEGATIVE}},
        "4": {"class_type": "ScaleKVCacheConfig", "inputs": {**CONFIG, **(config or {})}},
        "5": {"class_type": "InfinitySampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cache_config": ["4", 0],
                         **SAMPLER, **(sampler or {})}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "scalekv_server"}},
    }
    if not cache:
        del g["4"], g["5"]["inputs"]["cache_config"]
    return g


def fetch_image(server, item: dict) -> np.ndarray:
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item["subfolder"],
                                    "type": item["type"]})
    status, body = server.request(f"/view?{query}")
    assert status == 200
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def assert_serving(server) -> None:
    assert server.get_json("/system_stats")["system"]
    assert "InfinitySampler" in server.get_json("/object_info/InfinitySampler")


def test_prompt_runs_and_saves_the_engines_image(server):
    prompt_id, done = server.run(graph())
    assert done["type"] == "execution_success", done
    outputs = server.history(prompt_id)["outputs"]
    [item] = outputs["6"]["images"]
    saved = fetch_image(server, item)
    engine = InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                         TINY / "t5_tiny")
    cache = CacheConfig(policy="scalekv", budget=48, window=4, kernel=5)
    ref = engine.generate(PROMPT, NEGATIVE, seed=7, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
                          schedule=schedule_from_label(RES), cache=cache, batch=1)
    assert saved.shape == (256, 256, 3)
    assert np.array_equal(saved, ref.images[0])
    [report] = outputs["5"]["scalekv_memory"]
    assert report["policy"]["policy"] == "scalekv" and report["policy"]["budget"] == 48
    scales = report["scales"]
    assert len(scales) == 7
    for s in scales[:-1]:
        assert s["held_tokens"] == s["planned_tokens"]
    assert any(sum(s["planned_tokens"]) < len(s["planned_tokens"]) * s["full_tokens"] for s in scales[:-1])


def test_same_prompt_again_is_cached(server):
    first_id, done = server.run(graph())
    assert done["type"] == "execution_success", done
    second_id, done = server.run(graph())
    assert done["type"] == "execution_success", done
    [cached] = server.events(second_id, "execution_cached")
    assert {"1", "2", "3", "4", "5"} <= set(cached["data"]["nodes"])
    ran = [m["data"]["node"] for m in server.events(second_id, "executing") if m["data"]["node"] is not None]
    assert "5" not in ran and "1" not in ran
    first, second = server.history(first_id)["outputs"], server.history(second_id)["outputs"]
    assert second["6"] == first["6"]  # SaveImage's UI output (an output node) is replayed from the cache


def test_interrupt_mid_run_then_next_prompt_succeeds(server):
    big = graph(sampler={"resolution": "512x512 (1:1)", "batch": 2, "seed": 11}, cache=False)
    status, body = server.queue(big)
    assert status == 200, body
    prompt_id = body["prompt_id"]
    server.wait_for(lambda m: m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id
                    and m["data"].get("node") == "5")
    status, _ = server.request("/interrupt", {})
    assert status == 200
    done = server.wait_done(prompt_id)
    assert done["type"] == "execution_interrupted", done
    assert done["data"]["node_id"] == "5"
    assert_serving(server)
    prompt_id, done = server.run(graph(sampler={"seed": 12}))
    assert done["type"] == "execution_success", done
    assert server.history(prompt_id)["outputs"]["6"]["images"]


@pytest.mark.parametrize("node, field, value, expect", [
    ("4", "budget", 0.0, "budget: 0 is out of range"),
    ("4", "kernel", 401, "kernel: 401 is out of range"),
    ("5", "cfg", float("nan"), "cfg: expected a number"),
    ("1", "transformer", "no_such_model.safetensors", "no_such_model.safetensors"),
    ("5", "resolution", "100x100 (1:1)", "100x100 (1:1)"),
])
def test_bad_input_is_refused(server, node, field, value, expect):
    """A validation error (HTTP 400 with node_errors) or, where ComfyUI does not check, an execution error at the node.

    ComfyUI 0.3.75 checks combo values only for V1-style list inputs: a V3 Combo ("COMBO", {"options": ...}) passes
    validation with any string, so a missing file or an unknown resolution reaches the node, which names it.
    """
    g = graph(sampler={"seed": 20})
    g[node]["inputs"][field] = value
    status, body = server.queue(g)
    if status == 400:
        errors = body["node_errors"][node]["errors"]
        assert any(expect in (e.get("details", "") + " " + e.get("message", "")) for e in errors), errors
    else:
        assert status == 200 and node != "4", body  # the budget is always caught by the node's validate_inputs
        done = server.wait_done(body["prompt_id"])
        assert done["type"] == "execution_error", done
        assert done["data"]["node_id"] == node and expect in done["data"]["exception_message"], done["data"]
    assert_serving(server)


def test_vae_that_does_not_fit_the_transformer_is_an_execution_error(server):
    prompt_id, done = server.run(graph(loader={"vae": "vae_tiny14.safetensors"}, sampler={"seed": 13}))
    assert done["type"] == "execution_error", done
    data = done["data"]
    assert data["node_id"] == "1"
    assert "vae_tiny14.safetensors" in data["exception_message"], data["exception_message"]
    status = server.history(prompt_id)["status"]
    assert status["status_str"] == "error"
    assert_serving(server)
    prompt_id, done = server.run(graph(sampler={"seed": 14}))
    assert done["type"] == "execution_success", done
