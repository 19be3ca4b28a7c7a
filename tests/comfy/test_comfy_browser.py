"""The budget widget in a real browser: ComfyUI's own frontend (1.32.9) in headless Chromium, classic and Nodes 2.0.

A real ComfyUI server with this pack mounted (the `server` fixture of test_comfy_server.py, on a free port) serves
the frontend; tests/browser/widget_check.mjs (playwright-core) builds the graph in the page, edits the budget as a
user would, queues a run and reads back what the widgets show. These tests compare that text with the engine's
planner called here directly, and with the memory report the run left in /history. Screenshots: out/browser/.

Needs chromium (/usr/bin/chromium or $CHROMIUM), node and playwright-core (.browser/node_modules, or
$PLAYWRIGHT_CORE_DIR): `bash scripts/setup_browser.sh` installs them; without them the tests skip, saying so.
SCALEKV_DOCS_IMAGES=docs/images also rewrites the README's node pictures (classic mode, one PNG per node).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess

import psutil
import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.budget import kv_bytes_per_token, plan_to_original_json
from scalekv_core.job_memory import JobOptions, plan_job, t5_shape
from scalekv_core.kvcache.memory import plan_memory
from scalekv_core.loader import load_transformer, load_vae
from scalekv_core.model.config import KNOWN_MODELS
from scalekv_core.schedules import schedule_from_label
from test_comfy_server import server  # noqa: F401  (the real ComfyUI with this pack and the tiny models)

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
CHECK = REPO / "tests" / "browser" / "widget_check.mjs"
OUT = REPO / "out" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
RES = "256x256 (1:1)"
MODES = ("classic", "vue")
MiB = 2**20
#: What the check sets in the page: budget 48 tokens and window 4, then the user types 24 into the budget.
SETTINGS = dict(policy="scalekv", budget=48, window=4, kernel=5)
EDITED_BUDGET = 24
TIMEOUT = 300
#: The budget file a linked ScaleKV Calibrate (prefix skvtest, 256x256, 10%) names; written before the page opens.
CALIBRATED = "skvtest_256x256_10pct.json"
#: The fit-line steps: what the check changes, as the route's JobOptions fields (cumulative, in this order).
JOB_STEPS = {"job_weights": dict(weights="fp8_e4m3fn"), "job_t5": dict(t5_weights="int8"),
             "job_tile": dict(decode_tile=8), "job_memory_linked": {}, "job_swap": dict(block_swap=2)}
#: WCAG AA for normal text.
MIN_CONTRAST = 4.5


def playwright_modules() -> pathlib.Path | None:
    """The node_modules folder holding playwright-core: $PLAYWRIGHT_CORE_DIR, .browser/, then $NODE_PATH."""
    candidates = [os.environ.get("PLAYWRIGHT_CORE_DIR"), str(REPO / ".browser" / "node_modules"),
                  *os.environ.get("NODE_PATH", "").split(os.pathsep)]
    for c in candidates:
        if c and (pathlib.Path(c) / "playwright-core" / "package.json").is_file():
            return pathlib.Path(c)
    return None


def missing_browser() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"chromium not found at {CHROMIUM}: run `bash scripts/setup_browser.sh` (or set CHROMIUM)"
    if shutil.which("node") is None:
        return "node not found, so playwright-core cannot run: run `bash scripts/setup_browser.sh`"
    if playwright_modules() is None:
        return ("playwright-core not found in .browser/node_modules, $PLAYWRIGHT_CORE_DIR or $NODE_PATH: "
                "run `bash scripts/setup_browser.sh`")
    return None


pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))


@pytest.fixture(scope="module")
def page_run(server):  # noqa: F811  (the imported fixture)
    """One browser session over both display modes; its JSON summary (steps, texts, prompt ids, screenshots)."""
    shutil.rmtree(OUT, ignore_errors=True)
    write_calibrated(server.log.parent / "models" / "scalekv" / CALIBRATED)
    cmd = ["node", str(CHECK), "--url", server.url, "--out", str(OUT), "--modes", ",".join(MODES),
           "--timeout", "90"]
    docs = os.environ.get("SCALEKV_DOCS_IMAGES")
    if docs:
        cmd += ["--docs", str((REPO / docs).resolve())]
    return run_check(cmd, OUT, TIMEOUT, server.log)


def run_check(cmd: list[str], out: pathlib.Path, timeout: float, server_log: pathlib.Path) -> dict:
    """Run a browser check (node + playwright-core) and return its JSON summary; fails with its errors and the
    server log's tail unless it completed with no page error."""
    env = {**os.environ, "PLAYWRIGHT_CORE_DIR": str(playwright_modules()), "CHROMIUM": CHROMIUM}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    # the check also writes its summary to a file: a large summary on a pipe can be cut when node exits
    saved = out / "summary.json"
    lines = [saved.read_text()] if saved.is_file() else [line for line in proc.stdout.splitlines()
                                                          if line.startswith("{")]
    assert lines, f"{pathlib.Path(cmd[1]).name} printed no summary (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(lines[-1])
    assert proc.returncode == 0 and summary["ok"], json.dumps(
        {k: summary.get(k) for k in ("fatal", "page_errors", "extension_errors")}, indent=1) + \
        f"\nserver log tail:\n{server_log.read_text()[-3000:]}"
    return summary


