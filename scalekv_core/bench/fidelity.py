"""Fidelity benchmark: how close each KV policy's image stays to the full-cache image (a miniature of Table 1).

    python -m scalekv_core.bench fidelity                                   # default model, 200 pairs, all policies
    python -m scalekv_core.bench fidelity --transformer tests/data/infinity-tiny/infinity_tiny.safetensors \\
        --vae tests/data/infinity-tiny/vae_tiny.safetensors --text-encoder tests/data/infinity-tiny/t5_tiny \\
        --prompts captions.txt --num-pairs 8 --out out/fidelity
    torchrun --nproc_per_node=2 -m scalekv_core.bench fidelity ...          # the pairs sharded over 2 processes

For every caption/seed pair the full-cache image is generated once; then every (policy, budget) generates the
same pair and is compared with it: PSNR, SSIM, LPIPS (if its weights are on disk), the fraction of sampled bits
equal to the full cache's, and the stored-KV and measured-peak memory as ratios to the full cache's. FID is
computed per (policy, budget) over all pairs when the Inception weights are on disk. With `--weights` (e.g.
`none,fp8_e4m3fn,int8,int4`) every quantized weight format also generates each pair with the full cache and is
compared with the unquantized full-cache image the same way (`--policies none` skips the KV policies). Rank 0 writes
fidelity.json (every row plus the means), fidelity.md (the table and per-pair comparisons) and fidelity_psnr.png
(PSNR vs budget).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..kvcache import CacheConfig
from ..kvcache.budget import BudgetError
from . import distributed
from .metrics import (ALEXNET_FILES, INCEPTION_FILES, LPIPS, LPIPS_FILES, InceptionFeatures, bits_agreement,
                      find_weights, frechet_distance, psnr, ssim, to_unit)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRANSFORMER = ROOT / "default_model" / "infinity" / "infinity_shapes.safetensors"
DEFAULT_VAE = ROOT / "default_model" / "vae" / "infinity_shapes_vae.safetensors"
DEFAULT_TEXT_ENCODER = ROOT / "default_model" / "text_encoders" / "t5_shapes"

#: Table rows: label -> (policy, ScaleKV scoring). `full` is accepted too (a sanity row: everything equal).
POLICY_SPECS: dict[str, tuple[str, str]] = {
    "sliding_window": ("sliding_window", "improved"), "streamingllm": ("streamingllm", "improved"),
    "snapkv": ("snapkv", "improved"), "pyramidkv": ("pyramidkv", "improved"),
    "scalekv-original": ("scalekv", "original"), "scalekv-improved": ("scalekv", "improved"),
    "scalekv-calibrated": ("scalekv", "improved"),
    "full": ("full", "improved"),
}
#: Rows whose drafters come from `calibrate` on this model (per budget) instead of the policy's default choice.
CALIBRATED = "scalekv-calibrated"
DEFAULT_POLICIES = [k for k in POLICY_SPECS if k != "full"]
WARMUP_CAPTION = "warm-up"
WINDOWS = (16, 9, 4, 1)


def build_parser(prog: str = "python -m scalekv_core.bench fidelity") -> argparse.ArgumentParser:
    """The command's flags (also used by `python -m scalekv_core.bench fidelity --help`)."""
    from ..cli_args import Parser

    p = Parser(prog=prog, description="Image fidelity of every KV policy against the full cache.")
    m = p.add_argument_group("model")
    m.add_argument("--transformer", default=str(DEFAULT_TRANSFORMER), help="Infinity checkpoint")
    m.add_argument("--vae", default=str(DEFAULT_VAE), help="BSQ-VAE checkpoint")
    m.add_argument("--text-encoder", default=str(DEFAULT_TEXT_ENCODER), help="T5 folder")
    m.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="block precision; auto as loader.resolve_precision (bf16 on CUDA sm80+, fp32 on CPU)")
    m.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (0 = torch's default). CPU results depend on it, so sharded and "
                        "single-process runs agree bit for bit only with the same value; 1 matches torchrun's default")
    d = p.add_argument_group("pairs")
    d.add_argument("--prompts", help="captions, one per line (seed = line index among non-empty lines); "
                                     "default: scalekv_core.training.shapes.eval_pairs")
    d.add_argument("--num-pairs", type=int, default=200, help="caption/seed pairs to evaluate")
    d.add_argument("--pairs-seed", type=int, default=0, help="seed passed to eval_pairs")
    s = p.add_argument_group("sampling")
    s.add_argument("--width", type=int, default=256, help="snapped to the nearest official template")
    s.add_argument("--height", type=int, default=256)
    s.add_argument("--cfg", type=float, default=3.0, help="guidance (the paper's evaluation: 3)")
    s.add_argument("--tau", type=float, default=1.0, help="temperature (the paper's evaluation: 1.0)")
    s.add_argument("--top-k", type=int, default=900)
    s.add_argument("--top-p", type=float, default=0.97)
    k = p.add_argument_group("KV cache")
    k.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated, from: {', '.join(POLICY_SPECS)}; 'none' for no policy rows (with --weights)")
    k.add_argument("--budgets", default="4%,10%,20%", help="comma-separated budgets ('10%%', '650', '900MB')")
    k.add_argument("--window", type=int, default=0,
                   help="observation window (a square); 0 = the largest of 16, 9, 4, 1 within the smallest budget")
    k.add_argument("--kernel", type=int, default=5)
    k.add_argument("--pooling", default="maxpool")
    k.add_argument("--kv-dtype", default="auto")
    k.add_argument("--weights", default="none",
                   help="comma-separated weight formats (none, fp8_e4m3fn, int8, int4): each quantized one also "
                        "generates every pair with the full cache, compared with the unquantized full cache")
    k.add_argument("--calibration-captions", type=int, default=16,
                   help=f"training-split captions (scalekv_core.training.shapes) that {CALIBRATED} measures attention "
                        "on to pick its drafters, once per budget; never the evaluated pairs")
    w = p.add_argument_group("optional metrics (skipped with a note when the weights are not on disk)")
    w.add_argument("--alexnet-weights", help=f"torchvision AlexNet state dict (default: torch hub cache {ALEXNET_FILES[0]})")
    w.add_argument("--lpips-weights", help="LPIPS v0.1 AlexNet linear layers (default: torch hub cache alex.pth)")
    w.add_argument("--inception-weights", help=f"TorchScript Inception-V3 for FID (default: torch hub cache "
                                               f"{INCEPTION_FILES[0]})")
    p.add_argument("--out", default="docs/fidelity", help="folder for fidelity.json, fidelity.md, fidelity_psnr.png")
    return p


