"""Issue 22's side-by-side speed check: the original Infinity inference code against this engine (full cache and
ScaleKV 10%), on the same random weights, in one process per model, with the ratios the issue sets targets for.

    # once, here: write the original's inference files out of a fetched snapshot into an ignored folder
    python scripts/gpu_speed.py --prepare-original .original --snapshot /work/.mirror/FoundationVision+Infinity/repo
    # on the GPU machine (the device tool must carry .original): 2B and 8B, 1024x1024, batch 1 and 4
    python scripts/gpu_speed.py --original .original --out out/gpu_speed.json
    # CPU smoke run of the same code on a tiny shape
    python scripts/gpu_speed.py --original .original --device cpu --models layer12 --size 0.06M --batches 1,2 \
        --repeats 2 --out out/gpu_speed_cpu.json

What runs, per model (one subprocess each, so a failure or an OOM never spills into the next model):
- one random state dict (block tensors in bf16 on CUDA, the rest float32, as both codes run the released files),
  loaded with `assign=True` into the original `Infinity` (its own constructor with run_infinity.py's arguments and
  its own `load_state_dict`) and into ours (`build_transformer_on_meta` + `load_state_dict` + `place_transformer`):
  both models hold the very same tensors, so the weights count once;
- the original's `autoregressive_infer_cfg` as `gen_one_img` calls it (bf16 autocast, cfg 3 on the logits,
  tau 0.5, top-k 900, top-p 0.97, ret_img=False) against ours' `sampler.sample` with CacheConfig(policy="full")
  and CacheConfig(policy="scalekv", budget="10%"); neither decodes (no VAE runs: the transformer only);
- warm-up runs, then `--repeats` timed rounds that run the engines in turn (so drift hits all alike): the wall time
  (synchronised, perf_counter), per-scale times from CUDA events recorded by a forward pre-hook on block 0 (the same
  boundary in both codes: scale i runs from block 0 of scale i to block 0 of scale i+1, setup is what comes before
  block 0 of scale 0), and max_memory_allocated per run;
- one extra ScaleKV run with CUDA events around the policy's `select` (scoring), the cache's `_gather_into`
  (the kept tokens' gather) and `KVCache._keep_rows` (scoring + gather + buffer moves), wrapped from here; the
  fraction is of the same run's event-timed total. Events bracket GPU-timeline time, so where the GPU waits for
  launches (batch 1) they count that wait too. A torch.profiler run of ScaleKV at batch 1 adds the kernel-busy
  share of the same sections (record_function ranges, device time of the kernels launched inside them).

What the original needs that the GPU image lacks, supplied at import time by this script (the original files are
not touched): `flash_attn` (not installed; the original imports it unconditionally): a stand-in whose
`flash_attn_varlen_kvpacked_func` runs torch's SDPA over equal-length texts (the original uses flash-attn only
for cross-attention and the text pool; its self-attention is SDPA, customized_flash_attn=False, as in the official
run); its fused ops stay absent, so the original uses its own Python RMSNorm fallback (text_norm, once per image).
`timm`, `pytz`, `tqdm` when missing: tiny stand-ins (register_model, DropPath, timezone, a no-op bar). The VAE's
quantizer is a stand-in that turns bits into codes with the engine's `bits_to_codes` (bit-exact with the original's
indices_to_codes). The original's `fused_ada_layer_norm` is torch.compile'd as in its code (run_infinity.py's
dynamo cache_size_limit=64); `--original-compile off` (the CPU default) runs it eagerly.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from scalekv_core.model.config import InfinityConfig
    from scalekv_core.model.transformer import Infinity

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The original's files inference imports (infinity/models/infinity.py and what it imports), plus its licence.
ORIGINAL_FILES = (
    "LICENSE",
    "infinity/models/__init__.py",
    "infinity/models/infinity.py",
    "infinity/models/basic.py",
    "infinity/models/flex_attn.py",
    "infinity/models/fused_op.py",
    "infinity/utils/dist.py",
    "infinity/utils/misc.py",
    "infinity/utils/dynamic_resolution.py",
)
RESULT = "@@gpu_speed "  # prefix of the worker's result lines on stdout (the original prints a lot)
ENGINES = ("original", "ours_full", "ours_scalekv")
#: Ours with a captured graph per scale (docs/cuda_graphs.md): engine -> (policy, the eager engine it must equal).
#: Timed after the eager rounds, one runner alive at a time (a runner keeps its cache between images).
GRAPH_ENGINES = {"ours_full_graphs": ("full", "ours_full"), "ours_scalekv_graphs": ("scalekv", "ours_scalekv")}
#: Issue 22's targets: (name, numerator engine, denominator engine, batch, at most).
TARGETS = (
    ("ours full <= 0.6x original, batch 1", "ours_full", "original", 1, 0.6),
    ("scalekv <= 0.9x ours full, batch 1", "ours_scalekv", "ours_full", 1, 0.9),
    ("scalekv <= 0.85x ours full, batch 4", "ours_scalekv", "ours_full", 4, 0.85),
)
EVICTION_TARGET = 0.05
#: Share of the remaining time budget a model's worker may use, relative to the others still to run (8B is slower).
BUDGET_WEIGHT = {"8b": 1.6}


def smoke_models() -> dict[str, InfinityConfig]:
    """Shapes small enough for a CPU smoke run of both codes: one per VAE layout (2B-like d32, 8B-like patchify d56)."""
    from scalekv_core.model.config import InfinityConfig

    tiny = dict(depth=4, embed_dim=256, num_heads=4, block_chunks=2, ffn_hidden=1024, text_channels=2048,
                text_maxlen=512, pool_heads=16)
    return {"tiny": InfinityConfig(**tiny, d_vae=32), "tiny56": InfinityConfig(**tiny, d_vae=56)}
SAMPLING = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Preparing the original's files (never committed: the folder is git-ignored and travels with the device's carry)

def prepare_original(folder: Path, snapshot: Path, commit: str = "HEAD") -> dict:
    """Write the original's inference files out of a bare git snapshot, so the GPU machine can import them."""
    sha = subprocess.run(["git", f"--git-dir={snapshot}", "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    total = 0
    for rel in ORIGINAL_FILES:
        data = subprocess.run(["git", f"--git-dir={snapshot}", "show", f"{sha}:{rel}"], check=True,
                              capture_output=True).stdout
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        total += len(data)
    info = {"repository": "FoundationVision/Infinity", "commit": sha, "files": list(ORIGINAL_FILES), "bytes": total,
            "note": "copied by scripts/gpu_speed.py --prepare-original; not part of this repository (git-ignored)"}
    (folder / "ORIGIN.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------------------------------------------
# Import-time stand-ins for what the original imports but the GPU image lacks

def _flash_stub() -> types.ModuleType:
    """flash_attn's two entry points the original imports, on torch SDPA (equal-length texts need no host read)."""
    import torch
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):  # BLHc, unused at inference
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=softmax_scale, is_causal=causal)
        return out.transpose(1, 2)

    def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                        softmax_scale=None, causal=False, **_):
        B = cu_seqlens_q.shape[0] - 1
        H, c = q.shape[1], q.shape[2]
        if kv.shape[0] == B * max_seqlen_k and q.shape[0] == B * max_seqlen_q:  # every text as long as the longest
            qb = q.view(B, max_seqlen_q, H, c).transpose(1, 2)
            k = kv[:, 0].view(B, max_seqlen_k, H, c).transpose(1, 2)
            v = kv[:, 1].view(B, max_seqlen_k, H, c).transpose(1, 2)
            out = F.scaled_dot_product_attention(qb, k, v, scale=softmax_scale)
            return out.transpose(1, 2).reshape(B * max_seqlen_q, H, c)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # unequal texts: one call per sequence (host read)
        outs = []
        for i in range(B):
            qi = q[cq[i]:cq[i + 1]].transpose(0, 1)
            ki, vi = kv[ck[i]:ck[i + 1]].unbind(1)
            outs.append(F.scaled_dot_product_attention(qi, ki.transpose(0, 1), vi.transpose(0, 1),
                                                       scale=softmax_scale).transpose(0, 1))
        return torch.cat(outs, 0)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    mod.__gpu_speed_stand_in__ = True
    return mod


