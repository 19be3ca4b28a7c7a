"""A real ComfyUI server with this pack mounted, driven over loopback from the engine's venv.

The server is `main.py --cpu` run by ComfyUI's own python (it must stay as users install it), as a subprocess on a
free 127.0.0.1 port with a temporary root: models/ holds the tiny test model (tests/data/infinity-tiny) and a few
hostile budget files, custom_nodes/ links this checkout. The test process needs only the standard library (HTTP via
http.client, results polled from /history), so it runs in `.venv` without aiohttp.

    SCALEKV_SERVER_TESTS=1 .venv/bin/python -m pytest tests/server -q

SCALEKV_COMFYUI (default /tmp/scalekv-comfy/ComfyUI) and SCALEKV_COMFY_PYTHON (default
/tmp/scalekv-comfy/venv/bin/python) name the host; `bash scripts/comfy_host.sh setup` builds it.
SCALEKV_SERVER_PACK mounts another checkout of the pack instead of this one.
"""
from __future__ import annotations

import copy
import functools
import http.client
import io
import json
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
COMFYUI = pathlib.Path(os.environ.get("SCALEKV_COMFYUI", "/tmp/scalekv-comfy/ComfyUI"))
COMFY_PYTHON = pathlib.Path(os.environ.get("SCALEKV_COMFY_PYTHON", "/tmp/scalekv-comfy/venv/bin/python"))
#: The checkout mounted as the pack: this one, or SCALEKV_SERVER_PACK (e.g. a worktree of an older commit, to see
#: which of its defects the suite catches). The tiny model always comes from this checkout.
PACK = pathlib.Path(os.environ.get("SCALEKV_SERVER_PACK", REPO))
PACK_NODES = ("InfinityModelLoader", "InfinityTextEncode", "ScaleKVCacheConfig", "InfinitySampler",
              "ScaleKVCalibrate")
RES = "256x256 (1:1)"  # the tiny model's 7-scale schedule: well under a second per run on one CPU thread
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SAMPLER = dict(seed=7, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, resolution=RES, batch=1)
CONFIG = dict(policy="scalekv", budget_unit="tokens", budget=48.0, window=4, kernel=5, pooling="maxpool",
              scoring="improved", kv_dtype="auto", budget_source="generated", refiner_decay=0.0)
CALIBRATE = dict(prompts="a red fox", resolution=RES, budget=10.0, num_drafters=0, seed=0,
                 filename_prefix="fuzz_budget")
#: The server's address space is capped (RLIMIT_AS) at its idle size plus this much, so a runaway read (a budget
#: file that is /dev/zero) ends in MemoryError inside the server instead of taking the machine's memory.
ADDRESS_SPACE_HEADROOM = 4 << 30
#: A sparse regular file in models/scalekv: a budget file that must be refused by size, not read (1 GiB of zeros).
HUGE_BUDGET_BYTES = 1 << 30
#: The first key of a budget file planted outside models/scalekv: it must never show up in an answer.
SECRET_KEY = "SCALEKV_OUTSIDE_SECRET_7f3a9c"


