"""In-process ComfyUI for the node tests. Run with ComfyUI's venv (scripts/test.sh does it):

    bash scripts/comfy_host.sh setup
    SCALEKV_COMFYUI=/tmp/scalekv-comfy/ComfyUI /tmp/scalekv-comfy/venv/bin/python -m pytest tests/comfy

ComfyUI (path from SCALEKV_COMFYUI) goes on sys.path with `--cpu`; the pack (this repository's root) is imported as
the package `ComfyUI_ScaleKV`, so its relative imports work as they do when ComfyUI loads it from custom_nodes.
A temporary models folder holds the tiny random-weight files; nothing is written into the ComfyUI tree.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
COMFYUI = pathlib.Path(os.environ.get("SCALEKV_COMFYUI", "/tmp/scalekv-comfy/ComfyUI"))
PACK = "ComfyUI_ScaleKV"
RES = "256x256 (1:1)"  # the tiny model's 7-scale schedule, about a second on CPU

if not (COMFYUI / "main.py").is_file():
    pytest.exit(f"ComfyUI not found at {COMFYUI}: run `bash scripts/comfy_host.sh setup` or set SCALEKV_COMFYUI "
                f"to a ComfyUI checkout", returncode=4)

# The tests register their own models; the embedded default model (default_model/) stays out of every menu.
os.environ["SCALEKV_DEFAULT_MODEL_DIR"] = ""

sys.path.insert(0, str(COMFYUI))
sys.path.insert(0, str(REPO / "tests"))  # helpers_tiny

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported: no CUDA probing
# The tiny models gain nothing from intra-op threads, and on a busy machine OpenMP spinning makes a 0.4 s
# generation take 6 s (measured on 2 shared cores).
torch.set_num_threads(int(os.environ.get("SCALEKV_TEST_THREADS", "1")))
import utils.extra_config  # noqa: E402,F401  (else nodes.py's sys.path hack makes `utils` resolve to comfy/utils.py)
import folder_paths  # noqa: E402

# The models folder, registered as a user's extra_model_paths.yaml would be, before the pack imports.
MODELS = pathlib.Path(tempfile.mkdtemp(prefix="scalekv-comfy-models-"))
for sub in ("infinity", "vae", "text_encoders", "scalekv"):
    (MODELS / sub).mkdir()
shutil.copy(TINY / "infinity_tiny.safetensors", MODELS / "infinity")
shutil.copy(TINY / "vae_tiny.safetensors", MODELS / "vae")
shutil.copytree(TINY / "t5_tiny", MODELS / "text_encoders" / "t5_tiny")
for key in ("vae", "text_encoders"):
    folder_paths.folder_names_and_paths[key] = ([str(MODELS / key)], folder_paths.folder_names_and_paths[key][1])
for key in ("infinity", "scalekv"):
    folder_paths.add_model_folder_path(key, str(MODELS / key), is_default=True)
for kind in ("output", "temp", "input"):
    (MODELS.parent / f"{MODELS.name}-{kind}").mkdir(exist_ok=True)
folder_paths.set_output_directory(str(MODELS.parent / f"{MODELS.name}-output"))
folder_paths.set_temp_directory(str(MODELS.parent / f"{MODELS.name}-temp"))
folder_paths.set_input_directory(str(MODELS.parent / f"{MODELS.name}-input"))


def import_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def pytest_sessionfinish(session, exitstatus):
    for path in (MODELS, *(MODELS.parent / f"{MODELS.name}-{k}" for k in ("output", "temp", "input"))):
        shutil.rmtree(path, ignore_errors=True)


class StubServer:
    """What ComfyUI's executor and progress hooks need of PromptServer.instance; records every message."""

    def __init__(self) -> None:
        self.client_id = "test"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass

    def events(self, name: str) -> list:
        return [d for e, d in self.messages if e == name]