def _timm_stub() -> dict[str, types.ModuleType]:
    """The three timm names the original's model files import (a registry decorator, DropPath, a loss class)."""
    import torch.nn as nn

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float = 0.0) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):  # eval only: identity
            return x

    class SoftTargetCrossEntropy(nn.Module):
        pass

    timm, models, layers, loss = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers",
                                                                 "timm.loss"))
    models.register_model = lambda fn: fn
    layers.DropPath, layers.drop_path = DropPath, (lambda x, *a, **k: x)
    loss.SoftTargetCrossEntropy = SoftTargetCrossEntropy
    timm.models, timm.loss, models.layers = models, loss, layers
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.loss": loss}


def install_stand_ins(flash: str) -> dict[str, str]:
    """Put stand-ins into sys.modules for what is missing (flash_attn always unless `flash` is 'real'); say which."""
    import datetime
    import importlib.util

    used: dict[str, str] = {}
    if flash == "real" and importlib.util.find_spec("flash_attn") is not None:
        used["flash_attn"] = "installed flash_attn"
    else:
        sys.modules["flash_attn"] = _flash_stub()
        used["flash_attn"] = "stand-in: torch SDPA (cross-attention and text pool)"
    if importlib.util.find_spec("timm") is None:
        sys.modules.update(_timm_stub())
        used["timm"] = "stand-in"
    if importlib.util.find_spec("pytz") is None:
        pytz = types.ModuleType("pytz")
        pytz.timezone = lambda name: datetime.timezone.utc
        sys.modules["pytz"] = pytz
        used["pytz"] = "stand-in"
    if importlib.util.find_spec("tqdm") is None:
        tqdm = types.ModuleType("tqdm")

        class _Bar:
            def __init__(self, *a, **k) -> None:
                pass

            def update(self, *a) -> None:
                pass

        tqdm.tqdm = _Bar
        sys.modules["tqdm"] = tqdm
        used["tqdm"] = "stand-in"
    return used


def import_original(folder: Path, compile_norm: bool) -> types.ModuleType:
    """infinity.models.infinity from `folder`; with compile_norm False its torch.compile'd norms run eagerly."""
    import torch

    if not (folder / "infinity/models/infinity.py").exists():
        raise FileNotFoundError(f"{folder}: no original Infinity code; run --prepare-original first")
    sys.path.insert(0, str(folder.resolve()))
    with contextlib.suppress(Exception):  # as tools/run_infinity.py sets it (renamed in later torch versions)
        torch._dynamo.config.cache_size_limit = 64
    real_compile = torch.compile
    if not compile_norm:
        torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import infinity.models.infinity as original  # noqa: PLC0415
    finally:
        torch.compile = real_compile
    return original


