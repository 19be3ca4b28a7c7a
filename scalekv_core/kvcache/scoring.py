"""Shared scoring pieces: observation windows, attention scores, and pooling (1-D, or inside each token map)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


POOLINGS = ("maxpool", "avgpool")


def check_window(window: int, field: str = "window") -> int:
    """ScaleKV's observation window is a √window x √window grid: a square number of tokens within the limits
    table (InputError naming `field`). The one statement of the rule: engine, CLI, benchmarks and nodes use it."""
    from ..limits import LIMITS, InputError

    window = LIMITS["window"].check(window, field)
    if math.isqrt(window) ** 2 != window:
        raise InputError(f"{field}: {window} is not a square number of tokens; ScaleKV observes a √window x "
                         f"√window grid of the token map: use 4, 9, 16, 25, ...")
    return window


def grid_window(h: int, w: int, window: int) -> list[int]:
    """Row-major indices of the cell centres of a √window x √window grid over an h x w map (ScaleKV's window).

    Maps smaller than the grid use every cell (at most `window`).
    """
    g = math.isqrt(check_window(window))
    gh, gw = min(g, h), min(g, w)
    ph, pw = h // gh, w // gw
    rows = [i * ph + (ph - 1) // 2 for i in range(gh)]
    cols = [j * pw + (pw - 1) // 2 for j in range(gw)]
    return [r * w + c for r in rows for c in cols]


def softmax_window_scores(q_win: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention probability (B, H, T) each key gets from the window queries (B, H, w, c), in float32.

    Queries are the model's real ones (cos-normalised and scaled), so the softmax scale is 1, as in attention.
    """
    logits = torch.matmul(q_win.float(), keys.float().transpose(-1, -2))  # (B, H, w, T)
    return logits.softmax(dim=-1).mean(dim=-2)


def pool_1d(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Smooth (B, H, T) scores along the flattened sequence (SnapKV's and the original ScaleKV's pooling)."""
    if kernel <= 1:
        return scores
    if pooling == "maxpool":
        return F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    if pooling == "avgpool":
        return F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    raise ValueError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class ScheduleTables:
    """Everything ScaleKV's selection looks up, built once on the device so no step copies a table from the host.

    Token maps are stacked top to bottom on one canvas `width` cells wide, `radius` empty rows apart (radius =
    kernel // 2): a (2r+1)-square max pool of the canvas then never mixes two maps, so 2-D pooling inside each
    map is one pooling call for all scales. `slots[p]` is the canvas cell of sequence position p.
    """

    width: int
    radius: int
    canvas_rows: tuple[int, ...]  # canvas rows in use once scale s is present
    slots: torch.Tensor  # (L,) int32
    windows: tuple[torch.Tensor, ...]  # per scale: the grid window's local indices, int64
    rows: torch.Tensor  # (B, 1, 1) int64: batch row index, for (row, head, slot) indexing
    heads: torch.Tensor  # (1, H, 1) int64
    neighbours: torch.Tensor | None  # (cells + 1, (2r+1)²) int64 canvas cells, avgpool only; absent -> cells


def _device_window(h: int, w: int, window: int, device: torch.device) -> torch.Tensor:
    """grid_window(h, w, window) made with device ops (two strided ranges), never copied from the host."""
    g = math.isqrt(check_window(window))
    gh, gw = min(g, h), min(g, w)
    ph, pw = h // gh, w // gw
    r0, c0 = (ph - 1) // 2, (pw - 1) // 2
    rows = torch.arange(r0 * w, (r0 + gh * ph) * w, ph * w, device=device)
    cols = torch.arange(c0, c0 + gw * pw, pw, device=device)
    return (rows.unsqueeze(1) + cols).reshape(-1)


@lru_cache(maxsize=32)
def schedule_tables(grids: tuple[tuple[int, int], ...], window: int, kernel: int, pooling: str, batch: int,
                    heads: int, device: str) -> ScheduleTables:
    """ScaleKV's tables for a schedule, once per process and device (a generation's setup builds them)."""
    dev = torch.device(device)
    r = kernel // 2 if kernel > 1 else 0
    width = max(w for _, w in grids)
    slots, canvas_rows, top = [], [], 0
    for h, w in grids:
        ys = torch.arange(top * width, (top + h) * width, width, device=dev, dtype=torch.int32)
        slots.append((ys.unsqueeze(1) + torch.arange(w, device=dev, dtype=torch.int32)).reshape(-1))
        canvas_rows.append(top + h)
        top += h + r
    neighbours = None
    if pooling == "avgpool" and r:
        neighbours = _canvas_neighbours(grids, width, r, dev)
    return ScheduleTables(width=width, radius=r, canvas_rows=tuple(canvas_rows), slots=torch.cat(slots),
                          windows=tuple(_device_window(h, w, window, dev) for h, w in grids),
                          rows=torch.arange(batch, device=dev).view(batch, 1, 1),
                          heads=torch.arange(heads, device=dev).view(1, heads, 1), neighbours=neighbours)


#: The launch census (bench/launches.py) empties the process-wide tables by this name before and after a count.
_neighbour_table = schedule_tables


def _canvas_neighbours(grids: tuple[tuple[int, int], ...], width: int, r: int, dev: torch.device) -> torch.Tensor:
    """(cells + 1, (2r+1)²) canvas cells of each cell's neighbours inside its own map (dy-major, as avg pooling
    sums them); neighbours outside the map, and the extra last row, point at the empty cell `cells`."""
    offs = torch.arange(-r, r + 1, device=dev)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)
    cells = (sum(h for h, _ in grids) + r * (len(grids) - 1)) * width
    table = torch.full((cells + 1, dy.numel()), cells, dtype=torch.long, device=dev)
    top = 0
    for h, w in grids:
        y = torch.arange(h, device=dev).repeat_interleave(w)[:, None]
        x = torch.arange(w, device=dev).repeat(h)[:, None]
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        table[(top + y[:, 0]) * width + x[:, 0]] = torch.where(inside, (top + ny) * width + nx, cells)
        top += h + r
    return table


def pool_in_canvas(scores: torch.Tensor, slots: torch.Tensor, tables: ScheduleTables, scale: int,
                   pooling: str) -> torch.Tensor:
    """Smooth (B, H, T) scores over each token's 2-D neighbours in its own scale's map, never across rows or scales.

    `slots` (B, H, T) int32 are the tokens' canvas cells (ScheduleTables). Tokens already evicted simply don't take
    part. Max pooling is four kernels (fill, scatter, pool, gather), with no index table or cast per step.
    """
    r = tables.radius
    if r == 0:
        return scores
    B, H, T = scores.shape
    cells = tables.canvas_rows[scale] * tables.width
    at = (tables.rows, tables.heads, slots)
    if pooling == "maxpool":
        canvas = scores.new_full((B, H, cells), -torch.inf)
        canvas[at] = scores
        pooled = F.max_pool2d(canvas.view(B * H, tables.canvas_rows[scale], tables.width), 2 * r + 1, 1, r)
        return pooled.view(B, H, cells)[at]
    if pooling == "avgpool":
        total = tables.neighbours.shape[0] - 1
        canvas = scores.new_zeros((B, H, total + 1))
        canvas[at] = scores
        present = torch.zeros_like(canvas, dtype=torch.bool)
        present.index_put_(at, present.new_ones(()))  # a device True: `present[at] = True` syncs on CUDA
        nbr = tables.neighbours[slots.long()].reshape(B, H, -1)  # (B, H, T * k²)
        vals = canvas.gather(-1, nbr).reshape(B, H, T, -1)
        count = present.gather(-1, nbr).reshape(B, H, T, -1).sum(-1).clamp_min(1)
        return vals.sum(-1) / count
    raise ValueError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")
