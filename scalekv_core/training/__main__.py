"""python -m scalekv_core.training train|eval|samples|binding: retrain the default model and measure it."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalekv_core.training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train VAE, T5 and transformer from scratch")
    tr.add_argument("--out", default="default_model", help="folder that receives infinity/, vae/, text_encoders/")
    tr.add_argument("--preset", default="default", choices=["default", "smoke"])
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it; 1 is fastest "
                    "on a shared 2-core machine)")
    tr.add_argument("--cache", help="folder to keep/reuse the trained VAE and tokenized data of the same recipe")
    tr.add_argument("--stage1-from", metavar="FOLDER", help="take the first transformer stage from a model folder "
                    "this recipe's first stage wrote (its training log is checked) and run only the refine stage; "
                    "the weights equal a whole run's")
    ev = sub.add_parser("eval", help="prompt-following score over held-out captions")
    ev.add_argument("--model", default="default_model", help="folder with the three model parts")
    ev.add_argument("-n", type=int, default=100, help="number of held-out captions")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--cfg", type=float, default=3.0)
    ev.add_argument("--tau", type=float, default=0.5)
    ev.add_argument("--json", help="write the per-caption results here")
    ev.add_argument("--truth-scales", type=int, default=0, metavar="K", help="diagnosis: the first K scales get "
                    "each scene's ground-truth bits, the rest are sampled (7 = the VAE's own ceiling)")
    sm = sub.add_parser("samples", help="PNG grid of samples for held-out captions")
    sm.add_argument("--model", default="default_model")
    sm.add_argument("--out", default="docs/images/default_model_samples.png")
    sm.add_argument("-n", type=int, default=8)
    bp = sub.add_parser("binding", help="diagnosis: train a fresh probe on a model's frozen T5 features and "
                        "report how well they say each position's colour (held-out captions)")
    bp.add_argument("--model", default="default_model")
    bp.add_argument("--steps", type=int, default=2000)
    bp.add_argument("--seed", type=int, default=0)
    for p in (ev, sm, bp):
        p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)

    if args.cmd == "train":
        from .train_default import preset, train_default
        record = train_default(args.out, preset(args.preset, args.seed), threads=args.threads,
                               cache=args.cache, stage1_from=args.stage1_from)
        print(json.dumps(record["seconds"]))
        return 0
    import torch
    torch.set_num_threads(args.threads)
    if args.cmd == "binding":
        from transformers import T5EncoderModel
        from .text_binding import frozen_probe
        from .text_encoder_training import load_tokenizer
        from .train_default import T5_FOLDER
        t5 = T5EncoderModel.from_pretrained(Path(args.model) / T5_FOLDER, local_files_only=True, use_safetensors=True)
        result = frozen_probe(t5.float().eval(), load_tokenizer(Path(args.model) / T5_FOLDER), steps=args.steps,
                              seed=args.seed)
        print("T5 binding probe (held-out): " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        return 0
    from .prompt_following import evaluate, load_default, sample_grid
    pipe = load_default(args.model)
    if args.cmd == "eval":
        report = evaluate(pipe, n=args.n, seed=args.seed, cfg=args.cfg, tau=args.tau, truth_scales=args.truth_scales)
        print(f"prompt following: {report.score:.3f} ({report.passed}/{report.total} checks, {args.n} captions)")
        for k, v in report.by_kind().items():
            print(f"  {k}: {v:.3f}")
        for k, v in report.shapes_by_count().items():
            print(f"  shapes, captions with {k}: {v:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(report.as_dict(), indent=1))
        return 0
    sample_grid(pipe, args.out, n=args.n)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
