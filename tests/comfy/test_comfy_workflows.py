"""The example workflows (workflows/*.json, UI format) run as saved on a real ComfyUI server, through
scripts/run_workflow.py's UI -> API conversion, and give the engine's images and memory plans.

The server is test_comfy_server's fixture (ComfyUI's main.py with this pack mounted, a temporary models folder);
the tiny random-weight files are linked into its models folder under the embedded default model's names, which
the workflows use. Those folders come before default_model/, so the tiny files are used whether or not the
trained model is checked out.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from test_comfy_server import TINY, server  # noqa: F401  (the module-scoped server fixture)
from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.budget import kv_bytes_per_token
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import schedule_from_label

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SCRIPT = REPO / "scripts" / "run_workflow.py"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
EXPECTED = {"scalekv_text_to_image.json", "full_vs_scalekv.json", "calibrate_then_generate.json"}
# What scripts/workflows/build_workflows.mjs puts in the graphs.
DEFAULT_NAMES = {"transformer": "infinity_shapes.safetensors", "vae": "infinity_shapes_vae.safetensors",
                 "text_encoder": "t5_shapes"}
RES = "256x256 (1:1)"
AUTO = "auto (the model's own size)"  # what the workflows set: the embedded model's 256x256
PROMPT = "a large red circle at the top left on a blue background"
NEGATIVE = ""  # the example workflow leaves its negative prompt empty: no negative
SAMPLER = dict(seed=3, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, resolution=AUTO, batch=1)
SCALEKV_10 = CacheConfig(policy="scalekv", budget="10%")


def load_run_workflow():
    spec = importlib.util.spec_from_file_location("run_workflow", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rw = load_run_workflow()


@pytest.fixture(scope="module")
def comfy(server):  # noqa: F811
    """The server, with the tiny files also under the default model's names in its (user) models folder."""
    models = pathlib.Path(server.log).parent / "models"
    assert (models / "infinity").is_dir(), f"test_comfy_server's fixture no longer keeps its models in {models}"
    # the tiny transformer under the embedded model's name, with its metadata: "auto" resolves to 256x256 (1:1)
    save_file(load_file(str(TINY / "infinity_tiny.safetensors")), str(models / "infinity" / DEFAULT_NAMES["transformer"]),
              metadata={"scalekv_resolution": RES})
    os.symlink(TINY / "vae_tiny.safetensors", models / "vae" / DEFAULT_NAMES["vae"])
    os.symlink(TINY / "t5_tiny", models / "text_encoders" / DEFAULT_NAMES["text_encoder"])
    server.models = models
    server.info = server.get_json("/object_info")
    return server


@pytest.fixture(scope="module")
def engine():
    return InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                       TINY / "t5_tiny")


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def by_class(api: dict, class_type: str) -> dict[str, dict]:
    return {k: v for k, v in api.items() if v["class_type"] == class_type}


def read_image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def reference(engine, cache: CacheConfig, negative: str | None = NEGATIVE, prompt: str = PROMPT,
              seed: int = SAMPLER["seed"]) -> np.ndarray:
    result = engine.generate(prompt, negative, seed=seed, cfg=SAMPLER["cfg"], tau=SAMPLER["tau"],
                             top_k=SAMPLER["top_k"], top_p=SAMPLER["top_p"], schedule=schedule_from_label(RES),
                             cache=cache, batch=1)
    return result.images[0]


def assert_report_follows_the_plan(report: dict, engine, cache: CacheConfig) -> None:
    """Planned tokens per scale and layer are the core's plan for these settings; the cache held exactly that."""
    cfg = engine.transformer.cfg
    schedule = schedule_from_label(RES)
    assert report["batch"] == 1 and report["batch_rows"] == 2  # CFG doubles the rows
    _, plan = cache.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, 2, engine.transformer.block_dtype)
    scales = report["scales"]
    assert len(scales) == schedule.num_scales == len(plan.kept) + 1
    for si, row in enumerate(plan.kept):
        assert scales[si]["planned_tokens"] == list(row), si
        assert scales[si]["held_tokens"] == list(row), si
        assert scales[si]["full_tokens"] == sum(schedule.tokens_per_scale[:si + 1])
    per_token = kv_bytes_per_token(cfg.num_heads, cfg.head_dim, 4, 4, 2)  # fp32 keys and values on CPU
    assert report["bytes_per_token_layer"] == per_token
    assert report["analytic_mb"] == pytest.approx(plan.peak_stored_tokens() * per_token / 2**20)
    assert report["full_analytic_mb"] == pytest.approx(plan.full_tokens() * per_token / 2**20)
    assert report["measured_peak_mb"] is not None and report["measured_peak_mb"] > 0