class _LFQStandIn:
    """The VAE quantizer surface autoregressive_infer_cfg touches: bits -> codes and the interpolation mode."""

    def __init__(self, d: int, device: torch.device) -> None:
        import torch

        self.mask = 2 ** torch.arange(d, device=device)
        self.recorded: list | None = None  # set to a list to keep each scale's bits (the agreement check)

    def indices_to_codes(self, idx: torch.Tensor, label_type: str = "bit_label") -> torch.Tensor:
        from scalekv_core.model.vae import bits_to_codes

        if self.recorded is not None:
            self.recorded.append(idx.to("cpu", copy=True))
        return bits_to_codes(idx)


class OriginalVAEStandIn:
    """What the original's constructor and sampler read off its VAE; nothing is decoded (ret_img=False)."""

    def __init__(self, d: int, device: torch.device) -> None:
        self.embed_dim = d
        self.vocab_size = 2 ** min(d, 16)
        self.quantizer = types.SimpleNamespace(lfq=_LFQStandIn(d, device), z_interplote_up="trilinear")


@contextlib.contextmanager
def _skip_init():
    """Build modules without their random init (every tensor is replaced by the shared state dict right after)."""
    import torch.nn as nn

    saved = [(nn.Linear, "reset_parameters"), (nn.Embedding, "reset_parameters"), (nn.LayerNorm, "reset_parameters"),
             (nn.init, "trunc_normal_")]
    old = [getattr(o, n) for o, n in saved]
    try:
        for o, n in saved:
            setattr(o, n, lambda *a, **k: None)
        yield
    finally:
        for (o, n), f in zip(saved, old):
            setattr(o, n, f)


# ---------------------------------------------------------------------------------------------------------------
# Models: one random state dict, loaded into both codes

