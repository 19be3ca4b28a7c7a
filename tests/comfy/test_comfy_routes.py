"""POST /scalekv/plan, the budget widget's route, over HTTP (an aiohttp app holding the pack's route, in-process).

The answers are checked against direct calls to the engine's planner and against numbers known without it: the
paper's 650-token 10% budget at 1024x1024, the 6425-token prefix, the released 2B budget file's Max/Min, the tiny
model's shape from its config.json. Bad settings answer 400 with the cache-config node's own validation message.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch

import folder_paths
from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.memory import plan_memory
from scalekv_core.model.config import KNOWN_MODELS
from scalekv_core.schedules import schedule_from_label

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
PRESET_2B = REPO / "scalekv_core" / "kvcache" / "presets" / "infinity-2b-10pct.json"
MiB = 2**20


def core_plan(model: str, resolution: str, config: CacheConfig, batch: int = 1, cfg: bool = True,
              dtype: torch.dtype = torch.float32):
    """The engine's own answer: (plan, memory plan), as the sampler would build them."""
    c = KNOWN_MODELS[model] if isinstance(model, str) else model
    schedule = schedule_from_label(resolution)
    rows = batch * (2 if cfg else 1)
    _, plan = config.build(schedule, c.depth, c.num_heads, c.head_dim, rows, dtype)
    memory = plan_memory(c.depth, c.embed_dim, c.num_heads, c.ffn_hidden, c.d_vae, schedule, batch, config, dtype,
                         cfg=cfg)
    return plan, memory


def assert_rows_equal_plan(answer: dict, plan, memory) -> None:
    rows = answer["scales"]
    assert len(rows) == len(plan.kept) == answer["num_scales"] - 1  # the last scale is never stored
    tb = answer["token_bytes"]
    full = 0
    for si, (row, kept) in enumerate(zip(rows, plan.kept)):
        full += plan.tokens_per_scale[si]
        ds = sorted(plan.drafters[si])
        rs = [i for i in range(plan.num_layers) if i not in ds]
        assert row["full_tokens"] == full
        assert row["drafters"] == len(ds) and row["drafter_layers"] == ds and row["refiners"] == len(rs)
        assert row["drafter_tokens"] == (max(kept[i] for i in ds) if ds else None)
        assert row["refiner_tokens"] == max(kept[i] for i in rs)
        assert row["refiner_tokens_min"] == min(kept[i] for i in rs)
        assert row["stored_tokens"] == sum(kept)
        assert row["drafter_mb"] + row["refiner_mb"] == pytest.approx(row["stored_mb"])
        assert row["stored_mb"] == pytest.approx(sum(kept) * tb / MiB)
        assert row["full_mb"] == pytest.approx(full * plan.num_layers * tb / MiB)
        assert row["buffer_mb"] == pytest.approx(memory.per_scale_cache_mb[si])
    totals = answer["totals"]
    assert totals["stored_peak_mb"] == pytest.approx(memory.analytic_mb)
    assert totals["full_mb"] == pytest.approx(memory.full_analytic_mb)
    # beside the weights as the sampler admits a run: the cache planner's peak and one preview decode (the
    # released VAE's decoder without a loader's; these plans hold no quantized weights)
    from scalekv_core.job_memory import VAE_BASE_CH, VAE_PATCH
    from scalekv_core.kvcache.memory import preview_peak_bytes

    h, w = schedule_from_label(answer["resolution"]).pixel_size
    known = KNOWN_MODELS.get(answer["model"]["name"].removeprefix("infinity-"))
    preview = preview_peak_bytes(h, w, VAE_BASE_CH, VAE_PATCH[known.d_vae if known else 32]) / MiB
    assert totals["planned_peak_mb"] == pytest.approx(memory.sampling_peak_mb + preview)
    assert totals["cache_peak_mb"] == pytest.approx(memory.cache_peak_mb)
    assert max(r["stored_mb"] for r in rows) == pytest.approx(totals["stored_peak_mb"])


def test_default_2b_1024_is_the_papers_10_percent(post):
    status, answer = post({"resolution": "1024x1024 (1:1)", "model": "2b", "precision": "bf16"})
    assert status == 200, answer
    assert answer["budget_tokens"] == 650  # the paper: 10% of the 6425-token prefix, rounded up to 50
    assert answer["scales"][-1]["full_tokens"] == 6425
    # bf16 blocks, auto storage: fp32 keys + bf16 values; CFG doubles the rows: 2 x 16 heads x 128 x (4 + 2) bytes
    assert answer["token_bytes"] == 2 * 16 * 128 * 6
    assert answer["totals"]["full_mb"] == pytest.approx(6425 * 32 * 24576 / MiB)  # 4818.75 MB
    assert answer["scales"][-1]["drafters"] == 2  # the 2B's default drafters, as the released files chose
    plan, memory = core_plan("2b", "1024x1024 (1:1)", CacheConfig(policy="scalekv", budget="10%"),
                             dtype=torch.bfloat16)
    assert_rows_equal_plan(answer, plan, memory)


@pytest.mark.parametrize("body, model, config, batch, cfg", [
    (dict(policy="pyramidkv", budget_unit="tokens", budget=300, window=16, resolution="512x512 (1:1)", model="8b",
          batch=2), "8b", CacheConfig(policy="pyramidkv", budget=300, window=16), 2, True),
    (dict(policy="snapkv", budget_unit="MB", budget=200, kv_dtype="bf16", resolution="1024x1024 (1:1)", cfg=1.0),
     "2b", CacheConfig(policy="snapkv", budget="200MB", kv_dtype="bf16"), 1, False),
    (dict(policy="full"), "2b", CacheConfig(policy="full"), 1, True),
    (dict(policy="scalekv", budget=20, refiner_decay=30, window=9, resolution="768x768 (1:1)"), "2b",
     CacheConfig(policy="scalekv", budget="20%", window=9, refiner_decay=30.0), 1, True),
])
def test_answers_equal_the_engine_planner(post, body, model, config, batch, cfg):
    status, answer = post({**body, "precision": "fp32"})
    assert status == 200, answer
    plan, memory = core_plan(model, body.get("resolution", "1024x1024 (1:1)"), config, batch, cfg)
    assert_rows_equal_plan(answer, plan, memory)
    assert answer["batch_rows"] == batch * (2 if cfg else 1)


