"""The one KV-cache type: per-layer buffers sized from the budget plan, written in place, evicted in place.

Memory model, per layer and scale (S stored tokens, n new ones, `keep` to hold afterwards):
- The scale's keys and values are projected straight into their place (`new_slots`), never held beside it.
- When nothing is dropped and the buffer has room, that place is after the stored tokens in the layer's buffer
  and attention reads the buffer directly (the full cache never copies).
- Otherwise the step runs in one workspace shared by all layers: stored + new tokens are laid out there,
  attention reads them, the policy picks `keep` of them, and those are gathered straight into the layer's
  buffer. So only one layer at a time ever holds more than its budget.
- The last scale's keys and values are never stored: nothing reads them again.
Buffers are sized to the most the layer holds before its next eviction, and re-sized only when that changes; a
layer's first buffer is made before its first write, so a step that keeps everything never goes through the workspace.

Row layout (RowLayout): a layer's keys, values (codes and scales when 8-bit) and, for policies that track them, each
token's int32 id sit side by side in one buffer (B, H, T, row), so the stored tokens reach the workspace in one copy
and the kept ones come back in one gather. Keys and values are strided views of it; rows are padded to 16 bytes
(attention reads values in place). In the workspace, a scale's new tokens always start at the same row for every
layer (the most any layer stores at that scale) and a layer's stored tokens end there, so the new tokens' ids are
written once per scale, not once per layer. A buffer made before its first eviction holds its tokens' ids already.

Scaled 8-bit storage (k_dtype and v_dtype both float8_e4m3fn or int8; docs/kv_storage.md): each layer holds codes
and one float32 scale per token and head, (B, H, T, 1). A step then always runs in a float32 staging area shared
by all layers: the stored tokens are dequantized into it, the projection writes the new ones after them
(`new_slots`), attention and scoring read it, and only the new tokens are quantized; an eviction gathers codes and
scales with the same indices (through a workspace of codes when it drops tokens, as above). So the extra memory is
one layer's keys and values in float32, never all layers', and a stored token is quantized once, never again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from ..schedules import Schedule
from .attention import sdpa
from .budget import BudgetPlan, kv_bytes_per_token

#: One-byte storage formats and their largest code: a token's scale maps its largest magnitude there.
QUANT_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
SCALE_DTYPE = torch.float32
#: Tokens converted at a time, so quantizing and dequantizing never hold a full-size float32 temporary.
QUANT_CHUNK = 1024


def quantize_into(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Write x (B, H, T, c) as 8-bit codes and per-token, per-head absmax scales (B, H, T, 1), in place."""
    qmax = QUANT_MAX[codes.dtype]
    for s in range(0, x.shape[2], QUANT_CHUNK):
        part = x[:, :, s:s + QUANT_CHUNK].float()
        scale = part.abs().amax(dim=-1, keepdim=True).div_(qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token keeps code 0
        part = part / scale
        if codes.dtype == torch.int8:
            part.round_()
        codes[:, :, s:s + QUANT_CHUNK] = part.clamp_(-qmax, qmax)
        scales[:, :, s:s + QUANT_CHUNK] = scale


def dequantize_into(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """Write codes * scales into `out` (its dtype), a chunk of tokens at a time."""
    for s in range(0, codes.shape[2], QUANT_CHUNK):
        e = s + QUANT_CHUNK
        out[:, :, s:e] = codes[:, :, s:e].to(SCALE_DTYPE).mul_(scales[:, :, s:e])


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of x (new tensors), for tests and tools; the cache writes with quantize_into."""
    codes = torch.empty(x.shape, dtype=dtype, device=x.device)
    scales = torch.empty(*x.shape[:-1], 1, dtype=SCALE_DTYPE, device=x.device)
    quantize_into(x, codes, scales)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of codes and scales (a new tensor)."""
    out = torch.empty(codes.shape, dtype=SCALE_DTYPE, device=codes.device)
    dequantize_into(codes, scales, out)
    return out
from .policies.base import EvictionPolicy, StepContext

#: Called with (scale, layer, kept indices (B, H, keep)) whenever a layer decides what to keep.
KeptRecorder = Callable[[int, int, torch.Tensor], None]
#: Called after each layer's attention with its queries (B, H, n, c), all its keys (B, H, S+n, c) and S; calibration.
AttentionObserver = Callable[[int, int, torch.Tensor, torch.Tensor, int], None]


@dataclass
class ScaleUsage:
    """Measured after a scale: tokens and bytes each layer holds, and bytes its buffers occupy."""

    tokens: list[int]
    stored_bytes: list[int]
    allocated_bytes: list[int]
    workspace_bytes: int


class RowLayout:
    """Byte layout of one cached token of one head: named fields side by side, moved as whole rows of `unit`."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]], align: int) -> None:
        self.fields: dict[str, tuple[torch.dtype, int, int]] = {}  # name -> (dtype, elements, byte offset)
        off = 0
        for name, dtype, width in fields:
            off = -(-off // dtype.itemsize) * dtype.itemsize
            self.fields[name] = (dtype, width, off)
            off += width * dtype.itemsize
        self.row_bytes = -(-off // align) * align
        size = next(u for u in (8, 4, 2, 1) if self.row_bytes % u == 0 and all(
            o % u == 0 and (w * d.itemsize) % u == 0 for d, w, o in self.fields.values()))
        self.unit = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[size]
        self.units = self.row_bytes // size

    def view(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` of raw rows (..., units) as (..., elements) of its dtype: a view, no copy."""
        dtype, width, off = self.fields[name]
        u = self.unit.itemsize
        return raw[..., off // u:(off + width * dtype.itemsize) // u].view(dtype)


def row_layout(k_dtype: torch.dtype, v_dtype: torch.dtype, head_dim: int, track_positions: bool) -> RowLayout:
    """The one row layout of cache buffers and workspace, so the planner counts exactly the bytes the cache allocates."""
    quantized = k_dtype in QUANT_MAX
    fields = [("k", k_dtype, head_dim), ("v", v_dtype, head_dim)]
    if quantized:
        fields += [("ks", SCALE_DTYPE, 1), ("vs", SCALE_DTYPE, 1)]
    if track_positions:
        fields.append(("id", torch.int32, 1))
    return RowLayout(fields, 4 if quantized else 16)  # values are read in place by attention unless quantized


class KVCache:
    """Keys and values of every layer for one generation (the CFG-doubled batch), driven by a budget plan."""

    def __init__(self, plan: BudgetPlan, policy: EvictionPolicy, schedule: Schedule, batch: int, num_heads: int,
                 head_dim: int, device: torch.device | str = "cpu", k_dtype: torch.dtype = torch.float32,
                 v_dtype: torch.dtype = torch.float32, record_kept: KeptRecorder | None = None,
                 observer: AttentionObserver | None = None) -> None:
        if plan.num_scales != schedule.num_scales:
            raise ValueError(f"budget plan is for {plan.num_scales} scales, the schedule has {schedule.num_scales}")
        self.plan, self.policy, self.schedule = plan, policy, schedule
        self.batch, self.num_heads, self.head_dim = batch, num_heads, head_dim
        self.num_layers = plan.num_layers
        self.device = torch.device(device)
        self.k_dtype, self.v_dtype = k_dtype, v_dtype
        self.quantized = k_dtype in QUANT_MAX
        if self.quantized != (v_dtype in QUANT_MAX):
            raise ValueError(f"keys in {k_dtype} and values in {v_dtype}: 8-bit storage quantizes both or neither")
        self.record_kept = record_kept
        self.observer = observer
        #: Seconds spent scoring and evicting, measured only when `time_eviction` is set (it synchronises CUDA).
        self.time_eviction = False
        self.eviction_seconds = 0.0
        self.track_positions = policy.needs_positions
        policy.prepare(schedule, batch, num_heads, self.device)  # device tables: no host copy inside a step
        self._token_ids = policy.token_ids() if self.track_positions else None
        if self.track_positions and self._token_ids is None:
            raise RuntimeError(f"policy {policy.name} needs positions but gives no token ids")
        self.layout = row_layout(k_dtype, v_dtype, head_dim, self.track_positions)
        L = self.num_layers
        self.rows: list[torch.Tensor | None] = [None] * L
        self.keys: list[torch.Tensor | None] = [None] * L
        self.values: list[torch.Tensor | None] = [None] * L
        self.positions: list[torch.Tensor | None] = [None] * L
        #: Scaled storage only: float32 scales (B, H, capacity, 1) beside each layer's codes.
        self.k_scales: list[torch.Tensor | None] = [None] * L
        self.v_scales: list[torch.Tensor | None] = [None] * L
        #: Whether a layer's buffer still holds the ids written when it was made (no eviction since).
        self._ids_prefilled = [False] * L
        self.lengths = [0] * L
        self.scale = 0
        self.usage: list[ScaleUsage] = []
        self._ws_base = self._workspace_bases()
        self._ws_tokens = max((b + n for b, n in zip(self._ws_base, schedule.tokens_per_scale) if b is not None),
                              default=0)
        self._ws_raw: torch.Tensor | None = None
        self._ws: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ws_pos: torch.Tensor | None = None
        self._ws_scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.staging_tokens = self._staging_tokens() if self.quantized else 0
        self._stage: tuple[torch.Tensor, torch.Tensor] | None = None
        #: (layer, scale, stored, new, in place) between new_slots() and attend().
        self._step: tuple[int, int, int, int, bool] | None = None

    # ------------------------------------------------------------------ planning

    def _run_capacity(self, layer: int, scale: int) -> int:
        """Tokens the layer will hold at the end of the run of keep-everything scales that follows `scale`."""
        kept, last = self.plan.kept, len(self.plan.kept) - 1
        j = scale
        while j < last and not self.plan.evicts(j + 1, layer):
            j += 1
        return kept[j][layer]

    def _fresh(self, layer: int, scale: int, stored: int, capacity: int) -> bool:
        """Whether this step makes the layer's first buffer and writes into it (nothing stored, nothing dropped)."""
        last = scale == self.schedule.num_scales - 1
        return stored == 0 and capacity == 0 and not last and not self.plan.evicts(scale, layer)

    def _in_place(self, layer: int, scale: int, stored: int, capacity: int) -> bool:
        if self._fresh(layer, scale, stored, capacity):
            capacity = self._run_capacity(layer, scale)
        n = self.schedule.tokens_per_scale[scale]
        last = scale == self.schedule.num_scales - 1
        return stored + n <= capacity and (last or not self.plan.evicts(scale, layer))

    def _walk(self, layer: int, scales: int):  # noqa: ANN202 - generator of (scale, stored, in place, capacity after)
        """The plan's storage steps for one layer: (scale, stored before, in place, buffer capacity after)."""
        stored, cap = 0, 0
        for scale in range(scales):
            n_kept = len(self.plan.kept)
            fresh = self._fresh(layer, scale, stored, cap)
            in_place = self._in_place(layer, scale, stored, cap)
            if (fresh or not in_place) and scale < n_kept:
                cap = self._run_capacity(layer, scale)
            yield scale, stored, in_place, cap
            if scale < n_kept:
                stored = self.plan.kept[scale][layer]

    def _workspace_bases(self) -> list[int | None]:
        """Per scale, the workspace row where the new tokens go: the most any layer stepping through it stores."""
        bases: list[int | None] = [None] * self.schedule.num_scales
        for layer in range(self.num_layers):
            for scale, stored, in_place, _ in self._walk(layer, self.schedule.num_scales):
                if not in_place:
                    bases[scale] = max(bases[scale] or 0, stored)
        return bases

    def _staging_tokens(self) -> int:
        """The most tokens one step attends over (stored plus new): the staging area of scaled storage."""
        need = 0
        for layer in range(self.num_layers):
            stored = 0
            for scale, n in enumerate(self.schedule.tokens_per_scale):
                need = max(need, stored + n)
                if scale < len(self.plan.kept):
                    stored = self.plan.kept[scale][layer]
        return need

    @property
    def staging_token_bytes(self) -> int:
        """Bytes of one token in the float32 staging area (keys + values, all rows and heads); 0 unless scaled."""
        return kv_bytes_per_token(self.num_heads, self.head_dim, 4, 4, self.batch) if self.quantized else 0

    @property
    def planned_workspace_bytes(self) -> int:
        """Bytes of the shared workspace (codes and scales or plain) and the staging area, once both exist."""
        return self._ws_tokens * self.row_token_bytes + self.staging_tokens * self.staging_token_bytes

    def buffer_tokens(self, scale: int) -> list[int]:
        """Buffer capacity per layer after `scale`, as the allocation rule gives it (for planning and reports)."""
        caps = []
        for layer in range(self.num_layers):
            cap = 0
            for s, _, _, after in self._walk(layer, min(scale + 1, len(self.plan.kept))):
                cap = after
            caps.append(cap)
        return caps

    @property
    def token_bytes(self) -> int:
        """Bytes of one cached token in one layer (keys + values, all rows and heads)."""
        return kv_bytes_per_token(self.num_heads, self.head_dim, self.k_dtype.itemsize, self.v_dtype.itemsize,
                                  self.batch)

    @property
    def row_token_bytes(self) -> int:
        """Bytes one token takes in a layer's buffer or the workspace as allocated: padded rows, ids included."""
        return self.batch * self.num_heads * self.layout.row_bytes

    # ------------------------------------------------------------------ storage

    def _alloc(self, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self.batch, self.num_heads, tokens, self.head_dim, device=self.device, dtype=dtype)

    def _alloc_rows(self, tokens: int) -> torch.Tensor:
        return torch.empty(self.batch, self.num_heads, tokens, self.layout.units, device=self.device,
                           dtype=self.layout.unit)

    def _fields(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor | None, torch.Tensor | None]:
        """Keys, values, key scales, value scales and ids (B, H, T) of raw rows; views, None where absent."""
        lay = self.layout
        ks = lay.view(raw, "ks") if self.quantized else None
        vs = lay.view(raw, "vs") if self.quantized else None
        ids = lay.view(raw, "id")[..., 0] if self.track_positions else None
        return lay.view(raw, "k"), lay.view(raw, "v"), ks, vs, ids

    def _set_buffer(self, layer: int, raw: torch.Tensor | None) -> None:
        if raw is None:
            self.rows[layer] = self.keys[layer] = self.values[layer] = None
            self.k_scales[layer] = self.v_scales[layer] = self.positions[layer] = None
            return
        self.rows[layer] = raw
        (self.keys[layer], self.values[layer], self.k_scales[layer], self.v_scales[layer],
         self.positions[layer]) = self._fields(raw)

    def _new_buffer(self, layer: int, tokens: int, prefill: bool) -> torch.Tensor:
        """A layer's buffer; `prefill` writes the ids of positions 0.. (a run that has evicted nothing yet)."""
        self._set_buffer(layer, None)  # the old buffer goes back before the new one is made
        raw = self._alloc_rows(tokens)
        self._set_buffer(layer, raw)
        self._ids_prefilled[layer] = prefill and self.track_positions
        if self._ids_prefilled[layer]:
            self.positions[layer].copy_(self._token_ids[:tokens])
        return raw

    def _staging(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stage is None:
            self._stage = (self._alloc(self.staging_tokens, SCALE_DTYPE), self._alloc(self.staging_tokens, SCALE_DTYPE))
        return self._stage

    def _workspace(self) -> torch.Tensor:
        if self._ws_raw is None:
            self._ws_raw = self._alloc_rows(self._ws_tokens)
            k, v, ks, vs, ids = self._fields(self._ws_raw)
            self._ws, self._ws_pos = (k, v), ids
            self._ws_scales = (ks, vs) if self.quantized else None
        return self._ws_raw

    def begin_scale(self, scale: int) -> None:
        """Start a scale: the workspace exists from the first scale on; the new tokens' ids go in once per scale."""
        self.scale = scale
        if self._ws_tokens:
            self._workspace()
        base = self._ws_base[scale]
        last = scale == self.schedule.num_scales - 1
        if self.track_positions and base is not None and (not last or self.record_kept is not None):
            start, n = self.schedule.offsets[scale], self.schedule.tokens_per_scale[scale]
            self._ws_pos[:, :, base:base + n].copy_(self._token_ids[start:start + n])

    def query_dtype(self, layer: int, compute_dtype: torch.dtype) -> torch.dtype:
        """Dtype this step's queries (after `new_slots`) may be rounded to as they are made: attention's own, unless
        the policy scores with them at this step or an observer reads them (then float32), so attention need not
        cast them again (the same single rounding)."""
        if self._step is None or self._step[:2] != (layer, self.scale):
            raise RuntimeError(f"query_dtype(layer {layer}) at scale {self.scale} without new_slots() for it first")
        _, scale, S, n, in_place = self._step
        last = scale == self.schedule.num_scales - 1
        scores = (self.policy.scores_keys and not in_place and self._step_keep(layer, scale, S + n) < S + n
                  and (not last or self.record_kept is not None))
        return torch.float32 if scores or self.observer is not None else compute_dtype

    def _step_keep(self, layer: int, scale: int, total: int) -> int:
        """Tokens the layer keeps after this scale's step of `total` (at the last scale: its cap, or all)."""
        if scale == self.schedule.num_scales - 1:
            return self.plan.final_caps[layer] if self.plan.final_caps else total
        return self.plan.kept[scale][layer]

    def new_slots(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, H, n, c) where this scale's keys and values for `layer` must be written before `attend`.

        The projection writes straight into them, so no separate copy of the scale's keys and values ever exists:
        they go after the stored tokens in the layer's buffer when it has room and nothing is dropped, else after
        a copy of the stored tokens in the shared workspace.
        """
        scale, S = self.scale, self.lengths[layer]
        raw = self.rows[layer]
        cap = 0 if raw is None else raw.shape[2]
        in_place = self._in_place(layer, scale, S, cap)
        if self._fresh(layer, scale, S, cap):
            raw = self._new_buffer(layer, self._run_capacity(layer, scale), prefill=True)
        if self.quantized:
            return self._staged_slots(layer, scale, S, n, in_place)
        if in_place:
            base = S
            dst_k, dst_v = self.keys[layer], self.values[layer]
        else:
            ws = self._workspace()
            base = self._ws_base[scale]
            if S:  # one copy moves the stored keys, values and ids
                ws[:, :, base - S:base].copy_(raw[:, :, :S])
            if scale == self.schedule.num_scales - 1:  # the last scale reads the buffer once: the copy is it
                self._set_buffer(layer, None)
            dst_k, dst_v = self._ws
        self._step = (layer, scale, S, n, in_place)
        return dst_k[:, :, base:base + n], dst_v[:, :, base:base + n]

    def _staged_slots(self, layer: int, scale: int, S: int, n: int, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled storage: the stored tokens dequantized into the staging area, and the new tokens' views after them."""
        st_k, st_v = self._staging()
        if S:
            dequantize_into(self.keys[layer][:, :, :S], self.k_scales[layer][:, :, :S], st_k[:, :, :S])
            dequantize_into(self.values[layer][:, :, :S], self.v_scales[layer][:, :, :S], st_v[:, :, :S])
        if scale == self.schedule.num_scales - 1:  # read once, now in the staging area: the codes can go
            self._set_buffer(layer, None)
        self._step = (layer, scale, S, n, in_place)
        return st_k[:, :, S:S + n], st_v[:, :, S:S + n]

    def _write_new_ids(self, layer: int, S: int, n: int) -> None:
        """Ids of an in-place step's tokens, unless the buffer was made holding them (the usual case)."""
        if self.track_positions and not self._ids_prefilled[layer]:
            start = self.schedule.offsets[self.scale]
            self.positions[layer][:, :, S:S + n].copy_(self._token_ids[start:start + n])

    def attend(self, layer: int, q: torch.Tensor, compute_dtype: torch.dtype, x: torch.Tensor | None = None,
               w_q: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of this scale's queries over the layer's cache plus its own keys, then the layer's eviction.

        The keys and values must already be in the views `new_slots(layer, n)` returned. `x` and `w_q` (the
        self-attention input and query weight) are read by the original ScaleKV scoring.
        """
        if self._step is None or self._step[:2] != (layer, self.scale):
            raise RuntimeError(f"attend(layer {layer}) at scale {self.scale} without new_slots() for it first")
        _, scale, S, n, in_place = self._step
        self._step = None
        if self.quantized:
            return self._attend_staged(layer, q, compute_dtype, x, w_q, scale, S, n, in_place)
        total = S + n
        last = scale == self.schedule.num_scales - 1
        if in_place:
            if not last:
                self._write_new_ids(layer, S, n)
            out = sdpa(q, self.keys[layer][:, :, :total], self.values[layer][:, :, :total], compute_dtype)
            if self.observer is not None:
                self.observer(scale, layer, q, self.keys[layer][:, :, :total], S)
            if last:  # nothing reads this layer's cache again: its memory serves the layers still to come
                self._set_buffer(layer, None)
            else:
                self.lengths[layer] = total
            return out

        base = self._ws_base[scale]
        lo, hi = base - S, base + n
        ws_k, ws_v = self._ws
        keys, values = ws_k[:, :, lo:hi], ws_v[:, :, lo:hi]
        positions = self._ws_pos[:, :, lo:hi] if self.track_positions else None
        out = sdpa(q, keys, values, compute_dtype)
        if self.observer is not None:
            self.observer(scale, layer, q, keys, S)

        keep = self._step_keep(layer, scale, total)
        if last:
            if self.record_kept is not None and keep < total:  # what the original would keep; never stored
                self.record_kept(scale, layer, self._select(layer, q, keys, positions, S, keep, x, w_q))
            return out
        self._keep_rows(layer, scale, self._ws_raw[:, :, lo:hi], keep, total, q, keys, positions, S, x, w_q)
        return out

    def _keep_rows(self, layer: int, scale: int, src: torch.Tensor, keep: int, total: int, q: torch.Tensor,
                   keys: torch.Tensor, positions: torch.Tensor | None, S: int, x: torch.Tensor | None,
                   w_q: torch.Tensor | None) -> None:
        """Move the step's rows (workspace) into the layer's buffer: all of them, or the kept ones in one gather."""
        new_cap = self._run_capacity(layer, scale)
        if self.rows[layer] is None or self.rows[layer].shape[2] != new_cap:  # no reference keeps the old one alive
            self._new_buffer(layer, new_cap, prefill=False)
        raw = self.rows[layer]
        self._ids_prefilled[layer] = False
        if keep == total:
            raw[:, :, :total].copy_(src)
        else:
            timed = self.time_eviction  # off: no clock call at all (a host call inside a step breaks graphs/compile)
            t0 = self._clock() if timed else 0.0
            idx = self._select(layer, q, keys, positions, S, keep, x, w_q)
            if self.record_kept is not None:
                self.record_kept(scale, layer, idx)
            _gather_into(raw, src, idx.unsqueeze(-1).expand(-1, -1, -1, self.layout.units), keep)
            if timed:
                self.eviction_seconds += self._clock() - t0
        self.lengths[layer] = keep

    def _attend_staged(self, layer: int, q: torch.Tensor, compute_dtype: torch.dtype, x: torch.Tensor | None,
                       w_q: torch.Tensor | None, scale: int, S: int, n: int, in_place: bool) -> torch.Tensor:
        """attend() for scaled storage: attention and scoring read the staging area; codes and scales move together."""
        total = S + n
        last = scale == self.schedule.num_scales - 1
        st_k, st_v = self._stage
        keys, values = st_k[:, :, :total], st_v[:, :, :total]
        base = self._ws_base[scale]
        positions = None
        if in_place:
            if not last:
                self._write_new_ids(layer, S, n)
        elif self.track_positions:
            positions = self._ws_pos[:, :, base - S:base + n]
        out = sdpa(q, keys, values, compute_dtype)
        if self.observer is not None:
            self.observer(scale, layer, q, keys, S)
        if last:
            keep = self._step_keep(layer, scale, total)
            if self.record_kept is not None and keep < total and not in_place:
                self.record_kept(scale, layer, self._select(layer, q, keys, positions, S, keep, x, w_q))
            return out
        if in_place:  # only the new tokens are quantized, straight into the layer's buffer
            quantize_into(st_k[:, :, S:total], self.keys[layer][:, :, S:total], self.k_scales[layer][:, :, S:total])
            quantize_into(st_v[:, :, S:total], self.values[layer][:, :, S:total], self.v_scales[layer][:, :, S:total])
            self.lengths[layer] = total
            return out

        # Rows of stored + new tokens laid out in the workspace, so the kept ones gather straight into the buffer.
        ws = self._workspace()
        ws_k, ws_v = self._ws
        ws_ks, ws_vs = self._ws_scales
        if S:
            ws[:, :, base - S:base].copy_(self.rows[layer][:, :, :S])
        quantize_into(st_k[:, :, S:total], ws_k[:, :, base:base + n], ws_ks[:, :, base:base + n])
        quantize_into(st_v[:, :, S:total], ws_v[:, :, base:base + n], ws_vs[:, :, base:base + n])
        keep = self._step_keep(layer, scale, total)
        self._keep_rows(layer, scale, ws[:, :, base - S:base + n], keep, total, q, keys, positions, S, x, w_q)
        return out

    def _clock(self) -> float:
        """Wall time for `time_eviction`, after the device's queued work (so it measures what eviction took)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _select(self, layer: int, q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor | None, stored: int,
                keep: int, x: torch.Tensor | None, w_q: torch.Tensor | None) -> torch.Tensor:
        ctx = StepContext(layer=layer, scale=self.scale, schedule=self.schedule, stored=stored, q=q, x=x, w_q=w_q,
                          positions=positions)
        return self.policy.select(ctx, keys, keep)

    def end_scale(self) -> None:
        """Record what every layer holds now (planned tokens are checked against it)."""
        tb, rb = self.token_bytes, self.row_token_bytes
        alloc = [0 if t is None else t.shape[2] for t in self.rows]
        ws = 0 if self._ws_raw is None else self._ws_raw.shape[2] * rb
        if self._stage is not None:
            ws += self._stage[0].shape[2] * self.staging_token_bytes
        self.usage.append(ScaleUsage(tokens=list(self.lengths), stored_bytes=[n * tb for n in self.lengths],
                                     allocated_bytes=[a * rb for a in alloc], workspace_bytes=ws))

    def stored(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values a layer holds now (scaled storage: dequantized float32 copies)."""
        n = self.lengths[layer]
        if self.quantized:
            return (dequantize(self.keys[layer][:, :, :n], self.k_scales[layer][:, :, :n]),
                    dequantize(self.values[layer][:, :, :n], self.v_scales[layer][:, :, :n]))
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def nbytes(self) -> int:
        """Bytes the buffers and the workspace occupy now."""
        tensors = [t for t in (*self.rows, self._ws_raw) if t is not None]
        if self._stage is not None:
            tensors += list(self._stage)
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """Drop every buffer so its memory returns to the allocator at once (also after an interrupt)."""
        L = self.num_layers
        for layer in range(L):
            self._set_buffer(layer, None)
        self._ws_raw, self._ws, self._ws_pos, self._ws_scales, self._stage = None, None, None, None, None
        self._step = None
        self.lengths = [0] * L


def _gather_into(dst: torch.Tensor, src: torch.Tensor, idx: torch.Tensor, keep: int) -> None:
    """Write the kept tokens straight into the layer buffer, with no intermediate copy when sizes match."""
    if dst.shape[2] == keep:
        torch.gather(src, 2, idx, out=dst)
    else:
        dst[:, :, :keep] = src.gather(2, idx)