def random_state_dict(cfg: InfinityConfig, device: torch.device, block_dtype: torch.dtype,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint layout: matrices N(0, 0.02), norm weights 1, biases 0, attention scales log 4."""
    import torch

    from scalekv_core.model.transformer import Infinity

    with torch.device("meta"):
        meta = Infinity(cfg)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    sd = {}
    for name, t in meta.state_dict().items():
        dtype = block_dtype if name.startswith("block_chunks.") else torch.float32
        out = torch.empty(t.shape, dtype=dtype, device=device)
        if name.endswith("scale_mul_1H11"):
            out.fill_(math.log(4.0))
        elif out.ndim >= 2:
            out.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("weight"):
            out.fill_(1.0)
        else:
            out.zero_()
        sd[name] = out
    return sd


def build_ours(sd: dict[str, torch.Tensor], device: torch.device, block_dtype: torch.dtype) -> Infinity:
    """Our transformer as the loader builds it from a file: detected on meta, strict load (sharing sd's tensors)."""
    from scalekv_core.loader import build_transformer_on_meta, place_transformer

    model = build_transformer_on_meta({k: tuple(v.shape) for k, v in sd.items()}, "random state dict")
    model.load_state_dict(sd, strict=True, assign=True)
    place_transformer(model, device, block_dtype)
    return model.eval().requires_grad_(False)


def build_original(original: types.ModuleType, cfg: InfinityConfig, sd: dict[str, torch.Tensor], device: torch.device,
                   size: str) -> tuple[Any, OriginalVAEStandIn, bool]:
    """The original Infinity with tools/run_infinity.py's constructor arguments, loaded by its own load_state_dict."""
    import torch

    patchify = cfg.d_vae == 56  # the 8B drives a 14-bit VAE through 2x2 patchify
    vae = OriginalVAEStandIn(cfg.d_vae // 4 if patchify else cfg.d_vae, device)
    kwargs = dict(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, drop_path_rate=0.1,
                  mlp_ratio=4, block_chunks=cfg.block_chunks)
    with _skip_init(), contextlib.redirect_stdout(io.StringIO()):
        model = original.Infinity(
            vae_local=vae, text_channels=cfg.text_channels, text_maxlen=cfg.text_maxlen, shared_aln=True,
            raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=True,
            pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
            rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=size, apply_spatial_patchify=int(patchify),
            inference_mode=True, train_h_div_w_list=[1.0], **kwargs)
    model.eval().requires_grad_(False)
    model.load_state_dict(dict(sd), strict=True, assign=True)  # a copy: its cfg_uncond rule rewrites that entry
    # that rule rebuilds cfg_uncond on the construction device (the host): point it at the shared tensor instead
    model.cfg_uncond = torch.nn.Parameter(sd["cfg_uncond"], requires_grad=False)
    where = sd["pos_start"].device
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != where]
    if stray:
        raise RuntimeError(f"original model tensors left off the device: {stray[:5]}")
    model.rng = torch.Generator(device=device)  # as load_infinity does
    return model, vae, patchify


def shared_tensor_count(original_model: Any, ours: Infinity) -> tuple[int, int]:
    """How many state-dict entries the two models hold as the very same storage (proof both run one set of weights)."""
    a, b = original_model.state_dict(), ours.state_dict()
    same = sum(1 for k, v in a.items() if k in b and v.data_ptr() == b[k].data_ptr())
    return same, len(a)


# ---------------------------------------------------------------------------------------------------------------
# Timing

class Marks:
    """Timestamps on the device timeline (CUDA events, no sync) or the host clock (CPU runs)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.points: list = []

    def mark(self) -> None:
        import torch

        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points.append(ev)
        else:
            self.points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronises once, after the run)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:])]


class SpanTimer:
    """Sums of (start, end) mark pairs per label: what wraps the eviction code records into."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.spans: dict[str, list[tuple[Any, Any]]] = {}

    def wrap(self, label: str, fn: Callable) -> Callable:
        """fn with a timed span (and a profiler range of the same label) around every call."""
        import torch

        def timed(*args, **kwargs):
            marks = Marks(self.cuda)
            marks.mark()
            with torch.profiler.record_function(f"gpu_speed.{label}"):
                out = fn(*args, **kwargs)
            marks.mark()
            self.spans.setdefault(label, []).append((marks.points[0], marks.points[1]))
            return out

        return timed

    def totals_ms(self) -> dict[str, dict[str, float]]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for label, pairs in self.spans.items():
            ms = [a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in pairs]
            out[label] = {"ms": sum(ms), "calls": len(ms)}
        return out


@contextlib.contextmanager
def eviction_wrapped(timer: SpanTimer):
    """Wrap ScaleKV.select, cache._gather_into and KVCache._keep_rows (whichever exist) from outside the engine."""
    import scalekv_core.kvcache.cache as cache_mod
    from scalekv_core.kvcache.policies.scalekv import ScaleKV

    patches = [(ScaleKV, "select", "select"), (cache_mod, "_gather_into", "gather"),
               (cache_mod.KVCache, "_keep_rows", "keep_rows")]
    done = []
    try:
        for owner, name, label in patches:
            fn = owner.__dict__.get(name)
            if fn is not None:
                setattr(owner, name, timer.wrap(label, fn))
                done.append((owner, name, fn))
        yield [f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in done]
    finally:
        for owner, name, fn in done:
            setattr(owner, name, fn)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _gib(n: int) -> float:
    return n / 2**30


class Case:
    """One model at one batch size: the three engines, their warm-ups, timed rounds and extra measurements."""

    def __init__(self, ctx: dict, batch: int) -> None:
        import torch

        from scalekv_core.model.text_encoder import TextConditioning

        self.ctx, self.batch = ctx, batch
        device = ctx["device"]
        gen = torch.Generator(device="cpu").manual_seed(1000 + batch)
        L = ctx["text_len"]
        hidden = torch.randn(batch, L, ctx["cfg"].text_channels, generator=gen) * 0.1
        self.cond = TextConditioning.from_padded(hidden, torch.ones(batch, L, dtype=torch.bool)).to(device)
        self.cuda = device.type == "cuda"
        self.runners: dict[str, Any] = {}  # graph engine -> its ScaleGraphRunner, alive during its phase only
        self.last: dict[str, Any] = {}  # engine -> its latest SampleOutput (same seed each run: the bits reference)

    # one run of each engine; `marks` gets [start, block 0 of every scale..., end]
    def run_original(self, marks: Marks | None) -> None:
        import torch

        c = self.ctx
        n = c["schedule"].num_scales
        ac = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=True) if self.cuda else contextlib.nullcontext()
        c["hook_marks"][0] = marks
        try:
            if marks:
                marks.mark()
            with ac:
                c["original_model"].autoregressive_infer_cfg(
                    vae=c["original_vae"], scale_schedule=c["schedule"].as_original(),
                    label_B_or_BLT=self.cond.as_tuple(), B=self.batch, g_seed=SAMPLING["seed"],
                    cfg_list=[SAMPLING["cfg"]] * n, tau_list=[SAMPLING["tau"]] * n, top_k=SAMPLING["top_k"],
                    top_p=SAMPLING["top_p"], returns_vemb=1, cfg_insertion_layer=[0], vae_type=1, ret_img=False,
                    inference_mode=True)
            if marks:
                marks.mark()
        finally:
            c["hook_marks"][0] = None
            for b in c["original_model"].unregistered_blocks:  # an interrupted run must not keep its cat-grown cache
                b.sa.kv_caching(False)

    def run_ours(self, policy: str, marks: Marks | None, graph_runner: Any = None) -> Any:
        """One generation of ours; with `graph_runner`, from its per-scale graphs ('replay', the CPU stand-in, off
        CUDA). Graphs run no Python hook, so their marks come from on_scale: the end of each scale's sampling."""
        from scalekv_core.kvcache import CacheConfig
        from scalekv_core.sampler import SamplerSettings, sample

        c = self.ctx
        cache = CacheConfig(policy="full") if policy == "full" else CacheConfig(policy="scalekv", budget="10%")
        settings = SamplerSettings(cfg=SAMPLING["cfg"], tau=SAMPLING["tau"], top_k=SAMPLING["top_k"],
                                   top_p=SAMPLING["top_p"], seed=SAMPLING["seed"])
        graphs = {}
        if graph_runner is not None:
            graphs = {"graphs": graph_runner.mode, "runner": graph_runner,
                      "on_scale": (lambda *_: marks.mark()) if marks else None}
        c["hook_marks"][1] = None if graph_runner is not None else marks
        try:
            if marks:
                marks.mark()
            out = sample(c["ours_model"], self.cond, c["schedule"], settings, c["patchify"], cache_config=cache,
                         **graphs)
            if marks:
                marks.mark()
        finally:
            c["hook_marks"][1] = None
        return out

    def runner(self, engine: str) -> Callable[[Marks | None], Any]:
        if engine == "original":
            return self.run_original
        if engine in GRAPH_ENGINES:
            return lambda marks: self.run_ours(GRAPH_ENGINES[engine][0], marks, self.runners[engine])
        return lambda marks: self.run_ours("full" if engine == "ours_full" else "scalekv", marks)

    def timed(self, engine: str) -> dict:
        """One synchronised run: wall seconds, per-scale ms from the marks, peak memory over the run."""
        import torch

        n = self.ctx["schedule"].num_scales
        marks = Marks(self.cuda)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = self.runner(engine)(marks)
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if out is not None:
            self.last[engine] = out
        iv = marks.intervals_ms()
        rec = {"wall_s": wall}
        if engine in GRAPH_ENGINES and len(iv) == n + 1:  # start->end of scale 0's sampling, each scale, the rest
            rec["scale_ms"], rec["after_ms"] = iv[:n], iv[n]
            rec["setup_ms"] = 0.0  # folded into scale 0: no hook runs inside a graph
        elif len(iv) == n + 1:  # start->block0(s0), then each scale, the last to the end of the call
            rec["setup_ms"], rec["scale_ms"] = iv[0], iv[1:]
        else:
            rec["marks_note"] = f"{len(marks.points)} marks for {n} scales: block 0's pre-hook did not fire per scale"
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            rec["peak_gib"], rec["peak_over_start_gib"] = _gib(peak), _gib(peak - start_bytes)
        return rec


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e)[:400]}{where}"


