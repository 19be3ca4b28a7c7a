"""Block swap: keep N transformer blocks in (pinned) host memory and stream each to the device when its turn comes.

For as long as a `BlockSwap` is active, the model runs on `device` with N of its blocks stored in host memory, one
flat byte buffer per block (every parameter and buffer of the block, whatever its dtype: bf16/fp32 weights, fp8/int8/
int4 packed weights and their scales). The device holds the other blocks, everything outside the blocks, and two
block-sized slots (`job_memory.SWAP_BUFFERS`): the block that is running and the one being fetched. So the device
holds the weights minus N - 2 blocks, exactly what `job_memory.plan_job` plans.

Per scale (`Infinity.forward_scale` calls the three hooks):
- `begin_scale`: fetch the first swapped block into a slot (blocks are spread so block 0 stays resident: the fetch
  overlaps with the resident blocks before it);
- `before_block(i)`: wait until block i's copy has landed, point its tensors at the slot, then start fetching the
  next swapped block into the other slot (it overlaps with block i and the resident blocks after it);
- `after_block(i)`: mark the slot free once block i's kernels are done, point its tensors back at the host copy.

On CUDA the copies run on a side stream from pinned memory (`non_blocking`), ordered by events: a slot is written
only after the block that used it has finished, and read only after its copy has landed. Elsewhere (CPU, tests) the
same slot logic runs with plain synchronous copies. Each swapped block is copied once per scale: N x scales copies
per image (13 scales at 1024x1024), one memcpy of the block's bytes each (for N <= 3 fewer: a block that a slot
still holds from the previous scale is not copied again).

`restore` (or leaving `swap_blocks`) puts every tensor back where it was before (same device, same values, no
buffer of the swap kept), also after an exception or an interrupt in the middle of a scale. While a swap is active the
model refuses `.to()` / `.cuda()` (Infinity._apply): ComfyUI's memory manager may move models, so enable the swap
inside the sampling call and leave it before returning (`swap_blocks`).
"""
from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
import torch.nn as nn

from ..job_memory import SWAP_BUFFERS
from ..limits import InputError, shown

#: (module, attribute name, is a parameter) of one tensor of a block.
_Entry = tuple[nn.Module, str, bool]


def max_block_swap(depth: int) -> int:
    """Most blocks a model of `depth` can swap: two slots stay on the device."""
    return max(depth - SWAP_BUFFERS, 0)


def check_block_swap(n: object, depth: int, field: str = "block_swap") -> int:
    """`n` as an int from 0 to depth - 2; an InputError (a ValueError) naming `field`, the value, depth and max."""
    top = max_block_swap(depth)
    if isinstance(n, bool):
        n_int = None
    else:
        try:
            n_int = operator.index(n)
        except TypeError:
            n_int = None
    if n_int is None:
        raise InputError(f"{field}: expected a whole number of blocks from 0 to {top}, got {shown(n)}")
    if n_int < 0:
        raise InputError(f"{field}: {n_int} is negative; expected a number of blocks from 0 to {top}")
    if n_int > top:
        raise InputError(f"{field}: {n_int} blocks, but the model has {depth}; swap at most {top} "
                         f"({SWAP_BUFFERS} stay on the device as swap slots)")
    return n_int


