"""Command line: `python -m scalekv_core generate|convert ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence


def _floats(text: str) -> float | list[float]:
    """'3' -> 3.0; '3,3,2.5' -> a per-scale list."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values[0] if len(values) == 1 else values


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate images with Infinity, reproducing the original sampler.")
    g.add_argument("--transformer", required=True, help="Infinity checkpoint: .safetensors, .pth, or the 8B shard folder")
    g.add_argument("--vae", required=True, help="BSQ-VAE checkpoint (.pth with {'vae': ...} or .safetensors)")
    g.add_argument("--text-encoder", help="T5 folder (e.g. flan-t5-xl/); not needed with --text-kv")
    g.add_argument("--prompt", default="", help="text prompt")
    g.add_argument("--negative-prompt", default="", help="negative prompt (replaces the learned unconditional text)")
    g.add_argument("--text-kv", help="precomputed T5 encodings of one prompt, a (L, C) float .npy, instead of --prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg", type=_floats, default=3.0, help="guidance scale, or one per scale: 3,3,3,...")
    g.add_argument("--tau", type=_floats, default=0.5, help="temperature, or one per scale")
    g.add_argument("--top-k", type=int, default=900)
    g.add_argument("--top-p", type=float, default=0.97)
    g.add_argument("--width", type=int, default=1024, help="snapped to the nearest official template")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="block precision; auto = bf16 on CUDA like the original, fp32 on CPU")
    g.add_argument("--out", default="out/image.png", help="output PNG (a batch writes NAME_00.png, NAME_01.png, ...)")
    g.add_argument("--dump", help="also write per-scale bits, token ids, codes and decoded arrays here")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    _add_cache_flags(g, default_policy="full")
    g.add_argument("--memory-report", help="write the memory report (planned and measured, per scale and layer) here")


def _add_cache_flags(p: argparse.ArgumentParser, default_policy: str) -> None:
    from .kvcache.config import KV_DTYPES, POLICIES
    from .kvcache.policies.scalekv import SCORINGS
    from .kvcache.scoring import POOLINGS

    k = p.add_argument_group("KV cache")
    k.add_argument("--kv-policy", default=default_policy, choices=sorted(POLICIES),
                   help="eviction policy (full keeps everything, as the original)")
    k.add_argument("--budget", default="10%",
                   help="tokens kept per layer: '10%%' of the cache before the last scale, '650' tokens, or '900MB'")
    k.add_argument("--budget-file", help="scalekv: an original-format budget JSON, or a preset "
                                          "(infinity-2b-10pct, infinity-8b-10pct); --budget is then the base capacity")
    k.add_argument("--window", type=int, default=16, help="observation window (tokens, a square number)")
    k.add_argument("--kernel", type=int, default=5, help="score pooling kernel (odd)")
    k.add_argument("--pooling", default="maxpool", choices=POOLINGS)
    k.add_argument("--scoring", default="improved", choices=SCORINGS, help="scalekv scoring mode")
    k.add_argument("--kv-dtype", default="auto", choices=sorted(KV_DTYPES),
                   help="cache storage: auto = keys fp32 + values in the block dtype (the original); bf16 saves 33%%")
    k.add_argument("--refiner-decay", type=float, default=0.0, help="scalekv: refiner budget decay per scale (tokens)")


def _cache_config(a: argparse.Namespace):
    from .kvcache import CacheConfig

    config = CacheConfig(policy=a.kv_policy, budget=a.budget, window=a.window, kernel=a.kernel, pooling=a.pooling,
                         scoring=a.scoring, kv_dtype=a.kv_dtype, budget_file=a.budget_file,
                         refiner_decay=a.refiner_decay)
    config.validate()
    return config


def _dump_kept(kept: dict, folder: Path, batch: int, cfg_on: bool) -> None:
    """`scalekv_kept_sSS_lL.npy`: kept positions of batch row 0, per CFG row (cond, uncond) and head."""
    import numpy as np

    for (scale, layer), idx in sorted(kept.items()):
        rows = [0, batch] if idx.shape[0] == 2 * batch else [0]
        np.save(folder / f"scalekv_kept_s{scale:02d}_l{layer}.npy", idx[rows].numpy())


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from .model.config import KNOWN_MODELS

    p = sub.add_parser("plan", help="predict memory for a model, resolution, batch and cache policy, without running")
    p.add_argument("--model", default="2b", choices=sorted(KNOWN_MODELS))
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="block precision")
    _add_cache_flags(p, default_policy="scalekv")
    p.add_argument("--json", action="store_true", help="print the full plan as JSON")
    p.add_argument("--table", action="store_true",
                   help="print a Markdown table for 2B and 8B at 512/768/1024, batch 1 and 4, full vs ScaleKV")