def parse_policies(text: str) -> list[str]:
    """Table-row labels from --policies, rejecting unknown names up front rather than after hours of sampling."""
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if labels == ["none"]:
        return []
    bad = [t for t in labels if t not in POLICY_SPECS]
    if bad or not labels:
        raise ValueError(f"unknown policy {', '.join(bad) or repr(text)} in --policies; choose from "
                         f"{', '.join(POLICY_SPECS)}")
    return labels


def parse_weights(text: str) -> list[str]:
    """The quantized formats of --weights ("none" is the reference every run has), checked up front."""
    from ..model.quant import check_format

    formats = [check_format(t.strip(), "--weights") for t in text.split(",") if t.strip()]
    return [f for i, f in enumerate(formats) if f != "none" and f not in formats[:i]]


def parse_budgets(text: str) -> list[str]:
    """Budget strings from --budgets, kept as typed so the table shows them as the user wrote them."""
    budgets = [t.strip() for t in text.split(",") if t.strip()]
    if not budgets:
        raise ValueError(f"--budgets {text!r} names no budget")
    return budgets


def load_pairs(prompts: str | None, num_pairs: int, pairs_seed: int) -> list[tuple[str, int]]:
    """Caption/seed pairs from a file (seed = index) or from the shapes data set's fixed evaluation split."""
    if num_pairs < 1:
        raise ValueError(f"--num-pairs must be >= 1, got {num_pairs}")
    if prompts:
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts file {path} does not exist")
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"--prompts file {path} has no captions")
        if len(captions) < num_pairs:
            print(f"note: {path} has {len(captions)} captions; evaluating all of them (--num-pairs {num_pairs})")
        return [(c, i) for i, c in enumerate(captions[:num_pairs])]
    try:
        shapes = importlib.import_module("scalekv_core.training.shapes")
    except ImportError as e:
        raise RuntimeError(f"no --prompts file given and scalekv_core.training.shapes could not be imported ({e}); "
                           "pass --prompts FILE with one caption per line") from None
    pairs = [(str(c), int(s)) for c, s in shapes.eval_pairs(num_pairs, pairs_seed)]
    if len(pairs) != num_pairs:
        raise RuntimeError(f"eval_pairs({num_pairs}, {pairs_seed}) returned {len(pairs)} pairs")
    return pairs