def test_mb_budget_fits_the_memory_target(post):
    status, answer = post({"policy": "snapkv", "budget_unit": "MB", "budget": 200, "precision": "fp32"})
    assert status == 200, answer
    assert answer["totals"]["stored_peak_mb"] <= 200
    assert answer["totals"]["stored_peak_mb"] > 199  # one token per layer more would not fit


def test_preset_capacities_are_the_released_files(post):
    status, answer = post({"budget_source": "preset:infinity-2b-10pct", "model": "2b"})
    assert status == 200, answer
    preset = json.loads(PRESET_2B.read_text())
    compressed = 0
    for row in answer["scales"]:
        entry = preset.get(f"Scale {row['scale'] + 2}")
        if row["full_tokens"] <= 650:  # the base capacity: nothing dropped yet
            assert row["refiner_tokens"] == row["full_tokens"]
            continue
        compressed += 1
        assert row["drafters"] == entry["High"]
        assert row["drafter_tokens"] == min(entry["Max"], row["full_tokens"])
        assert row["refiner_tokens"] == row["refiner_tokens_min"] == min(entry["Min"], row["full_tokens"])
    assert compressed == 5


def test_loader_file_gives_the_tiny_models_shape(post):
    tiny = json.loads((TINY / "config.json").read_text())["infinity_model_kwargs"]
    status, answer = post({"transformer": "infinity_tiny.safetensors", "resolution": "256x256 (1:1)",
                           "budget_unit": "tokens", "budget": 48, "window": 4})
    assert status == 200, answer
    m = answer["model"]
    assert (m["depth"], m["width"], m["heads"]) == (tiny["depth"], tiny["embed_dim"], tiny["num_heads"])
    assert m["source"] == "infinity_tiny.safetensors" and m["block_dtype"] == "float32"  # auto on the CPU
    assert answer["num_scales"] == 7 and answer["scales"][-1]["full_tokens"] == 1 + 4 + 16 + 36 + 64 + 144
    from scalekv_core.loader import load_transformer

    cfg = load_transformer(TINY / "infinity_tiny.safetensors").cfg
    plan, memory = core_plan(cfg, "256x256 (1:1)", CacheConfig(policy="scalekv", budget=48, window=4))
    assert_rows_equal_plan(answer, plan, memory)


@pytest.mark.parametrize("weights, tile", [("none", 0), ("fp8_e4m3fn", 32), ("int4", 32)])
def test_job_line_is_the_whole_job_planner_against_the_device(post, weights, tile):
    """The widget's fit line: the job planner's peak for the loader's formats and the sampler's decode tile, with T5
    offloaded (ComfyUI's memory manager frees it for the sampler), against the compute device's total memory."""
    import comfy.model_management as mm
    from scalekv_core.job_memory import JobOptions, plan_job

    status, answer = post({"model": "8b", "resolution": "1024x1024 (1:1)", "precision": "bf16",
                           "weight_format": weights, "decode_tile": tile})
    assert status == 200, answer
    job = answer["job"]
    want = plan_job("8b", 1024, 1024, 1, JobOptions(weights=weights, dtype="bf16", t5_offload=True,
                                                    decode_tile=tile or None, policy="scalekv", budget="10%",
                                                    previews=True))
    assert job["peak_mb"] == pytest.approx(want.peak_mb) and job["sampling_mb"] == pytest.approx(want.sampling_mb)
    total = mm.get_total_memory(mm.get_torch_device()) / MiB
    assert job["device_mb"] == pytest.approx(total) and job["fits"] == (want.peak_mb <= total)
    assert ("fits" if job["fits"] else "does not fit") in job["line"] and f"{want.peak_mb / 1024:.2f} GiB" in job["line"]


def test_a_gpus_job_must_fit_beside_comfyuis_reserve(post, monkeypatch):
    """On a GPU ComfyUI keeps its reserve free whatever loads (400 MB; 600 on Windows): the 8B in fp8 with a tiled
    decode and previews (11.0 GiB planned) fits a 12 GiB card, but not one of 11.2 GiB, where the reserve leaves
    10.8 (the line had said "fits" against the whole card). A pretend CUDA device: only its sizes are read."""
    import comfy.model_management as mm

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: gpu)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 400 * MiB)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 11 * 2**30)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    body = {"model": "8b", "resolution": "1024x1024 (1:1)", "precision": "bf16", "weight_format": "fp8_e4m3fn",
            "decode_tile": 32}
    answers = {}
    for gib in (12.0, 11.2):
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False, g=gib: int(g * 2**30))
        status, answers[gib] = post(body)
        assert status == 200, answers[gib]
    big, small = answers[12.0]["job"], answers[11.2]["job"]
    assert big["peak_mb"] == small["peak_mb"] and 10.8 * 1024 < big["peak_mb"] < 11.2 * 1024
    assert big["fits"] and not small["fits"] and small["reserved_mb"] == 400
    assert "0.4 GiB of it kept free by ComfyUI: does not fit" in small["line"]


def test_a_capped_servers_cpu_is_as_large_as_its_cap(post, pack, monkeypatch):
    """On the CPU the fit line measures the job against what the server may hold: the host's total, or its
    cgroup's or RLIMIT_AS's limit where that is smaller (a 64 GiB host, a 4 GiB cap: the 8B in int4 does not fit)."""
    import importlib

    import comfy.model_management as mm

    host_memory = importlib.import_module(f"{pack.__name__}.scalekv_core.host_memory")
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: 64 * 2**30)
    body = {"model": "8b", "resolution": "1024x1024 (1:1)", "precision": "bf16", "weight_format": "int4",
            "decode_tile": 32}
    status, free = post(body)
    assert status == 200 and free["job"]["fits"] and free["job"]["device_mb"] == 64 * 1024, free
    monkeypatch.setattr(host_memory, "process_caps", lambda: [host_memory.Cap("cgroup x", 4 << 30, 3 << 30)])
    status, capped = post(body)
    assert status == 200 and capped["job"]["device_mb"] == 4 * 1024, capped
    assert not capped["job"]["fits"] and " of 4.0 GiB on cpu: does not fit" in capped["job"]["line"]


