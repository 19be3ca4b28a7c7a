"""What the command line writes, and what it checks before writing: whole files only (never half of one under its
final name), the whole-job planner's budget file, calibration's checks before any work, the dump folder, the
benchmarks' one-line errors and the default resolution of a model file that declares one.

Cases that must be refused before any work replace `InfinityPipeline.from_files` with a trap.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from helpers_tiny import FULL_KV, T5_TINY, TINY_TRANSFORMER, TINY_VAE
from scalekv_core import cli
from scalekv_core.pipeline import InfinityPipeline

REPO = Path(__file__).resolve().parent.parent
CASE = FULL_KV / "p1_spaceship_s99_cfg4_tau1"
TEXT_KV = CASE / "text_kv_compact.npy"
TINY = ["--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE)]


def _generate(tmp: Path, *extra: str) -> list[str]:
    return ["generate", *TINY, "--text-kv", str(TEXT_KV), "--seed", "99", "--cfg", "4", "--tau", "1", *extra]


def _calibrate(prompts: Path, *extra: str) -> list[str]:
    return ["calibrate", *TINY, "--text-encoder", str(T5_TINY), "--prompts", str(prompts), "--width", "256",
            "--height", "256", *extra]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded (the case must be refused before any work)."""
    def trap(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")
    monkeypatch.setattr(InfinityPipeline, "from_files", classmethod(trap))


def _one_error(capsys, rc: int, *names: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


def _prompts(tmp: Path, n: int = 2) -> Path:
    path = tmp / "prompts.txt"
    path.write_text("\n".join(["a red apple on a wooden table", "alien spaceship enterprise", "a cat"][:n]) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- 1. plan --budget-file


def _all_drafters_2b(tmp: Path) -> Path:
    """The 2B preset with every layer of every scale a drafter: far larger budgets than the preset's."""
    from scalekv_core.kvcache.budget import preset_path

    data = json.loads(Path(preset_path("infinity-2b-10pct")).read_text())
    for scale in data.values():
        for key in scale:
            if key.startswith("Block "):
                scale[key] = 1
    path = tmp / "all_drafters_2b.json"
    path.write_text(json.dumps(data))
    return path


def test_whole_job_plan_uses_the_budget_file(tmp_path, capsys) -> None:
    budget_file = str(_all_drafters_2b(tmp_path))
    assert cli.main(["plan", "--model", "2b", "--budget-file", budget_file, "--json"]) == 0
    simple = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--model", "2b", "--budget-file", budget_file, "--offload-t5", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--model", "2b", "--offload-t5", "--json"]) == 0
    preset = json.loads(capsys.readouterr().out)
    assert job["kv_stored_mb"] == pytest.approx(simple["analytic_mb"])
    assert job["kv_stored_mb"] > 1.2 * preset["kv_stored_mb"]  # not the 10% preset's numbers
    assert f"with budget file {Path(budget_file).name}" in job["setting"]
    assert cli.main(["plan", "--model", "2b", "--budget-file", budget_file, "--vram", "24", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["asked"]["kv_stored_mb"] == pytest.approx(simple["analytic_mb"])


@pytest.mark.parametrize("job", [["--vram", "24"], ["--offload-t5"]])
def test_whole_job_plan_refuses_a_budget_file_of_another_depth(job, capsys) -> None:
    _one_error(capsys, cli.main(["plan", "--model", "2b", "--budget-file", "infinity-8b-10pct", *job]),
               "infinity-8b-10pct", "a model of 40 layers")


# ------------------------------------------------------------------------------------- 2. outputs written whole only

_FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    import numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    {setup}
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
    try:
        {action}
    except OSError as e:
        print(json.dumps({{"error": str(e)}}))
    else:
        print(json.dumps({{"error": None}}))
""")


def _on_a_full_disk(setup: str, action: str, limit: int) -> str | None:
    """Run `action` in a process that cannot write files past `limit` bytes; the OSError's message, or None."""
    code = _FULL_DISK.format(tests=str(REPO / "tests"), repo=str(REPO), setup=setup, action=action, limit=limit)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["error"]


def test_a_failed_image_write_leaves_the_earlier_image_whole(tmp_path) -> None:
    out = tmp_path / "img.png"
    out.write_bytes(b"the earlier image")
    setup = ("from scalekv_core.pipeline import GenerationResult\n"
             "r = GenerationResult(np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8), "
             "None, None, None, None)")
    error = _on_a_full_disk(setup, f"r.save_images({str(out)!r})", limit=2000)
    assert out.read_bytes() == b"the earlier image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
    assert error is not None and str(out) in error and ".partial" not in error


def test_a_failed_calibration_write_leaves_the_earlier_files_whole(tmp_path) -> None:
    out = tmp_path / "budget.json"
    side = tmp_path / "budget.asi.json"
    out.write_text('{"earlier": "budget"}')
    side.write_text('{"earlier": "table"}')
    # a budget file small enough to be written, its table too large: the table goes first, so neither is replaced
    setup = ("from scalekv_core.kvcache.calibration import AsiTable, CalibrationResult\n"
             "rows = [[0.5] * 32 for _ in range(13)]\n"
             "res = CalibrationResult(AsiTable(rows, rows, rows), [[0]] * 13, None, {'Scale 1': {'Max': 1}}, {})")
    error = _on_a_full_disk(setup, f"res.write({str(out)!r})", limit=1000)
    assert out.read_text() == '{"earlier": "budget"}' and side.read_text() == '{"earlier": "table"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.asi.json", "budget.json"]
    assert error is not None and str(side) in error and ".partial" not in error


def test_outputs_are_written_whole_and_leave_no_partial_files(tmp_path, capsys) -> None:
    dump = tmp_path / "dump"
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--kv-policy", "snapkv", "--budget", "50",
                            "--window", "4", "--out", str(tmp_path / "img.png"), "--dump", str(dump),
                            "--memory-report", str(tmp_path / "mem.json")))
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "mem.json").read_text())["policy"]["policy"] == "snapkv"
    assert not list(tmp_path.rglob("*.partial"))
    assert np.load(dump / "scale_00_bits.npy").shape[0] == 1 and list(dump.glob("scalekv_kept_*.npy"))


