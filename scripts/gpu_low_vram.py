"""Issue 20's GPU check: the whole job (T5 encode, sampling, decode) of real-shape models with random weights, each
under a memory cap, measured against the whole-job planner, and timed against the uncapped bf16 run.

    python scripts/gpu_low_vram.py --out out/gpu_low_vram.json            # every case, each in its own process
    python scripts/gpu_low_vram.py --case 8b:fp8_e4m3fn:11 --device cpu --size 256 --model-override layer12
                                                                          # a CPU smoke run of the same code

A case is MODEL:WEIGHTS:CAP_GIB[:BLOCK_SWAP] (cap 0 = uncapped; with block swap the transformer is built in host
memory and the pipeline streams that many blocks, as `generate --block-swap` does). Each case runs in a fresh
process, so one cap never limits
another: `torch.cuda.set_per_process_memory_fraction(cap / total)`, then T5-XL-shaped random encoder in fp16 on
512 random token ids (cond + uncond), T5 freed, the transformer built block by block on the device in bf16 and
quantized as each block is made (no full-precision copy of the model ever exists), the released VAE's shape, a
ScaleKV 10% generation with keys and values in bf16 and a tiled decode when the engine has it. Writes each phase's
`max_memory_allocated` (and `max_memory_reserved`, which the cap limits) beside the planner's figures, and the wall
time; a case that fails its cap still writes the phase it reached and its peaks. Cases run with
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless set. T5 keeps `wo` in float32, as the loader holds it in
fp16. Timings are one cold generate() per process, with the dequantizing fp8 matmul (not --fp8-matmul).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = ["8b:none:0", "8b:fp8_e4m3fn:11", "8b:int4:7", "8b:fp8_e4m3fn:7:24", "2b:none:0", "2b:none:5:6",
         "2b:fp8_e4m3fn:3.5"]
VAES = {32: dict(codebook_dim=32, patch_size=16, base_ch=128, ch_mult=(1, 2, 4, 4, 4)),
        56: dict(codebook_dim=14, patch_size=8, base_ch=128, ch_mult=(1, 2, 4, 4))}
DECODE_TILE = 32


def _randomize(module, std: float = 0.02) -> None:
    """Small random weights as scalekv_core.bench.kv does: matrices N(0, std), vectors 0, attention scales log 4."""
    import math

    import torch

    with torch.no_grad():
        for _, buf in module.named_buffers():  # to_empty leaves them unset; Infinity's only ones are zero biases
            buf.zero_()
        for name, p in module.named_parameters():
            if name.endswith("scale_mul_1H11"):
                p.fill_(math.log(4.0))
            elif p.ndim >= 2:
                p.normal_(0.0, std)
            elif p.is_floating_point():
                p.zero_()


def build_transformer(cfg, fmt: str, device, dtype, scratch=None):
    """The Infinity transformer of `cfg` with random weights, made on `device` one block at a time; with `scratch`
    (the GPU, for a host-memory model under block swap) each block is randomized and quantized there, then moved
    to `device`: the CPU's single-threaded normal_ took about two minutes for the 8B's blocks."""
    import torch

    from scalekv_core.model.quant import QUANTIZED_LAYERS, QuantLinear
    from scalekv_core.model.transformer import Infinity

    with torch.device("meta"):
        model = Infinity(cfg)
    blocks = set(map(id, model.blocks))
    for name, child in model.named_children():  # everything outside the blocks: float32, as the loader keeps it
        if not any(id(m) in blocks for m in child.modules()):
            child.to_empty(device=device)
            _randomize(child)
    for pname, param in list(model.named_parameters(recurse=False)):  # the model's own (start token, ...)
        setattr(model, pname, torch.nn.Parameter(torch.randn(param.shape, device=device) * 0.02
                                                 if param.ndim >= 2 else torch.zeros(param.shape, device=device)))
    for bname, buf in list(model.named_buffers(recurse=False)):
        setattr(model, bname, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    for index, block in enumerate(model.blocks):
        block.to(dtype)  # still on meta: the device never holds a float32 copy of a block
        block.to_empty(device=scratch or device)
        _randomize(block)
        if fmt != "none":
            for path in QUANTIZED_LAYERS:
                parent_name, leaf = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, leaf, QuantLinear.from_linear(getattr(parent, leaf), fmt,
                                                              name=f"{cfg.block_key(index)}.{path}.weight"))
        if scratch is not None and scratch != device:
            block.to(device)
        if device.type == "cuda" or (scratch is not None and scratch.type == "cuda"):
            torch.cuda.empty_cache()
    model.set_block_dtype(dtype)
    return model.eval().requires_grad_(False)


def run_case(case: str, device_name: str, size: int, model_override: str | None, out: dict) -> dict:
    """One case's figures, written into `out` as they are measured, so a case that fails its cap still reports
    the phase it reached and the peaks until then."""
    import torch

    from scalekv_core.job_memory import JobOptions, T5_XL, plan_job
    from scalekv_core.kvcache import CacheConfig
    from scalekv_core.model.config import KNOWN_MODELS
    from scalekv_core.model.text_encoder import TextConditioning
    from scalekv_core.model.vae import BSQVAE, VAEConfig, make_random_vae_state_dict
    from scalekv_core.pipeline import InfinityPipeline
    from scalekv_core.schedules import schedule_for_pixels

    name, fmt, cap, *rest = case.split(":")
    cap_gib = float(cap)
    swap = int(rest[0]) if rest else 0
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = KNOWN_MODELS[model_override or name]
    if model_override:  # a smoke run's smaller shape swaps what it can of the case's blocks
        swap = min(swap, cfg.depth - 2)
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)
    options = JobOptions(weights=fmt, dtype="bf16" if cuda else "fp32", t5_offload=True,
                         decode_tile=DECODE_TILE, policy="scalekv", budget="10%", kv_dtype="bf16", block_swap=swap)
    plan = plan_job(model_override or name, size, size, 1, options)
    out.update({"case": case, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "plan_gib": {"encode": plan.encode_mb / 1024, "sampling": plan.sampling_mb / 1024,
                             "decode": plan.decode_mb / 1024, "peak": plan.peak_mb / 1024}, "phase": "encode"})

    def peak_gib() -> float | None:
        if cuda:  # the cap limits what the allocator reserves; the plan counts what is allocated: both are kept
            out.setdefault("reserved_gib", {})[out["phase"]] = torch.cuda.max_memory_reserved(device) / 2**30
        return torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    out["peak_now"] = peak_gib  # read by main() when a phase fails

    t0 = time.perf_counter()
    # T5 encode: flan-t5-xl's encoder shape, random fp16 weights, 512 random ids for cond and uncond
    from transformers import T5Config, T5EncoderModel

    t5cfg = T5Config(vocab_size=T5_XL["vocab"], d_model=T5_XL["d_model"], d_kv=64, d_ff=T5_XL["d_ff"],
                     num_layers=T5_XL["layers"], num_heads=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    from scalekv_core.model.text_encoder import fp32_modules

    t5_dtype = torch.float16 if cuda else torch.float32
    with torch.device("meta"):  # cast on meta, so no float32 copy (4.6 GiB) is ever made on the device
        t5 = T5EncoderModel(t5cfg).to(t5_dtype)
        keep = fp32_modules(t5, t5_dtype)  # `wo` stays float32 in fp16, as loaded and as the planner counts it
        for mname, module in t5.named_modules():
            if keep & set(mname.split(".")):
                module.float()
    t5 = t5.to_empty(device=device)
    _randomize(t5)
    with torch.no_grad():
        ids = torch.randint(0, T5_XL["vocab"], (2, 512), device=device)
        hidden = t5(input_ids=ids)["last_hidden_state"].float()
    out["encode_gib"] = peak_gib()
    out["phase"] = "weights"
    del t5
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cond = TextConditioning.from_padded(hidden[:1, :64].cpu(), torch.ones(1, 64, dtype=torch.bool))
    # sampling and decode
    transformer = build_transformer(cfg, fmt, torch.device("cpu") if swap else device, dtype,
                                    scratch=device if swap and cuda else None)
    vae_cfg = VAEConfig(**VAES[cfg.d_vae])
    with torch.device("meta"):
        vae = BSQVAE(vae_cfg)
    vae.load_state_dict(make_random_vae_state_dict(vae_cfg, 0), assign=True)
    vae.encoder = None  # generation holds the decoder only, as loader.load_vae(decoder_only=True) and the plan
    vae = vae.to(device).eval().requires_grad_(False)
    pipe = InfinityPipeline(transformer, vae, device=device, block_swap=swap)
    out["weights_gib"] = peak_gib()
    out["phase"] = "sampling_and_decode"
    if cuda:  # what the build itself held for a moment is not the job's: sampling starts from the weights
        torch.cuda.reset_peak_memory_stats(device)
    cache = CacheConfig(policy="scalekv", budget="10%", kv_dtype="bf16")
    kwargs = {}
    import inspect

    if "decode_tile" in inspect.signature(pipe.generate).parameters:
        kwargs["decode_tile"] = DECODE_TILE
    out["decode_tiled"] = bool(kwargs)
    t1 = time.perf_counter()
    pipe.generate(cond, seed=0, schedule=schedule_for_pixels(size, size), cache=cache, **kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    out["generate_seconds"] = time.perf_counter() - t1
    out["job_seconds"] = time.perf_counter() - t0
    out["sampling_and_decode_gib"] = peak_gib()
    out["ok"] = True
    out.pop("peak_now")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help="MODEL:WEIGHTS:CAP_GIB; without it every case runs, each in a subprocess")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--model-override", help="plan and build this KNOWN_MODELS shape instead (CPU smoke runs)")
    p.add_argument("--out", default="out/gpu_low_vram.json")
    p.add_argument("--budget-s", type=float, default=440,
                   help="seconds for all the cases (gpu_bench.sh gives the step 480)")
    a = p.parse_args()
    if a.case:
        result: dict = {"case": a.case}
        try:
            run_case(a.case, a.device, a.size, a.model_override, result)
        except Exception as e:  # a case that does not fit its cap is a result, not a crash of the whole check
            peak = result.pop("peak_now", None)
            result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            if peak is not None:  # the failing phase's peaks (allocated and reserved) until the failure
                result[f"{result.get('phase', 'setup')}_gib_at_failure"] = peak()
        print(json.dumps(result))
        return 0
    results: list[dict] = []
    deadline = time.monotonic() + a.budget_s
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        left = deadline - time.monotonic()
        if left < 30:
            results.append({"case": case, "ok": False, "error": f"not run: the {a.budget_s:.0f} s budget was spent"})
            continue
        cmd = [sys.executable, __file__, "--case", case, "--device", a.device, "--size", str(a.size)]
        # fewer partly used segments: the cap limits reserved memory, and the caps sit 1-3% above the plans
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                       "expandable_segments:True")}
        if a.model_override:
            cmd += ["--model-override", a.model_override]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            line = (proc.stdout.strip().splitlines() or [""])[-1]
            result = json.loads(line) if line.startswith("{") else {
                "case": case, "ok": False, "error": f"rc {proc.returncode}: {proc.stderr[-800:]}"}
        except subprocess.TimeoutExpired:
            result = {"case": case, "ok": False, "error": f"killed after {left:.0f} s (the budget's end)"}
        results.append(result)
        print(json.dumps(result), flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))  # what ran so far survives a kill of this script
    base = {r["case"].split(":")[0]: r.get("generate_seconds") for r in results if r["case"].endswith(":none:0")}
    # time_vs_uncapped_bf16 compares generate() alone (sampling + decode), not the model build
    for r in results:
        b = base.get(r["case"].split(":")[0])
        if r.get("generate_seconds") and b:
            r["time_vs_uncapped_bf16"] = r["generate_seconds"] / b
    Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