def test_job_reads_the_loaders_t5_and_vae(post):
    """With the loader's files the job is sized from them (the embedded-size tiny T5 and VAE), not from T5-XL."""
    status, answer = post({"transformer": "infinity_tiny.safetensors", "vae": "vae_tiny.safetensors",
                           "text_encoder": "t5_tiny", "resolution": "256x256 (1:1)", "budget_unit": "tokens",
                           "budget": 48, "window": 4, "t5_weights": "int8"})
    assert status == 200, answer
    from safetensors.torch import load_file
    from transformers import T5Config

    t5 = T5Config.from_pretrained(TINY / "t5_tiny")
    linear = t5.num_layers * (4 * t5.d_model * t5.num_heads * t5.d_kv + 3 * t5.d_model * t5.d_ff)
    assert answer["job"]["t5_mb"] < 2 * linear / MiB  # 8-bit linears: about 1 byte each, not T5-XL's 1.2 GiB
    assert answer["job"]["t5_mb"] > linear / MiB
    # what the loader holds: the decoder and quantizer (generation never encodes)
    vae = sum(t.numel() for k, t in load_file(TINY / "vae_tiny.safetensors").items() if not k.startswith("encoder."))
    assert answer["job"]["vae_mb"] == pytest.approx(4 * vae / MiB)


def test_job_sizes_a_single_file_t5_as_its_folder(post):
    """A single-file T5 encoder (in the loader's menu, and loadable) is sized from its tensors' shapes: the same job
    as the folder it was saved from, not a 400 for a missing config.json."""
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    module = T5EncoderModel.from_pretrained(TINY / "t5_tiny")
    path = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0]) / "t5_tiny_route_single.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))  # (tied to shared.weight, as ComfyUI's single files have it)
    try:
        body = {"transformer": "infinity_tiny.safetensors", "resolution": "256x256 (1:1)", "budget_unit": "tokens",
                "budget": 48, "window": 4}
        status, from_file = post({**body, "text_encoder": path.name})
        assert status == 200, from_file
        status, from_folder = post({**body, "text_encoder": "t5_tiny"})
        assert status == 200, from_folder
        assert from_file["job"]["t5_mb"] == from_folder["job"]["t5_mb"]
        assert from_file["job"]["t5_mb"] < 100  # the tiny encoder, not T5-XL
    finally:
        path.unlink()


def test_pth_transformer_is_read_without_loading_it(post):
    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    target = folder / "tiny_copy.pth"
    shutil.copy(TINY / "infinity_tiny.pth", target)
    try:
        status, answer = post({"transformer": "tiny_copy.pth", "resolution": "256x256 (1:1)"})
    finally:
        target.unlink()
    assert status == 200, answer
    assert (answer["model"]["depth"], answer["model"]["width"]) == (4, 128)


def test_pre_quantized_transformer_gives_its_shape(post, tmp_path):
    from scalekv_core.loader import load_transformer
    from scalekv_core.model.quant import save_quantized

    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    target = folder / "tiny_int4.safetensors"
    save_quantized(load_transformer(TINY / "infinity_tiny.safetensors", weights="int4"), target)
    try:
        status, answer = post({"transformer": "tiny_int4.safetensors", "resolution": "256x256 (1:1)"})
    finally:
        target.unlink()
    assert status == 200, answer
    assert (answer["model"]["depth"], answer["model"]["width"], answer["model"]["heads"]) == (4, 128, 4)


# the loader's tiny T5 and VAE too: with T5-XL the encode phase would be the peak whatever the transformer holds
TINY_JOB = {"resolution": "256x256 (1:1)", "budget_unit": "tokens", "budget": 48, "window": 4,
            "vae": "vae_tiny.safetensors", "text_encoder": "t5_tiny"}


def tiny_job_plan(cfg, weights: str):
    """The whole-job planner's answer for the tiny model at 256x256 as the route plans TINY_JOB (blocks in fp32,
    the CPU's auto precision; T5 offloaded, previews; the tiny T5's and VAE's own sizes)."""
    from safetensors.torch import load_file

    from scalekv_core.job_memory import JobOptions, plan_job, t5_shape

    t5 = t5_shape(json.loads((TINY / "t5_tiny" / "config.json").read_text()))
    from scalekv_core.loader import load_vae

    vae = sum(t.numel() for k, t in load_file(TINY / "vae_tiny.safetensors").items() if not k.startswith("encoder."))
    shape = load_vae(TINY / "vae_tiny.safetensors").cfg
    return plan_job(cfg, 256, 256, 1, JobOptions(weights=weights, dtype="fp32", t5_offload=True, previews=True),
                    cache=CacheConfig(policy="scalekv", budget=48, window=4), t5=t5, vae_params=vae,
                    vae_shape=(shape.base_ch, shape.patch_size))


def test_job_decode_is_the_samplers_own_plan_for_the_loaders_vae(post, loaded):
    """The widget's decode figure is sized from the loader's VAE (its decoder's width and patch), as the sampler's
    admission sizes it from the loaded VAE: one figure, not the released VAE's for any file (it said 256 GiB where
    the sampler planned 144 for the embedded model at 1024x1024, batch 64)."""
    status, answer = post({**TINY_JOB, "resolution": "1024x1024 (1:1)", "batch": 4, "transformer":
                           "infinity_tiny.safetensors"})
    assert status == 200, answer
    job = answer["job"]
    decode_extra = job["decode_mb"] - job["transformer_mb"] - job["vae_mb"]  # T5 offloaded
    _, sampler_decode = loaded[0].peaks_mb(schedule_from_label("1024x1024 (1:1)"), 4, None)
    assert decode_extra == pytest.approx(sampler_decode, rel=1e-9)