# ------------------------------------------------------------------------- 3-5. calibrate: checks before any work


@pytest.mark.parametrize("extra, names", [
    (["--window", "5"], ["--window", "5", "square"]),
    (["--budget", "10", "--window", "16"], ["--budget 10", "observation window"]),
])
def test_calibrate_checks_the_scalekv_settings_before_loading(tmp_path, capsys, no_load, extra, names) -> None:
    _one_error(capsys, cli.main(_calibrate(_prompts(tmp_path), *extra, "--out", str(tmp_path / "b.json"))), *names)
    assert not (tmp_path / "b.json").exists()


def test_generate_refuses_a_scalekv_window_that_is_not_square_before_loading(tmp_path, capsys, no_load) -> None:
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--kv-policy", "scalekv", "--budget", "48",
                            "--window", "5", "--out", str(tmp_path / "img.png")))
    _one_error(capsys, rc, "--window", "square")


def test_calibrate_counts_its_prompts_from_one_to_n(tmp_path, capsys) -> None:
    rc = cli.main(_calibrate(_prompts(tmp_path, 2), "--budget", "48", "--window", "4", "--out",
                             str(tmp_path / "b.json")))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [line.strip() for line in err.splitlines() if line.strip().startswith("prompt ")] == \
        ["prompt 1/2", "prompt 2/2"]


def _budget_of(tmp: Path, shape: dict) -> Path:
    """A budget file whose measurement table says which model it was calibrated on."""
    budget = tmp / "mine.json"
    budget.write_text('{"Scale 1": {}}')
    (tmp / "mine.asi.json").write_text(json.dumps({"settings": {"model": shape}}))
    return budget


def test_calibrate_keeps_another_models_budget_file(tmp_path, capsys, no_load) -> None:
    """--out naming the 2B's calibration while calibrating the tiny model replaced it silently; refused before any
    work, naming the flag and the file, as the ComfyUI node refuses its filename_prefix."""
    budget = _budget_of(tmp_path, {"depth": 32, "width": 2048, "heads": 16})
    rc = cli.main(_calibrate(_prompts(tmp_path), "--budget", "48", "--window", "4", "--out", str(budget)))
    _one_error(capsys, rc, f"--out {budget}", "another model", "depth 32", "choose another --out")
    assert budget.read_text() == '{"Scale 1": {}}'