@pytest.fixture(autouse=True)
def prompt_server(monkeypatch) -> StubServer:
    import server

    stub = StubServer()
    monkeypatch.setattr(server.PromptServer, "instance", stub, raising=False)
    return stub


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(autouse=True)
def no_process_caps(monkeypatch):
    """The nodes see only the free and total memory a test mocks, whatever cgroup or RLIMIT_AS the machine running
    the tests sets (the nodes cap the CPU's figures by them); tests of those caps set their own."""
    import_pack()
    monkeypatch.setattr(importlib.import_module(f"{PACK}.scalekv_core.host_memory"), "process_caps", lambda: [])


@pytest.fixture(scope="session")
def node_classes(pack) -> dict:
    extension = asyncio.run(pack.comfy_entrypoint())
    classes = asyncio.run(extension.get_node_list())
    return {cls.GET_SCHEMA().node_id: cls for cls in classes}


def prepare(node_cls, unique_id: str = "1"):
    """A V3 class clone as the executor makes it: ComfyUI 0.3.75 takes the hidden inputs, 0.33+ wraps them."""
    try:
        clone = node_cls.PREPARE_CLASS_CLONE({"UNIQUE_ID": unique_id})
    except KeyError:  # 0.33+: V3Data {"hidden_inputs": {...}}
        clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": unique_id}})
    if clone.hidden.unique_id != unique_id:  # a version that accepts the old form but reads the new one
        clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": unique_id}})
    return clone


@pytest.fixture(scope="session")
def clone(node_classes):
    """clone("InfinitySampler", unique_id) -> the V3 class clone the executor would run."""
    return lambda node_id, unique_id="1": prepare(node_classes[node_id], unique_id)


@pytest.fixture(scope="session")
def run(node_classes):
    """run("InfinitySampler", **inputs) -> io.NodeOutput, through a class clone like the executor, and inside
    torch.inference_mode() as the executor runs every prompt (a model loaded there holds inference tensors)."""

    def _run(node_id: str, **inputs):
        with torch.inference_mode():
            return prepare(node_classes[node_id]).execute(**inputs)

    return _run


@pytest.fixture(scope="session")
def loaded(run):
    """(model, t5) from the tiny files, loaded once."""
    out = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
              text_encoder="t5_tiny", precision="auto")
    return out.result


@pytest.fixture(scope="session")
def encoded(run, loaded):
    return run("InfinityTextEncode", t5=loaded[1], prompt="a red fox in the snow").result[0]


CONFIG_DEFAULTS = dict(policy="scalekv", budget_unit="percent", budget=10.0, window=16, kernel=5, pooling="maxpool",
                       scoring="improved", kv_dtype="auto", budget_source="generated", refiner_decay=0.0)
SAMPLER_DEFAULTS = dict(seed=7, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, resolution=RES, batch=1)


@pytest.fixture(scope="session")
def config_inputs():
    """config_inputs(**overrides): the cache-config node's widget defaults, with overrides."""
    return lambda **overrides: {**CONFIG_DEFAULTS, **overrides}


@pytest.fixture(scope="session")
def sampler_inputs():
    """sampler_inputs(**overrides): sampler widgets at the tiny model's resolution, with overrides."""
    return lambda **overrides: {**SAMPLER_DEFAULTS, **overrides}


@pytest.fixture(scope="session")
def routes(pack):
    """The pack's budget route module (under ComfyUI's package name)."""
    return importlib.import_module(f"{pack.__name__}.nodes.routes")


@pytest.fixture(scope="session")
def post(routes):
    """post(body) -> (status, json) through a real aiohttp server holding only the pack's route."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    def _post(body, raw: bytes | None = None):
        async def go():
            table = web.RouteTableDef()
            assert routes.register(table)
            app = web.Application()
            app.add_routes(table)
            async with TestClient(TestServer(app)) as client:
                if raw is not None:
                    r = await client.post(routes.PLAN_ROUTE, data=raw, headers={"Content-Type": "application/json"})
                else:
                    r = await client.post(routes.PLAN_ROUTE, json=body)
                return r.status, await r.json()

        return asyncio.run(go())

    return _post


@pytest.fixture
def paths(pack):
    """The pack's nodes/paths module, as ComfyUI imported it."""
    return pack.nodes.paths


@pytest.fixture
def models_dir():
    """ComfyUI's models folder in the test host."""
    return pathlib.Path(folder_paths.get_folder_paths("infinity")[0]).parent
