"""The attention backend option: every name runs or is refused clearly, the default is today's call bit for bit,
the optional packages are called in their own layout and their output is used, and the pipeline and CLI reach it."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scalekv_core.kvcache import attention as A
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "infinity-tiny"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
CASE = "p1_spaceship_s99_cfg4_tau1"
CPU = torch.device("cpu")


def _qkv(b: int = 2, h: int = 3, n: int = 9, m: int = 21, c: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, L, c, generator=g) for L in (n, m, m))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its LSE written out in float64, the yardstick for every backend."""
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.matmul(s.softmax(-1), v.double()), s.logsumexp(-1)


def _fake_package(monkeypatch: pytest.MonkeyPatch, package: str, function: str, result=None) -> list[dict]:
    """Install a fake `package` whose `function` records each call and returns `result(q, k, v, kwargs)`."""
    calls: list[dict] = []

    def fake(q, k, v, **kwargs):
        calls.append({"shapes": [tuple(t.shape) for t in (q, k, v)], "dtypes": [t.dtype for t in (q, k, v)],
                      "last_strides": [t.stride(-1) for t in (q, k, v)], "kwargs": kwargs})
        return result(q, k, v, kwargs)

    module = types.ModuleType(package)
    setattr(module, function, fake)
    monkeypatch.setitem(sys.modules, package, module)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", A.CHOICES)
def test_every_name_runs_here_or_is_refused_naming_it_the_reason_and_the_choices(name: str, dtype) -> None:
    why = A.problem(name, CPU, dtype)
    if why is None:
        q, k, v = _qkv()
        with A.use_backend(name, CPU, dtype) as resolved:
            assert A.current() == resolved and resolved in A.BACKENDS
            out = A.sdpa(q, k, v, dtype)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out.double(), _reference(q.to(dtype), k.to(dtype), v.to(dtype))[0],
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0, check_dtype=False)
    else:
        with pytest.raises(ValueError) as e:
            A.resolve(name, CPU, dtype)
        assert f"'{name}'" in str(e.value) and why in str(e.value)
        assert "choose one of " + ", ".join(A.CHOICES) in str(e.value)
    assert A.current() == "sdpa"  # the selection ends with the block


def test_on_the_cpu_efficient_cudnn_and_the_packages_are_refused_with_why() -> None:
    problems = A.available(CPU, torch.float32)
    assert problems["sdpa"] is None and problems["math"] is None and problems["flash"] is None
    assert "needs a CUDA device" in problems["efficient"] and "needs a CUDA device" in problems["cudnn"]
    if importlib.util.find_spec("flash_attn") is None:
        assert problems["flash_attn"] == "package flash_attn is not installed (pip install flash-attn)"
    if importlib.util.find_spec("sageattention") is None:
        assert "package sageattention is not installed" in problems["sage"]


def test_an_unknown_name_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'; choose one of auto, sdpa, flash, "
                                         r"efficient, cudnn, math, flash_attn, sage \(usable on cpu in float32: "
                                         r"auto, sdpa, flash, math"):
        with A.use_backend("xformers", CPU, torch.float32):
            pass
    with pytest.raises(ValueError, match="unknown attention backend 12"):
        A.resolve(12, CPU, torch.float32)  # type: ignore[arg-type]


def test_auto_on_the_cpu_is_todays_call_bit_for_bit() -> None:
    q, k, v = _qkv()
    today = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    today_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=1.0)[:2]
    for name in ("auto", "sdpa"):
        with A.use_backend(name, CPU, torch.float32) as resolved:
            assert resolved == "sdpa"
            assert torch.equal(A.sdpa(q, k, v, torch.float32), today)
            out, lse = A.sdpa_lse(q, k, v, torch.float32)
        assert torch.equal(out, today_lse[0]) and torch.equal(lse, today_lse[1])
    assert torch.equal(A.sdpa(q, k, v, torch.float32), today)  # no selection at all: the same


@pytest.mark.parametrize("name", ["sdpa", "flash", "math"])
def test_lse_of_every_cpu_backend_is_right_and_merges_to_the_whole(name: str) -> None:
    q, k, v = _qkv(m=40)
    ref_out, ref_lse = _reference(q, k, v)
    with A.use_backend(name, CPU, torch.float32):
        out, lse = A.sdpa_lse(q, k, v, torch.float32)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
        a, b = A.sdpa_lse(q, k[:, :, :25], v[:, :, :25], torch.float32), A.sdpa_lse(q, k[:, :, 25:], v[:, :, 25:],
                                                                                    torch.float32)
    torch.testing.assert_close(A.merge_partials(*a, *b).double(), ref_out, atol=1e-5, rtol=0)