def _check_model_files(a: argparse.Namespace) -> None:
    for flag, value in (("--transformer", a.transformer), ("--vae", a.vae), ("--text-encoder", a.text_encoder)):
        if not Path(value).exists():
            raise FileNotFoundError(
                f"{flag} {value} does not exist (the default is the embedded model in default_model/); "
                "the tiny test model is tests/data/infinity-tiny/{infinity_tiny.safetensors, vae_tiny.safetensors, "
                "t5_tiny}")


def _finite_mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


class _Optional:
    """The metrics that need network weights: loaded when the files are there, otherwise a note says why not."""

    def __init__(self, a: argparse.Namespace, device: str) -> None:
        self.notes: list[str] = []
        self.lpips: LPIPS | None = None
        self.inception: InceptionFeatures | None = None
        alex = find_weights(a.alexnet_weights, ALEXNET_FILES)
        lins = find_weights(a.lpips_weights, LPIPS_FILES)
        if alex and lins:
            self.lpips = LPIPS.from_files(alex, lins, device)
        else:
            missing = [n for n, f in (("AlexNet (--alexnet-weights)", alex), ("LPIPS layers (--lpips-weights)", lins))
                       if f is None]
            self.notes.append(f"LPIPS skipped: no {' or '.join(missing)} weights found locally")
        inc = find_weights(a.inception_weights, INCEPTION_FILES)
        if inc:
            self.inception = InceptionFeatures(inc, device)
        else:
            self.notes.append("FID skipped: no Inception-V3 weights (--inception-weights) found locally")


def _configs(a: argparse.Namespace, labels: list[str], budgets: list[str], window: int,
             drafters: dict[str, list[list[int]]] | None = None) -> list[tuple[str, str, CacheConfig]]:
    out = []
    for budget in budgets:
        for label in labels:
            policy, scoring = POLICY_SPECS[label]
            chosen = (drafters or {}).get(budget) if label == CALIBRATED else None
            if label == CALIBRATED and chosen is None:
                raise ValueError(f"{CALIBRATED} at budget {budget} has no calibrated drafters")
            out.append((label, budget, CacheConfig(policy=policy, budget=budget, scoring=scoring, window=window,
                                                   kernel=a.kernel, pooling=a.pooling, kv_dtype=a.kv_dtype,
                                                   drafters=chosen)))
    return out


def calibration_captions(n: int) -> list[str]:
    """Captions from the shapes training split, disjoint from `eval_pairs`' held-out captions."""
    from ..limits import LIMITS

    most = int(LIMITS["calibration_prompts"].max)  # each is a generation of the calibration
    if not 1 <= n <= most:
        raise ValueError(f"--calibration-captions must be from 1 to {most}, got {n}")
    try:
        shapes = importlib.import_module("scalekv_core.training.shapes")
    except ImportError as e:
        raise RuntimeError(f"{CALIBRATED} needs scalekv_core.training.shapes for its captions ({e})") from None
    return [shapes.caption(sc) for sc in shapes.scenes(n, 0, "train")]


def calibrated_drafters(a: argparse.Namespace, pipe: Any, schedule: Any, tokens: dict[str, int], window: int,
                        shard: distributed.Shard) -> dict[str, list[list[int]]]:
    """Drafters per budget from `calibrate` on rank 0 (training captions, the run's sampling), shared with all ranks."""
    from ..kvcache.calibration import calibrate
    chosen: dict[str, list[list[int]]] | None = None
    if shard.is_main:
        captions = calibration_captions(a.calibration_captions)
        chosen = {}
        for budget, n in tokens.items():
            print(f"{CALIBRATED}: measuring attention on {len(captions)} training captions for budget {budget} "
                  f"({n} tokens)", flush=True)
            res = calibrate(pipe, captions, schedule, n, window=window, cfg=a.cfg, tau=a.tau, top_k=a.top_k,
                            top_p=a.top_p)
            chosen[budget] = res.drafters
    return distributed.broadcast_from_main(chosen, shard)


def _budget_tokens(pipe: Any, schedule: Any, budget: str, rows: int) -> int:
    cfg = pipe.transformer.cfg
    return CacheConfig(policy="snapkv", budget=budget).budget_tokens(schedule, cfg.depth, cfg.num_heads, cfg.head_dim,
                                                                   rows, pipe.transformer.block_dtype)


def _auto_window(tokens: Sequence[int]) -> int:
    """The paper's 16-token window where every budget holds it, else the largest smaller square that fits."""
    smallest = min(tokens)
    return next(w for w in WINDOWS if w <= smallest)


