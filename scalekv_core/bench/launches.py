"""Launch census: every aten op of one whole generation, by scale, layer and phase, with no compute (issue 22).

    python -m scalekv_core.bench launches --model 2b --size 1M --policies full,scalekv --json launches.json

The engine's own `sampler.sample` runs on tensors that carry shapes but no data: on the `meta` device (the
default, standing in for the accelerator: a copy from the host is a visible op there, as on CUDA) or on the CPU
under `FakeTensorMode` (which dispatches exactly what a real CPU run dispatches; the tests check that). A
`TorchDispatchMode` records each op with its FLOPs, bytes moved and the live tensor bytes; module hooks and the
sampler's `on_scale` callback say which scale, layer and phase it belongs to. docs/launches.md has the method,
the definitions and today's figures.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
import weakref
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.multiprocessing.reductions import StorageWeakRef

from ..kvcache import CacheConfig
from ..kvcache import scoring as _scoring
from ..model.config import KNOWN_MODELS, InfinityConfig
from ..model.text_encoder import TextConditioning
from ..model.transformer import Infinity
from ..sampler import SamplerSettings, sample
from ..schedules import SIZES, Schedule, get_schedule, schedule_for_pixels

#: Ops that launch nothing: views and other metadata-only results, and allocations (no kernel until written).
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "expand", "expand_as", "permute", "transpose", "t",
    "numpy_T", "slice", "select", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "lift_fresh", "unbind",
    "split", "split_with_sizes", "unsafe_split", "chunk", "narrow", "diagonal", "unfold", "view_as", "view_as_real",
    "view_as_complex", "movedim", "swapaxes", "_neg_view", "_conj", "resolve_conj", "resolve_neg",
})
ALLOC_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"})
#: Ops that only read metadata (never recorded at all; FakeTensorMode issues some of them itself).
METADATA_OPS = frozenset({"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous",
                          "is_strides_like_format", "is_non_overlapping_and_dense", "_fused_sdp_choice", "size",
                          "stride", "dim", "is_same_size"})
#: Ops whose result the host must wait for (a value or a data-dependent shape read back from the device).
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
                      "unique_dim", "masked_select", "repeat_interleave_tensor"})
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm"})
#: Where the issue wants us (not met today; tests/test_launches.py shows them as strict xfails).
TARGETS = {"full_per_layer_per_scale": 54, "full_per_image": 26_000, "scalekv_extra_per_evicting_layer": 8}

Key = tuple[int, str, int, str]  # (scale, phase, layer, part); scale -1 and layer -1 where none applies


def is_kernel_like(name: str) -> bool:
    """Whether an aten op (overload packet name) launches work: not a view, metadata read or bare allocation."""
    return name not in VIEW_OPS and name not in ALLOC_OPS and name not in METADATA_OPS and name not in SYNC_OPS


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def op_flops(name: str, args: tuple, out: Any) -> int:
    """Multiply-adds x 2 of the matrix products and attention (the rest is elementwise and counted as bytes)."""
    if name in ("mm", "bmm"):
        a, b = args[0], args[1]
        return 2 * a.numel() * b.shape[-1]
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
        return 2 * a.numel() * b.shape[-1]
    if "scaled_dot_product" in name:
        q, k, v = args[:3]
        return 2 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


@dataclass
class Census:
    """What one generation dispatched: kernel-like ops, views, FLOPs, bytes, host syncs and the live peak."""

    label: str
    depth: int
    tokens_per_scale: tuple[int, ...]
    device: str
    kernels: dict[Key, Counter] = field(default_factory=lambda: defaultdict(Counter))
    others: dict[Key, Counter] = field(default_factory=lambda: defaultdict(Counter))
    host_ops: dict[Key, Counter] = field(default_factory=lambda: defaultdict(Counter))
    flops: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    bytes_moved: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    syncs: list[dict] = field(default_factory=list)
    evicts: list[list[bool]] = field(default_factory=list)  # [scale][layer]: the layer drops tokens there
    peak_bytes: int = 0
    peak_at: Key = (-1, "setup", -1, "")
    seconds: float = 0.0

    # -------------------------------------------------------------- summaries

    def layer_ops(self, scale: int) -> list[int]:
        """Kernel-like ops of each layer at one scale."""
        out = [0] * self.depth
        for (s, phase, layer, _), c in self.kernels.items():
            if s == scale and phase == "layer":
                out[layer] += sum(c.values())
        return out

    def phase_ops(self, phase: str, scale: int | None = None) -> int:
        """Kernel-like ops of one phase (setup, input, layer, head, sample, end), at one scale or all."""
        return sum(sum(c.values()) for (s, p, _, _), c in self.kernels.items()
                   if p == phase and (scale is None or s == scale))

    def total(self) -> int:
        """Kernel-like ops of the whole image."""
        return sum(sum(c.values()) for c in self.kernels.values())

    def by_op(self, phase: str | None = None, scale: int | None = None, layer: int | None = None) -> Counter:
        """Kernel-like ops by aten name, optionally for one phase, scale and layer."""
        out: Counter = Counter()
        for (s, p, lay, _), c in self.kernels.items():
            if (phase is None or p == phase) and (scale is None or s == scale) and (layer is None or lay == layer):
                out.update(c)
        return out

    def per_scale(self) -> list[dict]:
        """One row per scale: layer ops (median, min, max), sampling ops, FLOPs and bytes."""
        rows = []
        for s, n in enumerate(self.tokens_per_scale):
            ops = self.layer_ops(s)
            keys = [k for k in self.kernels if k[0] == s]
            rows.append({
                "scale": s, "tokens": n, "layer_ops": ops, "median": statistics.median(ops), "min": min(ops),
                "max": max(ops), "evicting_layers": sum(self.evicts[s]) if s < len(self.evicts) else 0,
                "sampling_ops": sum(self.phase_ops(p, s) for p in ("head", "sample", "input")),
                "flops": sum(self.flops[k] for k in keys), "bytes": sum(self.bytes_moved[k] for k in keys)})
        return rows

    def to_json(self) -> dict:
        """Everything, with string keys: per scale, per layer (with op names), per phase, syncs, peak."""
        layers = []
        for s in range(len(self.tokens_per_scale)):
            for layer in range(self.depth):
                keys = [k for k in self.kernels if k[0] == s and k[1] == "layer" and k[2] == layer]
                layers.append({"scale": s, "layer": layer, "ops": sum(sum(self.kernels[k].values()) for k in keys),
                               "evicts": bool(self.evicts[s][layer]) if s < len(self.evicts) else False,
                               "by_part": {k[3] or "rest": sum(self.kernels[k].values()) for k in keys},
                               "by_op": dict(sorted(self.by_op("layer", s, layer).items())),
                               "flops": sum(self.flops[k] for k in keys),
                               "bytes": sum(self.bytes_moved[k] for k in keys)})
        phases = [{"scale": k[0], "phase": k[1], "layer": k[2], "part": k[3], "ops": sum(c.values()),
                   "by_op": dict(sorted(c.items())), "views_and_allocs": dict(sorted(self.others[k].items())),
                   "host_ops": dict(sorted(self.host_ops[k].items())), "flops": self.flops[k],
                   "bytes": self.bytes_moved[k]} for k, c in sorted(self.kernels.items())]
        return {"label": self.label, "device": self.device, "depth": self.depth,
                "tokens_per_scale": list(self.tokens_per_scale), "total_ops": self.total(),
                "total_flops": sum(self.flops.values()), "total_bytes": sum(self.bytes_moved.values()),
                "peak_bytes": self.peak_bytes, "peak_at": dict(zip(("scale", "phase", "layer", "part"), self.peak_at)),
                "ops_by_phase": {p: self.phase_ops(p) for p in ("setup", "input", "layer", "head", "sample", "end")},
                "by_op": dict(sorted(self.by_op().items())), "per_scale": self.per_scale(), "layers": layers,
                "phases": phases, "syncs": self.syncs, "seconds": self.seconds}


class _Where:
    """The phase every op is charged to, moved along by module hooks and the sampler's on_scale callback."""

    def __init__(self) -> None:
        self.scale, self.phase, self.layer, self.part = 0, "setup", -1, ""

    @property
    def key(self) -> Key:
        return (self.scale, self.phase, self.layer, self.part)


