"""Shared scoring pieces: observation windows, attention scores, and pooling (1-D, or inside each token map)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..schedules import Schedule

POOLINGS = ("maxpool", "avgpool")


def grid_window(h: int, w: int, window: int) -> list[int]:
    """Row-major indices of the cell centres of a √window x √window grid over an h x w map (ScaleKV's window).

    Maps smaller than the grid use every cell (at most `window`).
    """
    g = math.isqrt(window)
    if g * g != window:
        raise ValueError(f"the observation window must be a square number of tokens (4, 9, 16, ...), got {window}")
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


@lru_cache(maxsize=32)
def _neighbour_table(grids: tuple[tuple[int, int], ...], kernel: int, device: str) -> torch.Tensor:
    """(L+1, kernel²) absolute positions of each token's neighbours inside its own scale's map.

    Neighbours outside the map, and the extra row L, point at position L: an empty slot.
    """
    L = sum(h * w for h, w in grids)
    r = kernel // 2
    offs = torch.arange(-r, r + 1)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)
    parts, start = [], 0
    for h, w in grids:
        y = torch.arange(h).repeat_interleave(w)[:, None] + dy
        x = torch.arange(w).repeat(h)[:, None] + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        parts.append(torch.where(inside, start + y * w + x, torch.full_like(y, L)))
        start += h * w
    parts.append(torch.full((1, kernel * kernel), L, dtype=torch.long))
    return torch.cat(parts).to(device)


def pool_in_maps(scores: torch.Tensor, positions: torch.Tensor, schedule: Schedule, scale: int, kernel: int,
                 pooling: str) -> torch.Tensor:
    """Smooth (B, H, T) scores over each token's 2-D neighbours in its own scale's map, never across rows or scales.

    Tokens already evicted simply don't take part. `positions` (B, H, T) are absolute sequence positions.
    """
    if kernel <= 1:
        return scores
    grids = tuple(schedule.grids[: scale + 1])
    L = sum(h * w for h, w in grids)
    table = _neighbour_table(grids, kernel, str(scores.device))  # (L+1, k²)
    B, H, T = scores.shape
    empty = -torch.inf if pooling == "maxpool" else 0.0
    canvas = scores.new_full((B, H, L + 1), empty)
    canvas.scatter_(-1, positions.long(), scores)
    nbr = table[positions.long()]  # (B, H, T, k²)
    vals = canvas.gather(-1, nbr.reshape(B, H, -1)).reshape(B, H, T, -1)
    if pooling == "maxpool":
        return vals.amax(-1)
    if pooling == "avgpool":
        present = torch.zeros_like(canvas, dtype=torch.bool)
        present.scatter_(-1, positions.long(), True)
        count = present.gather(-1, nbr.reshape(B, H, -1)).reshape(B, H, T, -1).sum(-1).clamp_min(1)
        return vals.sum(-1) / count
    raise ValueError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")
