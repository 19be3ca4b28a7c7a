"""Memory accounting: what the cache plans and holds per scale and layer, the measured peak, and a planner.

`MemoryReport` is one JSON-serialisable record per generation (the CLI writes it, the nodes and the widget show
it). The measured peak is real: `torch.cuda.max_memory_allocated` on CUDA, and the profiler's allocator events
on CPU; on other devices (MPS) none is given, and the report says so. `plan_memory` predicts the same figures
from shapes alone, so users can ask what fits before running.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..host_memory import host_free, where_label
from ..model.vae import PREVIEW_GRID
from ..schedules import Schedule
from .budget import BudgetPlan
from .cache import KVCache, ScaleUsage
from .config import CacheConfig

MiB = 2**20


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass
class ScaleMemory:
    """One scale: what each layer keeps afterwards (planned and measured) and what the buffers take."""

    scale: int
    grid: tuple[int, int]
    new_tokens: int
    planned_tokens: list[int]
    held_tokens: list[int]
    stored_bytes: list[int]
    allocated_bytes: list[int]
    full_tokens: int  # what every layer of the full cache would hold after this scale

    @property
    def total_stored_bytes(self) -> int:
        return sum(self.stored_bytes)


@dataclass
class MemoryReport:
    """Planned and measured memory of one generation."""

    policy: dict
    model: dict
    schedule: dict
    batch: int
    batch_rows: int
    bytes_per_token_layer: int
    scales: list[ScaleMemory]
    analytic_mb: float  # the paper's MB column: peak stored tokens x layers x width x bytes x rows
    full_analytic_mb: float
    planned_peak_mb: float | None = None
    measured_peak_mb: float | None = None  # above what was allocated when sampling started (the weights)
    measurement: str = ""
    sampling_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def stored_ratio(self) -> float:
        return self.analytic_mb / self.full_analytic_mb if self.full_analytic_mb else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stored_ratio"] = self.stored_ratio
        return d


def build_report(plan: BudgetPlan, usage: list[ScaleUsage], schedule: Schedule, config: CacheConfig,
                 model_info: dict, batch: int, batch_rows: int, bytes_per_token_layer: int) -> MemoryReport:
    """Join the plan with what the cache really held after each scale."""
    layers = plan.num_layers
    cum = 0
    scales = []
    for si, (h, w) in enumerate(schedule.grids):
        cum += h * w
        last = si == schedule.num_scales - 1
        planned = [0] * layers if last else list(plan.kept[si])
        u = usage[si] if si < len(usage) else None
        scales.append(ScaleMemory(
            scale=si, grid=(h, w), new_tokens=h * w, planned_tokens=planned,
            held_tokens=list(u.tokens) if u else [],
            stored_bytes=list(u.stored_bytes) if u else [], allocated_bytes=list(u.allocated_bytes) if u else [],
            full_tokens=0 if last else cum))
    peak_tokens = plan.peak_stored_tokens()
    full_tokens = plan.full_tokens()
    return MemoryReport(
        policy=config.to_dict(), model=model_info,
        schedule={"template": schedule.template, "size": schedule.size, "pixels": list(schedule.pixel_size),
                  "scales": schedule.num_scales, "tokens": schedule.total_tokens},
        batch=batch, batch_rows=batch_rows, bytes_per_token_layer=bytes_per_token_layer, scales=scales,
        analytic_mb=peak_tokens * bytes_per_token_layer / MiB, full_analytic_mb=full_tokens * bytes_per_token_layer / MiB,
        notes=list(plan.notes))


# ------------------------------------------------------------------------------------------ measurement


#: Kineto's log level, read when a trace starts; the meter sets it (unless set already) to keep stdout clean.
KINETO_LOG_LEVEL_ENV = "KINETO_LOG_LEVEL"


def quiet_kineto() -> None:
    """Kineto prints "USDT ... profiler_start/stop" to stdout on every trace unless its log level is above 5."""
    os.environ.setdefault(KINETO_LOG_LEVEL_ENV, "6")


def start_profiler_here() -> None:
    """Run an empty CPU trace on this thread: Kineto registers its client on the thread of the first trace, and a
    first trace on a worker thread (ComfyUI runs prompts on one) prints "ERROR: External init callback must run
    in same thread as registerClient". A host calls this on its main thread, before any worker traces."""
    from torch.profiler import ProfilerActivity, profile

    quiet_kineto()
    with profile(activities=[ProfilerActivity.CPU]):
        pass