def swapped_indices(depth: int, n: int) -> list[int]:
    """Which blocks to swap: spread evenly, first and last block resident (so the fetch of the first swapped block
    of a scale overlaps with block 0, and each fetch with the resident blocks between two swapped ones)."""
    n = check_block_swap(n, depth)
    return [(k + 1) * depth // (n + 1) for k in range(n)]


def _entries(module: nn.Module) -> list[_Entry]:
    """Every parameter and buffer held under `module` (each module's own, so modules can be rebound one by one)."""
    out: list[_Entry] = []
    for m in module.modules():
        out += [(m, name, True) for name, p in m._parameters.items() if p is not None]
        out += [(m, name, False) for name, b in m._buffers.items() if b is not None]
    return out


def _get(entry: _Entry) -> torch.Tensor:
    m, name, is_param = entry
    return m._parameters[name] if is_param else m._buffers[name]


def _set(entry: _Entry, t: torch.Tensor) -> None:
    """Point a parameter (keeping the Parameter object, which call sites may hold) or buffer at `t`."""
    m, name, is_param = entry
    if is_param:
        m._parameters[name].data = t
    else:
        m._buffers[name] = t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Layout:
    """Where each tensor of one block lies in a flat byte buffer: largest element size first, so every offset is a
    multiple of its dtype's size with no padding (the buffer is exactly the block's bytes, as the planner counts)."""

    def __init__(self, entries: list[_Entry]) -> None:
        tensors = [_get(e) for e in entries]
        order = sorted(range(len(entries)), key=lambda i: -tensors[i].element_size())  # stable
        self.entries = [entries[i] for i in order]
        self.specs: list[tuple[int, int, torch.dtype, torch.Size]] = []
        offset = 0
        for i in order:
            t = tensors[i]
            self.specs.append((offset, _nbytes(t), t.dtype, t.shape))
            offset += _nbytes(t)
        self.nbytes = offset
        self.signature = tuple((d, s) for _, _, d, s in self.specs)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The block's tensors as views of a flat uint8 buffer."""
        return [flat[o:o + n].view(dtype).view(shape) for o, n, dtype, shape in self.specs]


class BlockSwap:
    """Runs `model` on `device` with `n` blocks in host memory, two device slots streaming them in (see module doc).

    Construction moves the weights (swapped blocks to host memory, the rest to `device`); `restore` moves every
    tensor back where it was. Use `swap_blocks` to get both around a call.
    """

    def __init__(self, model: nn.Module, n: int, device: torch.device | str) -> None:
        depth = len(model.blocks)
        self.n = check_block_swap(n, depth)
        if getattr(model, "block_swap", None) is not None:
            raise RuntimeError("block swap is already active on this model; restore it first")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.device = model, device
        self.swapped: tuple[int, ...] = tuple(swapped_indices(depth, self.n))
        self._rank = {layer: k for k, layer in enumerate(self.swapped)}
        self.transfers = 0  # block copies host -> slot since enabled
        self.scale_fetches: list[int] = []  # blocks fetched since the last begin_scale, in order
        self._cuda = device.type == "cuda"
        self._pinned = self._cuda
        self._homes: list[tuple[_Entry, torch.device, bool]] = []
        self._layouts: dict[int, _Layout] = {}
        self._host: dict[int, torch.Tensor] = {}  # block -> flat host buffer
        self._host_views: dict[int, list[torch.Tensor]] = {}
        self._slots: list[torch.Tensor] = []
        self._slot_views: dict[tuple, list[torch.Tensor]] = {}
        self._slot_holds: list[int | None] = []  # which block each slot holds (or is being filled with)
        self._slot_of: dict[int, int] = {}
        self._bound: dict[int, int] = {}  # blocks whose tensors point at a slot -> the slot
        self._stream = None
        self._ready: list = []  # per slot: copy landed (side stream)
        self._free: list = []  # per slot: the block that used it is done (compute stream)
        self._active = False
        self.resident_bytes = 0  # on the device outside the slots
        self.slot_bytes = 0  # all slots together
        self.host_bytes = 0
        try:
            self._enable()
        except BaseException:
            self.restore()
            raise

    # ------------------------------------------------------------------------------------------ placing, undoing

    @torch.no_grad()
    def _enable(self) -> None:
        model, blocks = self.model, self.model.blocks
        self._homes = [(e, _get(e).device, _get(e).is_inference()) for e in _entries(model)]
        self._active = True
        model.block_swap = self  # from here on restore() undoes whatever was done
        with torch.inference_mode(False):  # buffers that outlive an inference_mode caller (ComfyUI samples in one)
            in_swapped: set[int] = set()
            for layer in self.swapped:
                layout = _Layout(_entries(blocks[layer]))
                flat = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=self._pinned)
                views = layout.views(flat)
                for entry, view in zip(layout.entries, views):
                    view.copy_(_get(entry))
                    _set(entry, view)  # the block's old storage (on the device, if it was there) is released
                self._layouts[layer], self._host[layer], self._host_views[layer] = layout, flat, views
                in_swapped.update(id(m) for m in blocks[layer].modules())
                self.host_bytes += layout.nbytes
            for entry, _, _ in self._homes:
                if id(entry[0]) in in_swapped:
                    continue
                t = _get(entry)
                if t.device != self.device:
                    _set(entry, t.to(self.device))
                self.resident_bytes += _nbytes(_get(entry))
            if self.n:
                size = max(layout.nbytes for layout in self._layouts.values())
                self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(SWAP_BUFFERS)]
                self._slot_holds = [None] * SWAP_BUFFERS
                self.slot_bytes = size * SWAP_BUFFERS
                if self._cuda:
                    self._stream = torch.cuda.Stream(self.device)
                    self._ready = [torch.cuda.Event() for _ in self._slots]
                    self._free = [torch.cuda.Event() for _ in self._slots]

    @torch.no_grad()
    def restore(self) -> None:
        """Every tensor back on the device it was on before, with its values; the swap's buffers released.
        Safe to call twice, after a failed enable, or after an exception in the middle of a scale."""
        if not self._active:
            return
        with torch.inference_mode(False):
            if self._stream is not None:
                self._stream.synchronize()  # no copy may still be writing a slot
                torch.cuda.current_stream(self.device).synchronize()
            for layer, views in self._host_views.items():  # the host copy is the master: unbind every block
                for entry, view in zip(self._layouts[layer].entries, views):
                    _set(entry, view)
            self._bound.clear()
            self._slots, self._slot_views, self._slot_of, self._slot_holds = [], {}, {}, []
            ours = {flat.untyped_storage().data_ptr() for flat in self._host.values()}
            for entry, home, inference in self._homes:
                t = _get(entry)
                if t.numel() and t.untyped_storage().data_ptr() in ours:
                    # a fresh tensor of its own (pageable when home is the host), so the flat buffer can go; of
                    # the kind it was (ComfyUI loads models inside inference_mode: a weight put back as a normal
                    # tensor beside inference ones fails the next run, "Inference tensors do not track version
                    # counter")
                    with torch.inference_mode(inference):
                        _set(entry, torch.empty(t.shape, dtype=t.dtype, device=home).copy_(t))
                elif t.device != home:
                    with torch.inference_mode(inference):
                        _set(entry, t.to(home))
            self._host, self._host_views, self._layouts = {}, {}, {}
            self._stream, self._ready, self._free = None, [], []
            self.model.drop_rope_tables_elsewhere()
        self._active = False
        if getattr(self.model, "block_swap", None) is self:
            self.model.block_swap = None

    def __enter__(self) -> "BlockSwap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @property
    def active(self) -> bool:
        return self._active

    @property
    def device_bytes(self) -> int:
        """Weights on the device: the resident tensors plus the slots (job_memory: weights - (N - 2) blocks)."""
        return self.resident_bytes + self.slot_bytes

    # --------------------------------------------------------------------------------------- the per-scale hooks

    def begin_scale(self) -> None:
        """Start a scale: unbind what an interrupted scale left bound and fetch the first swapped block."""
        for layer in list(self._bound):
            self._unbind(layer)
        self.scale_fetches = []
        if self.n:  # keep the second swapped block if a slot still holds it (n <= 3)
            self._fetch(self.swapped[0], avoid=self._slot_of.get(self.swapped[1]) if self.n > 1 else None)

    def before_block(self, layer: int) -> None:
        """Block `layer` is next: make it usable on the device, and start fetching the next swapped block."""
        k = self._rank.get(layer)
        if k is None:
            return
        slot = self._slot_of.get(layer)
        if slot is None:  # not prefetched (blocks run out of order): fetch it now
            slot = self._fetch(layer, avoid=None)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        self._bind(layer, slot)
        if k + 1 < self.n:
            self._fetch(self.swapped[k + 1], avoid=slot)

    def after_block(self, layer: int) -> None:
        """Block `layer` is queued: its slot may be refilled once its kernels finish; its tensors go back to host."""
        slot = self._bound.get(layer)
        if slot is None:
            return
        if self._stream is not None:
            self._free[slot].record(torch.cuda.current_stream(self.device))
        self._unbind(layer)

    def _fetch(self, layer: int, avoid: int | None) -> int:
        """Copy block `layer` from host memory into a slot (not `avoid`); return the slot. A block a slot still
        holds (unchanged: the host copy is never written) is not copied again."""
        held = self._slot_of.get(layer)
        if held is not None:
            return held
        slot = next(s for s in range(len(self._slots)) if s != avoid and self._slot_holds[s] not in self._bound)
        old = self._slot_holds[slot]
        if old is not None:
            self._slot_of.pop(old, None)
        self._slot_holds[slot], self._slot_of[layer] = layer, slot
        src = self._host[layer]
        dst = self._slots[slot][:src.numel()]
        if self._stream is not None:
            self._stream.wait_event(self._free[slot])  # the block that used the slot has finished
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
                self._ready[slot].record(self._stream)
        else:
            dst.copy_(src)
        self.transfers += 1
        self.scale_fetches.append(layer)
        return slot

    def _bind(self, layer: int, slot: int) -> None:
        layout = self._layouts[layer]
        key = (layout.signature, slot)
        views = self._slot_views.get(key)
        if views is None:
            views = self._slot_views[key] = layout.views(self._slots[slot])
        for entry, view in zip(layout.entries, views):
            _set(entry, view)
        self._bound[layer] = slot

    def _unbind(self, layer: int) -> None:
        for entry, view in zip(self._layouts[layer].entries, self._host_views[layer]):
            _set(entry, view)
        self._bound.pop(layer, None)


def planned_device_bytes(model: nn.Module, n: int) -> int:
    """Weight bytes `BlockSwap(model, n, ...)` keeps on the device (all weights - (n - 2) blocks when n > 0)."""
    n = check_block_swap(n, len(model.blocks))
    total = sum(_nbytes(_get(e)) for e in _entries(model))
    if not n:
        return total
    block = sum(_nbytes(_get(e)) for e in _entries(model.blocks[0]))
    return total - (n - SWAP_BUFFERS) * block


@contextlib.contextmanager
def swap_blocks(model: nn.Module, n: int, device: torch.device | str) -> Iterator[BlockSwap]:
    """Run the body with `model` on `device` and `n` blocks streamed from host memory; afterwards (also after an
    exception) every tensor is back where it was. n = 0 only places the model on `device` for the body."""
    swap = BlockSwap(model, n, device)
    try:
        yield swap
    finally:
        swap.restore()
