"""Infinity Sampler: the engine's image bit for bit, the memory report, per-scale progress with previews, interrupts."""
from __future__ import annotations

import gc
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils

from scalekv_core.kvcache import CacheConfig
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import schedule_from_label

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
RES = "256x256 (1:1)"


@pytest.fixture(scope="module")
def engine():
    """The engine on its own (its own copy of scalekv_core, loaded from the original test files)."""
    return InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                       TINY / "t5_tiny")


@pytest.fixture
def progress(monkeypatch):
    """Record ComfyUI ProgressBar updates as the server's hook receives them."""
    calls = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        calls.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return calls


def live_caches() -> list:
    """Every KV cache object still alive (of any copy of the engine) and the tensors it still holds."""
    gc.collect()
    out = []
    for obj in gc.get_objects():
        if type(obj).__name__ == "KVCache" and type(obj).__module__.endswith("kvcache.cache"):
            held = [t for t in (*obj.keys, *obj.values, *obj.positions) if t is not None]
            out.append((obj, held + [t for t in (obj._ws or ()) if t is not None]))
    return out


def engine_image(engine, prompt="a red fox in the snow", negative=None, cache=None, **kw):
    settings = dict(seed=7, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, batch=1)
    settings.update(kw)
    return engine.generate(prompt, negative, schedule=schedule_from_label(RES), cache=cache, memory_report=True,
                           **settings)


@pytest.mark.parametrize("policy", [None, "scalekv"])
def test_image_equals_the_engines(run, loaded, encoded, engine, sampler_inputs, config_inputs, progress, policy):
    config = None if policy is None else run("ScaleKVCacheConfig", **config_inputs()).result[0]
    out = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs())
    image = out.result[0]
    assert image.shape == (1, 256, 256, 3) and image.dtype == torch.float32
    assert image.device == mm.intermediate_device() and 0 <= image.min() and image.max() <= 1
    ref = engine_image(engine, cache=None if policy is None else CacheConfig())
    assert torch.equal(image, ((ref.decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
    # What SaveImage writes (clip(255 x) -> uint8) is exactly the engine's PNG.
    saved = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(saved, ref.images)


def test_memory_report_in_the_ui(run, loaded, encoded, sampler_inputs, config_inputs):
    config = run("ScaleKVCacheConfig", **config_inputs(budget_unit="tokens", budget=24.0)).result[0]
    out = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs())
    reports = out.ui["scalekv_memory"]
    assert len(reports) == 1
    report = json.loads(json.dumps(reports[0]))  # travels as JSON (ws message, /history)
    assert report["policy"]["policy"] == "scalekv" and report["policy"]["budget"] == 24
    assert report["schedule"]["scales"] == 7 and report["schedule"]["pixels"] == [256, 256]
    scales = report["scales"]
    assert len(scales) == 7
    for s in scales[:-1]:
        assert s["held_tokens"] == s["planned_tokens"]  # the cache held exactly what the plan said, every layer
        assert len(s["planned_tokens"]) == 4
    assert any(sum(s["planned_tokens"]) < 4 * s["full_tokens"] for s in scales[:-1])  # it did compress
    assert report["measured_peak_mb"] > 0 and report["planned_peak_mb"] > 0
    assert report["analytic_mb"] < report["full_analytic_mb"]
    assert report["model"]["architecture"] == "this model" and report["batch"] == 1


def test_full_cache_report_without_config(run, loaded, encoded, sampler_inputs):
    report = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs()).ui["scalekv_memory"][0]
    assert report["policy"]["policy"] == "full"
    assert all(s["held_tokens"] == [s["full_tokens"]] * 4 for s in report["scales"][:-1])


def test_progress_step_and_preview_per_scale(run, loaded, encoded, sampler_inputs, progress):
    """One step per scale with a decoded preview the size of the output, nearing the picture scale by scale; the
    last update shows the result itself, so the node ends on the image, not on a preview."""
    image = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs()).result[0]
    assert [(v, t) for v, t, _ in progress] == [(i, 7) for i in range(1, 8)] + [(7, 7)]
    for _, _, preview in progress:
        kind, picture, size = preview
        assert kind == "JPEG" and isinstance(picture, Image.Image) and picture.mode == "RGB"
        assert picture.size == (256, 256) and size == 256  # the image's own size, as the frontend labels it
    final = (image[0].numpy() * 255).astype(np.int16)
    shown = [np.asarray(p[2][1]).astype(np.int16) for p in progress]
    assert np.abs(shown[-1] - final).max() <= 1  # the result (rounded where SaveImage truncates)
    errors = [np.abs(p - final).mean() for p in shown[:-1]]
    assert errors[-1] < errors[0] / 4, errors  # the previews converge on the picture
    assert np.abs(shown[-2] - final).max() <= 1  # the tiny model's 16x16 latent: the last preview is a full decode
    # image-like from the first scale: its mean colour is the picture's, unlike false-colour latent channels
    assert np.abs(shown[0].reshape(-1, 3).mean(0) - final.reshape(-1, 3).mean(0)).max() < 40