class _Recorder(TorchDispatchMode):
    """Counts every aten op below Python (after autograd and composite decomposition), as a real run issues it."""

    def __init__(self, census: Census, where: _Where, device_type: str) -> None:
        super().__init__()
        self.census, self.where, self.device_type = census, where, device_type
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, python tensors alive]
        #: Storages made outside the recorder (weights, inputs, Python constants); weak, as their addresses get reused.
        self.external: dict[int, StorageWeakRef] = {}
        self.seen: dict[int, weakref.ref] = {}  # tensor objects being tracked, by id
        self.live_bytes = 0

    def _storage(self, t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _track(self, t: torch.Tensor) -> None:
        """Count a new storage's bytes until the last tensor object on it is gone."""
        if id(t) in self.seen:
            return
        sid = self._storage(t)
        ext = self.external.get(sid)
        if ext is not None:
            if not ext.expired():
                return
            del self.external[sid]
        entry = self.live.get(sid)
        if entry is None:
            entry = self.live[sid] = [t.untyped_storage().nbytes(), 0]
            self.live_bytes += entry[0]
            if self.live_bytes > self.census.peak_bytes:
                self.census.peak_bytes, self.census.peak_at = self.live_bytes, self.where.key
        entry[1] += 1
        tid = id(t)
        self.seen[tid] = (weakref.ref(t, lambda _, tid=tid, sid=sid: self._release(tid, sid)))

    def _release(self, tid: int, sid: int) -> None:
        self.seen.pop(tid, None)
        entry = self.live.get(sid)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live_bytes -= entry[0]
                del self.live[sid]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "prim" or name in METADATA_OPS:
            return func(*args, **kwargs)
        where, census = self.where, self.census
        inputs = _tensors((args, kwargs))
        for t in inputs:
            sid = self._storage(t)
            if sid not in self.live and id(t) not in self.seen:
                self.external[sid] = StorageWeakRef(t.untyped_storage())
        if name in SYNC_OPS:
            census.syncs.append({"scale": where.scale, "phase": where.phase, "layer": where.layer, "op": name,
                                 "what": "the host reads a value or a data-dependent shape back"})
            if name == "_local_scalar_dense" and inputs[0].device.type == "meta":
                census.syncs[-1]["what"] += " (meta has no value: the census went on with 0)"
                return False if inputs[0].dtype == torch.bool else 0
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        devices = {t.device.type for t in inputs + outputs}
        if name in ("_to_copy", "copy_") and len(devices) > 1:
            src, dst = (inputs[1], inputs[0]) if name == "copy_" else (inputs[0], outputs[0])
            census.syncs.append({"scale": where.scale, "phase": where.phase, "layer": where.layer, "op": name,
                                 "what": f"copy {src.device.type} -> {dst.device.type}, {_nbytes(src)} bytes"})
        key = where.key
        if self.device_type not in devices and is_kernel_like(name):
            census.host_ops[key][name] += 1  # host-side work of a device run (tables built on the CPU)
        elif self.device_type in devices and is_kernel_like(name):
            census.kernels[key][name] += 1
            census.flops[key] += op_flops(name, args, out)
            census.bytes_moved[key] += sum(_nbytes(t) for t in inputs + outputs)
        elif name not in SYNC_OPS:
            census.others[key][name] += 1
        if name != "lift_fresh":  # a Python constant: fake mode wraps it anew, a real run returns it as it is
            for t in outputs:
                self._track(t)
        return out


_SDPA = torch._C._nn.scaled_dot_product_attention


def _accelerator_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                           dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                           **_: Any) -> torch.Tensor:
    """The fused kernel CUDA's SDPA picks (flash for fp16/bf16 without a mask, else memory-efficient), as one op."""
    c = q.shape[-1]
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and c % 8 == 0 and c <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:  # as CUDA's SDPA converts a boolean mask (approximate)
        bias = torch.where(bias, torch.scalar_tensor(0.0, dtype=q.dtype, device=q.device),
                           torch.scalar_tensor(-math.inf, dtype=q.dtype, device=q.device))
    if bias is not None:
        bias = bias.expand(*q.shape[:-1], k.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, dropout_p, is_causal,
                                                                  scale=scale)[0]