@functools.lru_cache(maxsize=None)
def host_problem() -> str | None:
    """Why the ComfyUI host cannot run here, or None."""
    if not (COMFYUI / "main.py").is_file():
        return f"ComfyUI not found at {COMFYUI} (set SCALEKV_COMFYUI; `bash scripts/comfy_host.sh setup` builds it)"
    if not os.access(COMFY_PYTHON, os.X_OK):
        return f"ComfyUI's python not found at {COMFY_PYTHON} (set SCALEKV_COMFY_PYTHON)"
    probe = subprocess.run([str(COMFY_PYTHON), "-c", "import aiohttp, requests, yaml, comfyui_frontend_package, "
                            "torch"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{COMFY_PYTHON} lacks ComfyUI's requirements: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize ... of a process in kB."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


class WorkerDied(AssertionError):
    """The server process lives but its prompt worker thread is gone."""


class Response:
    def __init__(self, status: int, body: bytes, seconds: float) -> None:
        self.status, self.body, self.seconds = status, body, seconds

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        text = self.body[:600].decode("utf-8", "replace")
        more = f" ... ({len(self.body)} bytes)" if len(self.body) > 600 else ""
        return f"<HTTP {self.status} in {self.seconds:.2f} s: {text}{more}>"


def dumps(value) -> bytes:
    """JSON as Python writes it: NaN and Infinity literals (the server's json.loads reads them), lone surrogates
    escaped as \\udXXX."""
    return json.dumps(value, allow_nan=True).encode()


class Server:
    """One ComfyUI server process and the HTTP calls the tests make to it."""

    def __init__(self) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="scalekv-server-tests-"))
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def _layout(self) -> None:
        root = self.root
        models = root / "models"
        for sub in ("infinity", "vae", "text_encoders", "scalekv"):
            (models / sub).mkdir(parents=True)
        os.symlink(TINY / "infinity_tiny.safetensors", models / "infinity" / "infinity_tiny.safetensors")
        os.symlink(TINY / "vae_tiny.safetensors", models / "vae" / "vae_tiny.safetensors")
        os.symlink(TINY / "t5_tiny", models / "text_encoders" / "t5_tiny")
        self.scalekv_dir = models / "scalekv"
        # hostile things a budget file name or path may point at
        outside = root / "outside"
        outside.mkdir()
        self.secret_file = outside / "secret_budget.json"
        # a budget reader names the first field it does not know: opening this file shows in the answer
        self.secret_file.write_text(json.dumps({SECRET_KEY: {"Max": 1, "Min": 1, "Block 0": 1}}))
        self.fifo = outside / "budget_fifo.json"
        os.mkfifo(self.fifo)
        (outside / "a_directory.json").mkdir()
        huge = self.scalekv_dir / "huge_budget.json"
        with open(huge, "wb") as f:
            f.truncate(HUGE_BUDGET_BYTES)  # sparse: no disk used
        os.symlink("/dev/zero", self.scalekv_dir / "zero_budget.json")
        os.symlink(self.fifo, self.scalekv_dir / "fifo_budget.json")
        (self.scalekv_dir / "dir_budget.json").mkdir()
        self.hostile_names = ["huge_budget.json", "zero_budget.json", "fifo_budget.json", "dir_budget.json"]
        (root / "custom_nodes").mkdir()
        os.symlink(PACK, root / "custom_nodes" / "ComfyUI-ScaleKV")
        config = root / "extra_model_paths.yaml"
        config.write_text("scalekv_pack:\n  custom_nodes: " + str(root / "custom_nodes") + "\n"
                          + "".join(f"  {k}: {models / k}\n" for k in ("infinity", "vae", "text_encoders",
                                                                           "scalekv")))
        for d in ("user", "output", "temp", "input"):
            (root / d).mkdir()
        self.config = config

    def start(self) -> "Server":
        self._layout()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SCALEKV_DEFAULT_MODEL_DIR": "",
               "PYTHONUNBUFFERED": "1"}
        self.log_path = self.root / "server.log"
        self._log = open(self.log_path, "wb")
        root = self.root
        self.proc = subprocess.Popen(
            [str(COMFY_PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--extra-model-paths-config", str(self.config),
             "--database-url", "sqlite:///:memory:", "--user-directory", str(root / "user"),
             "--output-directory", str(root / "output"), "--temp-directory", str(root / "temp"),
             "--input-directory", str(root / "input")],
            cwd=COMFYUI, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer in 180 s:\n{self.log_tail()}")
            try:
                if self.request("GET", "/system_stats", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        # cap the address space now that the server is up (torch's import maps a lot; the cap is for what follows)
        idle = proc_status(self.pid)["VmSize"] << 10
        limit = idle + ADDRESS_SPACE_HEADROOM
        resource.prlimit(self.pid, resource.RLIMIT_AS, (limit, limit))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.unblock_fifo()
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if os.environ.get("SCALEKV_KEEP_SERVER_ROOT"):
            print(f"server root kept: {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    #: What ComfyUI's log shows when its prompt worker thread dies: the server still answers HTTP and queues
    #: prompts, but runs none of them again.
    WORKER_DEATH = (b"Exception in thread", b"lost sys.stderr")

    def worker_died(self) -> bool:
        try:
            log = self.log_path.read_bytes()
        except OSError:
            return False
        return any(marker in log for marker in self.WORKER_DEATH)

    def unblock_fifo(self) -> None:
        """Give a server thread stuck opening or reading the FIFO its end of file (no-op when none waits)."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody has it open for reading
            return
        os.close(fd)

    # ------------------------------------------------------------------------------------------ memory
    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def rss_mb(self) -> float:
        return self.status()["VmRSS"] / 1024

    def cpu_seconds(self) -> float:
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def busy(self, window: float = 0.5) -> bool:
        """Whether the server burns CPU (more than a third of a core over `window` s) while the tests wait."""
        before = self.cpu_seconds()
        time.sleep(window)
        return self.cpu_seconds() - before > window / 3

    def reset_peak(self) -> None:
        """Reset VmHWM (the peak RSS) to the current RSS: Linux's clear_refs 5."""
        pathlib.Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        return self.status()["VmHWM"] / 1024

    # ------------------------------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60,
                headers: dict | None = None) -> Response:
        """One HTTP exchange on a fresh connection. A dropped connection raises (ConnectionError, RemoteDisconnected),
        a slow answer raises TimeoutError."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t0 = time.monotonic()
        try:
            hdrs = {"Content-Type": "application/json"} if body is not None else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            return Response(r.status, data, time.monotonic() - t0)
        finally:
            conn.close()

    def get_json(self, path: str):
        r = self.request("GET", path)
        assert r.status == 200, (path, r)
        return r.json()

    def post_json(self, path: str, value, timeout: float = 60) -> Response:
        return self.request("POST", path, dumps(value), timeout=timeout)

    def serving(self, timeout: float = 10) -> bool:
        """The server process lives and GET / answers 200."""
        if not self.alive():
            return False
        try:
            return self.request("GET", "/", timeout=timeout).status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------------------------------ prompts
    def schema(self, class_type: str) -> dict:
        """A node's /object_info entry (fetched once per server)."""
        cache = self.__dict__.setdefault("_schemas", {})
        if class_type not in cache:
            cache[class_type] = self.get_json(f"/object_info/{class_type}")[class_type]
        return cache[class_type]

    def complete(self, prompt: dict) -> dict:
        """A copy of `prompt` in which every required widget input it leaves out has its declared default (or a
        menu's first entry): the graphs here name only what they mean, and a widget added later keeps them valid."""
        out = copy.deepcopy(prompt)
        for node in out.values():
            required = self.schema(node["class_type"])["input"].get("required", {})
            for name, spec in required.items():
                if name in node["inputs"]:
                    continue
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
                if "default" in opts:
                    node["inputs"][name] = opts["default"]
                elif isinstance(kind, list) and kind:
                    node["inputs"][name] = kind[0]
                elif opts.get("options"):
                    node["inputs"][name] = opts["options"][0]
        return out

    def queue(self, prompt: dict, complete: bool = True) -> Response:
        """POST /prompt; `complete` fills in left-out required widgets first (see complete)."""
        if complete:
            prompt = self.complete(prompt)
        return self.post_json("/prompt", {"prompt": prompt, "client_id": "scalekv-server-tests"})

    def history(self, prompt_id: str) -> dict | None:
        h = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return h.get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """The /history entry of a finished prompt (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if not self.alive():
                raise AssertionError(f"server died while running {prompt_id}:\n{self.log_tail()}")
            if self.worker_died():
                raise WorkerDied(f"ComfyUI's prompt worker thread died; {prompt_id} will never run:\n"
                                 f"{self.log_tail(2500)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prompt_id} did not finish in {timeout} s")
            time.sleep(0.05)

    def run(self, prompt: dict, timeout: float = 120) -> tuple[str, dict]:
        r = self.queue(prompt)
        assert r.status == 200, r
        prompt_id = r.json()["prompt_id"]
        return prompt_id, self.wait(prompt_id, timeout)

    def queue_state(self) -> dict:
        return self.get_json("/queue")

    def interrupt(self) -> Response:
        return self.post_json("/interrupt", {})

    def image(self, entry: dict, node: str = "6"):
        """The first image a SaveImage node wrote, as a uint8 (H, W, 3) array."""
        import numpy as np
        from PIL import Image

        item = entry["outputs"][node]["images"][0]
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item["subfolder"],
                                        "type": item["type"]})
        r = self.request("GET", f"/view?{query}")
        assert r.status == 200, r
        return np.asarray(Image.open(io.BytesIO(r.body)).convert("RGB"))


def status_messages(entry: dict) -> dict[str, dict]:
    """{message type: data} from a /history entry's status (execution_start, execution_cached, execution_error ...)."""
    return {kind: data for kind, data in (entry.get("status") or {}).get("messages", [])}


def outcome(entry: dict) -> str:
    """'success', 'error' or 'interrupted' for a finished /history entry."""
    messages = status_messages(entry)
    if "execution_interrupted" in messages:
        return "interrupted"
    if "execution_error" in messages:
        return "error"
    return entry["status"]["status_str"]


def ran(entry: dict, node: str) -> bool:
    """Whether `node` executed in this prompt (not replayed from ComfyUI's cache)."""
    cached = status_messages(entry).get("execution_cached", {}).get("nodes", [])
    return node not in cached


def graph(sampler=None, config=None, loader=None, seed=None) -> dict:
    """The known-good text-to-image graph: loader, two text encodes, cache config, sampler, SaveImage."""
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
    if seed is not None:
        g["5"]["inputs"]["seed"] = seed
    return g


def calibrate_graph(calibrate=None) -> dict:
    """Loader + ScaleKV Calibrate (an output node) on one short prompt at the tiny model's resolution."""
    return {
        "1": {"class_type": "InfinityModelLoader",
              "inputs": {"transformer": "infinity_tiny.safetensors", "vae": "vae_tiny.safetensors",
                         "text_encoder": "t5_tiny", "precision": "auto"}},
        "7": {"class_type": "ScaleKVCalibrate",
              "inputs": {"model": ["1", 0], "t5": ["1", 1], **CALIBRATE, **(calibrate or {})}},
    }


def skip_without_host() -> None:
    """Skip the calling test module (at import) when the ComfyUI host is missing."""
    import pytest

    problem = host_problem()
    if problem:
        pytest.skip(problem, allow_module_level=True)