def test_negative_prompt_and_batch(run, loaded, encoded, engine, sampler_inputs):
    negative = run("InfinityTextEncode", t5=loaded[1], prompt="blurry").result[0]
    image = run("InfinitySampler", model=loaded[0], positive=encoded, negative=negative,
                **sampler_inputs(batch=2, seed=3)).result[0]
    assert image.shape == (2, 256, 256, 3)
    ref = engine_image(engine, negative="blurry", batch=2, seed=3)
    assert torch.equal(image, ((ref.decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
    assert not torch.equal(image[0], image[1])  # one seed, two different samples


def test_blank_negative_prompt_means_none(run, loaded, encoded, sampler_inputs):
    """As in the original: an empty negative prompt is no negative (the learned unconditional embedding)."""
    plain = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(seed=3)).result[0]
    for text in ("", "  \n"):
        blank = run("InfinityTextEncode", t5=loaded[1], prompt=text).result[0]
        image = run("InfinitySampler", model=loaded[0], positive=encoded, negative=blank,
                    **sampler_inputs(seed=3)).result[0]
        assert torch.equal(image, plain), repr(text)
    # a blank *positive* prompt is still encoded and sampled from, as the original does
    blank_pos = run("InfinityTextEncode", t5=loaded[1], prompt="").result[0]
    image = run("InfinitySampler", model=loaded[0], positive=blank_pos, **sampler_inputs(seed=3)).result[0]
    assert image.shape == plain.shape and not torch.equal(image, plain)


def test_seed_changes_the_image(run, loaded, encoded, sampler_inputs):
    a = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(seed=1)).result[0]
    b = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(seed=2)).result[0]
    assert not torch.equal(a, b)


def test_interrupt_stops_at_the_scale_and_leaves_no_cache(run, loaded, encoded, sampler_inputs, config_inputs,
                                                           monkeypatch):
    """ComfyUI's interrupt flag (what /interrupt sets), raised during scale 3, stops the sampler at scale 4."""
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    config = run("ScaleKVCacheConfig", **config_inputs(budget_unit="tokens", budget=24.0)).result[0]
    assert not live_caches()
    raised = None
    try:
        try:
            run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs())
        except mm.InterruptProcessingException as e:
            raised = e
        assert raised is not None and seen == [1, 2, 3]  # the check at scale 4 raised; nothing after it ran
        # While the traceback keeps the sampler's frames (and so the cache object) alive, its memory is gone already.
        alive = live_caches()
        assert len(alive) == 1 and not alive[0][1]
        del raised, alive
        assert not live_caches()  # and once the exception is dropped, the cache object itself
    finally:
        mm.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    image = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs()).result[0]
    assert image.shape == (1, 256, 256, 3)  # the next run works