class _HostWatch(TorchFunctionMode):
    """What the dispatcher cannot show: `torch.tensor(data, device=...)` copies host data without a visible op,
    and on `meta` SDPA would fall back to its unfused math; here it takes the accelerator's fused kernel."""

    def __init__(self, census: Census, where: _Where, device_type: str) -> None:
        super().__init__()
        self.census, self.where, self.device_type = census, where, device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        if self.device_type == "meta" and func is _SDPA:
            return _accelerator_attention(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            dev = torch.device(kwargs["device"])
            if dev.type != "cpu" and not isinstance(args[0], torch.Tensor):
                w = self.where
                self.census.syncs.append({"scale": w.scale, "phase": w.phase, "layer": w.layer, "op": "tensor",
                                          "what": f"torch.{func.__name__}(host data, device={dev.type}): "
                                                  "a host-to-device copy"})
                self.census.kernels[w.key]["h2d_copy"] += 1
        return func(*args, **kwargs)


def _hooks(model: Infinity, where: _Where) -> list:
    """Forward hooks that move `where` between setup, layers (and their parts), the head and sampling."""
    handles = []

    def enter(phase: str | None = None, layer: int | None = None, part: str | None = None):  # noqa: ANN202
        def hook(*_: Any) -> None:
            if phase is not None:
                where.phase = phase
            if layer is not None:
                where.layer = layer
            if part is not None:
                where.part = part
        return hook

    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(enter("layer", i, "")))
        handles.append(block.register_forward_hook(enter("sample", -1, "")))
        for part in ("ca", "ffn"):
            handles.append(getattr(block, part).register_forward_pre_hook(enter(part=part)))
            handles.append(getattr(block, part).register_forward_hook(enter(part="")))
    for module in (model.head_nm, model.head):
        handles.append(module.register_forward_pre_hook(enter("head")))
        handles.append(module.register_forward_hook(enter("sample")))
    handles.append(model.word_embed.register_forward_pre_hook(enter(part="embed")))
    handles.append(model.word_embed.register_forward_hook(enter(part="")))
    return handles


