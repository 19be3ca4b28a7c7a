"""KV-policy benchmark: stored bytes, measured peak memory and wall time of every policy, as ratios to `full`.

    python -m scalekv_core.bench kv --model tiny                     # the tiny reference model, CPU, 256x256
    python -m scalekv_core.bench kv --model 2b --size 1M --device cuda --dtype bf16   # 2B-shaped, random weights
    python -m scalekv_core.bench kv-storage --num-pairs 20   # 8-bit K/V against auto on the embedded model

All figures come from one run of this command on one machine. Peak memory is measured above what is allocated
when sampling starts (the weights): `torch.cuda.max_memory_allocated` on CUDA, allocator events on CPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from ..kvcache import CacheConfig
from ..kvcache.memory import PeakMeter, plan_memory
from ..model.config import KNOWN_MODELS, InfinityConfig
from ..model.text_encoder import TextConditioning
from ..model.transformer import Infinity
from ..safe_files import write_text
from ..sampler import SamplerSettings, sample
from ..schedules import Schedule, get_schedule

TINY = Path(__file__).resolve().parents[2] / "tests" / "data" / "infinity-tiny"
POLICIES = ["sliding_window", "streamingllm", "snapkv", "pyramidkv", "scalekv"]


def _random_model(cfg: InfinityConfig, device: str, dtype: torch.dtype, seed: int) -> Infinity:
    """A model of the given shape with small random weights (no checkpoint needed to measure memory and speed)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Infinity(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_mul_1H11"):
                p.fill_(torch.log(torch.tensor(4.0)).item())
            elif p.ndim >= 2:
                p.normal_(0, 0.02)
            else:
                p.zero_()
    return model.set_block_dtype(dtype).eval().requires_grad_(False)


def _load(args: argparse.Namespace) -> tuple[Infinity, TextConditioning, bool]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.model == "tiny":
        from ..loader import load_transformer

        model = load_transformer(TINY / "infinity_tiny.safetensors", args.device, args.dtype)
        cond = TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")
        return model, cond, False
    cfg = KNOWN_MODELS[args.model]
    if args.depth:
        cfg = InfinityConfig(**{**cfg.__dict__, "depth": args.depth, "block_chunks": 2 if args.depth % 2 == 0 else 1})
    model = _random_model(cfg, args.device, dtype, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cond = TextConditioning.from_padded(torch.randn(1, 32, cfg.text_channels, generator=g), torch.ones(1, 32))
    return model, cond, cfg.d_vae == 56


def _run(model: Infinity, cond: TextConditioning, schedule, config: CacheConfig, patchify: bool, device: str,
         measure_memory: bool) -> dict:
    settings = SamplerSettings(cfg=3.0, tau=1.0, seed=0)
    meter = PeakMeter(device)
    if measure_memory:
        with meter.measure():
            out = sample(model, cond, schedule, settings, patchify, cache_config=config)
        return {"peak_bytes": meter.peak_bytes, "method": meter.method, "plan": out.plan,
                "bits": [b.cpu() for b in out.bits], "seconds": meter.seconds}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sample(model, cond, schedule, settings, patchify, cache_config=config, time_eviction=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    timed = sample(model, cond, schedule, settings, patchify, cache_config=config, time_eviction=True)
    return {"seconds": wall, "eviction_seconds": timed.eviction_seconds, "plan": out.plan,
            "bits": [b.cpu() for b in out.bits]}


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, parsed with the CLI's one-line errors."""
    from ..cli_args import Parser, device_flag, number_flag
    from ..kvcache.config import KV_DTYPES
    from ..kvcache.policies.scalekv import SCORINGS
    from ..schedules import SIZES

    p = Parser(prog="python -m scalekv_core.bench")
    sub = p.add_subparsers(dest="bench", required=True)
    k = sub.add_parser("kv", help="memory and speed of every KV policy, as ratios to the full cache")
    k.add_argument("--model", default="tiny", choices=["tiny", *sorted(KNOWN_MODELS)])
    k.add_argument("--depth", type=int, default=0, help="override the depth (fewer layers, same width)")
    k.add_argument("--size", default="0.06M", choices=list(SIZES), help="schedule size: 0.06M, 0.25M, 0.60M, 1M")
    k.add_argument("--budgets", default="4%,10%,20%")
    k.add_argument("--policies", default=",".join(POLICIES))
    k.add_argument("--scoring", default="improved", choices=SCORINGS)
    k.add_argument("--window", type=number_flag("window", "--window"), default=16,
                   help="observation window (4 suits the tiny 256x256 model)")
    k.add_argument("--kv-dtype", default="auto", choices=sorted(KV_DTYPES))
    k.add_argument("--device", default="cpu", type=device_flag)
    k.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    k.add_argument("--seed", type=number_flag("seed", "--seed"), default=0)
    k.add_argument("--batch", type=number_flag("batch", "--batch"), default=1, help="images per run (one prompt repeated)")
    k.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (the fastest counts)")
    k.add_argument("--no-timing", action="store_true",
                   help="measure memory only (one run per configuration): for full-size models on a CPU")
    k.add_argument("--json", help="also write every figure here")
    st = sub.add_parser("kv-storage", help="8-bit K/V storage against auto on the embedded model (bits, PSNR)")
    st.add_argument("--kv-dtypes", default="fp8_e4m3fn,int8")
    st.add_argument("--policies", default="full,scalekv")
    st.add_argument("--budget", default="10%")
    st.add_argument("--window", type=number_flag("window", "--window"), default=4,
                    help="observation window (4 suits 256x256)")
    st.add_argument("--num-pairs", type=int, default=20)
    st.add_argument("--pairs-seed", type=int, default=0)
    st.add_argument("--threads", type=int, default=0)
    st.add_argument("--json", help="also write every figure here")
    return p


def policy_list(text: str, flag: str = "--policies", allowed: Sequence[str] | None = None,
                what: str = "policy") -> list[str]:
    """Comma-separated names (KV policies unless `allowed` says otherwise), each known: InputError naming `flag`
    and the name otherwise."""
    from ..kvcache.config import POLICIES as KNOWN
    from ..limits import InputError, shown

    allowed = list(KNOWN) if allowed is None else list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise InputError(f"{flag}: unknown {what} {shown(bad[0]) if bad else shown(text)}; choose from "
                         f"{', '.join(allowed)}")
    return names


def check_configs(configs: list[CacheConfig], schedule: Schedule, budget_flag: str) -> None:
    """Each cache setting valid, its % or token budget tried on the schedule (the CLI's check, before any work)."""
    from ..kvcache.budget import BudgetError
    from ..limits import InputError

    for config in configs:
        try:
            config.validate()
            if config.policy == "scalekv":
                from ..kvcache.scoring import check_window

                check_window(config.window, "--window")
            if config.policy != "full" and not str(config.budget).lower().endswith("mb"):
                config.build(schedule, 1, 1, 1, 1, torch.float32)
        except BudgetError as e:
            raise InputError(f"{budget_flag} {config.budget} ({config.policy}, window {config.window}): {e}") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m scalekv_core.bench kv|kv-storage ...`: a bad value or path is one line, `error: ...`, exit 2."""
    from ..cli_args import run_reporting_errors

    return run_reporting_errors(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..cli_args import output_file, check_budget_text

    p = build_parser()
    a = p.parse_args(argv)
    if a.bench == "kv-storage":
        return storage_fidelity(a)

    # every value and the output path, before the model is built or any run starts
    budgets = [check_budget_text(b, "--budgets") for b in a.budgets.split(",")]
    policies = policy_list(a.policies)
    schedule = get_schedule(1.0, a.size)
    check_configs([CacheConfig(policy=policy, budget=budget, scoring=a.scoring, kv_dtype=a.kv_dtype, window=a.window)
                   for budget in budgets for policy in policies], schedule, "--budgets")
    if a.json:
        output_file(a.json, "--json")
    torch.manual_seed(a.seed)
    model, cond, patchify = _load(a)
    cond = cond.repeat_each(a.batch)
    cfg = model.cfg
    print(f"model {a.model} ({cfg.describe()}), {schedule.pixel_size[1]}x{schedule.pixel_size[0]}, "
          f"batch {a.batch}, device {a.device}, blocks {a.dtype}, torch {torch.__version__}", flush=True)

    def measure(config: CacheConfig) -> dict:
        mem = _run(model, cond, schedule, config, patchify, a.device, measure_memory=True)
        best = None
        if a.no_timing:
            best = {"seconds": float("nan"), "eviction_seconds": float("nan"), "plan": mem["plan"], "bits": mem["bits"]}
        for _ in range(0 if a.no_timing else max(1, a.repeats)):
            r = _run(model, cond, schedule, config, patchify, a.device, measure_memory=False)
            best = r if best is None or r["seconds"] < best["seconds"] else best
        planned = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, a.batch, config,
                              model.block_dtype, text_tokens=cond.max_len)
        return {**best, "peak_bytes": mem["peak_bytes"], "method": mem["method"],
                "stored_bytes": planned.analytic_mb * 2**20, "planned_peak_bytes": planned.sampling_peak_mb * 2**20}

    full = measure(CacheConfig(policy="full", kv_dtype=a.kv_dtype))
    rows = []
    header = (f"{'policy':<16}{'budget':>7}{'stored KV':>11}{'peak mem':>10}{'time':>8}{'evict %':>9}{'bits = full':>13}"
              f"{'peak MB':>10}{'full MB':>9}")
    print(header)
    print(f"{'full':<16}{'-':>7}{1:>11.3f}{1:>10.3f}{1:>8.3f}{0:>9.2f}{1:>13.3f}{full['peak_bytes'] / 2**20:>10.1f}"
          f"{full['peak_bytes'] / 2**20:>9.1f}", flush=True)
    for budget in budgets:
        for policy in policies:
            config = CacheConfig(policy=policy, budget=budget, scoring=a.scoring, kv_dtype=a.kv_dtype,
                                 window=a.window)
            r = measure(config)
            same = sum((x == y).sum().item() for x, y in zip(r["bits"], full["bits"])) / sum(x.numel() for x in full["bits"])
            row = {"policy": policy, "budget": budget, "stored_ratio": r["stored_bytes"] / full["stored_bytes"],
                   "peak_ratio": r["peak_bytes"] / full["peak_bytes"], "time_ratio": r["seconds"] / full["seconds"],
                   "eviction_fraction": r["eviction_seconds"] / r["seconds"], "bits_equal_full": same,
                   "peak_mb": r["peak_bytes"] / 2**20, "full_peak_mb": full["peak_bytes"] / 2**20,
                   "planned_peak_mb": r["planned_peak_bytes"] / 2**20, "seconds": r["seconds"]}
            rows.append(row)
            print(f"{policy:<16}{budget:>7}{row['stored_ratio']:>11.3f}{row['peak_ratio']:>10.3f}{row['time_ratio']:>8.3f}"
                  f"{100 * row['eviction_fraction']:>9.2f}{same:>13.3f}{row['peak_mb']:>10.1f}{row['full_peak_mb']:>9.1f}",
                  flush=True)
    verdicts = _targets(rows)
    for line in verdicts:
        print(line)
    if a.json:
        write_text(a.json, json.dumps({"args": vars(a), "full": {k: v for k, v in full.items() if k not in ("plan", "bits")},
                                       "rows": rows, "targets": verdicts, "torch": torch.__version__}, indent=1))
    return 0


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets at 10% for ScaleKV, each said to be met or missed."""
    out = []
    for r in rows:
        if r["policy"] != "scalekv" or r["budget"].strip() != "10%":
            continue
        checks = [("stored KV <= 10.5% of full", r["stored_ratio"] <= 0.105),
                  ("measured peak above weights <= 20% of full's", r["peak_ratio"] <= 0.20),
                  ("never slower than full", r["time_ratio"] <= 1.0),
                  ("scoring + eviction < 5% of sampling time", r["eviction_fraction"] < 0.05)]
        for name, ok in checks:
            if "slower" in name or "eviction" in name:
                if r["time_ratio"] != r["time_ratio"]:  # NaN: timing was not measured
                    out.append(f"target NOT MEASURED scalekv 10%: {name} (--no-timing)")
                    continue
            out.append(f"target {'MET   ' if ok else 'MISSED'} scalekv 10%: {name}")
    return out


def storage_fidelity(a: argparse.Namespace) -> int:
    """Images with 8-bit K/V against the same policy with auto storage: sampled bits equal, PSNR, identical count."""
    import math

    import numpy as np

    from ..cli_args import output_file, check_budget_text
    from ..kvcache.config import KV_DTYPES
    from ..pipeline import InfinityPipeline
    from ..schedules import schedule_for_pixels
    from .decode import DEFAULT_MODEL
    from .fidelity import load_pairs
    from .metrics import bits_agreement, psnr, to_unit

    # every value and the output path, before the model loads
    dtypes = policy_list(a.kv_dtypes, "--kv-dtypes", KV_DTYPES, "K/V storage")
    policies = policy_list(a.policies)
    check_budget_text(a.budget, "--budget")
    check_configs([CacheConfig(policy=p, budget=a.budget, window=a.window, kv_dtype=d) for d in dtypes
                   for p in policies], schedule_for_pixels(256, 256), "--budget")
    if a.json:
        output_file(a.json, "--json")
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = InfinityPipeline.from_files(DEFAULT_MODEL / "infinity" / "infinity_shapes.safetensors",
                                       DEFAULT_MODEL / "vae" / "infinity_shapes_vae.safetensors",
                                       DEFAULT_MODEL / "text_encoders" / "t5_shapes")
    print(f"embedded model, 256x256, budget {a.budget} (window {a.window}) for evicting policies; torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    per: dict[tuple[str, str], list[dict]] = {(d, p): [] for d in dtypes for p in policies}
    for caption, seed in load_pairs(None, a.num_pairs, a.pairs_seed):
        cond = pipe.text_encoder.encode([caption])
        for policy in policies:
            def run(kv_dtype: str):
                config = CacheConfig(policy=policy, budget=a.budget, window=a.window, kv_dtype=kv_dtype)
                return pipe.generate(cond, seed=seed, width=256, height=256, cache=config)
            ref = run("auto")
            for d in dtypes:
                got = run(d)
                p = float(psnr(to_unit(got.images), to_unit(ref.images))[0])
                per[(d, policy)].append({"caption": caption, "seed": seed,
                                         "bits_equal": bits_agreement(got.samples.bits, ref.samples.bits),
                                         "psnr_db": None if math.isinf(p) else p,
                                         "identical": bool(np.array_equal(got.images, ref.images))})
        print(f"  {caption[:60]:<60} seed {seed}: " + ", ".join(
            f"{d}/{p} bits {per[(d, p)][-1]['bits_equal']:.3f}" for d in dtypes for p in policies), flush=True)
    print("\n| kv_dtype | policy | pairs | bits equal mean / min | identical images | PSNR of the others (dB, mean / min) |")
    print("|---|---|---|---|---|---|")
    summary = []
    for (d, policy), rows in per.items():
        finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
        s = {"kv_dtype": d, "policy": policy, "pairs": len(rows),
             "bits_equal_mean": float(np.mean([r["bits_equal"] for r in rows])),
             "bits_equal_min": min(r["bits_equal"] for r in rows), "identical": sum(r["identical"] for r in rows),
             "psnr_mean": float(np.mean(finite)) if finite else None, "psnr_min": min(finite) if finite else None}
        summary.append(s)
        ps = "-" if s["psnr_mean"] is None else f"{s['psnr_mean']:.1f} / {s['psnr_min']:.1f}"
        label = policy if policy == "full" else f"{policy} {a.budget}"
        print(f"| {d} | {label} | {s['pairs']} | {s['bits_equal_mean']:.3f} / {s['bits_equal_min']:.3f} | "
              f"{s['identical']} of {s['pairs']} | {ps} |")
    if a.json:
        write_text(a.json, json.dumps({"args": vars(a), "summary": summary,
                                       "rows": {f"{d}/{p}": r for (d, p), r in per.items()}}, indent=1))
    return 0