def unmeasured_reason(device: torch.device | str) -> str | None:
    """Why PeakMeter gives no peak on `device` (None on CUDA and the CPU, where it measures one): torch keeps no
    peak counter for MPS (only the current figure), and the CPU profiler sees none of that device's memory."""
    kind = torch.device(device).type
    if kind in ("cuda", "cpu"):
        return None
    return (f"not measured on {kind}: torch keeps no peak-memory counter there (the CPU profiler would see only "
            f"host allocations); the planned peak is the figure to go by")


class PeakMeter:
    """Measures the peak of allocated memory above the starting point while its block runs: on CUDA and the CPU;
    on other devices (MPS) `peak_bytes` stays None and `method` says why, never a figure of the wrong memory."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = ""
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator["PeakMeter"]:
        t0 = time.perf_counter()
        unmeasured = unmeasured_reason(self.device)
        if unmeasured is not None:
            try:
                yield self
            finally:
                self.peak_bytes, self.method = None, unmeasured
                self.seconds = time.perf_counter() - t0
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield self
            finally:
                torch.cuda.synchronize(self.device)
                self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - start
                self.method = "torch.cuda.max_memory_allocated"
                self.seconds = time.perf_counter() - t0
            return
        from torch.profiler import ProfilerActivity, profile

        quiet_kineto()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            try:
                yield self
            finally:
                self.seconds = time.perf_counter() - t0
        self.peak_bytes = _peak_from_profile(prof)
        self.method = "torch.profiler CPU allocator events"


def _peak_from_profile(prof: "torch.profiler.profile") -> int:
    """Largest running sum of the CPU allocator's alloc/free events, in time order."""
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, delta in mem:
        cur += delta
        peak = max(peak, cur)
    return peak


# ------------------------------------------------------------------------------------------ planner


@dataclass
class MemoryPlan:
    """Predicted memory for one generation, before running it."""

    weights_mb: float
    cache_peak_mb: float  # buffers + workspace at the heaviest scale
    activations_peak_mb: float
    sampling_peak_mb: float  # above the weights: cache + activations at the heaviest scale
    decode_peak_mb: float  # the VAE decoder's activations (a separate, later phase)
    total_mb: float  # weights + the larger of sampling and decoding
    per_scale_cache_mb: list[float]
    analytic_mb: float
    full_analytic_mb: float
    notes: list[str] = field(default_factory=list)  # the budget plan's (BudgetPlan.notes)

    def to_dict(self) -> dict:
        return asdict(self)


def _activation_bytes(rows: int, n: int, width: int, ffn: int, text_tokens: int, block_bytes: int, vocab: int) -> int:
    """Live tensors while one block runs over n tokens, plus the head's logits (a conservative sum)."""
    fp32 = 4
    resid = 3 * rows * n * width * fp32  # x, the AdaLN output, the branch output
    qkv = rows * n * 3 * width * block_bytes + 2 * rows * n * width * fp32 * 2  # qkv + q, k in fp32 (+ RoPE temps)
    ffn_act = 2 * rows * n * ffn * block_bytes
    text = 2 * rows * text_tokens * width * max(block_bytes, fp32)
    logits = 3 * rows * n * vocab * fp32
    return resid + max(qkv, ffn_act) + text + logits