def _build(cfg: InfinityConfig, dtype: torch.dtype, device: str, fake: bool) -> Infinity:
    """The model's shape without its bytes (built on meta) unless a real run asked for real weights."""
    with torch.device("meta" if fake else device):
        model = Infinity(cfg)
    return model.set_block_dtype(dtype).eval().requires_grad_(False)


def _fakeify(model: Infinity) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of its shape and dtype (call inside the mode).

    Set directly in the module's tables: `Module.to` would swap tensors, which fake tensors (weak-referenced by
    their mode) refuse.
    """
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                    table[name] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new


def parse_size(size: str) -> Schedule:
    """'1M' (a named square size) or '1024x1024' (width x height, snapped as the CLI does) -> a schedule."""
    if size in SIZES:
        return get_schedule(1.0, size)
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown size {size!r}; give one of {', '.join(SIZES)} or WIDTHxHEIGHT") from None
    return schedule_for_pixels(w, h)


def run_census(cfg: InfinityConfig, schedule: Schedule, cache_config: CacheConfig, batch: int = 1,
               cfg_scale: float = 3.0, device: str = "meta", dtype: torch.dtype = torch.bfloat16, text_len: int = 32,
               fake: bool = True, seed: int | None = None, label: str = "", warm: bool = False) -> Census:
    """Run `sample` once for a model of shape `cfg` and record every op, so launches can be counted without a GPU.

    `fake=False` runs the same on real tensors (only for tiny shapes): the tests compare the two. `warm=True`
    counts a second generation in the process (the engine's process-wide tables already made), not the first.
    """
    device_type = torch.device(device).type
    if device_type not in ("meta", "cpu"):
        raise ValueError(f"the census runs on 'meta' (accelerator stand-in) or 'cpu', not {device!r}")
    census = Census(label=label, depth=cfg.depth, tokens_per_scale=schedule.tokens_per_scale,
                    device=device + (" (fake tensors)" if fake and device_type == "cpu" else ""))
    where = _Where()
    # A process-wide table cache: cleared so every census counts a first generation, and so no fake tensor
    # made here is ever handed to a real run afterwards.
    _scoring._neighbour_table.cache_clear()
    t0 = time.perf_counter()
    try:
        with ExitStack() as stack:
            model = _build(cfg, dtype, device, fake)
            if fake and device_type == "cpu":
                stack.enter_context(FakeTensorMode())
                _fakeify(model)
            n_text = text_len * batch
            cond = TextConditioning(torch.zeros(n_text, cfg.text_channels, device=device), [text_len] * batch,
                                    torch.arange(0, n_text + 1, text_len, dtype=torch.int32, device=device), text_len)
            settings = SamplerSettings(cfg=cfg_scale, seed=seed)
            if warm:
                scratch = Census(label="", depth=cfg.depth, tokens_per_scale=(), device=device)
                with _HostWatch(scratch, _Where(), device_type):
                    sample(model, cond, schedule, settings, vae_patchify=cfg.d_vae == 56, cache_config=cache_config)
            handles = _hooks(model, where)
            stack.callback(lambda: [h.remove() for h in handles])

            def on_scale(si: int, n: int, _: torch.Tensor) -> None:
                where.scale, where.phase, where.layer, where.part = si + 1, "input" if si + 1 < n else "end", -1, ""

            stack.enter_context(_HostWatch(census, where, device_type))
            stack.enter_context(_Recorder(census, where, device_type))
            out = sample(model, cond, schedule, settings, vae_patchify=cfg.d_vae == 56, on_scale=on_scale,
                         cache_config=cache_config)
        plan = out.plan
        census.evicts = [[bool(plan is not None and plan.evicts(s, layer)) for layer in range(cfg.depth)]
                         for s in range(schedule.num_scales)]
    finally:
        _scoring._neighbour_table.cache_clear()
    census.seconds = time.perf_counter() - t0
    return census


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def extra_per_evicting_layer(policy: Census, full: Census) -> list[dict]:
    """Per scale, the ops a policy adds to a layer over full's same layer: at evicting layers and at the others."""
    rows = []
    for s in range(len(full.tokens_per_scale)):
        a, b = policy.layer_ops(s), full.layer_ops(s)
        ev = [a[i] - b[i] for i in range(full.depth) if policy.evicts[s][i]]
        keep = [a[i] - b[i] for i in range(full.depth) if not policy.evicts[s][i]]
        rows.append({"scale": s, "evicting_layers": len(ev),
                     "extra_evicting_median": statistics.median(ev) if ev else None,
                     "extra_evicting_max": max(ev) if ev else None,
                     "extra_other_median": statistics.median(keep) if keep else None})
    return rows


def _where(at: dict) -> str:
    if at["phase"] != "layer":
        return at["phase"]
    return f"layer {at['layer']}" + (f" ({at['part']})" if at["part"] else "")


def report(censuses: dict[str, Census]) -> list[str]:
    """The table: per scale, each policy's ops per layer (median/max) and sampling ops; then per-image totals."""
    names = list(censuses)
    first = censuses[names[0]]
    head = f"{'scale':>5} {'tokens':>6}" + "".join(f" | {n[:24]:>24} {'':>9}" for n in names)
    sub = f"{'':>5} {'':>6}" + "".join(f" | {'layer med/max':>15} {'evict':>5} {'sampl':>5}" + " " * 2
                                       for _ in names)
    lines = ["kernel-like ops per layer per scale (median and max over layers), evicting layers, sampling ops",
             head, sub]
    rows = {n: c.per_scale() for n, c in censuses.items()}
    for s, n_tok in enumerate(first.tokens_per_scale):
        line = f"{s:>5} {n_tok:>6}"
        for n in names:
            r = rows[n][s]
            line += f" | {_fmt_int(r['median']):>9}/{r['max']:<5} {r['evicting_layers']:>5} {r['sampling_ops']:>5}  "
        lines.append(line)
    lines.append("")
    for n, c in censuses.items():
        j = c.to_json()
        ph = j["ops_by_phase"]
        pa = j["peak_at"]
        lines.append(f"{n}: {c.total():,} kernel-like ops per image (layers {ph['layer']:,}, head {ph['head']:,}, "
                     f"sampling {ph['sample'] + ph['input']:,}, setup {ph['setup']:,}, end {ph['end']:,}); "
                     f"{j['total_flops'] / 1e12:.1f} TFLOP (matmul+attention); {j['total_bytes'] / 1e9:.0f} GB moved; "
                     f"live peak {c.peak_bytes / 2**20:,.0f} MiB at scale {pa['scale']}, {_where(pa)}; "
                     f"census {c.seconds:.0f} s")
    full = next((c for n, c in censuses.items() if n.startswith("full")), None)
    for n, c in censuses.items():
        if full is None or c is full:
            continue
        ex = [r for r in extra_per_evicting_layer(c, full) if r["evicting_layers"]]
        if ex:
            parts = ", ".join(f"{r['scale']}: +{_fmt_int(r['extra_evicting_median'])}" for r in ex)
            lines.append(f"{n}: extra ops per evicting layer over full (median, by scale) {parts}")
        other = [r["extra_other_median"] for r in extra_per_evicting_layer(c, full)
                 if r["extra_other_median"] is not None]
        if other:
            med = _fmt_int(statistics.median(other))
            lines.append(f"{n}: extra ops per non-evicting layer over full: median {med}")
    lines.append("")
    for n, c in censuses.items():
        if not c.syncs:
            lines.append(f"{n}: host syncs: none")
            continue
        grouped = Counter((s["phase"], s["op"], s["what"]) for s in c.syncs)
        lines.append(f"{n}: host syncs ({len(c.syncs)}):")
        for (phase, op, what), k in grouped.most_common():
            scales = sorted({s["scale"] for s in c.syncs if (s["phase"], s["op"], s["what"]) == (phase, op, what)})
            lines.append(f"  {k:>4} x {op} in {phase} at scales {scales}: {what}")
    return lines


def _iter_policies(spec: str, budget: str) -> Iterator[tuple[str, CacheConfig]]:
    for p in (s.strip() for s in spec.split(",") if s.strip()):
        yield (p if p == "full" else f"{p} {budget}"), CacheConfig(policy=p, budget=budget)


def main(argv: list[str] | None = None) -> int:
    """`python -m scalekv_core.bench launches`: the census of one generation per policy, as a table and JSON; a bad
    value or path is one line, `error: ...`, exit 2."""
    from ..cli_args import run_reporting_errors

    return run_reporting_errors(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..cli_args import Parser, output_file, check_budget_text
    from ..safe_files import write_text
    from .kv import check_configs, policy_list

    p = Parser(prog="python -m scalekv_core.bench launches",
               description="Count the ops one generation dispatches, with no compute.")
    p.add_argument("--model", default="2b", choices=sorted(KNOWN_MODELS))
    p.add_argument("--depth", type=int, default=0, help="override the depth (fewer layers, same width)")
    p.add_argument("--size", default="1M", help="a named size (0.06M, 0.25M, 0.60M, 1M) or WIDTHxHEIGHT")
    p.add_argument("--policies", default="full,scalekv")
    p.add_argument("--budget", default="10%")
    p.add_argument("--batch", type=int, default=1, help="images per run; CFG doubles the rows")
    p.add_argument("--cfg", type=float, default=3.0, help="1 runs without CFG (no doubled rows)")
    p.add_argument("--text-len", type=int, default=32, help="T5 tokens per prompt")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="meta", choices=["meta", "cpu"],
                   help="meta: accelerator stand-in (host copies visible); cpu: FakeTensorMode, as a CPU run")
    p.add_argument("--warm", action="store_true",
                   help="count a second generation in the process (process-wide tables already built)")
    p.add_argument("--json", help="write every figure here")
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error(f"--batch must be at least 1, got {a.batch}")
    try:
        schedule = parse_size(a.size)
    except ValueError as e:
        p.error(f"--size: {e}")
    check_budget_text(a.budget, "--budget")
    policy_list(a.policies)
    check_configs([config for _, config in _iter_policies(a.policies, a.budget)], schedule, "--budget")
    if a.json:
        output_file(a.json, "--json")
    cfg = KNOWN_MODELS[a.model]
    if a.depth:
        cfg = InfinityConfig(**{**cfg.__dict__, "depth": a.depth, "block_chunks": 2 if a.depth % 2 == 0 else 1})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    h, w = schedule.pixel_size
    rows = 2 * a.batch if a.cfg != 1 else a.batch
    print(f"launch census: {a.model} ({cfg.describe()}), {w}x{h}, batch {a.batch} ({rows} rows), blocks {a.dtype}, "
          f"device {a.device}, {'second' if a.warm else 'first'} generation in the process, torch {torch.__version__}",
          flush=True)
    censuses = {}
    for name, config in _iter_policies(a.policies, a.budget):
        censuses[name] = run_census(cfg, schedule, config, batch=a.batch, cfg_scale=a.cfg, device=a.device,
                                    dtype=dtype, text_len=a.text_len, label=name, warm=a.warm)
    for line in report(censuses):
        print(line)
    if a.json:
        full = censuses.get("full")
        data = {"args": vars(a), "torch": torch.__version__, "targets": TARGETS,
                "policies": {n: c.to_json() for n, c in censuses.items()},
                "extra_over_full": {n: extra_per_evicting_layer(c, full) for n, c in censuses.items()
                                    if full is not None and c is not full}}
        write_text(a.json, json.dumps(data, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