def _after_failure(cuda: bool) -> None:
    import gc

    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bits_agreement(case: Case) -> dict:
    """Fraction of equal bits, per scale, between the original and ours (full) on the same weights and seed.

    On the CPU both draw one sample per bit the same way, so this shows both run the same model. On CUDA the
    original's torch.multinomial and our exponential race draw differently, so streams part after scale 0.
    """
    c = case.ctx
    lfq = c["original_vae"].quantizer.lfq
    lfq.recorded = []
    try:
        case.run_original(None)
        theirs = lfq.recorded
    finally:
        lfq.recorded = None
    ours = case.run_ours("full", None).bits_vae
    fr = [float((a.to(b.dtype) == b.cpu()).float().mean()) for a, b in zip(theirs, ours)]
    return {"per_scale": fr, "scales_identical": sum(1 for f in fr if f == 1.0), "scales": len(fr)}


def profile_scalekv(case: Case) -> dict:
    """Kernel-busy time of one ScaleKV run and of its scoring/eviction ranges (torch.profiler, device time; a CPU
    run reports CPU time instead, which only checks that this code works)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    timer = SpanTimer(case.cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.cuda else [])
    with eviction_wrapped(timer), profile(activities=activities) as prof:
        case.run_ours("scalekv", None)
        if case.cuda:
            torch.cuda.synchronize()
    rows = prof.key_averages()
    kind = "device" if case.cuda else "cpu"

    def dev(row, self_only: bool) -> float:
        names = {("device", True): ("self_device_time_total", "self_cuda_time_total"),
                 ("device", False): ("device_time_total", "cuda_time_total"),
                 ("cpu", True): ("self_cpu_time_total",), ("cpu", False): ("cpu_time_total",)}[kind, self_only]
        for name in names:
            if hasattr(row, name):
                return float(getattr(row, name))
        return 0.0

    busy_us = sum(dev(r, True) for r in rows if not r.key.startswith("gpu_speed."))
    ranges = {r.key.split(".", 1)[1]: dev(r, False) / 1e3 for r in rows if r.key.startswith("gpu_speed.")}
    out = {"time": "kernel busy (CUDA)" if case.cuda else "CPU time (smoke run only)",
           "kernel_busy_ms": busy_us / 1e3, "ranges_busy_ms": ranges}
    if busy_us and "keep_rows" in ranges:
        out["keep_rows_busy_fraction"] = ranges["keep_rows"] * 1e3 / busy_us
    return out


def _same_bits(a: Any, b: Any) -> dict:
    """Whether two SampleOutputs hold the same bits at every scale and the same decoder input."""
    import torch

    scales = [bool(torch.equal(x, y)) for x, y in zip(a.bits, b.bits)]
    return {"identical": all(scales) and len(a.bits) == len(b.bits) and torch.equal(a.summed_codes, b.summed_codes),
            "scales_identical": sum(scales), "scales": len(scales)}


def run_graph_engines(case: Case, res: dict, repeats: int, deadline: float) -> None:
    """Each graph engine in turn: a runner, its first run (warm-up pass + capture + replay, timed apart), timed
    replays, the bits against the eager engine's run of the same seed, then release() and the memory it returns."""
    import torch

    from scalekv_core.graphs import ScaleGraphRunner

    for engine, (_, eager) in GRAPH_ENGINES.items():
        rec: dict = {"warmup_s": [], "runs": []}
        res["engines"][engine] = rec
        if eager not in case.last or time.time() > deadline:
            why = f"no eager {eager} run to compare with" if eager not in case.last else "time budget reached"
            rec["error"] = f"skipped: {why}"
            continue
        if case.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        case.runners[engine] = ScaleGraphRunner("cuda" if case.cuda else "replay")
        try:
            rec["capture_run_s"] = case.timed(engine)["wall_s"]
            rec["bits_vs_eager"] = _same_bits(case.last[engine], case.last[eager])
            for r in range(repeats):
                if time.time() > deadline:
                    rec["truncated"] = f"time budget reached after {r} of {repeats} timed replays"
                    break
                rec["runs"].append(case.timed(engine))
            rec["bits_vs_eager_last"] = _same_bits(case.last[engine], case.last[eager])["identical"]
        except Exception as e:  # noqa: BLE001 - a graph engine that fails is a result
            rec["error"] = _error(e)
        finally:
            case.runners.pop(engine).release()
            case.last.pop(engine, None)
            _after_failure(case.cuda)
            if case.cuda:
                rec["memory_after_release_minus_before"] = torch.cuda.memory_allocated() - before