def evaluate_shard(a: argparse.Namespace, shard: distributed.Shard, pairs: list[tuple[str, int]]) -> dict:
    """This rank's rows (and Inception features): its share of the pairs, every configuration each."""
    from ..pipeline import InfinityPipeline
    from ..schedules import schedule_for_pixels

    if a.threads > 0 and shard.device == "cpu":
        torch.set_num_threads(a.threads)
    labels, budgets = parse_policies(a.policies), parse_budgets(a.budgets)
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, a.text_encoder, device=shard.device, precision=a.dtype)
    schedule = schedule_for_pixels(a.width, a.height)
    rows_per_image = 2 if a.cfg != 1 else 1
    tokens = {b: _budget_tokens(pipe, schedule, b, rows_per_image) for b in budgets}
    window = a.window or _auto_window(list(tokens.values()))
    drafters = calibrated_drafters(a, pipe, schedule, tokens, window, shard) if CALIBRATED in labels else None
    configs = _configs(a, labels, budgets, window, drafters)
    for label, budget, config in configs:  # every configuration must build before hours are spent on the others
        try:
            cfg = pipe.transformer.cfg
            config.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, rows_per_image, pipe.transformer.block_dtype)
        except (BudgetError, ValueError) as e:
            raise ValueError(f"policy {label} at budget {budget}: {e} (try a smaller --window)") from None
    optional = _Optional(a, shard.device)
    weight_pipes = _weight_pipelines(a, pipe, shard.device)
    mine = distributed.shard_items(pairs, shard.rank, shard.world_size)
    tag = f"[rank {shard.rank}/{shard.world_size}] " if shard.world_size > 1 else ""

    def generate(caption_cond: Any, seed: int, config: CacheConfig) -> Any:
        return pipe.generate(caption_cond, seed=seed, cfg=a.cfg, tau=a.tau, top_k=a.top_k, top_p=a.top_p,
                             schedule=schedule, cache=config, memory_report=True)

    if mine:
        # One pass over every configuration first, so one-time allocations (lazy tables, allocator growth) fall
        # outside the measured peaks and every rank measures the same steady state whatever its first pair.
        warm = pipe.encode([WARMUP_CAPTION])
        generate(warm, 0, CacheConfig(policy="full", kv_dtype=a.kv_dtype))
        for _, _, config in configs:
            generate(warm, 0, config)
    rows: list[dict] = []
    weight_rows: list[dict] = []
    feats: dict[str, list] = {}
    t0 = time.perf_counter()
    for done, (index, (caption, seed)) in enumerate(mine, 1):
        cond = pipe.encode([caption])
        full = generate(cond, seed, CacheConfig(policy="full", kv_dtype=a.kv_dtype))
        ref = to_unit(full.images)
        full_bits = [b.cpu() for b in full.samples.bits]
        full_mem = full.memory
        if optional.inception is not None:
            feats.setdefault("full", []).append((index, optional.inception(ref)))
        for label, budget, config in configs:
            out = generate(cond, seed, config)
            img = to_unit(out.images)
            mem = out.memory
            p = float(psnr(img, ref)[0])
            row = {
                "pair": index, "caption": caption, "seed": seed, "policy": label, "budget": budget,
                "budget_tokens": tokens[budget] if label != "full" else None,
                "psnr": p, "ssim": float(ssim(img, ref)[0]),
                "bits_equal": bits_agreement([b.cpu() for b in out.samples.bits], full_bits),
                "identical": bool(np.array_equal(out.images, full.images)),
                "stored_mb": mem.analytic_mb, "full_stored_mb": full_mem.analytic_mb,
                "stored_ratio": mem.analytic_mb / full_mem.analytic_mb,
                "peak_mb": mem.measured_peak_mb, "full_peak_mb": full_mem.measured_peak_mb,
                "peak_ratio": mem.measured_peak_mb / full_mem.measured_peak_mb if full_mem.measured_peak_mb else None,
            }
            if optional.lpips is not None:
                row["lpips"] = float(optional.lpips(img, ref)[0])
            if optional.inception is not None:
                feats.setdefault(f"{label}@{budget}", []).append((index, optional.inception(img)))
            rows.append(row)
        for fmt, qpipe in weight_pipes.items():
            out = qpipe.generate(cond, seed=seed, cfg=a.cfg, tau=a.tau, top_k=a.top_k, top_p=a.top_p,
                                 schedule=schedule, cache=CacheConfig(policy="full", kv_dtype=a.kv_dtype))
            img = to_unit(out.images)
            row = {"pair": index, "caption": caption, "seed": seed, "weights": fmt, "psnr": float(psnr(img, ref)[0]),
                   "ssim": float(ssim(img, ref)[0]),
                   "bits_equal": bits_agreement([b.cpu() for b in out.samples.bits], full_bits),
                   "identical": bool(np.array_equal(out.images, full.images))}
            if optional.lpips is not None:
                row["lpips"] = float(optional.lpips(img, ref)[0])
            weight_rows.append(row)
        elapsed = time.perf_counter() - t0
        print(f"{tag}pair {done}/{len(mine)} (#{index} seed {seed}): {len(configs) + len(weight_pipes)} configurations, "
              f"{elapsed:.1f}s, ~{elapsed / done * (len(mine) - done):.0f}s left", flush=True)
    cfg = pipe.transformer.cfg
    meta = {"model": {"transformer": str(a.transformer), "depth": cfg.depth, "width": cfg.embed_dim,
                      "heads": cfg.num_heads, "block_dtype": str(pipe.transformer.block_dtype).replace("torch.", "")},
            "schedule": {"pixels": list(schedule.pixel_size), "scales": schedule.num_scales,
                         "tokens": schedule.total_tokens, "prefix_tokens": sum(schedule.tokens_per_scale[:-1])},
            "window": window, "budget_tokens": tokens, "notes": optional.notes,
            "calibrated_drafters": drafters,
            "weight_mb": {fmt: _transformer_mb(p) for fmt, p in [("none", pipe), *weight_pipes.items()]},
            "peak_measurement": "torch.cuda.max_memory_allocated" if shard.device.startswith("cuda")
            else "torch.profiler CPU allocator events"}
    return {"rank": shard.rank, "rows": rows, "weight_rows": weight_rows, "features": feats, "meta": meta}