# ------------------------------------------------------------------------------------------- expectations


def write_calibrated(path: pathlib.Path) -> None:
    """A budget file for the tiny model at 256x256 in the original format, from a 40-token plan (so its capacities
    differ from the 24-token plan the widget shows without it)."""
    cfg = load_transformer(TINY / "infinity_tiny.safetensors").cfg
    config = CacheConfig(policy="scalekv", budget=40, window=SETTINGS["window"], kernel=SETTINGS["kernel"])
    _, plan = config.build(schedule_from_label(RES), cfg.depth, cfg.num_heads, cfg.head_dim, 2, torch.float32)
    path.write_text(json.dumps(plan_to_original_json(plan)))


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_transformer(TINY / "infinity_tiny.safetensors").cfg


def expected(cfg, budget: int, resolution: str = RES, budget_file: str | None = None, **job_options) -> dict:
    """The engine's own plan for the check's graph: CFG on (2 rows), fp32 blocks (auto on the CPU server); the
    whole job with the route's JobOptions plus `job_options` (weights, t5_weights, decode_tile, block_swap)."""
    schedule = schedule_from_label(resolution)
    config = CacheConfig(policy="scalekv", budget=budget, window=SETTINGS["window"], kernel=SETTINGS["kernel"],
                         budget_file=budget_file)
    _, plan = config.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, 2, torch.float32)
    memory = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, 1, config,
                         torch.float32)
    tb = kv_bytes_per_token(cfg.num_heads, cfg.head_dim, 4, 4, 2)  # auto storage on fp32 blocks: fp32 keys and values
    rows, full = [], 0
    for si, kept in enumerate(plan.kept):
        full += schedule.tokens_per_scale[si]
        ds = sorted(plan.drafters[si])
        rs = [i for i in range(cfg.depth) if i not in ds]
        lo, hi = min(kept[i] for i in rs), max(kept[i] for i in rs)
        rows.append({"scale": f"{si} {schedule.grids[si][0]}×{schedule.grids[si][1]}",
                     "drafters": f"{len(ds)}×{max(kept[i] for i in ds)}" if ds else "–",
                     "refiners": f"{len(rs)}×{hi}" if lo == hi else f"{len(rs)}×{lo}…{hi}",
                     "mb": sum(kept) * tb / MiB, "full_mb": full * cfg.depth * tb / MiB})
    # the whole job: the loader's tiny T5 and VAE (its decoder's shape too) when the graph has the loader (tiny
    # model), else T5-XL and the released VAE; T5 offloaded (ComfyUI frees it for the sampler) and in fp32, as the
    # loader holds it on the server's device (the CPU here)
    files = {}
    if cfg == load_transformer(TINY / "infinity_tiny.safetensors").cfg:
        from safetensors.torch import load_file
        vae = load_vae(TINY / "vae_tiny.safetensors").cfg
        files = dict(t5=t5_shape(json.loads((TINY / "t5_tiny" / "config.json").read_text())),
                     vae_params=sum(t.numel() for k, t in load_file(TINY / "vae_tiny.safetensors").items()
                                    if not k.startswith("encoder.")),  # the decoder the loader holds
                     vae_shape=(vae.base_ch, vae.patch_size))
    h, w = schedule.pixel_size
    job = plan_job(cfg, w, h, 1, JobOptions(dtype="fp32", t5_offload=True, previews=True, t5_dtype="fp32",
                                            **job_options), cache=config, **files)
    return {"rows": rows, "stored_peak": memory.analytic_mb, "full_total": memory.full_analytic_mb,
            "planned_peak": job.sampling_extra_mb, "job_gib": f"{job.peak_mb / 1024:.2f} GiB", "job": job,
            "last_scale": f"{schedule.num_scales - 1} {schedule.grids[-1][0]}×{schedule.grids[-1][1]}",
            "job_fits": job.peak_mb <= psutil.virtual_memory().total / MiB}  # ComfyUI's CPU total is psutil's