#: Full-resolution fp32 feature maps of base_ch channels alive at the decoder's peak: measured 8.0 on CPU
#: (level 0's first ResBlock holds its 2*base_ch-channel input, its norm, sigmoid and product; docs/low_vram.md).
DECODE_LIVE_MAPS = 8


def decode_peak_bytes(batch: int, height: int, width: int, vae_base_ch: int, patch: int,
                      tile: int | None = None) -> int:
    """The VAE decode's peak above its weights, whole or in `tile`-latent tiles, so a planner can bound it.

    Whole: DECODE_LIVE_MAPS maps of (batch, base_ch, H, W). Tiled (BSQVAE.decode_tiled runs one image and one
    tile at a time, its full-resolution maps in host memory: decode_offload_bytes): the same maps for a tile of
    tile*patch pixels per side, plus the output (batch, 3, H, W), all fp32. Measured on CPU within 2% of this
    (docs/low_vram.md). A tile covering the image is the whole decode.
    """
    maps = DECODE_LIVE_MAPS * vae_base_ch * 4
    if not tile or (tile * patch >= height and tile * patch >= width):
        return batch * height * width * maps
    th, tw = min(tile * patch, height), min(tile * patch, width)
    return th * tw * maps + 3 * batch * height * width * 4


def preview_peak_bytes(height: int, width: int, vae_base_ch: int, patch: int) -> int:
    """The per-scale preview's decode (BSQVAE.preview: one image, at most PREVIEW_GRID latent positions per side),
    which the ComfyUI sampler runs while the cache is held."""
    side = PREVIEW_GRID * patch
    return decode_peak_bytes(1, min(height, side), min(width, side), vae_base_ch, patch)


#: Full-resolution maps of base_ch channels a tiled decode keeps in host memory at once: level 0's first ResBlock
#: holds its 2*base_ch-channel input, the first convolution's output and the block's output (measured 4.0).
DECODE_OFFLOAD_MAPS = 4


def decode_offload_bytes(height: int, width: int, vae_base_ch: int) -> int:
    """Host memory a tiled decode holds for its full-resolution maps (one image at a time), beside the device's."""
    return DECODE_OFFLOAD_MAPS * height * width * vae_base_ch * 4


def plan_memory(depth: int, width: int, num_heads: int, ffn: int, d_vae: int, schedule: Schedule, batch: int,
                config: CacheConfig, block_dtype: torch.dtype = torch.float32, params: int | None = None,
                vae_params: int = 0, text_tokens: int = 512, cfg: bool = True, vae_base_ch: int = 128,
                vae_patch: int = 16, decode_tile: int | None = None) -> MemoryPlan:
    """Predict sampling and decoding memory for a model shape, schedule, batch and cache policy.

    `decode_tile` (latent positions) plans a tiled decode with decode_peak_bytes; None plans the whole decode
    (DECODE_LIVE_MAPS maps, as measured: docs/low_vram.md).
    """
    rows = batch * (2 if cfg else 1)
    head_dim = width // num_heads
    policy, plan = config.build(schedule, depth, num_heads, head_dim, rows, block_dtype)
    k_dtype, v_dtype = config.storage_dtypes(block_dtype)
    cache = KVCache(plan, policy, schedule, rows, num_heads, head_dim, "meta", k_dtype, v_dtype)
    tb, rb = cache.token_bytes, cache.row_token_bytes  # stored data; rows as allocated (padding and ids included)
    per_scale, peak, act_peak = [], 0, 0
    block_bytes = _size(block_dtype)
    prev_alloc = [0] * depth
    for si, n in enumerate(schedule.tokens_per_scale):
        if si < len(plan.kept):
            alloc = cache.buffer_tokens(si)
            # Layers step one after another and a layer frees its old buffer before making its new one, so the
            # most held at once is after some first l layers have stepped: theirs new, the rest still old.
            worst = during = max(sum(alloc[:l]) + sum(prev_alloc[l:]) for l in range(depth + 1))
        else:
            # The last scale frees each layer's buffer once read: all are held until layer 0 reads its own (a copy
            # into the workspace, before its attention's temporaries exist); while layer l's block runs, only the
            # later layers' buffers, and its own if attention reads it in place.
            alloc, stored = prev_alloc, plan.kept[-1]
            worst = sum(alloc)
            during = max(sum(alloc[l + 1:]) + (alloc[l] if cache._in_place(l, si, stored[l], alloc[l]) else 0)
                         for l in range(depth))
        fixed = cache.planned_workspace_bytes  # workspace rows and scaled storage's float32 staging area
        cache_bytes = worst * rb + fixed
        act = _activation_bytes(rows, n, width, ffn, text_tokens, block_bytes, 2 * d_vae)
        per_scale.append(cache_bytes / MiB)
        peak = max(peak, during * rb + fixed + act)
        act_peak = max(act_peak, act)
        prev_alloc = alloc
    H, W = schedule.pixel_size
    decode = decode_peak_bytes(batch, H, W, vae_base_ch, vae_patch, decode_tile)
    weights = 0.0
    if params is not None:
        weights = params * block_bytes + vae_params * 4
    return MemoryPlan(weights_mb=weights / MiB, cache_peak_mb=max(per_scale), activations_peak_mb=act_peak / MiB,
                      sampling_peak_mb=peak / MiB, decode_peak_mb=decode / MiB,
                      total_mb=(weights + max(peak, decode)) / MiB, per_scale_cache_mb=per_scale,
                      analytic_mb=plan.peak_stored_tokens() * tb / MiB, full_analytic_mb=plan.full_tokens() * tb / MiB,
                      notes=list(plan.notes))