def _weight_pipelines(a: argparse.Namespace, pipe: Any, device: str) -> dict[str, Any]:
    """One pipeline per quantized --weights format: its own transformer, the reference's VAE and T5."""
    from ..loader import load_transformer
    from ..pipeline import InfinityPipeline

    return {fmt: InfinityPipeline(load_transformer(a.transformer, device=device, precision=a.dtype, weights=fmt),
                                  pipe.vae, pipe.text_encoder) for fmt in parse_weights(a.weights)}


def _transformer_mb(pipe: Any) -> float:
    """MiB of the transformer's weights as held (packed weights and scales for a quantized one)."""
    return sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values()) / 2**20


def aggregate_weights(rows: list[dict], formats: list[str], weight_mb: dict[str, float]) -> list[dict]:
    """Means per weight format against the unquantized full cache; PSNR over the images that differ."""
    out = []
    for fmt in formats:
        sel = [r for r in rows if r["weights"] == fmt]
        if not sel:
            continue
        agg: dict[str, Any] = {
            "weights": fmt, "pairs": len(sel), "psnr": _finite_mean([r["psnr"] for r in sel]),
            "identical": float(np.mean([r["identical"] for r in sel])),
            "ssim": float(np.mean([r["ssim"] for r in sel])),
            "bits_equal": float(np.mean([r["bits_equal"] for r in sel])),
            "weight_mb": weight_mb.get(fmt), "weight_ratio": weight_mb.get(fmt, 0) / weight_mb["none"],
        }
        if all("lpips" in r for r in sel):
            agg["lpips"] = float(np.mean([r["lpips"] for r in sel]))
        out.append(agg)
    return out