def assert_shown(text: str, value: float) -> None:
    """A figure as the widget prints it equals `value` to the digits it shows."""
    assert re.fullmatch(r"\d+(\.\d+)?", text), text
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9, (text, value)
    assert decimals >= 2 or value >= 10, (text, value)  # small figures keep three significant digits


def assert_widget_shows(widget: dict, exp: dict) -> None:
    assert widget["state"] == "plan", widget
    assert widget["scales"] == [r["scale"] for r in exp["rows"]]
    assert widget["drafters"] == [r["drafters"] for r in exp["rows"]]
    assert widget["refiners"] == [r["refiners"] for r in exp["rows"]]
    for text, r in zip(widget["mb"], exp["rows"]):
        assert_shown(text, r["mb"])
    for text, r in zip(widget["full_mb"], exp["rows"]):
        assert_shown(text, r["full_mb"])
    assert_shown(widget["stored_peak"], exp["stored_peak"])
    assert_shown(widget["full_total"], exp["full_total"])
    assert_shown(widget["planned_peak"], exp["planned_peak"])
    job = widget["job"]  # the fit line: the whole job's planned peak against the device, and the answer
    assert job["text"].startswith(f"whole job {exp['job_gib']} ("), job
    assert job["fits"] == str(exp["job_fits"]).lower(), job
    assert (": fits" in job["text"]) == exp["job_fits"] and " on cpu: " in job["text"], job
    for part in ("peak", "sampling", "decode", "transformer", "t5"):  # the planner's own figures, MB
        assert float(job[f"{part}Mb"]) == pytest.approx(getattr(exp["job"], f"{part}_mb"), rel=1e-9), (part, job)
    # the legend, the last scale (never stored) and the rule the planned peak follows
    assert widget["legend"][-1] == "full cache" and "refiners" in widget["legend"], widget["legend"]
    assert widget["last_scale"] == exp["last_scale"]
    assert widget["last_note"] == "never stored: the last scale's keys/values are not cached"
    assert widget["planned_for"] == "for prompts up to 512 tokens"


# ------------------------------------------------------------------------------------------- tests


def test_page_loads_the_extension_without_errors(page_run):
    for mode in MODES:
        res = page_run["modes"][mode]
        # this widget's extension, once (the pack's other extensions may load beside it)
        assert res["extensions"].count("scalekv.budget_widget") == 1, res["extensions"]
        assert res["vue_nodes"] is (mode == "vue")
    assert page_run["page_errors"] == [] and page_run["extension_errors"] == []


@pytest.mark.parametrize("mode", MODES)
def test_widget_shows_the_planners_numbers(page_run, tiny_cfg, mode):
    initial = page_run["modes"][mode]["steps"]["initial"]
    assert initial["visible"], initial["rect"]
    assert "infinity_tiny.safetensors" in initial["model"] and "4 layers" in initial["model"]  # the loader's file
    assert initial["resolution"] == RES  # the sampler's resolution, not the widget's default
    assert initial["budget"] == f"scalekv · {SETTINGS['budget']} tokens/layer"
    assert_widget_shows(initial, expected(tiny_cfg, SETTINGS["budget"]))


@pytest.mark.parametrize("mode", MODES)
def test_widget_follows_a_budget_edit(page_run, tiny_cfg, mode):
    steps = page_run["modes"][mode]["steps"]
    assert steps["budget_widget_value"] == EDITED_BUDGET
    edited = steps["budget"]
    assert edited["budget"] == f"scalekv · {EDITED_BUDGET} tokens/layer"
    assert_widget_shows(edited, expected(tiny_cfg, EDITED_BUDGET))
    assert edited["mb"] != steps["initial"]["mb"]


@pytest.mark.parametrize("mode", MODES)
def test_invalid_setting_shows_the_nodes_message(page_run, node_classes, mode):
    steps = page_run["modes"][mode]["steps"]
    message = node_classes["ScaleKVCacheConfig"].validate_inputs(policy="scalekv", budget_unit="tokens",
                                                                 budget=float(EDITED_BUDGET), window=5, kernel=5,
                                                                 budget_source="generated")
    assert isinstance(message, str)
    assert steps["invalid"]["state"] == "error" and steps["invalid"]["error"] == message
    assert steps["restored"]["state"] == "plan"  # window back to 4: the plan again