def test_bad_resolution_and_budget_are_errors(run, loaded, encoded, sampler_inputs, config_inputs):
    with pytest.raises(ValueError, match="resolution: unknown value '100x100'"):
        run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(resolution="100x100"))
    # the config node refuses 8 tokens under a 16-token window itself; a config made elsewhere (the engine's type
    # through a link) is refused by the sampler's plan, before any sampling
    config = CacheConfig(policy="scalekv", budget=8, window=16)
    with pytest.raises(ValueError, match="cannot run at 256x256 on this model: .*observation window"):
        run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs())
    # a preset made for 1024x1024 at another depth, and an MB budget that gives no token: refused by the plan too
    preset = run("ScaleKVCacheConfig", **config_inputs(budget_source="preset:infinity-2b-10pct")).result[0]
    with pytest.raises(ValueError, match="cannot run at 256x256 on this model: .*a model of 32 layers, but this model has 4"):
        run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=preset, **sampler_inputs())
    tiny_mb = run("ScaleKVCacheConfig", **config_inputs(budget_unit="MB", budget=1e-6)).result[0]
    with pytest.raises(ValueError, match="too little to keep anything"):
        run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=tiny_mb, **sampler_inputs())
    assert not live_caches()


@pytest.mark.parametrize("overrides, words", [
    (dict(cfg=float("nan")), "cfg: expected a number from 0 to 30, got nan"),
    (dict(tau=float("nan")), "tau: expected a number"),
    (dict(tau=0.0), "tau: 0 is out of range"),
    (dict(top_p=float("inf")), "top_p: expected a number"),
    (dict(cfg="abc"), "cfg: expected a number"),
    (dict(resolution="9" * 1_000_000), "resolution: unknown value '99999"),
])
def test_sampler_refuses_bad_numbers_by_name(node_classes, run, loaded, encoded, sampler_inputs, overrides, words):
    cls = node_classes["InfinitySampler"]
    named = {k: v for k, v in sampler_inputs(**overrides).items() if k in ("cfg", "tau", "top_p", "resolution")}
    message = cls.validate_inputs(**named)
    assert isinstance(message, str) and message.startswith(words) and len(message) < 1000
    with pytest.raises(ValueError) as e:  # and at run time, for values that came through links
        run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(**overrides))
    assert str(e.value).startswith(words) and len(str(e.value)) < 1000


def test_admission_refuses_a_run_larger_than_free_memory(run, loaded, encoded, sampler_inputs, monkeypatch):
    """The planner's peak is compared with the device's free memory before sampling; the override lets it run."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 1 << 20)  # 1 MiB free
    with pytest.raises(MemoryError, match=r"planned to need .* GiB .* has only 0.0 GiB free. To fit, .*lower the batch \(now 2\)"):
        run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(batch=2))
    assert not live_caches()
    monkeypatch.setenv("SCALEKV_ALLOW_OVERCOMMIT", "1")
    image = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs()).result[0]
    assert image.shape == (1, 256, 256, 3)


def test_the_report_records_what_made_the_picture(run, loaded, encoded, sampler_inputs):
    """The memory report names the run's settings (seed, sampling, size, tile, block swap, the weights' format), so
    /history tells runs apart whose memory figures barely differ (int8 and bf16 weights, block swap or none)."""
    memory = run("InfinityMemory", block_swap=2).result[0]
    out = run("InfinitySampler", model=loaded[0], positive=encoded, memory=memory,
              **sampler_inputs(seed=11, tau=0.6, batch=2, decode_tile=8, resolution="320x256 (1.25:1)"))
    shown = out.ui["scalekv_memory"][0]["run"]
    assert shown == {"seed": 11, "cfg": sampler_inputs()["cfg"], "tau": 0.6, "top_k": sampler_inputs()["top_k"],
                     "top_p": sampler_inputs()["top_p"], "resolution": "320x256 (1.25:1)", "batch": 2,
                     "decode_tile": 8, "block_swap": 2, "transformer": "infinity_tiny.safetensors",
                     "weights": "none", "precision": "fp32"}


def test_admission_counts_the_servers_own_memory_limit(run, loaded, encoded, sampler_inputs, pack, monkeypatch):
    """ComfyUI's free memory on the CPU is the host's; a server capped by its cgroup or RLIMIT_AS has less. The run
    is refused by the cap, which the message names (the fuzz's capped server had run out of memory midway)."""
    import importlib

    host_memory = importlib.import_module(f"{pack.__name__}.scalekv_core.host_memory")
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 64 << 30)
    monkeypatch.setattr(host_memory, "process_caps", lambda: [host_memory.Cap("RLIMIT_AS", 3 << 30, 1 << 20)])
    with pytest.raises(MemoryError, match=r"but cpu \(this process's RLIMIT_AS of 3.0 GiB\) has only 0.0 GiB free"):
        run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs())
    assert not live_caches()
    monkeypatch.setattr(host_memory, "process_caps", lambda: [host_memory.Cap("RLIMIT_AS", 3 << 30, 2 << 30)])
    image = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs()).result[0]
    assert image.shape == (1, 256, 256, 3)


