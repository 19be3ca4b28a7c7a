"""Devices without some dtypes (Apple's MPS: no float64, no float8, bf16 from macOS 14) and CUDA cards without
native bf16, simulated on the CPU: the one table (scalekv_core/devices.py) and every place that asks it."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from scalekv_core import devices
from scalekv_core.cli import main
from scalekv_core.cli_args import run_reporting_errors
from scalekv_core.devices import DeviceDtypeError, dtype_problem, statistics_device
from scalekv_core.job_memory import JobOptions, cheapest_fit, ladder
from scalekv_core.kvcache import attention
from scalekv_core.kvcache.config import CacheConfig
from scalekv_core.kvcache.memory import PeakMeter
from scalekv_core.loader import load_transformer, load_vae, resolve_precision
from scalekv_core.model import vae as vae_module
from scalekv_core.model.quant import check_format_on, format_problem
from scalekv_core.pipeline import InfinityPipeline

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER = ROOT / "default_model" / "infinity" / "infinity_shapes.safetensors"
VAE = ROOT / "default_model" / "vae" / "infinity_shapes_vae.safetensors"
T5 = ROOT / "default_model" / "text_encoders" / "t5_shapes"
MPS_FLOAT64 = ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. "
               "Please use float32 instead.")


@pytest.fixture
def mps_here(monkeypatch):
    """An MPS device 'present' in this process: probes answer per dtype from `works` (bf16: macOS 14+)."""
    works = {torch.bfloat16: True}
    monkeypatch.setattr(devices, "_PROBED", {})
    monkeypatch.setattr(devices, "_present", lambda d: d.type in ("cpu", "mps"))
    monkeypatch.setattr(devices, "_probe", lambda d, dtype: d.type != "mps" or works.get(dtype, False))
    return works


# ------------------------------------------------------------------------------------------ the table


def test_the_table_names_what_mps_lacks(monkeypatch):
    monkeypatch.setattr(devices, "_present", lambda d: d.type == "cpu")  # no MPS here: the table answers, not a probe
    assert "float64" in dtype_problem("mps", torch.float64)
    assert "float8_e4m3fn" in dtype_problem("mps", torch.float8_e4m3fn)
    assert dtype_problem("mps", torch.float32) is None and dtype_problem("mps", torch.int8) is None
    assert dtype_problem("cpu", torch.float64) is None and dtype_problem("cuda", torch.float8_e4m3fn) is None
    # bf16 depends on the OS: assumed there when no MPS device can be asked (planning for a Mac elsewhere)
    assert dtype_problem("mps", torch.bfloat16) is None


def test_a_present_device_is_probed_not_assumed(mps_here):
    assert dtype_problem("mps", torch.bfloat16) is None
    devices._PROBED.clear()
    mps_here[torch.bfloat16] = False  # macOS 13
    assert "macOS 14" in dtype_problem("mps", torch.bfloat16)
    devices._PROBED.clear()
    mps_here[torch.float8_e4m3fn] = True  # a torch that added fp8 on MPS: the probe has the last word
    assert dtype_problem("mps", torch.float8_e4m3fn) is None


def test_statistics_stay_on_the_device_unless_it_has_no_float64():
    assert statistics_device("cpu") == torch.device("cpu")
    assert statistics_device("cuda:1") == torch.device("cuda:1")
    assert statistics_device("mps") == torch.device("cpu")


# ------------------------------------------------------------------------------------------ 1. tiled decode


def test_tiled_decode_asks_where_its_float64_statistics_live(monkeypatch):
    """The per-channel float64 statistics follow statistics_device (the CPU for MPS), not a bare .double() on
    the compute device; on the CPU the result is the same bits as before."""
    vae = load_vae(VAE, decoder_only=True)
    z = torch.randn(1, vae.cfg.codebook_dim, 16, 16, generator=torch.Generator().manual_seed(0))
    before = vae.decode_tiled(z, 8)
    asked = []

    def spy(device):
        asked.append(torch.device(device))
        return torch.device("cpu")

    monkeypatch.setattr(vae_module, "statistics_device", spy)
    after = vae.decode_tiled(z, 8)
    assert asked and set(asked) == {torch.device("cpu")}
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------------ 2. fp8 on MPS


def test_fp8_weights_are_refused_for_mps_naming_int8():
    assert format_problem("fp8_e4m3fn", "mps") is not None
    assert format_problem("int8", "mps") is None and format_problem("int4", "mps") is None
    with pytest.raises(DeviceDtypeError, match=r"weight_format fp8_e4m3fn: cannot run on mps: .*float8.*int8"):
        check_format_on("fp8_e4m3fn", "mps", "weight_format")
    check_format_on("fp8_e4m3fn", "cpu")


def test_loader_refuses_fp8_for_mps_at_load(monkeypatch):
    """ComfyUI loads on the CPU and moves to MPS later: the run device is checked before any weight is read."""
    import scalekv_core.loader as loader

    monkeypatch.setattr(loader, "load_state_dict", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(DeviceDtypeError, match="weight_format fp8_e4m3fn: cannot run on mps.*int8"):
        load_transformer(TRANSFORMER, "cpu", "fp32", "fp8_e4m3fn", run_device="mps", weights_field="weight_format")


def test_a_pipeline_for_mps_refuses_fp8_weights_kept_on_the_cpu():
    model = load_transformer(TRANSFORMER, "cpu", "fp32", "fp8_e4m3fn")
    with pytest.raises(DeviceDtypeError, match="weights fp8_e4m3fn: cannot run on mps"):
        InfinityPipeline(model, load_vae(VAE, decoder_only=True), device="mps")


def test_kv_dtype_fp8_is_refused_where_the_device_is_known():
    CacheConfig(kv_dtype="fp8_e4m3fn").validate()  # no device: as before
    CacheConfig(kv_dtype="fp8_e4m3fn").validate("cpu")
    CacheConfig(kv_dtype="int8").validate("mps")
    with pytest.raises(DeviceDtypeError, match="kv_dtype fp8_e4m3fn: cannot run on mps.*int8"):
        CacheConfig(kv_dtype="fp8_e4m3fn").validate("mps")


def test_generate_refuses_fp8_kv_on_mps_before_t5_runs():
    model = load_transformer(TRANSFORMER, "cpu", "fp32")
    pipe = InfinityPipeline(model, load_vae(VAE, decoder_only=True), device="mps")
    with pytest.raises(DeviceDtypeError, match="kv_dtype fp8_e4m3fn"):
        pipe.generate("never encoded", cache=CacheConfig(policy="full", kv_dtype="fp8_e4m3fn"))


def test_the_planner_offers_int8_not_fp8_for_mps():
    steps = [o.weights for _, o in ladder(JobOptions(), 32, device="mps")]
    assert "fp8_e4m3fn" not in steps and "int8" in steps
    assert "fp8_e4m3fn" in [o.weights for _, o in ladder(JobOptions(), 32)]  # no device: as before
    answer = cheapest_fit("8b", 1024, 1024, 12, device="mps")
    assert answer["cheapest"]["options"]["weights"] == "int8"
    with pytest.raises(DeviceDtypeError, match="weights fp8_e4m3fn"):
        cheapest_fit("8b", 1024, 1024, 12, options=JobOptions(weights="fp8_e4m3fn"), device="mps")


def test_plan_device_flag(capsys):
    assert main(["plan", "--model", "8b", "--vram", "12", "--device", "mps"]) == 0
    out = capsys.readouterr().out
    assert "weights int8" in out and "fp8" not in out and "T5 fp32" in out
    assert main(["plan", "--model", "8b", "--vram", "12", "--device", "mps", "--weights", "fp8_e4m3fn"]) == 2
    assert "--weights fp8_e4m3fn: cannot run on mps" in capsys.readouterr().err
    assert main(["plan", "--kv-dtype", "fp8_e4m3fn", "--device", "mps"]) == 2
    assert "--kv-dtype fp8_e4m3fn: cannot run on mps" in capsys.readouterr().err


def test_generate_flags_are_checked_against_the_device():
    from scalekv_core.cli import _check_device_dtypes

    a = argparse.Namespace(device="mps", dtype="auto", weights="none", t5_weights="none", kv_dtype="auto",
                           transformer=str(TRANSFORMER))
    _check_device_dtypes(a)
    for flag, value in (("weights", "fp8_e4m3fn"), ("t5_weights", "fp8_e4m3fn"), ("kv_dtype", "fp8_e4m3fn")):
        bad = argparse.Namespace(**{**vars(a), flag: value})
        with pytest.raises(DeviceDtypeError, match=f"--{flag.replace('_', '-')} {value}: cannot run on mps"):
            _check_device_dtypes(bad)


def test_torch_dtype_errors_are_one_line_errors(capsys):
    def mps_float64():
        raise TypeError(MPS_FLOAT64)

    assert run_reporting_errors(mps_float64) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot convert a MPS Tensor to float64") and err.count("\n") == 1

    def bug():
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    with pytest.raises(TypeError):  # a programming error keeps its traceback
        run_reporting_errors(bug)


# ------------------------------------------------------------------------------------------ 3. precision


def fake_cuda(monkeypatch, capabilities: dict[int, tuple[int, int]], current: int = 0) -> list:
    """CUDA devices of these compute capabilities; is_bf16_supported says True, as it does with emulation."""
    asked = []

    def capability(device=None):
        index = current if device is None else torch.device(device).index
        asked.append(index if index is not None else current)
        return capabilities[asked[-1]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return asked


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((6, 1), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_is_bf16_only_where_cuda_computes_it_natively(monkeypatch, capability, expected):
    fake_cuda(monkeypatch, {0: capability})
    assert resolve_precision("auto", "cuda") == expected


def test_auto_asks_the_requested_cuda_device(monkeypatch):
    asked = fake_cuda(monkeypatch, {0: (8, 6), 1: (7, 5)}, current=0)
    assert resolve_precision("auto", "cuda:1") == torch.float16
    assert asked == [1]


def test_auto_for_cuda_without_a_gpu_here_still_answers(monkeypatch):
    """Planning for CUDA on a machine without one: fp16, as is_bf16_supported() made it, not a crash."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda") == torch.float16