@pytest.mark.parametrize("mode", MODES)
def test_the_widget_reads_through_reroute_nodes(page_run, tiny_cfg, mode):
    """Two Reroute nodes in a row on the config-to-sampler link and on the loader-to-sampler link: the widget
    still plans the loader's file at the sampler's resolution, which changes behind them (it planned the default
    2B at 1024x1024)."""
    shown = page_run["modes"][mode]["steps"]["rerouted"]
    assert "infinity_tiny.safetensors" in shown["model"] and "(default)" not in shown["model"]
    assert shown["resolution"] == "320x256 (1.25:1)"
    assert_widget_shows(shown, expected(tiny_cfg, EDITED_BUDGET, "320x256 (1.25:1)"))


@pytest.mark.parametrize("mode", MODES)
def test_without_a_sampler_the_widget_offers_defaults(page_run, mode):
    steps = page_run["modes"][mode]["steps"]
    shown = steps["defaults"]
    assert "(default)" in shown["model"] and "(default)" in shown["resolution"]
    assert (shown["model_choice"], shown["resolution_choice"]) == ("2b", "1024x1024 (1:1)")
    assert_widget_shows(shown, expected(KNOWN_MODELS["2b"], EDITED_BUDGET, "1024x1024 (1:1)"))
    assert len(shown["scales"]) == 12  # 13 scales at 1024x1024, the last never stored
    assert shown["last_run"] is None  # the tiny run's figures are not the 2B plan's
    picked = steps["defaults_8b"]  # the user picks 8B in the header
    assert picked["model_choice"] == "8b"
    assert_widget_shows(picked, expected(KNOWN_MODELS["8b"], EDITED_BUDGET, "1024x1024 (1:1)"))


def test_widget_is_not_sent_with_the_prompt(page_run):
    for mode in MODES:
        prompt = page_run["modes"][mode]["api_prompt"]
        [config] = [n for n in prompt.values() if n["class_type"] == "ScaleKVCacheConfig"]
        assert set(config["inputs"]) == {"policy", "budget_unit", "budget", "window", "kernel", "pooling", "scoring",
                                         "kv_dtype", "budget_source", "refiner_decay"}
        assert config["inputs"]["budget"] == EDITED_BUDGET and config["inputs"]["window"] == 4
        [sampler] = [n for n in prompt.values() if n["class_type"] == "InfinitySampler"]
        assert not any("scalekv" in k for k in sampler["inputs"])


@pytest.mark.parametrize("mode", MODES)
def test_run_shows_measured_figures(page_run, server, tiny_cfg, mode):  # noqa: F811
    res = page_run["modes"][mode]
    assert res["exec_events"] == ["execution_start", "execution_success"]
    history = server.history(res["prompt_id"])
    [report] = history["outputs"][str(res["ids"]["sampler"])]["scalekv_memory"]
    shown = res["steps"]["executed"]
    assert shown["state"] == "report" and shown["visible"], shown["rect"]
    exp = expected(tiny_cfg, EDITED_BUDGET)
    assert shown["drafters"] == [r["drafters"] for r in exp["rows"]]  # the run's plan is the one shown before it
    stored = report["scales"][:-1]
    assert len(shown["measured_mb"]) == len(stored) == len(exp["rows"])
    for text, s in zip(shown["measured_mb"], stored):
        assert_shown(text, sum(s["stored_bytes"]) / MiB)
    assert shown["held"] == ["= plan"] * len(stored)
    assert all(s["held_tokens"] == s["planned_tokens"] for s in stored)
    assert_shown(shown["measured_peak"], report["measured_peak_mb"])
    assert_shown(shown["planned_peak"], report["planned_peak_max_prompt_mb"])
    assert_shown(shown["measured_stored"], max(sum(s["stored_bytes"]) for s in stored) / MiB)
    assert shown["match"] == "held = plan"
    after = res["steps"]["config_after_run"]
    assert after["last_run"].startswith("last run: measured peak") and after["measured_peak"] == shown["measured_peak"]
    assert shown["legend"] == ["drafters", "refiners", "full cache", "measured"]
    assert shown["last_scale"] == "6 16×16" and "never stored" in shown["last_note"]