def assert_generated(image: np.ndarray) -> None:
    assert image.shape == (256, 256, 3)
    assert image.std() > 1.0, "the image is blank"


# ------------------------------------------------------------------------------------------------ the files


def test_the_three_workflows_exist_with_thumbnails():
    assert {p.name for p in WORKFLOW_FILES} == EXPECTED
    for path in WORKFLOW_FILES:
        wf = json.loads(path.read_text())
        assert isinstance(wf["nodes"], list) and isinstance(wf["links"], list) and wf["version"] == 0.4, path.name
        with Image.open(path.with_suffix(".jpg")) as thumb:
            assert thumb.format == "JPEG" and thumb.width >= 600, path.name
            assert np.asarray(thumb.convert("L")).std() > 10, f"{path.name}: the thumbnail is blank"
    readme = (WORKFLOWS / "README.md").read_text()
    for path in WORKFLOW_FILES:  # issue 21: a title, a note that says what to do, seeds that change after a run
        wf = json.loads(path.read_text())
        [group] = wf["groups"]
        assert len(group["title"]) > 20, path.name
        notes = [n for n in wf["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 100, path.name
        seeds = [n for n in wf["nodes"] if n["type"] in ("InfinitySampler", "PrimitiveInt")
                 and not any(i["name"] == "seed" and i.get("link") is not None for i in n.get("inputs") or [])]
        assert seeds and all(n["widgets_values"][1] == "randomize" for n in seeds), path.name
    t2i = json.loads((WORKFLOWS / "scalekv_text_to_image.json").read_text())
    [sampler] = [n for n in t2i["nodes"] if n["type"] == "InfinitySampler"]
    assert all(i.get("link") is None for i in sampler["inputs"] if i["name"] == "negative")  # no negative wired
    assert all(name in readme for name in EXPECTED) and "Nothing is here yet" not in readme


def test_workflows_convert_to_what_the_build_script_set(comfy):
    for path in WORKFLOW_FILES:
        api = rw.ui_to_api(json.loads(path.read_text()), comfy.info)
        [loader] = by_class(api, "InfinityModelLoader").values()
        assert {k: loader["inputs"][k] for k in DEFAULT_NAMES} == DEFAULT_NAMES, path.name
        samplers = by_class(api, "InfinitySampler")
        assert samplers, path.name
        for node in samplers.values():
            # seed, then (skipped) its control, then cfg...: a wrong widget count would shift these; a linked seed
            # comes from the workflow's seed node
            inputs = {k: node["inputs"][k] for k in SAMPLER}
            if isinstance(inputs["seed"], list):
                inputs["seed"] = api[inputs["seed"][0]]["inputs"]["value"]
            assert inputs == SAMPLER, path.name
            positive = api[node["inputs"]["positive"][0]]
            assert positive["class_type"] == "InfinityTextEncode" and positive["inputs"]["prompt"] == PROMPT
        for node in by_class(api, "ScaleKVCacheConfig").values():
            assert node["inputs"]["policy"] == "scalekv" and node["inputs"]["budget_unit"] == "percent"
            assert node["inputs"]["budget"] == 10
        assert by_class(api, "SaveImage"), path.name


# ------------------------------------------------------------------------------------------------ the runs


def test_text_to_image_runs_from_the_command_line(comfy, engine, tmp_path):
    """The README's main path: the CLI converts, queues, waits, and writes the image and the memory report."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(WORKFLOWS / "scalekv_text_to_image.json"),
                           "--url", comfy.url, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    [image] = summary["images"]
    assert pathlib.Path(image["path"]).parent == out and pathlib.Path(image["path"]).name.startswith("scalekv_")
    saved = read_image(image["path"])
    assert_generated(saved)
    assert np.array_equal(saved, reference(engine, SCALEKV_10))
    assert [r["path"] for r in summary["memory_reports"]] == [str(out / "memory_report.json")]
    report = json.loads((out / "memory_report.json").read_text())
    assert report["policy"]["policy"] == "scalekv" and report["policy"]["budget"] == "10%"
    assert_report_follows_the_plan(report, engine, SCALEKV_10)
    assert report["stored_ratio"] < 0.5


def test_full_vs_scalekv_from_the_same_seed(comfy, engine, tmp_path):
    workflow = load("full_vs_scalekv.json")
    api = rw.ui_to_api(workflow, comfy.info)
    samplers = by_class(api, "InfinitySampler")
    [full_id] = [k for k, v in samplers.items() if "cache_config" not in v["inputs"]]
    [scalekv_id] = [k for k, v in samplers.items() if "cache_config" in v["inputs"]]
    summary = rw.run(comfy.url, workflow, str(tmp_path))
    images = {img["node"]: read_image(img["path"]) for img in summary["images"]}
    saves = by_class(api, "SaveImage")
    [full_save] = [k for k, v in saves.items() if v["inputs"]["images"][0] == full_id]
    [scalekv_save] = [k for k, v in saves.items() if v["inputs"]["images"][0] == scalekv_id]
    assert set(images) == {full_save, scalekv_save}
    names = {img["node"]: pathlib.Path(img["path"]).name for img in summary["images"]}
    assert names[full_save].startswith("full_") and names[scalekv_save].startswith("scalekv_")
    for image in images.values():
        assert_generated(image)
    assert np.array_equal(images[full_save], reference(engine, CacheConfig(policy="full"), negative=None))
    assert np.array_equal(images[scalekv_save], reference(engine, SCALEKV_10, negative=None))

    reports = {r["node"]: json.loads(pathlib.Path(r["path"]).read_text()) for r in summary["memory_reports"]}
    assert set(reports) == {full_id, scalekv_id}
    assert reports[full_id]["policy"]["policy"] == "full" and reports[full_id]["stored_ratio"] == pytest.approx(1.0)
    assert_report_follows_the_plan(reports[full_id], engine, CacheConfig(policy="full"))
    assert_report_follows_the_plan(reports[scalekv_id], engine, SCALEKV_10)
    assert reports[scalekv_id]["analytic_mb"] < reports[full_id]["analytic_mb"] / 2


def test_calibrate_then_generate_uses_the_calibrated_budget_file(comfy, engine, tmp_path):
    summary = rw.run(comfy.url, load("calibrate_then_generate.json"), str(tmp_path))
    budget_file = comfy.models / "scalekv" / "scalekv_budget_256x256_10pct.json"
    assert budget_file.is_file(), sorted(p.name for p in (comfy.models / "scalekv").iterdir())
    [report_file] = summary["memory_reports"]
    report = json.loads(pathlib.Path(report_file["path"]).read_text())
    assert report["policy"]["budget_file"] == str(budget_file)
    calibrated = CacheConfig(policy="scalekv", budget="10%", budget_file=str(budget_file))
    assert_report_follows_the_plan(report, engine, calibrated)
    [image] = summary["images"]
    saved = read_image(image["path"])
    assert_generated(saved)
    assert np.array_equal(saved, reference(engine, calibrated, negative=None))


def test_generate_sh_runs_the_main_job_and_stops_its_server(engine, tmp_path):
    """The README's main command, with --prompt/--seed, on stand-ins under the default model's names."""
    comfyui = pathlib.Path(os.environ.get("SCALEKV_COMFYUI", "/tmp/scalekv-comfy/ComfyUI"))
    host = comfyui.parent
    if not (pathlib.Path(sys.prefix) == host / "venv" and (host / "venv" / ".scalekv-comfy-setup").is_file()):
        pytest.skip(f"generate.sh sets up its own host with scripts/comfy_host.sh; this run's ComfyUI ({comfyui}, "
                    f"python {sys.prefix}) is not one")
    model = tmp_path / "default_model"
    for sub in ("infinity", "vae", "text_encoders"):
        (model / sub).mkdir(parents=True)
    save_file(load_file(str(TINY / "infinity_tiny.safetensors")), str(model / "infinity" / DEFAULT_NAMES["transformer"]),
              metadata={"scalekv_resolution": RES})  # as the embedded model's file says: auto is 256x256
    os.symlink(TINY / "vae_tiny.safetensors", model / "vae" / DEFAULT_NAMES["vae"])
    os.symlink(TINY / "t5_tiny", model / "text_encoders" / DEFAULT_NAMES["text_encoder"])
    env = {**os.environ, "SCALEKV_DEFAULT_MODEL_DIR": str(model), "COMFY_HOST_DIR": str(host),
           "COMFY_VENV": str(host / "venv"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("COMFY_PORT", None)
    other = "a small yellow star at the center on a black background"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "generate.sh"), "--prompt", other, "--seed", "4",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = read_image(tmp_path / "out" / "image.png")
    assert_generated(saved)
    assert np.array_equal(saved, reference(engine, SCALEKV_10, prompt=other, seed=4))
    assert_report_follows_the_plan(json.loads((tmp_path / "out" / "memory_report.json").read_text()), engine,
                                   SCALEKV_10)
    [url] = re.findall(r"server up on (http://127\.0\.0\.1:\d+)", proc.stderr)
    assert "stopped pid" in proc.stderr
    with pytest.raises(OSError):  # nothing answers there any more
        urllib.request.urlopen(url + "/system_stats", timeout=5)


# ------------------------------------------------------------------------------------------------ failures


def run_cli(comfy, workflow: dict, tmp_path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return subprocess.run([sys.executable, str(SCRIPT), str(path), "--url", comfy.url, "--out", str(tmp_path / "o"),
                           *args], capture_output=True, text=True, timeout=300)


def set_widget(workflow: dict, node_type: str, index: int, value) -> None:
    [node] = [n for n in workflow["nodes"] if n["type"] == node_type]
    node["widgets_values"][index] = value


def test_a_failed_run_exits_nonzero_with_the_servers_message(comfy, tmp_path):
    """A file listed in the menu but gone when the loader runs (a dangling link): the node's error, from the run."""
    dangling = comfy.models / "infinity" / "moved_away.safetensors"
    os.symlink(tmp_path / "not_there.safetensors", dangling)
    try:
        workflow = load("scalekv_text_to_image.json")
        set_widget(workflow, "InfinityModelLoader", 0, "moved_away.safetensors")
        proc = run_cli(comfy, workflow, tmp_path)
    finally:
        dangling.unlink()
    assert proc.returncode == 1 and not proc.stdout
    assert "HTTP 400" not in proc.stderr, proc.stderr  # validated, queued, and failed in the loader
    assert "InfinityModelLoader" in proc.stderr and "moved_away.safetensors" in proc.stderr, proc.stderr
    assert "models/infinity" in proc.stderr  # the node's own message: where it looked


def test_a_model_missing_from_the_menu(comfy, tmp_path):
    """The loader's validate_inputs checks its menus on every version (0.3.75 lets any string through a V3 combo):
    the prompt is refused before anything runs, naming the folders searched."""
    workflow = load("scalekv_text_to_image.json")
    set_widget(workflow, "InfinityModelLoader", 0, "no_such_model.safetensors")
    proc = run_cli(comfy, workflow, tmp_path)
    assert proc.returncode == 1 and not proc.stdout
    assert "InfinityModelLoader" in proc.stderr and "no_such_model.safetensors" in proc.stderr, proc.stderr
    assert "HTTP 400" in proc.stderr and "models/infinity" in proc.stderr, proc.stderr


def test_a_refused_prompt_exits_nonzero_with_the_validation_message(comfy, tmp_path):
    workflow = load("scalekv_text_to_image.json")
    set_widget(workflow, "ScaleKVCacheConfig", 2, 0.0)  # budget
    proc = run_cli(comfy, workflow, tmp_path)
    assert proc.returncode == 1
    assert "HTTP 400" in proc.stderr and "budget: 0 is out of range" in proc.stderr, proc.stderr


def test_no_server_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(WORKFLOWS / "scalekv_text_to_image.json"),
                           "--url", "http://127.0.0.1:9", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "no ComfyUI server answers at http://127.0.0.1:9" in proc.stderr


# ------------------------------------------------------------------------------------------------ conversion rules


#: A hand-written /object_info for the conversion rules (V3-style COMBO entries, input_order, a forceInput string).
INFO = {
    "Loader": {"input": {"required": {"name": ["COMBO", {"options": ["a", "b"]}]}},
               "input_order": {"required": ["name"]}, "display_name": "Loader"},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {}], "mode": [["x", "y"], {}],
                                       "pick": ["COMBO", {"options": ["p", "q"], "control_after_generate": True}],
                                       "label": ["STRING", {}]},
                          "optional": {"note": ["STRING", {"forceInput": True}], "extra": ["LATENT", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "mode", "pick", "label"],
                                "optional": ["note", "extra"]}},
    "Texter": {"input": {"required": {"noise_seed": ["INT", {}], "text": ["STRING", {}]}}},
}