def test_auto_on_mps_is_bf16_where_it_runs_else_fp32(mps_here):
    assert resolve_precision("auto", "mps") == torch.bfloat16
    devices._PROBED.clear()
    mps_here[torch.bfloat16] = False
    assert resolve_precision("auto", "mps") == torch.float32
    with pytest.raises(DeviceDtypeError, match="precision bf16: cannot run on mps: .*macOS 14.*fp32 or fp16"):
        resolve_precision("bf16", "mps")
    assert resolve_precision("fp16", "mps") == torch.float16
    assert resolve_precision("auto", "cpu") == torch.float32  # unchanged


# ------------------------------------------------------------------------------------------ 4. the meter


def test_peak_meter_on_mps_says_not_measured_instead_of_a_cpu_figure():
    meter = PeakMeter("mps")
    with meter.measure():
        x = torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)
        del x
    assert meter.peak_bytes is None
    assert meter.method.startswith("not measured on mps")
    cpu = PeakMeter("cpu")
    with cpu.measure():
        x = torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)
        del x
    assert cpu.peak_bytes >= 16 * 2**20 and cpu.method == "torch.profiler CPU allocator events"


def test_the_report_carries_the_reason_without_a_figure():
    pipe = InfinityPipeline.from_files(TRANSFORMER, VAE, T5)
    result = pipe.generate("a red circle", seed=1)
    meter = PeakMeter("mps")
    with meter.measure():
        pass
    report = pipe.memory_report(result.samples, 1, result.settings, result.schedule, meter)
    assert report.measured_peak_mb is None and report.measurement.startswith("not measured on mps")