@pytest.mark.parametrize("mode", MODES)
def test_config_and_sampler_show_one_planned_peak(page_run, server, tiny_cfg, mode):  # noqa: F811
    """Both nodes plan for prompts up to T5's 512 tokens; the run's own short prompt is the sampler's tooltip."""
    res = page_run["modes"][mode]
    [report] = server.history(res["prompt_id"])["outputs"][str(res["ids"]["sampler"])]["scalekv_memory"]
    config, sampler = res["steps"]["config_after_run"], res["steps"]["executed"]
    assert config["planned_peak"] == sampler["planned_peak"]
    assert config["planned_for"] == sampler["planned_for"] == "for prompts up to 512 tokens"
    assert_shown(sampler["planned_peak"], expected(tiny_cfg, EDITED_BUDGET)["planned_peak"])
    assert report["planned_peak_mb"] < report["planned_peak_max_prompt_mb"]  # this prompt is shorter than 512
    assert f"(planned {config['planned_peak']} MB)" in config["last_run"]


@pytest.mark.parametrize("mode", MODES)
def test_fit_line_follows_the_job_settings(page_run, tiny_cfg, mode):
    """The loader's formats, the sampler's decode tile and a linked memory node's block swap re-plan the job, each
    through a change event (not the slow check); the run's settings give the run's line back."""
    steps = page_run["modes"][mode]["steps"]
    options: dict = {}
    previous = steps["restored"]["job"]
    for step, change in JOB_STEPS.items():
        options.update(change)
        shown = steps[step]
        assert shown["trigger"] == "event", (step, shown["trigger"])
        assert_widget_shows(shown, expected(tiny_cfg, EDITED_BUDGET, **options))
        if step != "job_memory_linked":  # linked with block_swap 0: the same job
            assert shown["job"] != previous, step
        part = {"job_weights": "transformer", "job_t5": "t5", "job_tile": "decode"}.get(step)
        if part:  # the part the setting is about got smaller
            assert float(shown["job"][f"{part}Mb"]) < float(previous[f"{part}Mb"]), (step, shown["job"], previous)
        previous = shown["job"]
    assert steps["job_restored"]["job"] == steps["restored"]["job"]
    assert steps["budget"]["trigger"] == "event"  # the user's typed edit, in both display modes


@pytest.mark.parametrize("mode", MODES)
def test_text_is_readable_in_dark_and_light_palettes(page_run, mode):
    steps = page_run["modes"][mode]["steps"]
    dark, light = steps["contrast_dark"], steps["contrast_light"]
    assert dark["background_luminance"] < 0.2 and light["background_luminance"] > 0.4, (dark, light)
    for shown in (dark, light):
        assert shown["count"] > 50, shown  # header, legend, rows and footers of both widgets
        assert shown["min"] >= MIN_CONTRAST, shown


@pytest.mark.parametrize("mode", MODES)
def test_linked_calibration_shows_its_files_plan(page_run, tiny_cfg, server, mode):  # noqa: F811
    steps = page_run["modes"][mode]["steps"]
    missing, present = steps["cal_missing"], steps["cal_file"]
    assert "skvnone_256x256_10pct.json is not in models/scalekv yet" in missing["budget_file_note"]
    assert_widget_shows(missing, expected(tiny_cfg, EDITED_BUDGET))  # budget_source's plan meanwhile
    assert present["budget_file_note"] == f"budget_file: {CALIBRATED}, written by the linked ScaleKV Calibrate"
    path = server.log.parent / "models" / "scalekv" / CALIBRATED
    if not path.is_file():  # the module's server is gone only after its last test
        write_calibrated(path)
    exp = expected(tiny_cfg, EDITED_BUDGET, budget_file=str(path))
    assert_widget_shows(present, exp)
    assert present["refiners"] != missing["refiners"]
    assert missing["last_run"] is None  # the run's figures belong to the settings it ran with
    assert steps["cal_removed"]["budget_file_note"] is None


def test_screenshots_are_kept(page_run):
    names = {pathlib.Path(p).name for p in page_run["shots"]}
    for mode in MODES:
        for step in ("initial", "budget", "invalid", "job", "executed", "light", "calibrate", "defaults",
                     "defaults_8b"):
            assert f"{mode}_{step}.png" in names
    for p in page_run["shots"]:
        assert pathlib.Path(p).stat().st_size > 20_000, p  # a rendered page, not a blank one