def _plan(a: argparse.Namespace) -> int:
    from .kvcache.memory import plan_memory
    from .loader import PRECISIONS
    from .model.config import KNOWN_MODELS
    from .model.transformer import Infinity
    from .schedules import schedule_for_pixels

    import torch

    def predict(model: str, width: int, height: int, batch: int, config):
        cfg = KNOWN_MODELS[model]
        with torch.device("meta"):
            params = sum(p.numel() for p in Infinity(cfg).parameters())
        schedule = schedule_for_pixels(width, height)
        vae = 110_118_051 if cfg.d_vae == 32 else 81_624_209  # the released VAEs' parameter counts
        return schedule, plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule,
                                     batch, config, PRECISIONS[a.dtype], params=params, vae_params=vae,
                                     vae_patch=8 if cfg.d_vae == 56 else 16)

    if a.table:
        from .kvcache import CacheConfig

        print(f"| model | image | batch | full cache: KV / total | ScaleKV 20%: KV / total | ScaleKV 10%: KV / total |")
        print("|---|---|---|---|---|---|")
        for model in ("2b", "8b"):
            for side in (512, 768, 1024):
                for batch in (1, 4):
                    cells = []
                    for policy, budget in (("full", "10%"), ("scalekv", "20%"), ("scalekv", "10%")):
                        _, pl = predict(model, side, side, batch, CacheConfig(policy=policy, budget=budget))
                        cells.append(f"{pl.analytic_mb / 1024:.1f} / {pl.total_mb / 1024:.1f} GB")
                    print(f"| Infinity-{model} | {side}x{side} | {batch} | " + " | ".join(cells) + " |")
        return 0
    schedule, plan = predict(a.model, a.width, a.height, a.batch, _cache_config(a))
    if a.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        h, w = schedule.pixel_size
        print(f"Infinity-{a.model} {w}x{h} batch {a.batch}, {a.kv_policy} {a.budget}: weights {plan.weights_mb / 1024:.1f} GB, "
              f"KV cache {plan.analytic_mb / 1024:.2f} GB stored ({100 * plan.analytic_mb / plan.full_analytic_mb:.1f}% "
              f"of {plan.full_analytic_mb / 1024:.2f} GB), sampling peak above weights {plan.sampling_peak_mb / 1024:.2f} GB, "
              f"VAE decode {plan.decode_peak_mb / 1024:.2f} GB, total about {plan.total_mb / 1024:.1f} GB")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="measure each layer's attention selectivity and write a ScaleKV budget file",
                       description="Run the full cache on a few prompts, pick the drafter layers of every scale by "
                                   "their Attention Selectivity Index, and write an original-format budget JSON.")
    c.add_argument("--transformer", required=True)
    c.add_argument("--vae", required=True)
    c.add_argument("--text-encoder", required=True)
    c.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    c.add_argument("--width", type=int, default=1024)
    c.add_argument("--height", type=int, default=1024)
    c.add_argument("--budget", default="10%", help="'10%%', tokens or MB; also the base capacity when the file is used")
    c.add_argument("--num-drafters", type=int, default=None, help="drafter (scale, layer) pairs in all (default: ~6.6%%)")
    c.add_argument("--refiner-decay", type=float, default=0.0)
    c.add_argument("--window", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--cfg", type=_floats, default=3.0)
    c.add_argument("--tau", type=_floats, default=0.5)
    c.add_argument("--max-queries", type=int, default=64, help="query rows sampled per scale and layer")
    c.add_argument("--topk-fraction", type=float, default=0.1, help="history top-K as a fraction of the history")
    c.add_argument("--combine", default="product", choices=["product", "sum"])
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    c.add_argument("--out", default="out/scalekv_budget.json")


def _calibrate(a: argparse.Namespace) -> int:
    from .kvcache.budget import parse_budget
    from .kvcache.calibration import calibrate
    from .pipeline import InfinityPipeline
    from .schedules import schedule_for_pixels

    prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{a.prompts}: no prompts (one per line)")
    schedule = schedule_for_pixels(a.width, a.height)
    tokens = parse_budget(a.budget, schedule)
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, a.text_encoder, device=a.device, precision=a.dtype)
    res = calibrate(pipe, prompts, schedule, tokens, a.num_drafters, a.seed, a.refiner_decay, a.window,
                    on_prompt=lambda i, n: print(f"  prompt {i + 1}/{n}", file=sys.stderr, flush=True),
                    cfg=a.cfg, tau=a.tau, max_queries=a.max_queries, topk_fraction=a.topk_fraction,
                    combine=a.combine)
    paths = res.write(a.out)
    for si, ds in enumerate(res.drafters):
        if ds:
            print(f"  scale {si + 1}: drafters {ds}", file=sys.stderr)
    print(json.dumps({"budget_file": str(paths[0]), "asi": str(paths[1]), "budget_tokens": tokens,
                      "use": f"--kv-policy scalekv --budget-file {paths[0]} --budget {tokens}"}))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="rewrite a .pth checkpoint (or shard folder) as .safetensors")
    c.add_argument("src")
    c.add_argument("dst")