def ui_node(node_id, type_, values, inputs=(), mode=0, title=None):
    node = {"id": node_id, "type": type_, "mode": mode, "widgets_values": values,
            "inputs": [{"name": name, "type": "X", "link": link} for name, link in inputs]}
    if title:
        node["title"] = title
    return node


def test_conversion_follows_the_frontends_widget_order():
    workflow = {"nodes": [
        ui_node(1, "Loader", ["b"]),
        ui_node(2, "Sampler", [42, "randomize", 20, "y", "q", "increment", "", "hello"],
                inputs=[("model", 1), ("note", 2), ("extra", None), ("steps", 3)], title="My sampler"),
        ui_node(3, "Texter", [5, "fixed", "some text"]),  # noise_seed: a control widget without the flag
        ui_node(4, "Note", ["just a note"]),
        ui_node(5, "Texter", [1, "fixed", "muted"], mode=2),
        ui_node(6, "Sampler", [1, "fixed", 2, "x", "p", "fixed", "", "z"], inputs=[("model", 4)]),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 3, 0, 2, 6, "STRING"], [3, 3, 1, 2, 2, "INT"],
                 {"id": 4, "origin_id": 5, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "MODEL"}],
        "version": 0.4}
    api = rw.ui_to_api(workflow, INFO)
    assert api == {
        "1": {"class_type": "Loader", "inputs": {"name": "b"}, "_meta": {"title": "Loader"}},
        "2": {"class_type": "Sampler", "_meta": {"title": "My sampler"},
              "inputs": {"model": ["1", 0], "seed": 42, "steps": ["3", 1], "mode": "y", "pick": "q",
                         "label": "hello", "note": ["3", 0]}},
        "3": {"class_type": "Texter", "inputs": {"noise_seed": 5, "text": "some text"}, "_meta": {"title": "Texter"}},
        "6": {"class_type": "Sampler", "_meta": {"title": "Sampler"},  # its model came from the muted node
              "inputs": {"seed": 1, "steps": 2, "mode": "x", "pick": "p", "label": "z"}},
    }


