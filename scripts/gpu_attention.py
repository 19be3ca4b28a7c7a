"""Time every attention backend that runs here on the 2B and 8B attention shapes, scale by scale (docs/attention.md).

For each model, batch and scale of the schedule (1024x1024 by default): the self-attention of that scale's queries
over every key so far (the full cache; batch x 2 rows with guidance), as the sampler calls it (`kvcache.attention.
sdpa`), and its `sdpa_lse`. Each backend gets the median GPU time of `--reps` calls (CUDA events), the host time
per call (launch cost: what a launch-bound scale pays), the per-image attention time (scale times x depth), and
its largest error against float32 math. The JSON names the fastest backend per model and batch, which is what
`AUTO_ORDER` in kvcache/attention.py should follow. Runs in about two minutes on an H100; also runs on the CPU
(`--device cpu --size 0.06M --models 2b`) as a smoke test.

Usage: python scripts/gpu_attention.py [--models 2b,8b] [--batches 1,4] [--out out/gpu/gpu_attention.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalekv_core.kvcache import attention as A  # noqa: E402
from scalekv_core.model.config import KNOWN_MODELS  # noqa: E402
from scalekv_core.schedules import get_schedule  # noqa: E402

#: The math kernel materialises the scores; above this it is skipped at a scale (it is a reference, not a contender).
MATH_SCORE_BYTES = 8 * 2**30


def _inputs(rows: int, heads: int, head_dim: int, n: int, m: int, dtype: torch.dtype, device: torch.device,
            seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys cos-normalised with a learned-scale-like factor (as the model's), values random."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(rows, heads, n, head_dim, generator=g, device=device), dim=-1) * 8.0
    k = F.normalize(torch.randn(rows, heads, m, head_dim, generator=g, device=device), dim=-1)
    v = torch.randn(rows, heads, m, head_dim, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _time(fn, reps: int, device: torch.device) -> tuple[float, float]:
    """(median device milliseconds per call, host microseconds per call) after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        return med, med * 1e3
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host = []
    for s, e in zip(starts, ends):
        s.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), statistics.median(host)


def measure(model: str, batch: int, size: str, dtype: torch.dtype, device: torch.device, reps: int,
            problems: dict[str, str | None]) -> dict:
    """Every runnable backend's times and errors on one model's shapes at one batch."""
    cfg = KNOWN_MODELS[model]
    schedule = get_schedule(1.0, size)
    rows, heads, c = 2 * batch, cfg.num_heads, cfg.head_dim
    runnable = [n for n, why in problems.items() if why is None]
    result: dict = {"model": model, "batch": batch, "rows": rows, "heads": heads, "head_dim": c,
                    "depth": cfg.depth, "scales": [], "backends": {}}
    per_backend = {n: {"ms": [], "lse_ms": [], "host_us": [], "max_err": 0.0, "lse_max_err": 0.0,
                       "lse_out_max_err": 0.0, "errors": {}} for n in runnable}
    seen = 0
    for si, n in enumerate(schedule.tokens_per_scale):
        m = seen + n
        seen = m
        result["scales"].append({"scale": si, "queries": n, "keys": m})
        q, k, v = _inputs(rows, heads, c, n, m, dtype, device, seed=si)
        ref_out = ref_lse = None
        if rows * heads * n * m * 4 <= MATH_SCORE_BYTES:
            try:  # its float32 temporaries can peak at several times the scores: a failure costs this scale's
                with torch.no_grad():  # error figures, not the run
                    ref_out, ref_lse = A.BACKENDS["math"].attend_lse(q.float(), k.float(), v.float(), 1.0)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        for name in runnable:
            stats = per_backend[name]
            if name == "math" and rows * heads * n * m * q.element_size() > MATH_SCORE_BYTES:
                stats["ms"].append(None), stats["lse_ms"].append(None), stats["host_us"].append(None)
                stats["errors"][si] = "skipped: the scores would not fit the limit"
                continue
            try:
                with A.use_backend(name, device, dtype), torch.no_grad():
                    ms, host = _time(lambda: A.sdpa(q, k, v, dtype), reps, device)
                    lse_ms, _ = _time(lambda: A.sdpa_lse(q, k, v, dtype), reps, device)
                    out = A.sdpa(q, k, v, dtype)
                    lse_out, lse = A.sdpa_lse(q, k, v, dtype)
            except Exception as e:  # a kernel that refuses this shape: recorded, the others go on
                stats["ms"].append(None), stats["lse_ms"].append(None), stats["host_us"].append(None)
                stats["errors"][si] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            stats["ms"].append(ms), stats["lse_ms"].append(lse_ms), stats["host_us"].append(host)
            if ref_out is not None:
                stats["max_err"] = max(stats["max_err"], (out.float() - ref_out).abs().max().item())
                stats["lse_max_err"] = max(stats["lse_max_err"], (lse.float() - ref_lse).abs().max().item())
                stats["lse_out_max_err"] = max(stats["lse_out_max_err"], (lse_out.float() - ref_out).abs().max().item())
        del q, k, v, ref_out, ref_lse
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, stats in per_backend.items():
        complete = all(t is not None for t in stats["ms"])
        stats["image_attention_ms"] = cfg.depth * sum(stats["ms"]) if complete else None
        stats["image_lse_ms"] = cfg.depth * sum(stats["lse_ms"]) if complete else None
        stats["host_us_median"] = statistics.median(t for t in stats["host_us"] if t is not None) \
            if any(t is not None for t in stats["host_us"]) else None
        result["backends"][name] = stats
    timed = {n: s["image_attention_ms"] for n, s in per_backend.items() if s["image_attention_ms"] is not None}
    exact = {n: t for n, t in timed.items() if n != "sage"}
    result["fastest"] = min(timed, key=timed.get) if timed else None
    result["fastest_exact"] = min(exact, key=exact.get) if exact else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="2b,8b")
    p.add_argument("--batches", default="1,4", help="images per prompt (rows are twice this, with guidance)")
    p.add_argument("--size", default="1M", help="schedule size (1M: 1024x1024)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="out/gpu/gpu_attention.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    problems = A.available(device, dtype)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": a.dtype, "size": a.size, "reps": a.reps, "problems": problems,
            "auto_resolves_to": A.resolve("auto", device, dtype), "auto_order": A.AUTO_ORDER,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    for pkg in ("flash_attn", "sageattention"):
        try:
            info[f"{pkg}_version"] = getattr(__import__(pkg), "__version__", "?")
        except Exception:
            info[f"{pkg}_version"] = None
    runs = []
    for model in a.models.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            t0 = time.perf_counter()
            r = measure(model, batch, a.size, dtype, device, a.reps, problems)
            runs.append(r)
            print(f"== {model} batch {batch} ({r['rows']} rows, {r['heads']} heads of {r['head_dim']}), "
                  f"{time.perf_counter() - t0:.0f} s: fastest {r['fastest']}, fastest exact {r['fastest_exact']}")
            for name, s in r["backends"].items():
                img, lse = (("-" if t is None else f"{t:8.2f}") for t in (s["image_attention_ms"], s["image_lse_ms"]))
                print(f"  {name:10s} image attention {img} ms  lse {lse} ms  "
                      f"host {s['host_us_median'] or math.nan:6.1f} us/call  max err {s['max_err']:.2e}  "
                      f"lse err {s['lse_max_err']:.2e}" + (f"  refused at {len(s['errors'])} scales"
                                                            if s["errors"] else ""))
    for name, why in problems.items():
        if why is not None:
            print(f"  {name:10s} not run: {why}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