def weights_table(result: dict) -> str:
    """The weight-format rows as Markdown: each format's full-cache images against the unquantized ones."""
    agg = result.get("weights_aggregate") or []
    if not agg:
        return ""
    have_lpips = any("lpips" in r for r in agg)
    head = ["weights", "PSNR ↑", "SSIM ↑"] + (["LPIPS ↓"] if have_lpips else []) + \
        ["bits = unquantized", "identical", "transformer MiB", "of unquantized", "pairs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in agg:
        cells = [r["weights"], "∞" if r["psnr"] is None and r["identical"] == 1.0 else _fmt(r["psnr"], 2),
                 _fmt(r["ssim"], 4)] + ([_fmt(r.get("lpips"), 4)] if have_lpips else [])
        cells += [_fmt(r["bits_equal"], 4), _fmt(r["identical"], 3), _fmt(r["weight_mb"], 2),
                  _fmt(r["weight_ratio"], 3), str(r["pairs"])]
        lines.append("| " + " | ".join(cells) + " |")
    m, sch = result["meta"], result["meta"]["schedule"]
    return "\n".join(lines) + (
        f"\n\nModel {m['model']['transformer']} (depth {m['model']['depth']}, width {m['model']['width']}, "
        f"{m['model']['block_dtype']} blocks), {sch['pixels'][1]}x{sch['pixels'][0]}, full cache, cfg "
        f"{result['args']['cfg']}, tau {result['args']['tau']}, {result['pairs']} caption/seed pairs, device "
        f"{result['device']}, torch {result['torch']}. Every format against the unquantized model's image of the same "
        f"pair; PSNR is the mean over images that differ; transformer MiB counts every tensor the transformer holds.\n")


def merge(parts: list[dict], labels: list[str], budgets: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """All ranks' rows in the single-process order (pair, then budget, then policy) and features by pair."""
    order = {(b, l): i for i, (b, l) in enumerate((b, l) for b in budgets for l in labels)}
    rows = sorted((r for part in parts for r in part["rows"]), key=lambda r: (r["pair"], order[(r["budget"], r["policy"])]))
    feats: dict[str, torch.Tensor] = {}
    keys = {k for part in parts for k in part["features"]}
    for key in keys:
        items = sorted((i, f) for part in parts for i, f in part["features"].get(key, []))
        feats[key] = torch.cat([f for _, f in items], dim=0)
    return rows, feats


def aggregate(rows: list[dict], labels: list[str], budgets: list[str], feats: dict[str, torch.Tensor]) -> list[dict]:
    """Means per (budget, policy); PSNR over the images that differ from the full cache's (the rest are +inf)."""
    out = []
    for budget in budgets:
        for label in labels:
            sel = [r for r in rows if r["policy"] == label and r["budget"] == budget]
            if not sel:
                continue
            agg: dict[str, Any] = {
                "policy": label, "budget": budget, "budget_tokens": sel[0]["budget_tokens"], "pairs": len(sel),
                "psnr": _finite_mean([r["psnr"] for r in sel]),
                "identical": float(np.mean([r["identical"] for r in sel])),
                "ssim": float(np.mean([r["ssim"] for r in sel])),
                "bits_equal": float(np.mean([r["bits_equal"] for r in sel])),
                "stored_ratio": float(np.mean([r["stored_ratio"] for r in sel])),
                "peak_ratio": _finite_mean([r["peak_ratio"] for r in sel]),
                "stored_mb": float(np.mean([r["stored_mb"] for r in sel])),
                "peak_mb": _finite_mean([r["peak_mb"] for r in sel]),
            }
            if all("lpips" in r for r in sel):
                agg["lpips"] = float(np.mean([r["lpips"] for r in sel]))
            key = f"{label}@{budget}"
            if key in feats and "full" in feats and len(sel) >= 2:
                agg["fid"] = frechet_distance(feats["full"], feats[key])
            out.append(agg)
    return out


def _jsonable(value: Any) -> Any:
    """JSON has no infinity: an identical image's PSNR is written as null (its row says identical: true)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _psnr_value(row: dict) -> float:
    """A row's PSNR with an identical image (null in the JSON) as +inf, so it counts as ahead of any other."""
    return math.inf if row["psnr"] is None else float(row["psnr"])


def paired_psnr(rows: list[dict], first: str, second: str, budget: str) -> dict | None:
    """Per-pair PSNR of `first` against `second` at one budget: a mean gap means little without its spread."""
    a = {r["pair"]: _psnr_value(r) for r in rows if r["policy"] == first and r["budget"] == budget}
    b = {r["pair"]: _psnr_value(r) for r in rows if r["policy"] == second and r["budget"] == budget}
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    diffs = [a[p] - b[p] for p in common if math.isfinite(a[p]) and math.isfinite(b[p])]
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else None
    se = float(np.std(diffs, ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"first": first, "second": second, "budget": budget, "pairs": len(common),
            "ahead": sum(a[p] > b[p] for p in common), "behind": sum(a[p] < b[p] for p in common),
            "finite_pairs": n, "mean_db": mean, "se_db": se}


def paired_comparisons(result: dict) -> list[dict]:
    """Each budget's leader (highest mean PSNR) against every other policy, and ScaleKV's own variants."""
    out = []
    for budget in result["budgets"]:
        agg = [r for r in result["aggregate"] if r["budget"] == budget and r["policy"] != "full"]
        ranked = sorted((r for r in agg if r["psnr"] is not None), key=lambda r: -r["psnr"])
        pairs = [(ranked[0]["policy"], r["policy"]) for r in ranked[1:]] if ranked else []
        for extra in [("scalekv-improved", "scalekv-original"), (CALIBRATED, "scalekv-improved")]:
            if extra not in pairs and all(any(r["policy"] == x for r in agg) for x in extra):
                pairs.append(extra)
        out += [c for c in (paired_psnr(result["rows"], x, y, budget) for x, y in pairs) if c is not None]
    return out


def paired_table(comparisons: list[dict]) -> str:
    """The per-pair comparisons as Markdown: how often, and by how much, one policy beats another."""
    lines = ["| budget | policy | against | ahead | behind | mean PSNR gap (dB) | standard error |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        gap = "–" if c["mean_db"] is None else f"{c['mean_db']:+.2f}"
        lines.append(f"| {c['budget']} | {c['first']} | {c['second']} | {c['ahead']}/{c['pairs']} | "
                     f"{c['behind']}/{c['pairs']} | {gap} | {_fmt(c['se_db'], 2)} |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict) -> str:
    """The Table-1-style summary: one line per budget and policy."""
    agg = result["aggregate"]
    have_lpips = any("lpips" in r for r in agg)
    have_fid = any("fid" in r for r in agg)
    head = ["budget", "policy", "PSNR ↑", "SSIM ↑"] + (["LPIPS ↓"] if have_lpips else []) + (["FID ↓"] if have_fid else [])
    head += ["bits = full", "identical", "stored KV", "peak mem", "pairs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in agg:
        tok = f" ({r['budget_tokens']} tok)" if r["budget_tokens"] is not None else ""
        psnr_text = "∞" if r["psnr"] is None and r["identical"] == 1.0 else _fmt(r["psnr"], 2)
        cells = [f"{r['budget']}{tok}", r["policy"], psnr_text, _fmt(r["ssim"], 4)]
        cells += [_fmt(r.get("lpips"), 4)] if have_lpips else []
        cells += [_fmt(r.get("fid"), 2)] if have_fid else []
        cells += [_fmt(r["bits_equal"], 4), _fmt(r["identical"], 3), _fmt(r["stored_ratio"], 3),
                  _fmt(r["peak_ratio"], 3), str(r["pairs"])]
        lines.append("| " + " | ".join(cells) + " |")
    m = result["meta"]
    sch = m["schedule"]
    foot = [
        "",
        f"Model {m['model']['transformer']} (depth {m['model']['depth']}, width {m['model']['width']}, "
        f"{m['model']['block_dtype']}), {sch['pixels'][1]}x{sch['pixels'][0]} ({sch['scales']} scales, "
        f"{sch['prefix_tokens']}-token prefix), cfg {result['args']['cfg']}, tau {result['args']['tau']}, "
        f"window {m['window']}, {result['pairs']} caption/seed pairs, {result['world_size']} process(es), "
        f"device {result['device']}, torch {result['torch']}.",
        "PSNR is the mean over images that differ from the full cache's (identical ones have infinite PSNR; "
        "their share is the `identical` column). Memory columns are ratios to the full cache: stored KV is the "
        f"analytic prefix size, peak mem the measured peak above the weights ({m['peak_measurement']}).",
    ]
    foot += [f"{n}." for n in m["notes"]]
    return "\n".join(lines + foot) + "\n"


def _budget_x(budgets: Sequence[str]) -> list[float]:
    try:
        return [float(b.strip().rstrip("%")) for b in budgets]
    except ValueError:
        return [float(i) for i in range(len(budgets))]


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def plot_psnr(result: dict, path: Path) -> str:
    """PSNR vs budget per policy as a PNG: with matplotlib when installed, otherwise drawn with PIL."""
    budgets = result["budgets"]
    xs = _budget_x(budgets)
    series = []
    for label in result["policies"]:
        pts = [(x, r["psnr"]) for x, b in zip(xs, budgets) for r in result["aggregate"]
               if r["policy"] == label and r["budget"] == b and r["psnr"] is not None]
        if pts:
            series.append((label, pts))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(series, xs, budgets, path)
        return "PIL"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xticks(xs, budgets)
    ax.set_xlabel("KV budget")
    ax.set_ylabel("PSNR vs full cache (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from ..safe_files import atomic_output

    with atomic_output(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return "matplotlib"


def _plot_pil(series: list[tuple[str, list[tuple[float, float]]]], xs: list[float], budgets: Sequence[str],
              path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top, bottom = 760, 480, 70, 190, 30, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ys = [y for _, pts in series for _, y in pts]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (hi - y) / (hi - lo) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(6):
        y = lo + (hi - lo) * i / 5
        _, py = px(x0, y)
        d.line([left, py, W - right, py], fill=(225, 225, 225))
        d.text((left - 8, py), f"{y:.1f}", fill="black", font=font, anchor="rm")
    for x, b in zip(xs, budgets):
        qx, _ = px(x, lo)
        d.line([qx, H - bottom, qx, H - bottom + 5], fill="black")
        d.text((qx, H - bottom + 8), b, fill="black", font=font, anchor="ma")
    d.text(((left + W - right) / 2, H - 22), "KV budget", fill="black", font=font, anchor="ma")
    d.text((8, top - 20), "PSNR vs full cache (dB)", fill="black", font=font)
    for i, (label, pts) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = [px(x, y) for x, y in pts]
        if len(coords) > 1:
            d.line(coords, fill=color, width=2)
        for cx, cy in coords:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        ly = top + 10 + 18 * i
        d.line([W - right + 12, ly, W - right + 32, ly], fill=color, width=2)
        d.text((W - right + 38, ly), label, fill="black", font=font, anchor="lm")
    from ..safe_files import atomic_output

    with atomic_output(path) as f:
        img.save(f, format="PNG")


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    """fidelity.json (rows and means), fidelity.md (the tables) and fidelity_psnr.png (PSNR vs budget, when there are
    policy rows) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "fidelity.json", "markdown": out / "fidelity.md", "plot": out / "fidelity_psnr.png"}
    if result["policies"]:
        result["plot_backend"] = plot_psnr(result, paths["plot"])
    else:  # weight formats only: no budget axis to plot
        del paths["plot"]
    from ..safe_files import write_text

    write_text(paths["json"], json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    policies = ("# Fidelity against the full KV cache\n\n" + markdown_table(result)
                + "\n## Per pair\n\nPSNR gaps over the pairs where neither image equals the full "
                "cache's; an identical image counts as ahead.\n\n" + paired_table(result["paired"])
                if result["policies"] else "")
    weights = f"## Weight formats\n\n{weights_table(result)}" if result.get("weights_aggregate") else ""
    write_text(paths["markdown"], "\n".join(t for t in (policies, weights) if t))
    return paths


def run(a: argparse.Namespace) -> dict | None:
    """The whole benchmark in this process's role: every rank evaluates its pairs, rank 0 gathers and writes."""
    labels, budgets, formats = parse_policies(a.policies), parse_budgets(a.budgets), parse_weights(a.weights)
    if not labels and not formats:
        raise ValueError("--policies none leaves nothing to compare; give --weights too (e.g. none,int8)")
    _check_model_files(a)
    if CALIBRATED in labels:
        calibration_captions(a.calibration_captions)  # its count, before any model loads
    from ..cli_args import output_folder

    output_folder(a.out, "--out")  # before any work: the folder exists or can be made, and takes files
    shard = distributed.setup(a.device)
    try:
        pairs = load_pairs(a.prompts, a.num_pairs, a.pairs_seed)
        if shard.is_main:
            print(f"fidelity: {len(pairs)} pairs x {len(labels)} policies x {len(budgets)} budgets on "
                  f"{shard.world_size} process(es), device {shard.device}", flush=True)
        part = evaluate_shard(a, shard, pairs)
        parts = distributed.gather_to_main(part, shard)
        if not shard.is_main:
            return None
        assert parts is not None
        rows, feats = merge(parts, labels, budgets)
        meta = next(p["meta"] for p in parts if p["rows"]) if any(p["rows"] for p in parts) else parts[0]["meta"]
        weight_rows = sorted((r for p in parts for r in p.get("weight_rows", [])),
                             key=lambda r: (r["pair"], formats.index(r["weights"])))
        result = {"args": {k: v for k, v in vars(a).items()}, "torch": torch.__version__, "device": shard.device,
                  "world_size": shard.world_size, "pairs": len(pairs), "policies": labels, "budgets": budgets,
                  "meta": meta, "aggregate": aggregate(rows, labels, budgets, feats), "rows": rows,
                  "weights": formats, "weights_aggregate": aggregate_weights(weight_rows, formats, meta["weight_mb"]),
                  "weight_rows": weight_rows}
        result["paired"] = paired_comparisons(result)
        for note in meta["notes"]:
            print(f"note: {note}")
        paths = write_outputs(result, Path(a.out))
        if labels:
            print(markdown_table(result))
            print(paired_table(result["paired"]))
        print(weights_table(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
        return result
    finally:
        distributed.finish(shard)


def main(argv: list[str] | None = None) -> int:
    """`python -m scalekv_core.bench fidelity ...`: a bad value or path is one line, `error: ...`, exit 2."""
    from ..cli_args import run_reporting_errors

    def command() -> int:
        a = build_parser().parse_args(argv)
        try:
            run(a)
        except RuntimeError as e:  # this benchmark's own refusals (no CUDA, no shapes module) are RuntimeErrors
            raise ValueError(str(e)) from e
        return 0

    return run_reporting_errors(command)