def _generate(a: argparse.Namespace) -> int:
    import torch

    from .model.text_encoder import TextConditioning
    from .pipeline import InfinityPipeline
    from .schedules import schedule_for_pixels

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.text_kv is None and a.text_encoder is None:
        raise SystemExit("error: give --text-encoder (a T5 folder) or --text-kv (precomputed encodings)")
    if a.text_kv is None and not a.prompt.strip():
        raise SystemExit("error: --prompt is empty")
    if a.text_kv and a.negative_prompt and not a.text_encoder:
        raise SystemExit("error: --negative-prompt needs --text-encoder to encode it (--text-kv covers the prompt only)")
    schedule = schedule_for_pixels(a.width, a.height)
    t0 = time.perf_counter()
    need_t5 = not a.text_kv or bool(a.negative_prompt)
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, a.text_encoder if need_t5 else None,
                                       device=a.device, precision=a.dtype)
    print(f"loaded {pipe.transformer.cfg.describe()} in {time.perf_counter() - t0:.1f}s; "
          f"{schedule.pixel_size[1]}x{schedule.pixel_size[0]} (template {schedule.template}, {schedule.size}, "
          f"{schedule.num_scales} scales)", file=sys.stderr)
    prompt = TextConditioning.from_numpy_file(a.text_kv) if a.text_kv else a.prompt
    negative = a.negative_prompt or None
    t1 = time.perf_counter()

    def progress(si: int, n: int, _codes: torch.Tensor) -> None:
        print(f"  scale {si + 1}/{n} {schedule.grids[si][0]}x{schedule.grids[si][1]} "
              f"({time.perf_counter() - t1:.1f}s)", file=sys.stderr)

    kept: dict[tuple[int, int], torch.Tensor] = {}
    record = (lambda s, l, idx: kept.__setitem__((s, l), idx.cpu())) if a.dump and a.kv_policy != "full" else None
    result = pipe.generate(prompt, negative, seed=a.seed, cfg=a.cfg, tau=a.tau, top_k=a.top_k, top_p=a.top_p,
                           schedule=schedule, batch=a.batch, on_scale=progress, cache=_cache_config(a),
                           record_kept=record, memory_report=bool(a.memory_report))
    paths = result.save_images(a.out)
    if a.dump:
        result.dump(a.dump)
        _dump_kept(kept, Path(a.dump), result.images.shape[0], cfg_on=result.samples.usage is not None)
    if a.memory_report:
        Path(a.memory_report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.memory_report).write_text(json.dumps(result.memory.to_dict(), indent=1))
        m = result.memory
        print(f"KV cache: {m.analytic_mb:.1f} MB stored ({100 * m.stored_ratio:.1f}% of full), measured peak "
              f"{m.measured_peak_mb:.1f} MB above the weights ({m.measurement}); report: {a.memory_report}",
              file=sys.stderr)
    print(json.dumps({"images": [str(p) for p in paths], "seconds": round(time.perf_counter() - t1, 3),
                      "dump": a.dump}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors in the input come out as one readable line, not a traceback."""
    from .checkpoint import CheckpointError, convert_to_safetensors

    parser = argparse.ArgumentParser(prog="python -m scalekv_core")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    _add_calibrate(sub)
    _add_convert(sub)
    a = parser.parse_args(argv)
    try:
        if a.command == "generate":
            return _generate(a)
        if a.command == "plan":
            return _plan(a)
        if a.command == "calibrate":
            return _calibrate(a)
        if a.command == "convert":
            out = convert_to_safetensors(a.src, a.dst)
            print(f"wrote {out}")
            return 0
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1