def test_math_and_flash_agree_with_todays_call_to_float_rounding() -> None:
    q, k, v = _qkv()
    today = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    for name in ("math", "flash"):
        with A.use_backend(name, CPU, torch.float32):
            torch.testing.assert_close(A.sdpa(q, k, v, torch.float32), today, atol=1e-6, rtol=1e-5)


def test_a_mask_goes_to_plain_sdpa_where_the_backend_takes_none() -> None:
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[1, ..., 15:] = False
    today = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    with A.use_backend("flash", CPU, torch.float32):  # SDPA's flash kernel takes no mask
        assert torch.equal(A.attention(q, k, v, 0.25, mask), today)
    with A.use_backend("math", CPU, torch.float32):  # the math kernel does, and runs it
        out = A.attention(q, k, v, 0.25, mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.25, mask)[0], atol=1e-5, rtol=0)


def test_fake_flash_attn_is_called_in_its_layout_and_dtype_and_its_output_is_used(monkeypatch) -> None:
    def blhc_attention(q, k, v, kw):  # the real function's contract: (B, L, H, c) in, (B, L, H, c) out
        return F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                              v.transpose(1, 2).float(),
                                              scale=kw["softmax_scale"]).transpose(1, 2).to(q.dtype)

    calls = _fake_package(monkeypatch, "flash_attn", "flash_attn_func", blhc_attention)
    q, k, v = _qkv()
    assert A.problem("flash_attn", "cuda", torch.bfloat16) is None  # installed, and CUDA + bf16 by its rules
    with A.use_backend("flash_attn", "cuda", torch.bfloat16):  # tensors stay on the CPU: the fake does not care
        out = A.sdpa(q, k, v, torch.bfloat16)
    (call,) = calls
    assert call["shapes"] == [(2, 9, 3, 16), (2, 21, 3, 16), (2, 21, 3, 16)]  # (B, L, H, c)
    assert call["dtypes"] == [torch.bfloat16] * 3 and call["last_strides"] == [1, 1, 1]
    assert call["kwargs"] == {"dropout_p": 0.0, "softmax_scale": 1.0, "causal": False}
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(*(t.bfloat16() for t in (q, k, v)))[0], atol=2e-2, rtol=0)

    marked = _fake_package(monkeypatch, "flash_attn", "flash_attn_func",
                           lambda q, k, v, kw: torch.full_like(q, 7.0))
    with A.use_backend("flash_attn", "cuda", torch.float16):
        assert torch.equal(A.sdpa(q, k, v, torch.float16), torch.full(q.shape, 7.0, dtype=torch.float16))
        out, lse = A.sdpa_lse(q, k, v, torch.float16)  # it gives no LSE: SDPA's fused kernel serves sdpa_lse
    assert len(marked) == 1 and lse.shape == (2, 3, 9) and not torch.equal(out, torch.full_like(out, 7.0))


def test_cross_attention_takes_the_backend_unmasked_and_sdpa_masked(monkeypatch) -> None:
    calls = _fake_package(monkeypatch, "flash_attn", "flash_attn_func", lambda q, k, v, kw: torch.full_like(q, 3.0))
    q, k, v = (t.half() for t in _qkv())
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[0, ..., 10:] = False
    with A.use_backend("flash_attn", "cuda", torch.float16):
        assert torch.equal(A.attention(q, k, v, 0.25), torch.full_like(q, 3.0))
        masked = A.attention(q.float(), k.float(), v.float(), 0.25, mask)
    assert [c["kwargs"]["softmax_scale"] for c in calls] == [0.25]  # the masked call did not reach it
    assert torch.equal(masked, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                              scale=0.25))