def test_calibrate_replaces_its_own_models_budget_file(tmp_path, capsys) -> None:
    budget = _budget_of(tmp_path, {"depth": 4, "width": 128, "heads": 4})  # the tiny model's shape
    rc = cli.main(_calibrate(_prompts(tmp_path, 1), "--budget", "48", "--window", "4", "--out", str(budget)))
    assert rc == 0, capsys.readouterr().err
    assert "Scale 7" in json.loads(budget.read_text())


def test_calibrate_refuses_seeds_past_the_range_before_any_work(tmp_path, capsys, no_load) -> None:
    last = 2**64 - 1
    rc = cli.main(_calibrate(_prompts(tmp_path, 3), "--budget", "48", "--window", "4", "--seed", str(last - 1),
                             "--out", str(tmp_path / "b.json")))
    _one_error(capsys, rc, "--seed", str(last - 1))
    # one below is fine for one prompt fewer: the check is seed + prompts - 1
    from scalekv_core.kvcache.calibration import check_prompts

    assert check_prompts(last - 2, 3) == last - 2


def test_the_calibration_api_refuses_the_seed_before_any_generation(monkeypatch) -> None:
    from scalekv_core.kvcache import calibration
    from scalekv_core.limits import InputError
    from scalekv_core.schedules import schedule_for_pixels

    def trap(*args, **kwargs):
        raise AssertionError("generation ran before the seed was checked")
    measure_asi = calibration.measure_asi
    monkeypatch.setattr(calibration, "measure_asi", trap)
    monkeypatch.setattr("scalekv_core.sampler.sample", trap)

    class Pipe:  # never touched: the seeds are checked first
        pass

    with pytest.raises(InputError, match="^seed: "):
        calibration.calibrate(Pipe(), ["a", "b"], schedule_for_pixels(256, 256), 48, seed=2**64 - 1, window=4)
    with pytest.raises(InputError, match="^seed: "):
        measure_asi(Pipe(), ["a", "b"], schedule_for_pixels(256, 256), seed=2**64 - 1)


# ------------------------------------------------------------------------------------- 6. the image names and format


def test_every_batch_image_name_is_checked_before_loading(tmp_path, capsys, no_load) -> None:
    (tmp_path / "o" / "x_01.png").mkdir(parents=True)
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--batch", "2", "--out",
                            str(tmp_path / "o" / "x.png")))
    _one_error(capsys, rc, "--out", "x_01.png", "folder")


def test_an_image_format_that_cannot_hold_rgb_is_refused_before_loading(tmp_path, capsys, no_load) -> None:
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--out", str(tmp_path / "img.xbm")))
    _one_error(capsys, rc, "--out", "img.xbm", "RGB")


# ------------------------------------------------------------------------------------------------- 7. the dump folder


def test_dump_into_a_used_folder_removes_the_earlier_runs_files_only(tmp_path, capsys) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    stale = ["scale_12_bits.npy", "scale_12_token_ids.npy", "scalekv_kept_s11_l3.npy", "image.png.partial"]
    for name in stale:
        (dump / name).write_bytes(b"from an earlier run")
    (dump / "notes.txt").write_text("mine")
    (dump / "scale_notes").mkdir()
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--out", str(tmp_path / "img.png"),
                            "--dump", str(dump)))
    assert rc == 0, capsys.readouterr().err
    names = {p.name for p in dump.iterdir()}
    assert not names & set(stale)
    assert {"notes.txt", "scale_notes", "scale_06_bits.npy", "decoded.npy", "image.png"} <= names
    assert not any(n.startswith("scalekv_kept_") for n in names)  # the full cache keeps everything: none written


# ------------------------------------------------------------------------------------------------- 8. the benchmarks


@pytest.mark.parametrize("argv, names", [
    (["kv", "--policies", "h2o"], ["--policies", "h2o"]),
    (["kv", "--size", "7M"], ["--size", "7M"]),
    (["kv", "--window", "0"], ["--window", "0"]),
    (["kv", "--budgets", "lots"], ["--budgets", "lots"]),
    (["kv", "--window", "4", "--budgets", "2"], ["--budgets", "2", "observation window"]),
    (["kv", "--device", "cuda:99"], ["--device", "cuda:99"]),
    (["kv", "--window", "4", "--json", "/dev/null/x.json"], ["--json", "/dev/null"]),
    (["kv-storage", "--kv-dtypes", "int9"], ["--kv-dtypes", "int9"]),
    (["kv-storage", "--json", "/dev/null/x.json"], ["--json", "/dev/null"]),
])
def test_bench_kv_refuses_bad_values_in_one_line_before_any_work(monkeypatch, capsys, argv, names) -> None:
    from scalekv_core.bench import kv

    def trap(*args, **kwargs):
        raise AssertionError("the benchmark started before the mistake was reported")
    monkeypatch.setattr(kv, "_load", trap)
    monkeypatch.setattr("scalekv_core.pipeline.InfinityPipeline.from_files", classmethod(trap))
    _one_error(capsys, kv.main(argv), *names)


