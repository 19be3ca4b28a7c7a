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
    schedule = schedule_for_pixels(a.width, a.height)
    t0 = time.perf_counter()
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, None if a.text_kv else a.text_encoder,
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

    result = pipe.generate(prompt, negative, seed=a.seed, cfg=a.cfg, tau=a.tau, top_k=a.top_k, top_p=a.top_p,
                           schedule=schedule, batch=a.batch, on_scale=progress)
    paths = result.save_images(a.out)
    if a.dump:
        result.dump(a.dump)
    print(json.dumps({"images": [str(p) for p in paths], "seconds": round(time.perf_counter() - t1, 3),
                      "dump": a.dump}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors in the input come out as one readable line, not a traceback."""
    from .checkpoint import CheckpointError, convert_to_safetensors

    parser = argparse.ArgumentParser(prog="python -m scalekv_core")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    a = parser.parse_args(argv)
    try:
        if a.command == "generate":
            return _generate(a)
        if a.command == "convert":
            out = convert_to_safetensors(a.src, a.dst)
            print(f"wrote {out}")
            return 0
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1