@pytest.mark.parametrize("node, message", [
    (ui_node(1, "Unknown", []), "no node type 'Unknown'"),
    (ui_node(1, "Loader", ["a"], mode=4), "bypassed"),
    (ui_node(1, "Reroute", []), "Reroute nodes are not converted"),
    (ui_node(1, "Sampler", [1, "fixed", 2]), "widgets_values has 3 entries"),
])
def test_conversion_refuses_what_it_cannot_convert(node, message):
    with pytest.raises(rw.WorkflowError, match=message):
        rw.ui_to_api({"nodes": [node], "links": []}, INFO)


def test_overrides_reach_the_linked_prompts_and_every_sampler_seed():
    api = {"1": {"class_type": "Enc", "inputs": {"prompt": "old positive"}},
           "2": {"class_type": "Enc", "inputs": {"prompt": "old negative"}},
           "3": {"class_type": "S", "inputs": {"positive": ["1", 0], "negative": ["2", 0], "seed": 0}},
           "4": {"class_type": "S", "inputs": {"positive": ["1", 0], "seed": 0}},
           "5": {"class_type": "Calibrate", "inputs": {"prompts": "x", "seed": 0}}}
    rw.apply_overrides(api, prompt="new", seed=9, sets=['4.cfg=4.5', "5.prompts=a b"])
    assert api["1"]["inputs"]["prompt"] == "new" and api["2"]["inputs"]["prompt"] == "old negative"
    assert api["3"]["inputs"]["seed"] == api["4"]["inputs"]["seed"] == 9
    assert api["5"]["inputs"] == {"prompts": "a b", "seed": 0}  # not a sampler: its seed stays
    assert api["4"]["inputs"]["cfg"] == 4.5
    rw.apply_overrides(api, negative_prompt="neg")
    assert api["2"]["inputs"]["prompt"] == "neg"
    with pytest.raises(rw.WorkflowError, match="no text node feeds a 'negative'"):
        rw.apply_overrides({"1": api["1"], "4": api["4"]}, negative_prompt="x")
    with pytest.raises(rw.WorkflowError, match="NODE_ID.INPUT=VALUE"):
        rw.apply_overrides(api, sets=["cfg=3"])