@pytest.mark.parametrize("argv, names", [
    (["--vae", "nope"], ["--vae", "nope"]),
    (["--tiles", "3"], ["--tiles", "3"]),
    (["--tiles", "x"], ["--tiles", "x"]),
    (["--vae", "2b", "--json", "/dev/null/x.json"], ["--json", "/dev/null"]),
])
def test_bench_decode_refuses_bad_values_in_one_line_before_any_work(monkeypatch, capsys, argv, names) -> None:
    from scalekv_core.bench import decode

    def trap(*args, **kwargs):
        raise AssertionError("the benchmark started before the mistake was reported")
    monkeypatch.setattr(decode, "load_vae_and_latents", trap)
    _one_error(capsys, decode.main(argv), *names)


def test_bench_launches_t5_and_fidelity_check_their_outputs_first(monkeypatch, capsys, tmp_path) -> None:
    from scalekv_core.bench import fidelity, launches, t5

    def trap(*args, **kwargs):
        raise AssertionError("the benchmark started before the mistake was reported")
    monkeypatch.setattr(launches, "run_census", trap)
    monkeypatch.setattr("scalekv_core.pipeline.InfinityPipeline.from_files", classmethod(trap))
    monkeypatch.setattr(fidelity.distributed, "setup", trap)
    _one_error(capsys, launches.main(["--model", "layer12", "--depth", "2", "--size", "0.06M", "--json",
                                      "/dev/null/x.json"]), "--json")
    _one_error(capsys, launches.main(["--policies", "h2o"]), "--policies", "h2o")
    _one_error(capsys, t5.main(["--json", "/dev/null/x.json"]), "--json")
    _one_error(capsys, fidelity.main(["--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE),
                                      "--text-encoder", str(T5_TINY), "--out", "/dev/null/fid"]), "--out")


def test_python_m_bench_prints_one_line_not_a_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "scalekv_core.bench", "kv", "--policies", "h2o"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: --policies")


# ------------------------------------------------------------------------------------ 9. the file's native resolution


@pytest.fixture
def declared_256(tmp_path) -> Path:
    """The tiny transformer with the embedded model's metadata: trained at 256x256 (1:1) only."""
    path = tmp_path / "tiny_256.safetensors"
    save_file(load_file(str(TINY_TRANSFORMER)), str(path), metadata={"format": "pt",
                                                                    "scalekv_resolution": "256x256 (1:1)"})
    return path


def test_generate_defaults_to_the_resolution_the_file_declares(tmp_path, capsys, declared_256) -> None:
    from PIL import Image

    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--transformer", str(declared_256), "--vae", str(TINY_VAE), "--text-kv", str(TEXT_KV),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert Image.open(out).size == (256, 256)
    assert "note:" not in err


def test_a_size_outside_the_declared_one_gets_the_samplers_note(tmp_path, capsys, declared_256) -> None:
    from scalekv_core.loader import resolution_note
    from scalekv_core.schedules import schedule_for_pixels

    rc = cli.main(["generate", "--transformer", str(declared_256), "--vae", str(TINY_VAE), "--text-kv", str(TEXT_KV),
                   "--width", "352", "--height", "176", "--out", str(tmp_path / "img.png")])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    expected = resolution_note(("256x256 (1:1)", False), schedule_for_pixels(352, 176), declared_256.name)
    assert len(notes) == 1 and expected.split(";")[0] in notes[0] and "--width" in notes[0]


def test_released_models_without_metadata_keep_1024_by_default(capsys, no_load, tmp_path) -> None:
    """The tiny file has no resolution metadata: its default schedule is 1024x1024's (13 scales), as before."""
    rc = cli.main(["generate", *TINY, "--text-kv", str(TEXT_KV), "--cfg", "3,3,3,3,3,3,3", "--out",
                   str(tmp_path / "img.png")])
    _one_error(capsys, rc, "cfg list has 7 values", "13 scales")


