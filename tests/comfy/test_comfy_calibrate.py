"""ScaleKV Calibrate: the budget file it writes (the engine's own), its reuse by the config node, and its fingerprint."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.calibration import calibrate, measurement_cache
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import schedule_from_label

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"
RES = "256x256 (1:1)"
PROMPTS = "a red fox in the snow\n\n  a lighthouse at dusk  \n"


@pytest.fixture
def scalekv_dir():
    return pathlib.Path(folder_paths.get_folder_paths("scalekv")[0])


def calibrate_inputs(**overrides):
    base = dict(prompts=PROMPTS, resolution=RES, budget=10.0, num_drafters=0, seed=0, filename_prefix="tiny_calib")
    base.update(overrides)
    return base


@pytest.fixture
def calibrated(run, loaded, scalekv_dir):
    out = run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs())
    yield out
    for p in scalekv_dir.glob("tiny_calib*"):
        p.unlink()


def test_writes_the_engines_budget_file(calibrated, scalekv_dir):
    name = calibrated.result[0]
    assert name == "tiny_calib_256x256_10pct.json"
    path = scalekv_dir / name
    assert path.is_file() and (scalekv_dir / "tiny_calib_256x256_10pct.asi.json").is_file()
    engine = InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                         TINY / "t5_tiny")
    ref = calibrate(engine, ["a red fox in the snow", "a lighthouse at dusk"], schedule_from_label(RES), 27, None, 0)
    assert json.loads(path.read_text()) == ref.budget_json  # 10% of the 265-token prefix = 27 tokens
    summary = calibrated.ui["scalekv_calibration"][0]
    assert summary["budget_file"] == name and summary["budget_tokens"] == 27 and summary["prompts"] == 2
    assert summary["drafters"] == ref.drafters
    json.dumps(calibrated.ui)


def test_config_node_uses_the_file(calibrated, run, node_classes, loaded, encoded, config_inputs, sampler_inputs):
    name = calibrated.result[0]
    options = node_classes["ScaleKVCacheConfig"].GET_NODE_INFO_V1()["input"]["required"]["budget_source"][1]["options"]
    assert f"file:{name}" in options and not any(o.endswith(".asi.json") for o in options)
    by_menu = run("ScaleKVCacheConfig", **config_inputs(budget_source=f"file:{name}")).result[0]
    by_link = run("ScaleKVCacheConfig", **config_inputs(), budget_file=name).result[0]
    assert by_menu.budget_file == by_link.budget_file == folder_paths.get_full_path("scalekv", name)
    report = run("InfinitySampler", model=loaded[0], positive=encoded, cache_config=by_link,
                 **sampler_inputs()).ui["scalekv_memory"][0]
    assert report["policy"]["budget_file"].endswith(name)
    compressed = [s for s in report["scales"][:-1] if sum(s["planned_tokens"]) < 4 * s["full_tokens"]]
    assert compressed and all(s["held_tokens"] == s["planned_tokens"] for s in report["scales"][:-1])
    _, plan = CacheConfig(budget="10%", budget_file=by_link.budget_file).build(
        schedule_from_label(RES), 4, 4, 32, 2, torch.float32)  # the engine's reading of the same file
    assert [s["planned_tokens"] for s in report["scales"][:-1]] == plan.kept

def test_fingerprint_reruns_only_when_the_file_is_gone(run, loaded, scalekv_dir, node_classes):
    fp = node_classes["ScaleKVCalibrate"].fingerprint_inputs
    inputs = dict(calibrate_inputs(), model=None, t5=None)  # links are not resolved for fingerprints
    try:
        before = fp(**inputs)
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs())
        assert fp(**inputs) == before  # same inputs, file present: the cached result stands
        (scalekv_dir / "tiny_calib_256x256_10pct.json").unlink()
        gone = fp(**inputs)
        assert gone != before and fp(**inputs) == gone  # a new value, stable until the node runs again
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs())
        assert fp(**inputs) == gone  # the re-run's result is the cached one now
        assert fp(**dict(inputs, budget=None)) == 0  # a linked budget: nothing known yet
    finally:
        for p in scalekv_dir.glob("tiny_calib*"):
            p.unlink()


@pytest.mark.parametrize("inputs, words", [(dict(budget=0.0), "budget: 0 is out of range"),
                                           (dict(budget=120.0), "budget: 120 is out of range"),
                                           (dict(budget=float("nan")), "budget: expected a number"),
                                           (dict(filename_prefix="../escape"), "filename_prefix"),
                                           (dict(filename_prefix="/abs/path"), "filename_prefix"),
                                           (dict(filename_prefix="a\x00b"), "filename_prefix: contains a NUL"),
                                           (dict(filename_prefix="two\nlines"), "filename_prefix: contains a line"),
                                           (dict(filename_prefix="x" * 300), "filename_prefix: 300 characters"),
                                           (dict(prompts="ok\n\ud800"), "prompts: not valid text"),
                                           (dict(prompts=" \n "), "prompts: ScaleKV Calibrate needs")])
def test_validate_inputs(node_classes, inputs, words):
    cls = node_classes["ScaleKVCalibrate"]
    args = dict(budget=10.0, filename_prefix="ok")
    assert cls.validate_inputs(**args) is True
    args.update(inputs)
    message = cls.validate_inputs(**args)
    assert isinstance(message, str) and words in message and len(message) < 300


def test_no_prompts_and_no_compression_are_errors(run, loaded, scalekv_dir):
    with pytest.raises(ValueError, match="at least one prompt"):
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(prompts=" \n \n"))
    with pytest.raises(ValueError, match="never compresses"):  # 100% keeps everything: nothing to calibrate
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(budget=100.0))
    assert not list(scalekv_dir.glob("tiny_calib*"))


def test_interrupt_writes_nothing(run, loaded, scalekv_dir, monkeypatch):
    def hook(value, total, preview, prompt_id=None, node_id=None):
        if value == 1:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs())
    finally:
        mm.interrupt_current_processing(False)
    assert not list(scalekv_dir.glob("tiny_calib*"))


def test_reserves_room_for_the_cache_the_measurement_holds(run, loaded, scalekv_dir, monkeypatch):
    """The node loads the model with room for the measurement's cache: full, with the float32 keys its observer
    reads (auto would plan bf16 keys for full, a third less than the run holds)."""
    model = loaded[0]
    original = type(model).memory_required
    asked = []

    def recording(self, schedule, batch, cache, *args, **kwargs):
        asked.append(cache)
        return original(self, schedule, batch, cache, *args, **kwargs)

    monkeypatch.setattr(type(model), "memory_required", recording)
    try:
        run("ScaleKVCalibrate", model=model, t5=loaded[1], **calibrate_inputs())
    finally:
        for p in scalekv_dir.glob("tiny_calib*"):
            p.unlink()
    # the pack's scalekv_core is imported under ComfyUI's package name: compare the settings, not the class
    assert asked and asked[0].to_dict() == measurement_cache().to_dict()
    assert asked[0].storage_dtypes(torch.bfloat16) == (torch.float32, torch.bfloat16)


def test_fingerprint_with_auto_resolution_reruns_when_its_file_is_gone(run, loaded, scalekv_dir, node_classes):
    """The shipped calibrate_then_generate workflow uses resolution auto: deleting the file it wrote must make the
    next run calibrate again, not serve the cached name of a file that is gone."""
    auto = node_classes["ScaleKVCalibrate"].GET_NODE_INFO_V1()["input"]["required"]["resolution"][1]["default"]
    assert auto.startswith("auto")
    fp = node_classes["ScaleKVCalibrate"].fingerprint_inputs
    inputs = dict(calibrate_inputs(resolution=auto), model=None, t5=None)
    try:
        before = fp(**inputs)
        name = run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(resolution=auto)).result[0]
        assert fp(**inputs) == before
        (scalekv_dir / name).unlink()
        assert fp(**inputs) != before
    finally:
        for p in scalekv_dir.glob("tiny_calib*"):
            p.unlink()


def test_too_many_prompts_or_seeds_that_run_out_are_refused_before_encoding(run, loaded, scalekv_dir,
                                                                             node_classes, monkeypatch):
    """Each prompt is one generation and all encodings are held at once: more than the limits table's count is a
    validation error; a seed whose seed + i runs past the largest seed is refused before T5 encodes anything."""
    message = node_classes["ScaleKVCalibrate"].validate_inputs(budget=10.0, filename_prefix="ok",
                                                               prompts="a\n" * 1500)
    assert isinstance(message, str) and "prompts: 1500 prompts" in message and "at most 256" in message
    encoded = []
    monkeypatch.setattr(type(loaded[1]), "encode", lambda self, p: encoded.append(p))
    with pytest.raises(ValueError, match="seed: .* is too large for 2 prompts"):
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(seed=2**64 - 1))
    assert encoded == [] and not list(scalekv_dir.glob("tiny_calib*"))


def test_cancel_while_encoding_stops_before_the_next_prompt(run, loaded, scalekv_dir, monkeypatch):
    encoded = []
    original = type(loaded[1]).encode

    def encode(self, prompts):
        encoded.append(prompts)
        mm.interrupt_current_processing(True)  # the user presses Cancel while the first prompt is encoded
        return original(self, prompts)

    monkeypatch.setattr(type(loaded[1]), "encode", encode)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs())
    finally:
        mm.interrupt_current_processing(False)
    assert len(encoded) == 1 and not list(scalekv_dir.glob("tiny_calib*"))


def test_calibrate_is_admitted_like_the_sampler(run, loaded, monkeypatch, scalekv_dir, pack):
    """A card too small for the full-cache measurement is refused before any generation, with the sampler's
    figures and advice (it ran to a raw out-of-memory error), and nothing is written."""
    import importlib

    node = importlib.import_module(f"{pack.__name__}.nodes.cache")
    generations = []
    monkeypatch.setattr(node, "calibrate", lambda *a, **k: generations.append(a))
    tiny = 1 << 20
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False, *a, **k: (tiny, tiny) if torch_free_too else tiny)
    with pytest.raises(MemoryError, match="free"):
        run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(filename_prefix="tiny_admit"))
    assert generations == [] and not list(scalekv_dir.glob("tiny_admit*"))


def test_calibrate_with_block_swap_writes_the_same_file(run, loaded, scalekv_dir):
    """The Memory node on Calibrate streams blocks as on the sampler: the same measurements, the same file, and
    the weights back where ComfyUI keeps them."""
    model, t5 = loaded
    try:
        plain = run("ScaleKVCalibrate", model=model, t5=t5, **calibrate_inputs(filename_prefix="tiny_plain"))
        memory = run("InfinityMemory", block_swap=2).result[0]
        swapped = run("ScaleKVCalibrate", model=model, t5=t5, memory=memory,
                      **calibrate_inputs(filename_prefix="tiny_swap"))
        a, b = (json.loads((scalekv_dir / out.result[0]).read_text()) for out in (plain, swapped))
        assert a == b and plain.ui["scalekv_calibration"][0]["drafters"] == swapped.ui["scalekv_calibration"][0][
            "drafters"]
        homes = {p.device for p in model.pipeline.transformer.parameters()}
        assert homes == {torch.device(model.patcher.offload_device)}
    finally:
        for p in list(scalekv_dir.glob("tiny_plain*")) + list(scalekv_dir.glob("tiny_swap*")):
            p.unlink()


def test_calibrate_keeps_another_models_file_of_the_same_name(run, loaded, scalekv_dir):
    """The file name holds prefix, resolution and budget, not the model: a calibration of another model under the
    same name (its measurement table says which) is refused before any work, and kept; the same model's is
    replaced, as a re-calibration should."""
    name = "tiny_other_256x256_10pct.json"
    budget, side = scalekv_dir / name, scalekv_dir / name.replace(".json", ".asi.json")
    budget.write_text("{}")
    side.write_text(json.dumps({"settings": {"model": {"depth": 32, "width": 2048, "heads": 16}}}))
    try:
        with pytest.raises(ValueError, match=r"filename_prefix: tiny_other_256x256_10pct.json was calibrated for "
                                             r"another model \(depth 32, width 2048, heads 16\); this one has depth 4"):
            run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(filename_prefix="tiny_other"))
        assert budget.read_text() == "{}"
        side.write_text(json.dumps({"settings": {"model": {"depth": 4, "width": 128, "heads": 4}}}))
        out = run("ScaleKVCalibrate", model=loaded[0], t5=loaded[1], **calibrate_inputs(filename_prefix="tiny_other"))
        assert out.result[0] == name and json.loads(budget.read_text()) != {}
        assert json.loads(side.read_text())["settings"]["model"] == {"depth": 4, "width": 128, "heads": 4}
    finally:
        budget.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