def test_admission_on_a_gpu_leaves_comfyuis_reserve_free(loaded, monkeypatch):
    """On a GPU the run must fit beside what ComfyUI keeps free (extra_reserved_memory), as the widget plans it: a
    run 100 MiB short of free memory plus the reserve is refused, and admitted once the reserve is counted out.
    (A pretend CUDA load device: admit only reads its free memory.)"""
    import comfy.model_management as mm

    model = loaded[0]
    schedule = schedule_from_label("256x256 (1:1)")
    need = max(model.peaks_mb(schedule, 1, None, True)) * 2**20
    monkeypatch.setattr(model.patcher, "load_device", torch.device("cuda", 0))
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: int(need + 300 * 2**20))
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 400 * 2**20)
    with pytest.raises(MemoryError, match="free"):
        model.admit(schedule, 1, None, True)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 200 * 2**20)
    model.admit(schedule, 1, None, True)


def test_budget_file_drives_the_cache(run, loaded, encoded, sampler_inputs, config_inputs, engine):
    import folder_paths

    path = pathlib.Path(folder_paths.get_folder_paths("scalekv")[0]) / "tiny_budget.json"
    path.write_text((TINY / "scalekv_budget_tiny.json").read_text())
    try:
        config = run("ScaleKVCacheConfig", **config_inputs(budget_unit="tokens", budget=50.0,
                                                           budget_source="file:tiny_budget.json")).result[0]
        out = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=config, **sampler_inputs())
        ref = engine_image(engine, cache=CacheConfig(budget=50, budget_file=str(TINY / "scalekv_budget_tiny.json")))
        assert torch.equal(out.result[0], ((ref.decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
        planned = [s["planned_tokens"] for s in out.ui["scalekv_memory"][0]["scales"]]
        assert planned == [s.planned_tokens for s in ref.memory.scales]
    finally:
        path.unlink()


@pytest.mark.parametrize("seed", [-(2**63), -8371, 2**64 - 1])
def test_seeds_over_the_64_bit_range_from_comfyuis_integer_node_run(run, loaded, encoded, sampler_inputs, seed):
    """PrimitiveInt randomises over signed 64-bit (the full_vs_scalekv workflow's seed node feeds both samplers):
    a negative seed must run, as ComfyUI's KSampler takes seeds up to 2^64 - 1; the same seed, the same image."""
    first = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(seed=seed)).result[0]
    again = run("InfinitySampler", model=loaded[0], positive=encoded, **sampler_inputs(seed=seed)).result[0]
    assert torch.equal(first, again) and first.std() > 0