# ------------------------------------------------------------------------------------------ 5. attention


def test_sdpa_lse_off_cuda_and_cpu_uses_the_math_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_flash_lse", lambda *a: calls.append("flash") or ("o", "l"))
    monkeypatch.setattr(attention, "_math_lse", lambda *a: calls.append("math") or ("o", "l"))
    q = torch.zeros(1, 1, 4, 8, device="meta")  # a device that is neither CUDA nor the CPU, as MPS
    attention._sdpa_lse_default(q, q, q, 1.0)
    attention._sdpa_lse_default(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 1.0)
    assert calls == ["math", "flash"]


def test_math_lse_matches_the_cpu_flash_kernel():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    out_m, lse_m = attention._math_lse(q, k, v, 0.25)
    out_f, lse_f = attention._flash_lse(q, k, v, 0.25)
    assert torch.allclose(out_m, out_f, atol=1e-5) and torch.allclose(lse_m, lse_f.float(), atol=1e-5)


def test_the_flash_backend_is_refused_on_mps():
    assert "CUDA device or the CPU" in attention.problem("flash", "mps", torch.float32)
    with pytest.raises(ValueError, match="flash"):
        attention.resolve("flash", "mps", torch.float32)
    assert attention.resolve("auto", "mps", torch.float32) == "sdpa"


@pytest.mark.parametrize("value", ["nan", "12", "", "x" * (1 << 20), "mps:bogus"])
def test_plan_device_flag_refuses_what_is_no_device(value, capsys):
    """A NaN, a number, nothing, a megabyte or a malformed index is one argparse error naming --device, briefly."""
    assert main(["plan", "--model", "8b", "--vram", "12", "--device", value]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and len(err) < 2000 and "Traceback" not in err
