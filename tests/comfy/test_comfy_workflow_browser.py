"""The example workflows as an artist meets them: opened from the template browser in the real frontend (classic
and Nodes 2.0), run, and looked at (tests/browser/workflow_check.mjs does the browsing).

After each run: no two nodes overlap; the previews the sampler streamed are colour pictures of the output's size
(256x256 on the embedded model's stand-in); the ScaleKV panel shows its legend and the whole-job fit line, whose
figure is the job planner's; the panels' text keeps a contrast of 4.5 or more in the light palette. Screenshots: out/browser_workflows/.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest
from safetensors.torch import load_file

from scalekv_core.job_memory import JobOptions, plan_job, t5_shape
from scalekv_core.kvcache import CacheConfig
from scalekv_core.loader import load_transformer, load_vae
from test_comfy_browser import missing_browser, run_check
from test_comfy_server import TINY, server  # noqa: F401  (the module-scoped server fixture)
from test_comfy_workflows import comfy  # noqa: F401  (the tiny files under the embedded model's names)

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECK = REPO / "tests" / "browser" / "workflow_check.mjs"
OUT = REPO / "out" / "browser_workflows"
MODES = ("classic", "vue")
WORKFLOWS = ("calibrate_then_generate", "full_vs_scalekv", "scalekv_text_to_image")

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))


@pytest.fixture(scope="module")
def runs(comfy):  # noqa: F811
    shutil.rmtree(OUT, ignore_errors=True)  # no summary of an earlier run is read back
    cmd = ["node", str(CHECK), "--url", comfy.url, "--out", str(OUT), "--modes", ",".join(MODES), "--timeout", "240"]
    return run_check(cmd, OUT, 1200, comfy.log)


def each_run(runs):
    for mode in MODES:
        for name in WORKFLOWS:
            yield mode, name, runs["modes"][mode][name]


def test_the_template_browser_lists_the_three_workflows(runs):
    assert sorted(runs["templates"]["names"]) == sorted(WORKFLOWS)


def test_every_workflow_opens_from_the_template_browser(runs):
    """Templates -> Extensions -> ComfyUI-ScaleKV -> the workflow's card, as an artist opens it."""
    for mode, name, run in each_run(runs):
        assert run["opened_by"] == "template browser", (mode, name, run["opened_by"])


def test_every_workflow_runs_and_no_nodes_overlap_after_the_run(runs):
    for mode, name, run in each_run(runs):
        assert run["status"] == "success", (mode, name)
        assert run["nodes"] >= 6 and run["overlaps"] == [], (mode, name, run["overlaps"])


def test_previews_are_colour_pictures_of_the_outputs_size(runs):
    for mode, name, run in each_run(runs):
        previews = run["previews"]
        assert len(previews) >= 7, (mode, name, len(previews))  # one per scale (7 at 256x256) and the result
        assert all((p["width"], p["height"]) == (256, 256) for p in previews), (mode, name, previews[:3])
        assert max(p["chroma"] for p in previews) > 40, (mode, name)  # colour, not false-colour channels or grey


def job_line_gib() -> str:
    """The planner's whole-job peak for the workflows' graph on this server: the tiny stand-ins (T5 and VAE from
    their files, the VAE's decoder shape too), fp32 blocks and T5 on the CPU, T5 offloaded, previews, ScaleKV 10%,
    at the stand-in's 256x256."""
    cfg = load_transformer(TINY / "infinity_tiny.safetensors").cfg
    t5 = t5_shape(json.loads((TINY / "t5_tiny" / "config.json").read_text()))
    vae = sum(t.numel() for k, t in load_file(TINY / "vae_tiny.safetensors").items() if not k.startswith("encoder."))
    shape = load_vae(TINY / "vae_tiny.safetensors").cfg
    job = plan_job(cfg, 256, 256, 1, JobOptions(dtype="fp32", t5_offload=True, previews=True, t5_dtype="fp32"),
                   cache=CacheConfig(policy="scalekv", budget="10%"), t5=t5, vae_params=vae,
                   vae_shape=(shape.base_ch, shape.patch_size))
    return f"{job.peak_mb / 1024:.2f} GiB"


def test_the_panel_shows_its_legend_and_the_planners_fit_line(runs):
    want = job_line_gib()
    for mode, name, run in each_run(runs):
        widget = run["widget"]
        assert widget is not None and widget["state"] in ("plan", "report"), (mode, name)
        assert widget["job"] == widget["answer_job"] and widget["job"].startswith(f"whole job {want} ("), \
            (mode, name, widget["job"], want)
        assert re.search(r": (fits|does not fit)", widget["job"]) and widget["job_fits"] in ("true", "false")
        assert widget["legend"], (mode, name)  # drafters, refiners, full cache, measured


def test_inputs_the_policy_does_not_read_are_greyed_out(runs):
    """Under scalekv every input applies; under full the budget and scoring inputs are disabled (kv_dtype stays)."""
    for mode, name, run in each_run(runs):
        disabled = run["disabled"]
        assert disabled["scalekv"] == [] and disabled["restored"] == [], (mode, name, disabled)
        assert {"budget", "budget_unit", "window", "kernel", "pooling", "scoring", "refiner_decay",
                "budget_source"} <= set(disabled["full"]) and "kv_dtype" not in disabled["full"], (mode, name)


def test_calibrate_shows_its_file_and_drafters_on_the_node(runs):
    for mode in MODES:
        text = runs["modes"][mode]["calibrate_then_generate"]["calibration"]
        assert text and "wrote scalekv_budget_256x256_10pct.json" in text, (mode, text)
        assert "drafters" in text and "256x256 (1:1)" in text, (mode, text)


def test_panel_text_is_readable_in_the_light_palette(runs):
    for mode, name, run in each_run(runs):
        light = run["contrast_light"]
        assert light["count"] > 20 and light["min"] >= 4.5, (mode, name, light["worst"])  # WCAG AA for text