def run_case(ctx: dict, batch: int, repeats: int, warmup: int, deadline: float, profile: bool,
             graphs: bool = True) -> dict:
    """Warm-ups, interleaved timed rounds, the eviction-timed ScaleKV run and the agreement check for one batch."""
    cuda = ctx["device"].type == "cuda"
    case = Case(ctx, batch)
    res: dict = {"model": ctx["model"], "batch": batch, "size": ctx["size"], "engines": {}}
    live = []
    for engine in ENGINES:
        rec: dict = {"warmup_s": [], "runs": []}
        res["engines"][engine] = rec
        try:
            for _ in range(warmup):
                rec["warmup_s"].append(case.timed(engine)["wall_s"])
            live.append(engine)
        except Exception as e:  # noqa: BLE001 - a case that fails (OOM, say) is a result; the others go on
            rec["error"] = _error(e)
            _after_failure(cuda)
    for r in range(repeats):
        if time.time() > deadline:
            res["truncated"] = f"time budget reached after {r} of {repeats} timed rounds"
            break
        for engine in list(live):
            try:
                res["engines"][engine]["runs"].append(case.timed(engine))
            except Exception as e:  # noqa: BLE001
                res["engines"][engine]["error"] = _error(e)
                live.remove(engine)
                _after_failure(cuda)
    if graphs:
        run_graph_engines(case, res, repeats, deadline)
    for engine, rec in res["engines"].items():
        runs = rec.pop("runs")
        walls = [x["wall_s"] for x in runs]
        rec["repeats"] = len(walls)
        rec["wall_s"] = walls
        rec["median_s"] = _median(walls)
        rec["min_s"] = min(walls) if walls else None
        scales = [x["scale_ms"] for x in runs if "scale_ms" in x]
        if scales:
            rec["scale_ms_median"] = [statistics.median(col) for col in zip(*scales)]
            rec["setup_ms_median"] = _median([x["setup_ms"] for x in runs if "setup_ms" in x])
            rec["event_total_ms_median"] = _median([x["setup_ms"] + sum(x["scale_ms"])
                                                    for x in runs if "scale_ms" in x])
        notes = {x["marks_note"] for x in runs if "marks_note" in x}
        if notes:
            rec["marks_note"] = sorted(notes)
        if cuda and runs:
            rec["peak_gib"] = max(x["peak_gib"] for x in runs)
            rec["peak_over_start_gib"] = max(x["peak_over_start_gib"] for x in runs)
    if "ours_scalekv" in live and time.time() < deadline:
        try:
            timer = SpanTimer(cuda)
            marks = Marks(cuda)
            with eviction_wrapped(timer) as wrapped:
                case.run_ours("scalekv", marks)
            total = sum(marks.intervals_ms())
            spans = timer.totals_ms()
            ev = {"wrapped": wrapped, "total_ms": total, "spans": spans,
                  "measures": "CUDA events around each wrapped call (GPU-timeline time, launch waits included)"
                  if cuda else "host clock around each wrapped call (CPU run)"}
            if "keep_rows" in spans:
                ev["keep_rows_fraction"] = spans["keep_rows"]["ms"] / total
            elif "select" in spans:
                ev["select_fraction"] = spans["select"]["ms"] / total
            res["eviction"] = ev
        except Exception as e:  # noqa: BLE001
            res["eviction"] = {"error": _error(e)}
            _after_failure(cuda)
    first = batch == ctx["first_batch"]  # the profile and the agreement check run at the smallest batch only
    if profile and first and "ours_scalekv" in live and time.time() < deadline:
        try:
            res["profile_scalekv"] = profile_scalekv(case)
        except Exception as e:  # noqa: BLE001
            res["profile_scalekv"] = {"error": _error(e)}
            _after_failure(cuda)
    if first and {"original", "ours_full"} <= set(live) and time.time() < deadline:
        try:
            res["bits_agreement"] = bits_agreement(case)
            if cuda:
                res["bits_agreement"]["note"] = "CUDA: multinomial and the engine's race draw differently"
        except Exception as e:  # noqa: BLE001
            res["bits_agreement"] = {"error": _error(e)}
            _after_failure(cuda)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Worker (one model) and driver

def _emit(obj: dict) -> None:
    print(RESULT + json.dumps(obj), flush=True)