def test_an_output_that_is_a_symlink_is_written_through_it(tmp_path) -> None:
    """A budget file kept as models/scalekv/mine.json -> elsewhere stays a link; its target gets the new text."""
    from scalekv_core.safe_files import write_text

    target = tmp_path / "elsewhere" / "budget.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "mine.json"
    link.symlink_to(target)
    write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert not list(tmp_path.rglob("*.partial"))


# ---------------------------------------------------------------------- 10. outputs that would replace another file


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Copies of the tiny model's files, so a run that wrongly writes over one damages only a copy."""
    import shutil

    folder = tmp_path / "inputs"
    folder.mkdir()
    files = {"transformer": folder / "t.safetensors", "vae": folder / "v.safetensors", "text_kv": folder / "kv.npy",
             "t5": folder / "t5"}
    shutil.copy(TINY_TRANSFORMER, files["transformer"])
    shutil.copy(TINY_VAE, files["vae"])
    shutil.copy(TEXT_KV, files["text_kv"])
    shutil.copytree(T5_TINY, files["t5"])
    return files


def _generate_copies(files: dict[str, Path], *extra: str) -> list[str]:
    return ["generate", "--transformer", str(files["transformer"]), "--vae", str(files["vae"]), "--text-kv",
            str(files["text_kv"]), "--width", "256", "--height", "256", *extra]


@pytest.mark.parametrize("target", ["out", "transformer", "vae", "text_kv", "t5_config", "dump_image", "batch_image"])
def test_memory_report_that_would_replace_another_file_is_refused(tmp_path, capsys, no_load, inputs, target) -> None:
    """--memory-report naming the image, a model file, a file in the T5 folder or a file --dump writes replaced it
    (the image with JSON, still reported as the image; the model with a report): refused before any work."""
    out, dump = tmp_path / "r.png", tmp_path / "dump"
    extra = ["--out", str(out), "--dump", str(dump)]
    report, other = {"out": (out, "--out"), "transformer": (inputs["transformer"], "--transformer"),
                     "vae": (inputs["vae"], "--vae"), "text_kv": (inputs["text_kv"], "--text-kv"),
                     "t5_config": (inputs["t5"] / "config.json", "--text-encoder"),
                     "dump_image": (dump / "image.png", "--dump"),
                     "batch_image": (tmp_path / "r_01.png", "--out")}[target]
    if target == "t5_config":
        extra += ["--text-encoder", str(inputs["t5"]), "--negative-prompt", "blurry"]
    if target == "batch_image":
        extra += ["--batch", "2"]
    before = {p: p.read_bytes() for p in inputs.values() if p.is_file()}
    rc = cli.main(_generate_copies(inputs, *extra, "--memory-report", str(report)))
    _one_error(capsys, rc, "--memory-report", str(report), other)
    assert {p: p.read_bytes() for p in before} == before and not out.exists()


def test_out_inside_the_dump_folder_under_a_dump_name_is_refused(tmp_path, capsys, no_load, inputs) -> None:
    dump = tmp_path / "dump"
    rc = cli.main(_generate_copies(inputs, "--out", str(dump / "image.png"), "--dump", str(dump)))
    _one_error(capsys, rc, "--out", str(dump / "image.png"), "--dump")


def test_a_hard_link_to_an_input_is_the_same_file(tmp_path, capsys, no_load, inputs) -> None:
    import os

    link = tmp_path / "report.json"
    os.link(inputs["text_kv"], link)
    rc = cli.main(_generate_copies(inputs, "--out", str(tmp_path / "img.png"), "--memory-report", str(link)))
    _one_error(capsys, rc, "--memory-report", "--text-kv")


def test_a_report_beside_the_image_and_in_the_dump_folder_under_its_own_name_is_fine(tmp_path, inputs) -> None:
    out, dump = tmp_path / "r.png", tmp_path / "dump"
    rc = cli.main(_generate_copies(inputs, "--out", str(out), "--dump", str(dump), "--memory-report",
                                   str(dump / "memory.json")))
    assert rc == 0 and out.exists() and json.loads((dump / "memory.json").read_text()) and (dump / "image.png").exists()


# ------------------------------------------------------------------------- 11. cache flags the policy does not read


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:")]