@pytest.fixture
def prequantized():
    """write(fmt, name) puts a pre-quantized copy of the tiny transformer (as `convert --weights fmt` writes it) in
    the models folder; removed afterwards."""
    from scalekv_core.loader import load_transformer
    from scalekv_core.model.quant import save_quantized

    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    written: list[pathlib.Path] = []

    def write(fmt: str, name: str) -> pathlib.Path:
        target = folder / name
        save_quantized(load_transformer(TINY / "infinity_tiny.safetensors", weights=fmt), target)
        written.append(target)
        return target

    yield write
    for target in written:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "int8", "int4"])
def test_job_plans_a_pre_quantized_files_own_format(post, prequantized, fmt):
    """The loader takes a pre-quantized file with weight_format none and holds it in the file's format: the whole
    job is planned in that format (read from the file's metadata), not in the block dtype."""
    from scalekv_core.checkpoint import safetensors_metadata
    from scalekv_core.loader import load_transformer
    from scalekv_core.model.quant import file_format

    target = prequantized(fmt, f"tiny_pre_{fmt}.safetensors")
    declared, _group = file_format(safetensors_metadata(target), str(target))
    assert declared == fmt
    cfg = load_transformer(target).cfg
    want, plain = tiny_job_plan(cfg, declared), tiny_job_plan(cfg, "none")
    assert want.transformer_mb < plain.transformer_mb and want.peak_mb != plain.peak_mb
    for weight_format in ("none", fmt):  # the loader accepts both for this file, and holds the same weights
        status, answer = post({**TINY_JOB, "transformer": target.name, "weight_format": weight_format})
        assert status == 200, answer
        job = answer["job"]
        assert job["transformer_mb"] == pytest.approx(want.transformer_mb, rel=1e-12), (weight_format, job)
        assert job["peak_mb"] == pytest.approx(want.peak_mb, rel=1e-12), (weight_format, job)
        assert job["sampling_mb"] == pytest.approx(want.sampling_mb, rel=1e-12), (weight_format, job)
        assert job["transformer_mb"] != pytest.approx(plain.transformer_mb)
        assert f"weights {fmt}" in job["setting"] and f"{want.peak_mb / 1024:.2f} GiB" in job["line"]
    # the unquantized original with weight_format none is still planned in the block dtype
    status, answer = post({**TINY_JOB, "transformer": "infinity_tiny.safetensors", "weight_format": "none"})
    assert status == 200, answer
    assert answer["job"]["transformer_mb"] == pytest.approx(plain.transformer_mb, rel=1e-12)
    assert answer["job"]["peak_mb"] == pytest.approx(plain.peak_mb, rel=1e-12)


def test_job_follows_a_rewritten_pre_quantized_file(post, prequantized):
    """The format is cached per file and modification time: a file converted again in place is read again."""
    from scalekv_core.loader import load_transformer

    target = prequantized("int4", "tiny_pre_rewritten.safetensors")
    cfg = load_transformer(target).cfg
    status, answer = post({**TINY_JOB, "transformer": target.name})
    assert status == 200, answer
    assert answer["job"]["transformer_mb"] == pytest.approx(tiny_job_plan(cfg, "int4").transformer_mb, rel=1e-12)
    mtime = target.stat().st_mtime
    prequantized("fp8_e4m3fn", target.name)
    os.utime(target, (mtime + 10, mtime + 10))  # a coarse clock could give the rewrite the same time
    status, answer = post({**TINY_JOB, "transformer": target.name})
    assert status == 200, answer
    assert answer["job"]["transformer_mb"] == pytest.approx(tiny_job_plan(cfg, "fp8_e4m3fn").transformer_mb,
                                                            rel=1e-12)


def test_job_refuses_another_quantized_format_than_the_files(post, prequantized):
    """weight_format int8 on an int4 file is the loader's error; the widget says so, naming the file and both."""
    target = prequantized("int4", "tiny_pre_mismatch.safetensors")
    status, answer = post({**TINY_JOB, "transformer": target.name, "weight_format": "int8"})
    assert status == 400, answer
    error = answer["error"]
    assert error.startswith("weight_format: ") and target.name in error, error
    assert "already quantized as int4" in error and "int8" in error, error
    from scalekv_core.checkpoint import CheckpointError
    from scalekv_core.loader import load_transformer

    with pytest.raises(CheckpointError, match="already quantized as int4"):  # what the loader itself says
        load_transformer(target, weights="int8")


def test_report_rows_join_measured_with_planned(post, run, loaded, encoded, config_inputs, sampler_inputs):
    """The widget's figures before a run (from the loader's file) are what the run then holds and reports."""
    settings = dict(policy="scalekv", budget_unit="tokens", budget=48.0, window=4)
    config = run("ScaleKVCacheConfig", **config_inputs(**settings)).result[0]
    out = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config,
              **sampler_inputs(seed=3))
    [report] = out.ui["scalekv_memory"]
    status, measured = post({"report": report})
    assert status == 200, measured
    status, planned = post({**settings, "transformer": "infinity_tiny.safetensors", "vae": "vae_tiny.safetensors",
                            "resolution": "256x256 (1:1)"})  # the loader's files, as the widget sends them
    assert status == 200, planned
    assert measured["mode"] == "report" and planned["mode"] == "plan"
    keys = ("full_tokens", "drafters", "drafter_tokens", "refiner_tokens", "stored_tokens", "stored_mb", "full_mb")
    assert [{k: r[k] for k in keys} for r in measured["scales"]] == [{k: r[k] for k in keys} for r in planned["scales"]]
    for row, s in zip(measured["scales"], report["scales"]):
        m = row["measured"]
        assert m["stored_mb"] == pytest.approx(sum(s["stored_bytes"]) / MiB)
        assert m["stored_tokens"] == sum(s["held_tokens"]) == row["stored_tokens"]
        assert m["matches_plan"] is True
    assert any(r["drafters"] for r in measured["scales"])  # drafters known although the report has no list
    assert measured["measured"]["peak_mb"] == report["measured_peak_mb"] > 0
    # one planned peak on both nodes: prompts up to 512 tokens, as the config widget and the admission check plan
    assert measured["totals"]["planned_peak_mb"] == pytest.approx(planned["totals"]["planned_peak_mb"])
    assert measured["totals"]["planned_peak_mb"] == report["planned_peak_max_prompt_mb"]
    assert measured["text_tokens"] == planned["text_tokens"] == 512
    # the engine's figure for this short prompt is kept beside it, and is smaller
    assert measured["totals"]["prompt_peak_mb"] == report["planned_peak_mb"] < report["planned_peak_max_prompt_mb"]
    assert measured["last_scale"] == planned["last_scale"] == {"scale": 6, "grid": [16, 16], "new_tokens": 256}