@pytest.mark.parametrize("name", sorted(A.BACKENDS))
def test_float32_on_cuda_goes_to_sdpa_where_the_kernel_takes_only_half(name: str) -> None:
    """The prompt pooling attends in float32 inside the generation: a half-only CUDA kernel must not receive it."""
    backend = A.BACKENDS[name]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    half_only = name in {"flash", "cudnn", "flash_attn", "sage"}  # SDPA's flash/cuDNN and both packages
    assert A.runs_plain_sdpa(backend, cuda, torch.float32, masked=False) == half_only
    assert not A.runs_plain_sdpa(backend, cuda, torch.bfloat16, masked=False)
    assert not A.runs_plain_sdpa(backend, cpu, torch.float32, masked=False)  # the CPU flash kernel takes fp32
    assert A.runs_plain_sdpa(backend, cuda, torch.bfloat16, masked=True) == (name in {"flash", "cudnn", "flash_attn",
                                                                                     "sage"})


def test_fake_sage_is_called_in_hnd_layout_with_its_scale(monkeypatch) -> None:
    calls = _fake_package(monkeypatch, "sageattention", "sageattn", lambda q, k, v, kw: torch.full_like(q, 5.0))
    q, k, v = _qkv()
    with A.use_backend("sage", "cuda", torch.bfloat16):
        out = A.sdpa(q, k, v, torch.bfloat16)
    (call,) = calls
    assert call["shapes"] == [(2, 3, 9, 16), (2, 3, 21, 16), (2, 3, 21, 16)] and call["dtypes"] == [torch.bfloat16] * 3
    assert call["kwargs"] == {"tensor_layout": "HND", "is_causal": False, "sm_scale": 1.0}
    assert torch.equal(out, torch.full(q.shape, 5.0, dtype=torch.bfloat16))


def test_packages_are_refused_on_the_cpu_in_fp32_and_when_broken(monkeypatch) -> None:
    _fake_package(monkeypatch, "flash_attn", "flash_attn_func", lambda *a: None)
    with pytest.raises(ValueError, match=r"'flash_attn' cannot run here: needs a CUDA device \(this run is on cpu\)"):
        A.resolve("flash_attn", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match=r"needs fp16 or bf16 \(this model runs float32\)"):
        A.resolve("flash_attn", "cuda", torch.float32)
    monkeypatch.setitem(sys.modules, "sageattention", types.ModuleType("sageattention"))  # no sageattn in it
    with pytest.raises(ValueError, match="package sageattention is installed but sageattn does not load"):
        A.resolve("sage", "cuda", torch.float16)


def test_not_installed_packages_are_refused_by_name(monkeypatch) -> None:
    for package in ("flash_attn", "sageattention"):
        monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"'flash_attn' cannot run here: package flash_attn is not installed "
                                         r"\(pip install flash-attn\); choose one of auto"):
        A.resolve("flash_attn", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="'sage' cannot run here: package sageattention is not installed"):
        A.resolve("sage", "cuda", torch.bfloat16)


def test_auto_takes_the_first_backend_of_its_order_that_can_run(monkeypatch) -> None:
    assert A.resolve("auto", CPU, torch.float32) == "sdpa"
    monkeypatch.setitem(A.AUTO_ORDER, "cuda", ("flash_attn", "sage", "sdpa"))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "sageattention") else real_find_spec(name, *a))
    assert A.resolve("auto", "cuda", torch.bfloat16) == "sdpa"  # neither installed
    _fake_package(monkeypatch, "sageattention", "sageattn", lambda *a: None)
    assert A.resolve("auto", "cuda", torch.bfloat16) == "sage"
    _fake_package(monkeypatch, "flash_attn", "flash_attn_func", lambda *a: None)
    assert A.resolve("auto", "cuda", torch.bfloat16) == "flash_attn"
    assert A.resolve("auto", "cuda", torch.float32) == "sdpa"  # both need fp16/bf16


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return InfinityPipeline.from_files(DATA / "infinity_tiny.safetensors", DATA / "vae_tiny.safetensors",
                                       device="cpu", precision="fp32")


def _generate(pipe: InfinityPipeline, **kwargs):
    call = MANIFEST["runs"]["full_kv"][CASE]["autoregressive_infer_cfg_call"]
    cond = TextConditioning.from_numpy_file(DATA / "full_kv" / CASE / "text_kv_compact.npy")
    return pipe.generate(cond, seed=call["g_seed"], cfg=call["cfg_list"], tau=call["tau_list"], top_k=call["top_k"],
                         top_p=call["top_p"], schedule=get_schedule(1.0, MANIFEST["config"]["pn"]), keep_logits=True,
                         **kwargs)