def test_generate_names_the_cache_flags_its_default_policy_ignores(tmp_path, capsys) -> None:
    """generate's default policy is full, which keeps every token: --budget and --window copied from a plan line
    were silently ignored."""
    rc = cli.main(_generate(tmp_path, "--width", "256", "--height", "256", "--out", str(tmp_path / "img.png"),
                            "--budget", "5%", "--window", "9", "--kv-dtype", "bf16"))
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [n for n in _notes(err) if "ignored" in n]
    assert len(notes) == 1, err
    assert "--budget, --window ignored" in notes[0] and "--kv-policy full" in notes[0] and "default" in notes[0]
    assert "--kv-dtype" not in notes[0]  # every policy reads it


@pytest.mark.parametrize("argv, named", [
    (["--kv-policy", "full", "--budget", "20%"], ["--budget"]),
    (["--kv-policy", "sliding_window", "--window", "16", "--scoring", "original", "--budget", "30%"],
     ["--window", "--scoring"]),  # 16 is the default: given explicitly, it is still named
    (["--kv-policy", "snapkv", "--refiner-decay", "2", "--kernel", "3"], ["--refiner-decay"]),
    (["--kv-policy", "full", "--pooling", "avgpool", "--offload-t5"], ["--pooling"]),  # the whole-job plan too
    (["--kv-policy", "full", "--window", "4", "--vram", "24"], ["--window"]),
])
def test_plan_names_the_cache_flags_the_policy_ignores(capsys, argv, named) -> None:
    assert cli.main(["plan", *argv]) == 0
    notes = _notes(capsys.readouterr().err)
    assert len(notes) == 1 and notes[0].startswith(f"note: {', '.join(named)} ignored"), notes
    assert f"--kv-policy {argv[1]}" in notes[0] and "default" not in notes[0]  # the policy was chosen, not defaulted


@pytest.mark.parametrize("argv", [[], ["--budget", "20%", "--window", "9", "--scoring", "original"],
                                  ["--kv-policy", "full", "--kv-dtype", "bf16"],
                                  ["--kv-policy", "streamingllm", "--budget", "30%"]])
def test_plan_has_no_note_when_every_given_cache_flag_is_read(capsys, argv) -> None:
    assert cli.main(["plan", *argv]) == 0
    assert _notes(capsys.readouterr().err) == []


def test_a_flag_given_abbreviated_or_with_equals_counts_as_given(capsys) -> None:
    assert cli.main(["plan", "--kv-policy=full", "--scor", "original", "--window=9"]) == 0
    notes = _notes(capsys.readouterr().err)
    assert len(notes) == 1 and notes[0].startswith("note: --window, --scoring ignored"), notes


@pytest.mark.parametrize("table", ["--table", "--job-table"])
def test_the_fixed_tables_name_the_flags_they_ignore(capsys, table) -> None:
    """--table and --job-table print fixed rows: --model, --batch ... beside them were silently ignored."""
    assert cli.main(["plan", table, "--model", "8b", "--batch", "2"]) == 0
    captured = capsys.readouterr()
    assert _notes(captured.err) == [f"note: --batch, --model ignored: {table} prints fixed rows (2B and 8B at fixed "
                                    "sizes); leave it out to plan these settings"]
    assert captured.out.startswith("| model |")
    assert cli.main(["plan", table]) == 0 and _notes(capsys.readouterr().err) == []


def test_the_cache_table_follows_dtype_and_says_when_job_flags_replace_it(capsys) -> None:
    """--table's rows take --dtype (fp32 blocks double the 2B's weights), so it is not named as ignored; job flags
    beside --table plan the whole job instead, and the note says --table was dropped."""
    assert cli.main(["plan", "--table"]) == 0
    bf16 = capsys.readouterr().out.splitlines()[2]
    assert cli.main(["plan", "--table", "--dtype", "fp32"]) == 0
    captured = capsys.readouterr()
    assert _notes(captured.err) == [] and captured.out.splitlines()[2] != bf16
    assert cli.main(["plan", "--table", "--offload-t5"]) == 0
    captured = capsys.readouterr()
    assert _notes(captured.err) == ["note: --table ignored: the job flags given (--vram, --weights, --offload-t5, "
                                    "...) plan the whole job; leave them out for the cache table"]
    assert "T5 fp16 offloaded" in captured.out