def test_older_report_keeps_its_own_planned_peak(post, report):
    """A report made before the sampler sent the 512-token figure: its own peak, and no prompt limit claimed."""
    old = {k: v for k, v in report.items() if k != "planned_peak_max_prompt_mb"}
    status, answer = post({"report": old})
    assert status == 200, answer
    assert answer["totals"]["planned_peak_mb"] == report["planned_peak_mb"] and answer["text_tokens"] is None


def test_a_reports_notes_reach_the_widget(post, report):
    """The run's budget-plan notes (a file calibrated for another budget) are shown with its figures; a report
    without notes shows none, and notes are bounded like every other field."""
    assert report["notes"] == []
    status, answer = post({"report": report})
    assert status == 200 and answer["note"] is None, answer
    status, answer = post({"report": {**report, "notes": ["x.json was calibrated for a budget of 650 tokens"]}})
    assert status == 200 and answer["note"] == "x.json was calibrated for a budget of 650 tokens", answer
    status, answer = post({"report": {**report, "notes": ["n" * 5000]}})
    assert status == 400 and "report.notes.0" in answer["error"], answer
    for wrong in ("a note", [float("nan")], [1], ["x"] * 9):  # a string, NaN, a number, too many
        status, answer = post({"report": {**report, "notes": wrong}})
        assert status == 400 and "report.notes" in answer["error"], (wrong, answer)


def test_last_scale_is_named_never_stored(post):
    status, answer = post({"resolution": "1024x1024 (1:1)", "model": "2b"})
    assert status == 200, answer
    assert answer["last_scale"] == {"scale": 12, "grid": [64, 64], "new_tokens": 4096}
    assert [r["scale"] for r in answer["scales"]] == list(range(12))


CALIBRATION = {"filename_prefix": "mycal", "resolution": "1024x1024 (1:1)", "budget": 10.0}


def test_linked_calibration_plans_its_file(post):
    """budget_file linked from ScaleKV Calibrate: the file its widgets name, once it is in models/scalekv."""
    scalekv = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])
    body = {"model": "2b", "resolution": "1024x1024 (1:1)", "precision": "fp32", "calibration": CALIBRATION}
    status, before = post(body)
    assert status == 200, before
    assert before["budget_file"] is None
    assert "mycal_1024x1024_10pct.json is not in models/scalekv yet" in before["budget_file_note"]
    plan, memory = core_plan("2b", "1024x1024 (1:1)", CacheConfig(policy="scalekv", budget="10%"))
    assert_rows_equal_plan(before, plan, memory)  # budget_source's plan meanwhile
    target = scalekv / "mycal_1024x1024_10pct.json"
    shutil.copy(PRESET_2B, target)
    try:
        status, after = post(body)
        status_full, full = post({**body, "policy": "full"})
        plan, memory = core_plan("2b", "1024x1024 (1:1)", CacheConfig(policy="scalekv", budget="10%",
                                                                      budget_file=str(target)))
    finally:
        target.unlink()
    assert status == 200, after
    assert after["budget_file"] == "mycal_1024x1024_10pct.json" and "written by the linked" in after["budget_file_note"]
    assert_rows_equal_plan(after, plan, memory)
    assert after["scales"] != before["scales"]
    # another policy sets the file aside, as the node does: the full cache's plan, with the node's note
    assert status_full == 200 and full["policy"] == "full" and full["budget_file"] is None, full
    assert "is not used: only the scalekv policy reads budget files (policy is full)" in full["budget_file_note"]


def node_message(node_classes, **fields) -> str:
    result = node_classes["ScaleKVCacheConfig"].validate_inputs(**fields)
    assert isinstance(result, str), result
    return result


@pytest.mark.parametrize("fields", [
    dict(budget=0.0), dict(budget=150.0, budget_unit="percent"), dict(budget=10.5, budget_unit="tokens"),
    dict(window=5), dict(kernel=4), dict(policy="nope"), dict(budget_unit="GB"),
    dict(budget_source="file:missing.json"),
])
def test_bad_settings_are_400_with_the_nodes_message(post, node_classes, fields):
    status, answer = post(fields)
    assert status == 400
    expected = node_message(node_classes, **{"policy": "scalekv", "budget_unit": "percent", "budget": 10.0,
                                             "window": 16, "kernel": 5, "budget_source": "generated", **fields})
    assert answer == {"error": expected}