def worker(a: argparse.Namespace) -> int:
    """Build one model in both codes on the device and run every batch of it; one result line per batch."""
    import torch

    from scalekv_core.model.config import KNOWN_MODELS
    from scalekv_core.schedules import get_schedule

    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    compile_norm = a.original_compile == "on" or (a.original_compile == "auto" and cuda)
    block_dtype = torch.bfloat16 if cuda else torch.float32
    cfg = KNOWN_MODELS[a.worker] if a.worker in KNOWN_MODELS else smoke_models()[a.worker]
    ctx: dict = {"model": a.worker, "size": a.size, "device": device, "cfg": cfg, "text_len": a.text_len,
                 "schedule": get_schedule(1.0, a.size), "hook_marks": [None, None], "first_batch": min(a.batches)}
    info: dict = {"model": a.worker, "setup": True, "original_compiled_norm": compile_norm,
                  "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    t0 = time.perf_counter()
    try:
        info["stand_ins"] = install_stand_ins(a.original_flash)
        original = import_original(Path(a.original), compile_norm)
        sd = random_state_dict(cfg, device, block_dtype)
        ctx["original_model"], ctx["original_vae"], ctx["patchify"] = build_original(original, cfg, sd, device, a.size)
        ctx["ours_model"] = build_ours(sd, device, block_dtype)
        same, total = shared_tensor_count(ctx["original_model"], ctx["ours_model"])
        info["shared_tensors"] = f"{same}/{total}"
        info["weights_gib"] = _gib(sum(t.numel() * t.element_size() for t in sd.values()))
        del sd
        # block 0's pre-hook marks the start of every scale in both codes
        for slot, model in ((0, ctx["original_model"]), (1, ctx["ours_model"])):
            first = model.block_chunks[0].module[0]
            first.register_forward_pre_hook(lambda *_, s=slot: ctx["hook_marks"][s] and ctx["hook_marks"][s].mark())
        info["build_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        info["error"] = _error(e)
        traceback.print_exc(file=sys.stderr)
        _emit(info)
        return 1
    _emit(info)
    for batch in a.batches:
        if time.time() > a.deadline:
            _emit({"model": a.worker, "batch": batch, "skipped": "time budget reached before this case"})
            continue
        t1 = time.perf_counter()
        try:
            res = run_case(ctx, batch, a.repeats, a.warmup, a.deadline, a.profile == "scalekv", a.graphs == "on")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            res = {"model": a.worker, "batch": batch, "error": _error(e)}
            _after_failure(cuda)
        res["case_s"] = time.perf_counter() - t1
        _emit(res)
    return 0


def summarise(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ratios measured in one run (medians of the same process), and each issue-22 target met or not."""
    ratios, targets = [], []
    for c in cases:
        eng = c.get("engines", {})
        med = {k: v.get("median_s") for k, v in eng.items()}
        row = {"model": c["model"], "batch": c["batch"]}
        if med.get("original") and med.get("ours_full"):
            row["ours_full/original"] = med["ours_full"] / med["original"]
        if med.get("ours_full") and med.get("ours_scalekv"):
            row["scalekv/ours_full"] = med["ours_scalekv"] / med["ours_full"]
        for num, den in (("ours_full_graphs", "ours_full"), ("ours_scalekv_graphs", "ours_scalekv"),
                         ("ours_scalekv_graphs", "ours_full_graphs"), ("ours_full_graphs", "original")):
            if med.get(num) and med.get(den):
                row[f"{num}/{den}"] = med[num] / med[den]
        for g in GRAPH_ENGINES:
            if "bits_vs_eager" in eng.get(g, {}):
                row[f"{g} bits == eager"] = float(eng[g]["bits_vs_eager"]["identical"] and
                                                  eng[g].get("bits_vs_eager_last", True))
        ev = c.get("eviction", {})
        if "keep_rows_fraction" in ev:
            row["eviction_fraction_events"] = ev["keep_rows_fraction"]
        prof = c.get("profile_scalekv", {})
        if "keep_rows_busy_fraction" in prof:
            row["eviction_fraction_kernel_busy"] = prof["keep_rows_busy_fraction"]
        ratios.append(row)
        for name, num, den, batch, limit in TARGETS:
            if c["batch"] == batch and med.get(num) and med.get(den):
                r = med[num] / med[den]
                targets.append({"model": c["model"], "target": name, "ratio": r, "met": r <= limit})
        if c["batch"] == 1 and "eviction_fraction_events" in row:
            r = row["eviction_fraction_events"]
            targets.append({"model": c["model"], "target": "scoring+eviction < 5% of GPU time (events)", "ratio": r,
                            "met": r < EVICTION_TARGET})
    return ratios, targets


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_summary(cases: list[dict], ratios: list[dict], targets: list[dict]) -> None:
    """A table a reader takes in at a glance; every figure is also in the JSON."""
    print("\nmodel  batch  engine               median s   min s   peak GiB  setup ms  last 3 scales ms")
    for c in cases:
        for engine, e in c.get("engines", {}).items():
            sc = e.get("scale_ms_median") or []
            last = " ".join(f"{x:.1f}" for x in sc[-3:])
            err = f"  ERROR {e['error'][:80]}" if "error" in e else ""
            print(f"{c['model']:<6} {c['batch']:>5}  {engine:<19} {_fmt(e.get('median_s')):>9} "
                  f"{_fmt(e.get('min_s')):>7} {_fmt(e.get('peak_gib'), '.2f'):>9} "
                  f"{_fmt(e.get('setup_ms_median'), '.1f'):>9}"
                  f"  {last}{err}")
        if "skipped" in c or "error" in c:
            print(f"{c['model']:<6} {c.get('batch', '-'):>5}  {c.get('skipped') or c.get('error')}")
    for r in ratios:
        parts = [f"{k} {v:.3f}" for k, v in r.items() if k not in ("model", "batch")]
        print(f"ratios {r['model']} batch {r['batch']}: " + (", ".join(parts) or "-"))
    for t in targets:
        print(f"target {t['model']}: {t['target']}: {t['ratio']:.3f} {'met' if t['met'] else 'NOT met'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare-original", metavar="DIR", help="write the original's inference files into DIR and stop")
    p.add_argument("--snapshot", help="bare git dir of FoundationVision/Infinity (the fetch tool's snapshot)")
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--original", default=".original", help="folder holding the original's infinity/ package")
    p.add_argument("--models", default="2b,8b", help="KNOWN_MODELS names, comma-separated")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--size", default="1M", help="schedule size at aspect 1:1: 0.06M, 0.25M, 0.60M or 1M (1024x1024)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--text-len", type=int, default=64, help="text tokens per prompt (all prompts the same length)")
    p.add_argument("--budget-s", type=float, default=520, help="stop starting new timed work after this many seconds")
    p.add_argument("--grace-s", type=float, default=40,
                   help="then kill a worker still running after this many more (gpu_bench.sh's step ends at 580 s)")
    p.add_argument("--original-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the original's fused AdaLN as its code does (auto: on CUDA only)")
    p.add_argument("--original-flash", choices=("stand-in", "real"), default="stand-in",
                   help="'real' uses an installed flash_attn for the original's cross-attention")
    p.add_argument("--graphs", choices=("on", "off"), default="on",
                   help="also time ours with a CUDA graph per scale (ours_full_graphs, ours_scalekv_graphs)")
    p.add_argument("--profile", choices=("scalekv", "none"), default="scalekv",
                   help="one profiled ScaleKV run per case for the kernel-busy share of scoring (CUDA only)")
    p.add_argument("--out", default="out/gpu_speed.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batches = [int(b) for b in str(a.batches).split(",")]

    if a.prepare_original:
        if not a.snapshot:
            p.error("--prepare-original needs --snapshot GITDIR")
        info = prepare_original(Path(a.prepare_original), Path(a.snapshot), a.commit)
        print(json.dumps(info, indent=1))
        print(f"{info['bytes'] / 1024:.0f} KiB written to {a.prepare_original}")
        return 0
    if a.worker:
        return worker(a)

    start = time.time()
    deadline = start + a.budget_s
    hard_end = deadline + a.grace_s  # a worker still running then is killed: the step's own limit comes soon after
    import torch

    # no CUDA call here: a context in this process would hold device memory while the workers run
    machine = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    origin = Path(a.original) / "ORIGIN.json"
    report: dict = {"script": "scripts/gpu_speed.py", "args": {k: v for k, v in vars(a).items() if v is not None},
                    "machine": machine, "sampling": SAMPLING,
                    "original": json.loads(origin.read_text()) if origin.exists() else {"folder": a.original},
                    "models": {}, "cases": []}
    models = a.models.split(",")
    for i, model in enumerate(models):
        left = deadline - time.time()
        if left < 20:
            report["cases"].append({"model": model, "batch": "-", "skipped": "time budget reached before the model"})
            continue
        weights = [BUDGET_WEIGHT.get(m, 1.0) for m in models[i:]]
        model_deadline = time.time() + left * weights[0] / sum(weights)  # what this model leaves unused, the next gets
        cmd = [sys.executable, __file__, "--worker", model, "--deadline", str(model_deadline),
               *(f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                 if k in ("original", "size", "device", "repeats", "warmup", "text_len", "original_compile",
                          "original_flash", "profile", "graphs")),
               f"--batches={','.join(map(str, a.batches))}"]
        print(f"== {model}: worker starts ({left:.0f} s of budget left)", flush=True)
        lines: list[str] = []
        err_tail = ""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(hard_end - time.time(), 1),
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines, err_tail = proc.stdout.splitlines(), proc.stderr[-1500:]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            lines, err_tail = out.splitlines(), "worker killed at the time budget"
        got = [json.loads(x[len(RESULT):]) for x in lines if x.startswith(RESULT)]
        for r in got:
            if r.get("setup"):
                report["models"][model] = r
                report["machine"].setdefault("device", r.get("device"))
                print(f"== {model}: built in {r.get('build_s', 0):.1f} s, shared tensors {r.get('shared_tensors')}"
                      f"{', ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
            else:
                report["cases"].append(r)
                print(f"== {model} batch {r.get('batch')}: done in {r.get('case_s', 0):.1f} s", flush=True)
        if not got or any("error" in r for r in got):
            report["models"].setdefault(model, {})["worker_stderr_tail"] = err_tail
            print(err_tail, file=sys.stderr)
        write_report(report, a.out, start)  # each model's figures survive whatever stops the next one
    write_report(report, a.out, start)
    print_summary(report["cases"], report["ratios"], report["targets"])
    print(f"\nwrote {a.out} in {report['total_s']:.0f} s")
    return 0


def write_report(report: dict, out: str, start: float) -> None:
    """The JSON as it stands, ratios and verdicts included."""
    report["ratios"], report["targets"] = summarise(report["cases"])
    report["total_s"] = time.time() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