def test_pipeline_runs_every_attention_through_the_chosen_backend(pipe, monkeypatch) -> None:
    seen: list[tuple[tuple[int, ...], float, bool]] = []
    math_backend = A.BACKENDS["math"]

    def spy(q, k, v, scale, mask=None):
        seen.append((tuple(q.shape), scale, mask is not None))
        return math_backend.attend(q, k, v, scale, mask)

    monkeypatch.setitem(A.BACKENDS, "math", dataclasses.replace(math_backend, attend=spy))
    default = _generate(pipe)
    chosen = _generate(pipe, attention="math")
    assert (default.info["attention"], chosen.info["attention"]) == ("sdpa", "math")
    cfg = pipe.transformer.cfg
    n_scales = len(MANIFEST["config"]["scale_schedule"])
    self_calls = [s for s in seen if s[1] == 1.0]
    assert len(self_calls) == cfg.depth * n_scales  # every block's self-attention at every scale
    assert len(seen) > len(self_calls)  # and the cross-attentions (scale 1/sqrt(c)) too
    for a, b in zip(default.samples.bits, chosen.samples.bits):  # math vs the fused kernel: the same picture
        assert torch.equal(a, b)
    np.testing.assert_array_equal(default.images, chosen.images)
    for a, b in zip(default.samples.logits, chosen.samples.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_pipeline_refuses_a_backend_that_cannot_run_before_any_work(pipe) -> None:
    with pytest.raises(ValueError, match="'cudnn' cannot run here: needs a CUDA device"):
        pipe.generate("a prompt the pipeline has no T5 for", attention="cudnn")  # refused before encoding


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalekv_core", "generate", "--transformer",
                           str(DATA / "infinity_tiny.safetensors"), "--vae", str(DATA / "vae_tiny.safetensors"),
                           "--text-kv", str(DATA / "full_kv" / CASE / "text_kv_compact.npy"), "--seed", "99",
                           "--cfg", "4", "--tau", "1", "--width", "256", "--height", "256", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_attention_flag_reaches_the_run_and_keeps_the_original_bits(tmp_path: Path) -> None:
    r = _cli("--attention", "math", "--out", str(tmp_path / "img.png"), "--dump", str(tmp_path / "dump"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["attention"] == "math"
    ref = DATA / "full_kv" / CASE
    for si in range(len(MANIFEST["config"]["scale_schedule"])):
        f = f"scale_{si:02d}_bits.npy"
        np.testing.assert_array_equal(np.load(tmp_path / "dump" / f), np.load(ref / f), err_msg=f)


def test_cli_refuses_a_backend_that_cannot_run_before_loading(tmp_path: Path) -> None:
    r = _cli("--attention", "efficient", "--transformer", str(tmp_path / "missing.safetensors"),
             "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --attention: attention backend 'efficient' cannot run here: needs a CUDA "
                               "device (this run is on cpu); choose one of auto, sdpa, flash")
    r = _cli("--attention", "xformers", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "--attention" in r.stderr and "'xformers'" in r.stderr and "flash_attn" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_gpu_attention_script_runs_on_the_cpu_and_names_the_fastest(tmp_path: Path) -> None:
    """scripts/gpu_attention.py (run on a GPU by scripts/gpu_bench.sh) on a small shape here: every CPU backend
    timed at every scale, errors against float32 math tiny, the refused ones listed with their reasons."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_attention
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "attention.json"
    assert gpu_attention.main(["--device", "cpu", "--dtype", "fp32", "--size", "0.06M", "--models", "layer12",
                               "--batches", "1", "--reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["info"]["auto_resolves_to"] == "sdpa" and "needs a CUDA device" in data["info"]["problems"]["cudnn"]
    (run,) = data["runs"]
    assert [s["queries"] for s in run["scales"]] == [1, 4, 16, 36, 64, 144, 256]
    assert run["scales"][-1]["keys"] == 521 and run["rows"] == 2 and run["heads"] == 8
    assert set(run["backends"]) == {"sdpa", "flash", "math"} and run["fastest"] in run["backends"]
    for stats in run["backends"].values():
        assert len(stats["ms"]) == 7 and all(t > 0 for t in stats["ms"]) and stats["image_attention_ms"] > 0
        assert stats["max_err"] < 1e-5 and stats["lse_max_err"] < 1e-5 and stats["lse_out_max_err"] < 1e-5
        assert not stats["errors"]