@pytest.mark.parametrize("body, words", [
    (dict(resolution="100x100 (1:1)"), "resolution: unsupported resolution '100x100 (1:1)'"),
    (dict(model="70b"), "model: unknown model '70b'"),
    (dict(budget="ten"), "budget: expected a number from above 0 to 100, got 'ten'"),
    (dict(window=True), "window: expected a whole number from 1 to 4096, got True"),
    (dict(batch=0), "batch: Input should be greater than or equal to 1"),
    (dict(batch=65), "batch: Input should be less than or equal to 64"),
    (dict(kernel=1000000001), "kernel: 1000000001 is out of range; expected an odd whole number from 1 to 63"),
    (dict(kernel=6), "kernel: 6 is even"),
    (dict(refiner_decay=1e308), "refiner_decay: 1e+308 is out of range"),
    (dict(refiner_decay=float("nan")), "refiner_decay: expected a number from 0 to 1000, got nan"),
    (dict(cfg=float("nan")), "cfg: Input should be a finite number"),
    (dict(policy=["scalekv"]), "policy: unknown value ['scalekv']"),
    (dict(pooling="median"), "pooling: Input should be"),
    (dict(batch="2"), "batch: Input should be a valid integer"),
    (dict(transformer="nothing_here.safetensors"), "nothing_here.safetensors"),
    (dict(transformer="../../etc/passwd"), "is not a name inside a model folder"),
    (dict(precision="fp8"), "precision: unknown precision 'fp8'"),
    (dict(budget_source="preset:infinity-8b-10pct", model="2b"), "a model of 40 layers, but this model has 32"),
    (dict(weight_format="int3"), "weight_format: Input should be"),
    (dict(t5_weights="int4"), "t5_weights: Input should be"),
    (dict(decode_tile=513), "decode_tile: Input should be less than or equal to 512"),
    (dict(block_swap=-1), "block_swap: Input should be greater than or equal to 0"),
    (dict(block_swap=31, model="2b"), "block_swap: 31 blocks, but the model has 32"),  # two stay on the device
    (dict(text_encoder="../../etc"), "is not a name inside a model folder"),
    (dict(report=[1, 2]), "report: Input should be a valid dictionary"),
    (dict(report={"scales": []}), "report.scales: List should have at least 1 item"),
])
def test_bad_requests_name_the_field(post, body, words):
    status, answer = post(body)
    assert status == 400, answer
    assert words in answer["error"], answer


def test_body_that_is_not_json_is_400(post):
    status, answer = post(None, raw=b"{nope")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = post([1, 2])
    assert status == 400 and "expected a JSON object" in answer["error"]
    status, answer = post(None, raw=b"[" * 100_000 + b"]" * 100_000)  # RecursionError in json.loads: was a 500
    assert status == 400 and "nested too deeply" in answer["error"]


def test_huge_values_are_never_echoed(post):
    status, answer = post({"policy": "x" * 500_000})
    assert status == 400 and "policy:" in answer["error"] and len(json.dumps(answer)) < 2000
    status, answer = post({"resolution": "9" * 500_000})
    assert status == 400 and len(json.dumps(answer)) < 2000
    status, answer = post(None, raw=json.dumps({"policy": "x" * (2 << 20)}).encode())  # over the 1 MB cap
    assert status == 413 and len(json.dumps(answer)) < 500


@pytest.fixture
def report(run, loaded, encoded, config_inputs, sampler_inputs):
    """A real scalekv_memory report of a tiny run (ScaleKV, 48 tokens)."""
    config = run("ScaleKVCacheConfig", **config_inputs(budget_unit="tokens", budget=48.0, window=4)).result[0]
    out = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs(seed=3))
    return json.loads(json.dumps(out.ui["scalekv_memory"][0]))


def _with(report: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(report))
    *head, last = path.split(".")
    node = out
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return {"report": out}


@pytest.mark.parametrize("path, value, words", [
    ("model.depth", 10_000_000, "report.model.depth: Input should be less than or equal to 256"),
    ("model.depth", 100_000_000, "report.model.depth"),
    ("model.heads", 0, "report.model.heads: Input should be greater than or equal to 1"),
    ("model.width", "wide", "report.model.width"),
    ("model.depth", 3, "report.scales.0.planned_tokens: 4 layers for a model of depth 3"),
    ("scales.0.planned_tokens", "all", "report.scales.0.planned_tokens"),
    ("scales.0.planned_tokens", [1.5, 2, 3, 4], "report.scales.0.planned_tokens.0"),
    ("scales.1.held_tokens", {"a": 1}, "report.scales.1.held_tokens"),
    ("scales.2.stored_bytes", [-1, 0, 0, 0], "report.scales.2.stored_bytes.0"),
    ("policy", "scalekv", "report.policy"),
    ("policy.kernel", 1000000001, "report.policy.kernel"),
    ("policy.refiner_decay", 1e308, "report.policy.refiner_decay"),
    ("full_analytic_mb", "lots", "report.full_analytic_mb"),
    ("batch_rows", 0, "report.batch_rows"),
    ("scales", [], "report.scales"),
    ("schedule.size", "x" * 1000, "report.schedule.size"),
])
def test_bad_report_fields_are_400_naming_the_field(post, report, path, value, words):
    """Every report field is typed and bounded: depth 1e7 kept the server busy 130 s and took 2.7 GB."""
    import time

    t0 = time.perf_counter()
    status, answer = post(_with(report, path, value))
    assert status == 400, answer
    assert words in answer["error"], answer
    assert time.perf_counter() - t0 < 5 and len(json.dumps(answer)) < 2000