# ------------------------------------------------------------------------------------------ admission

#: Set to 1 to start a run whose planned peak exceeds the device's free memory (the admission check's override).
ALLOW_OVERCOMMIT_ENV = "SCALEKV_ALLOW_OVERCOMMIT"


def free_memory(device: torch.device | str) -> tuple[int | None, str]:
    """Memory a new run can still take on `device`, and the place to name in a refusal: CUDA's free bytes, or on
    the CPU the host's available memory capped by the process's own limits (cgroup, RLIMIT_AS), naming the limit;
    None where the platform tells neither."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), str(device)
    free, cap = host_free()
    return free, where_label(str(device), cap)


def admission_problem(sampling_mb: float, decode_mb: float, free_bytes: int | None, where: str, batch: int,
                      override: str = f"set {ALLOW_OVERCOMMIT_ENV}=1", decode_tile: int | None = None,
                      tile_field: str = "decode_tile") -> str | None:
    """Why a run must not start (its planned peak beside the weights exceeds the free memory), or None; the advice
    lowers the phase that sets the peak, naming the decode tile as the caller's `tile_field`. With no figure for
    the free memory (None) there is nothing to check against."""
    if free_bytes is None:
        return None
    need_mb = max(sampling_mb, decode_mb)
    free_mb = free_bytes / MiB
    if need_mb <= free_mb:
        return None
    if decode_mb >= sampling_mb:
        tiles = (f"decode in smaller tiles ({tile_field} now {decode_tile}, e.g. 16)" if decode_tile else
                 f"decode in tiles ({tile_field}, e.g. 32)")
        phase, advice = "the VAE decode", f"{tiles} or lower the batch (now {batch})"
    else:
        phase, advice = "sampling", f"lower the batch (now {batch}), the resolution or the ScaleKV budget"
    return (f"this run is planned to need {need_mb / 1024:.1f} GiB beside the weights ({phase}; sampling "
            f"{sampling_mb / 1024:.1f} GiB, decode {decode_mb / 1024:.1f} GiB) but {where} has only "
            f"{free_mb / 1024:.1f} GiB free. To fit, {advice}; to start it anyway, {override}")


def overcommit_allowed() -> bool:
    """The explicit override of the admission check."""
    return os.environ.get(ALLOW_OVERCOMMIT_ENV, "").strip() not in ("", "0")
