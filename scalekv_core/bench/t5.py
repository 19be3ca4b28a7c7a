"""T5 weight-format benchmark: how far an 8-bit T5 moves the text features and the images, against the plain T5.

    python -m scalekv_core.bench t5 --weights fp8_e4m3fn --num-pairs 20      # the embedded model, 256x256

Per caption/seed pair (the shapes data set's evaluation split, as the fidelity benchmark draws them): the T5
features' largest absolute difference, their cosine similarity per token (worst and mean), and the image made
from them with the same seed: sampled bits equal (every scale), PSNR and whether it is identical. Figures from
one run on one machine; the plain T5 runs in float32 on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from ..model.text_encoder import T5TextEncoder
from ..pipeline import InfinityPipeline
from .decode import DEFAULT_MODEL
from .fidelity import load_pairs
from .metrics import bits_agreement, psnr, to_unit


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, parsed with the CLI's one-line errors."""
    from ..cli_args import Parser
    from ..model.quant import T5_WEIGHT_FORMATS

    p = Parser(prog="python -m scalekv_core.bench t5", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="fp8_e4m3fn", choices=[f for f in T5_WEIGHT_FORMATS if f != "none"],
                   help="T5 weight format to compare with the plain T5")
    p.add_argument("--num-pairs", type=int, default=20)
    p.add_argument("--pairs-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write every figure here")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m scalekv_core.bench t5 ...`: a bad value or path is one line, `error: ...`, exit 2."""
    from ..cli_args import run_reporting_errors

    return run_reporting_errors(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..cli_args import output_file
    from ..safe_files import write_text

    a = build_parser().parse_args(argv)
    if a.num_pairs < 1:
        raise ValueError(f"--num-pairs must be >= 1, got {a.num_pairs}")
    if a.json:
        output_file(a.json, "--json")
    if a.threads:
        torch.set_num_threads(a.threads)
    t5_folder = DEFAULT_MODEL / "text_encoders" / "t5_shapes"
    pipe = InfinityPipeline.from_files(DEFAULT_MODEL / "infinity" / "infinity_shapes.safetensors",
                                       DEFAULT_MODEL / "vae" / "infinity_shapes_vae.safetensors", t5_folder)
    quant = T5TextEncoder.from_folder(t5_folder, weights=a.weights)
    other = InfinityPipeline(pipe.transformer, pipe.vae, quant)
    size = {name: sum(t.numel() * t.element_size() for t in te.module.state_dict().values())
            for name, te in (("none", pipe.text_encoder), (a.weights, quant))}
    print(f"embedded model, T5 {size['none'] / 2**20:.2f} MiB (float32) vs {a.weights} "
          f"{size[a.weights] / 2**20:.2f} MiB; torch {torch.__version__}, threads {torch.get_num_threads()}",
          flush=True)
    rows = []
    for caption, seed in load_pairs(None, a.num_pairs, a.pairs_seed):
        ref, got = pipe.text_encoder.encode([caption]), quant.encode([caption])
        cos = torch.nn.functional.cosine_similarity(ref.kv_compact, got.kv_compact, dim=-1)
        img_ref = pipe.generate(ref, seed=seed, width=256, height=256)
        img = other.generate(got, seed=seed, width=256, height=256)
        p = float(psnr(to_unit(img.images), to_unit(img_ref.images))[0])
        rows.append({"caption": caption, "seed": seed, "max_abs_diff": float((ref.kv_compact - got.kv_compact).abs().max()),
                     "feature_scale": float(ref.kv_compact.abs().max()), "cos_min": float(cos.min()),
                     "cos_mean": float(cos.mean()), "bits_equal": bits_agreement(img.samples.bits, img_ref.samples.bits),
                     "psnr_db": None if math.isinf(p) else p, "identical": bool(np.array_equal(img.images, img_ref.images))})
        r = rows[-1]
        print(f"  {caption[:60]:<60} seed {seed}: max|d| {r['max_abs_diff']:.3f}, cos min {r['cos_min']:.4f}, "
              f"bits {r['bits_equal']:.3f}, {'identical' if r['identical'] else f'PSNR {p:.1f} dB'}", flush=True)
    finite = [r["psnr_db"] for r in rows if r["psnr_db"] is not None]
    summary = {
        "pairs": len(rows), "weights": a.weights, "t5_bytes": size,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows), "feature_scale": max(r["feature_scale"] for r in rows),
        "cos_min": min(r["cos_min"] for r in rows), "cos_mean": float(np.mean([r["cos_mean"] for r in rows])),
        "bits_equal_mean": float(np.mean([r["bits_equal"] for r in rows])),
        "bits_equal_min": min(r["bits_equal"] for r in rows),
        "identical_images": sum(r["identical"] for r in rows),
        "psnr_db_mean_of_differing": float(np.mean(finite)) if finite else None,
    }
    print("\n| T5 weights | pairs | T5 MiB | features max abs diff (scale) | cosine min / mean | bits equal mean / min "
          "| identical images | PSNR of the others (dB, mean) |")
    print("|---|---|---|---|---|---|---|---|")
    s = summary
    other_psnr = "-" if s["psnr_db_mean_of_differing"] is None else f"{s['psnr_db_mean_of_differing']:.1f}"
    print(f"| {a.weights} | {s['pairs']} | {size[a.weights] / 2**20:.2f} (of {size['none'] / 2**20:.2f}) | "
          f"{s['max_abs_diff']:.3f} ({s['feature_scale']:.2f}) | {s['cos_min']:.4f} / {s['cos_mean']:.5f} | "
          f"{s['bits_equal_mean']:.3f} / {s['bits_equal_min']:.3f} | {s['identical_images']} of {s['pairs']} | "
          f"{other_psnr} |")
    if a.json:
        write_text(a.json, json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