def test_report_budget_file_is_resolved_like_the_node(post, report, tmp_path):
    """Only files inside models/scalekv are read: an outside path is refused without revealing it or its keys."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"TOPSECRETKEY": 1}))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    cases = [str(secret), str(tmp_path / "missing.json"), "/dev/zero", str(fifo), str(tmp_path),
             "../../../../" + str(secret), "/etc/passwd"]
    answers = []
    for path in cases:
        status, answer = post(_with(report, "policy.budget_file", path))
        answers.append((status, answer))
        assert status == 200, (path, answer)  # the rows still come back; the drafters are unknown
        assert "TOPSECRETKEY" not in json.dumps(answer)
        assert answer["note"].startswith("drafter layers unknown"), answer["note"]
    # a present and an absent outside file get the same answer: nothing is revealed
    assert answers[0][1]["note"].replace("secret", "X") == answers[1][1]["note"].replace("missing", "X")


def test_register_needs_a_running_server(routes):
    assert routes.register() is False  # in-process tests have no PromptServer routes: nothing is registered


def test_job_setting_names_the_planned_cache_and_t5_dtype(post, monkeypatch):
    """The job line's tooltip said 'T5 fp16 offloaded, whole decode, full cache' for the default Cache Config
    (ScaleKV 10%), whose numbers it planned; and fp16 T5 on the CPU, where the loader holds T5 in fp32."""
    import comfy.model_management as mm

    from scalekv_core.kvcache.budget import PRESETS

    from scalekv_core.job_memory import t5_bytes

    status, answer = post({})
    assert status == 200, answer
    setting = answer["job"]["setting"]
    assert "scalekv 10%" in setting and "full cache" not in setting, setting
    assert "T5 fp32 offloaded" in setting, setting  # this test host runs on the CPU
    assert answer["job"]["t5_mb"] == pytest.approx(t5_bytes("none", dtype="fp32") / MiB)  # and sized so
    status, answer = post({**TINY_JOB, "policy": "full"})
    assert status == 200 and "full cache" in answer["job"]["setting"], answer
    status, answer = post(TINY_JOB)
    assert status == 200 and "scalekv 48 tokens" in answer["job"]["setting"], answer
    status, answer = post({"budget_source": "preset:" + next(iter(PRESETS)), "kv_dtype": "int8"})
    assert status == 200, answer
    assert f"with preset budget {next(iter(PRESETS))}" in answer["job"]["setting"]
    assert "KV stored in int8" in answer["job"]["setting"]
    status, answer = post({"t5_weights": "int8"})
    assert status == 200 and "T5 int8 offloaded" in answer["job"]["setting"], answer
    # where T5 runs on CUDA the loader holds it in fp16, unless the loader's precision is fp32; a T5 on another
    # device than the one planned (here the CPU) takes none of its memory
    monkeypatch.setattr(mm, "text_encoder_device", lambda: __import__("torch").device("cuda", 0))
    status, answer = post({})
    assert status == 200 and "T5 fp16 on another device" in answer["job"]["setting"], answer
    assert answer["job"]["t5_mb"] == 0 and answer["job"]["encode_mb"] == 0
    status, answer = post({"precision": "fp32"})
    assert status == 200 and "T5 fp32 on another device" in answer["job"]["setting"], answer


def test_a_files_header_is_read_once_per_change_even_when_broken(post, routes, monkeypatch):
    """The widget posts on every change: a broken transformer file is read once and its error answered again (it
    was re-read on every request), and a rewritten file (a new mtime) is read afresh."""
    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    target = folder / "tiny_broken_header.safetensors"
    target.write_bytes((8).to_bytes(8, "little") + b'{"a": 1}')
    reads = []
    real = routes.transformer_config_of
    monkeypatch.setattr(routes, "transformer_config_of", lambda path: reads.append(path) or real(path))
    try:
        answers = [post({"transformer": target.name, "resolution": "256x256 (1:1)"}) for _ in range(3)]
        assert [status for status, _ in answers] == [400] * 3
        assert answers[0][1] == answers[2][1] and "tiny_broken_header" in answers[0][1]["error"]
        assert len(reads) == 1
        shutil.copy(TINY / "infinity_tiny.safetensors", target)
        mtime = target.stat().st_mtime
        os.utime(target, (mtime + 10, mtime + 10))  # a coarse clock could give the rewrite the same time
        status, answer = post({"transformer": target.name, "resolution": "256x256 (1:1)"})
        assert status == 200, answer
        assert (answer["model"]["depth"], answer["model"]["width"]) == (4, 128) and len(reads) == 2
    finally:
        target.unlink()


def test_a_calibrated_file_at_another_budget_is_noted_in_the_widget(post):
    """A budget file from models/scalekv whose measurements say it was calibrated for 650 tokens, planned at 20%
    (1300 tokens): the widget's note names the file and both budgets; at 650 tokens it says nothing."""
    scalekv = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])
    target, side = scalekv / "noted_1024x1024_10pct.json", scalekv / "noted_1024x1024_10pct.asi.json"
    shutil.copy(PRESET_2B, target)
    side.write_text(json.dumps({"settings": {"budget_tokens": 650}}))
    body = {"model": "2b", "resolution": "1024x1024 (1:1)", "budget_source": f"file:{target.name}"}
    try:
        answers = [post({**body, "budget_unit": "percent", "budget": 20.0}),
                   post({**body, "budget_unit": "tokens", "budget": 650})]
    finally:
        target.unlink()
        side.unlink()
    (status, other), (status_same, same) = answers
    assert status == status_same == 200, answers
    assert other["budget_tokens"] == 1300 and same["budget_tokens"] == 650
    note = other["budget_file_note"]
    assert "noted_1024x1024_10pct.json was calibrated for a budget of 650 tokens" in note and "is 1300" in note
    assert same["budget_file_note"] is None


def test_a_job_that_fits_the_card_but_not_what_is_free_says_so(post, monkeypatch):
    """The sampler admits a run by the memory free when it starts: on a GPU, a job within the card but beyond what
    other programs leave says so, where the line said "fits" and the run was then refused. Not on the CPU, where
    unloading frees no RAM and the figure would mislead either way. (A pretend CUDA device: sizes only.)"""
    import comfy.model_management as mm

    body = {"model": "8b", "resolution": "1024x1024 (1:1)", "precision": "bf16", "weight_format": "int4",
            "decode_tile": 32}
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: 64 * 2**30)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 2 * 2**30)
    status, cpu = post(body)
    assert status == 200 and cpu["job"]["line"].endswith(": fits"), cpu
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: gpu)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 0)
    lines = {}
    for free_gib in (40, 2):
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False, f=free_gib: f * 2**30)
        status, answer = post(body)
        assert status == 200, answer
        lines[free_gib] = answer["job"]
    assert lines[40]["fits"] and lines[40]["line"].endswith(": fits")
    assert lines[2]["fits"] and lines[2]["available_mb"] == 2048
    assert "fits the card, but only 2.0 GiB is available now" in lines[2]["line"]