def test_the_whole_job_plan_reads_refiner_decay(capsys) -> None:
    """The job planner dropped --refiner-decay (its options had no such field): 200 planned as 0. Now its figures
    are the planner's for that cache, given as a CacheConfig, and its setting says so."""
    from scalekv_core.job_memory import JobOptions, plan_job
    from scalekv_core.kvcache import CacheConfig

    sampling = {}
    for decay in (0, 200):
        assert cli.main(["plan", "--model", "2b", "--offload-t5", "--refiner-decay", str(decay), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        want = plan_job("2b", 1024, 1024, 1, JobOptions(t5_offload=True),
                        cache=CacheConfig(policy="scalekv", budget="10%", refiner_decay=decay))
        assert shown["sampling_mb"] == pytest.approx(want.sampling_mb)
        assert ("refiner decay 200" in shown["setting"]) == (decay == 200)
        sampling[decay] = shown["sampling_mb"]
    assert sampling[200] != sampling[0]


# ---------------------------------------------------------------------------- 12. two writers of one output file


def test_two_writers_of_one_output_each_use_their_own_temporary_file(tmp_path) -> None:
    """Two processes writing the same output shared one NAME.partial: B's open emptied A's file, A then held B's
    bytes (or failed at its rename). Each writer now has its own temporary file; the output is one writer's whole
    file at every moment, the last to finish wins, and no temporary file is left."""
    from scalekv_core.safe_files import atomic_output

    out = tmp_path / "budget.json"
    with atomic_output(out) as a:
        a.write(b"A" * 10)
        a.flush()
        with atomic_output(out) as b:
            b.write(b"B" * 5)
        assert out.read_bytes() == b"B" * 5
        a.write(b"A" * 10)
    assert out.read_bytes() == b"A" * 20
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"]


def test_a_failed_or_interrupted_write_leaves_no_temporary_file(tmp_path) -> None:
    from scalekv_core.safe_files import atomic_output

    out = tmp_path / "img.png"
    out.write_bytes(b"old")
    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_output(out) as f:
                f.write(b"half")
                raise error
        assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_an_output_gets_the_mode_open_would_give_it(tmp_path) -> None:
    """A unique temporary file must not make outputs owner-only (mkstemp's 0600): a ComfyUI service account reads
    the images and budget files another user wrote."""
    from scalekv_core.safe_files import write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_text(tmp_path / "written.txt", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_dump_clears_stale_temporary_files_of_both_namings(tmp_path) -> None:
    from scalekv_core.pipeline import clear_dump

    for name in ("image.png.partial", "decoded.npy.0123abcd.partial", "notes.txt.0123abcd.partial"):
        (tmp_path / name).write_bytes(b"stale")
    clear_dump(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt.0123abcd.partial"]  # not a file a dump writes


def test_a_prompt_longer_than_t5_reads_is_noted(tmp_path, capsys) -> None:
    """T5 reads 512 tokens, as the original, which drops the rest without a word: the CLI names the prompt and
    how many tokens are not drawn; a short prompt gets no note, and the image is the same as before."""
    from scalekv_core.model.text_encoder import TEXT_MAXLEN

    t5 = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, T5_TINY).text_encoder
    long_prompt = " ".join(["red fox"] * 400)
    n = len(t5.tokenizer(text=long_prompt, truncation=False).input_ids)
    assert n > TEXT_MAXLEN
    assert t5.truncation_notes(["a red fox", long_prompt]) == [
        f"prompt 2 is {n} T5 tokens; Infinity reads the first {TEXT_MAXLEN} (as the original), so its last "
        f"{n - TEXT_MAXLEN} are not drawn: shorten it to keep what matters"]
    base = ["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--text-encoder", str(T5_TINY),
            "--width", "256", "--height", "256", "--negative-prompt", "blurry"]
    assert cli.main([*base, "--prompt", long_prompt, "--out", str(tmp_path / "long.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --prompt")]
    assert notes == [f"note: --prompt: the prompt is {n} T5 tokens; Infinity reads the first {TEXT_MAXLEN} (as the "
                     f"original), so its last {n - TEXT_MAXLEN} are not drawn: shorten it to keep what matters"]
    assert cli.main([*base, "--prompt", "a red fox", "--out", str(tmp_path / "short.png")]) == 0
    assert "T5 tokens" not in capsys.readouterr().err