def test_a_read_failing_for_the_moment_is_not_kept(post, routes, monkeypatch):
    """An OSError (permissions, a file held by a download) can pass without the file changing: it is answered but
    not kept, so the next request reads again; and a dead entry in ComfyUI's loaded models is skipped."""
    import comfy.model_management as mm

    folder = pathlib.Path(folder_paths.get_folder_paths("infinity")[0])
    target = folder / "tiny_locked.safetensors"
    shutil.copy(TINY / "infinity_tiny.safetensors", target)
    calls = []
    real = routes.transformer_config_of

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(routes, "transformer_config_of", flaky)
    dead = type("Dead", (), {"model": None, "device": torch.device("cpu"),
                             "model_loaded_memory": lambda self: 1 / 0})()
    monkeypatch.setattr(mm, "current_loaded_models", [dead, *mm.current_loaded_models])
    try:
        status, first = post({"transformer": target.name, "resolution": "256x256 (1:1)"})
        status2, second = post({"transformer": target.name, "resolution": "256x256 (1:1)"})
    finally:
        target.unlink()
    assert status == 400 and "Permission denied" in first["error"], first
    assert status2 == 200 and second["model"]["depth"] == 4 and len(calls) == 2, second


def test_an_ordinary_checkpoints_format_is_read_once(post, routes, monkeypatch):
    """An ordinary checkpoint declares no format (None): that answer is kept like any other, not read again on
    every widget change."""
    calls = []
    real = routes.declared_format
    monkeypatch.setattr(routes, "declared_format", lambda path: calls.append(path) or real(path))
    monkeypatch.setattr(routes, "_header_cache", {})
    for _ in range(3):
        status, answer = post({**TINY_JOB, "transformer": "infinity_tiny.safetensors"})
        assert status == 200, answer
    assert len(calls) == 1


def _with_extra_entry(src: pathlib.Path, dst: pathlib.Path, name: str, entry: dict) -> None:
    """A copy of a safetensors file whose header gains one entry (the data unchanged)."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[name] = entry
    text = json.dumps(header).encode()
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("shape", [[10**99] * 8000, [-(10**11)]], ids=["huge", "negative"])
def test_a_vae_header_that_lies_about_a_shape_is_a_quick_400(post, shape):
    """The planner sums the VAE's tensor sizes from its header: a lying entry (8,000 dimensions of 10^99 took
    seconds of big-number products per request with the GIL held, then a 500; a negative one planned the VAE at
    -381,466 MB) is the same 400 naming the file as the loader's refusal, in milliseconds."""
    import time

    folder = pathlib.Path(folder_paths.get_folder_paths("vae")[0])
    target = folder / "lying_vae.safetensors"
    _with_extra_entry(TINY / "vae_tiny.safetensors", target, "decoder.bogus",
                      {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]})
    try:
        start = time.monotonic()
        status, answer = post({**TINY_JOB, "vae": target.name})
        took = time.monotonic() - start
    finally:
        target.unlink()
    assert status == 400 and answer["error"].startswith("vae: ") and "lying_vae.safetensors" in answer["error"], answer
    assert "'decoder.bogus'" in answer["error"] and took < 2, (answer, took)


def test_a_single_file_t5_of_zero_width_is_a_400_naming_it(post):
    """A single-file T5 whose relative attention table has 0 heads divided by zero (a 500 on every request)."""
    from safetensors.torch import save_file
    from transformers import T5EncoderModel

    module = T5EncoderModel.from_pretrained(TINY / "t5_tiny")
    sd = {k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 0)
    path = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0]) / "t5_zero_heads.safetensors"
    save_file(sd, str(path))
    try:
        status, answer = post({**TINY_JOB, "text_encoder": path.name})
    finally:
        path.unlink()
    assert status == 400 and "t5_zero_heads.safetensors: not a usable T5 encoder file: its heads is 0" in \
        answer["error"], answer


@pytest.mark.parametrize("name", [".", "./", "t5_tiny/.."])
def test_a_model_folder_itself_is_no_text_encoder(post, name):
    """"." named the text_encoders folder itself: every request walked the whole tree for its version (0.5 s with
    40,000 files) and kept that listing in the cache. Refused by name, before any walk."""
    status, answer = post({**TINY_JOB, "text_encoder": name})
    assert status == 400 and answer["error"].startswith("text_encoder: ") and \
        "names a model folder itself" in answer["error"], answer


def test_a_text_encoder_folder_needs_its_config(post):
    """A folder without config.json is no T5 folder: not found, with what one holds (it was walked, then a 400
    about config.json that the cache kept with the folder's whole listing)."""
    folder = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0]) / "not_a_t5"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "x.bin").write_bytes(b"0")
    try:
        status, answer = post({**TINY_JOB, "text_encoder": "not_a_t5"})
    finally:
        shutil.rmtree(folder)
    assert status == 400 and "T5 text encoder folder 'not_a_t5' not found" in answer["error"], answer
    assert "config.json" in answer["error"]


def test_the_trained_resolution_is_read_once_per_file_version(post, routes, monkeypatch):
    """The sampler's "auto" resolution reads the transformer's metadata; like its shapes, once per version of the
    file (it parsed the whole header, up to 100 MB, on every request)."""
    calls = []
    real = routes.native_resolution
    monkeypatch.setattr(routes, "native_resolution", lambda path: calls.append(path) or real(path))
    monkeypatch.setattr(routes, "_header_cache", {})
    body = {**TINY_JOB, "transformer": "infinity_tiny.safetensors", "resolution": "auto (the model's own size)"}
    for _ in range(3):
        status, answer = post(body)
        assert status == 200, answer
    assert len(calls) == 1
