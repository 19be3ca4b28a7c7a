"""2-D rotary position embedding of Infinity's self-attention, laid out like the original so positions match bit for bit."""
from __future__ import annotations

import torch

from ..schedules import Schedule

_GRID_EDGE = 128  # the original precomputes a 128x128 grid (2048 // 16)


def rope_table(head_dim: int, schedule: Schedule, base: float = 10000.0) -> torch.Tensor:
    """(2, L, head_dim/2) cos/sin for every token of `schedule`, in sequence order.

    Rows use the first half of the pairs and columns the second; a scale (h, w) is stretched onto the last
    scale of the 13-scale schedule of its aspect, so tokens keep their position whatever the size.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (half/2,)
    full_h, full_w = schedule.full_grids[-1]
    if max(full_h, full_w) > _GRID_EDGE:
        raise ValueError(f"schedule's last scale {full_h}x{full_w} exceeds the {_GRID_EDGE}-cell RoPE grid")
    parts = []
    for h, w in schedule.grids:
        rows = (torch.arange(h) * (full_h / h)).round().int()  # float32 round-half-even, as the original
        cols = (torch.arange(w) * (full_w / w)).round().int()
        r = rows.float()[:, None, None].expand(h, w, 1) * inv_freq  # (h, w, half/2)
        c = cols.float()[None, :, None].expand(h, w, 1) * inv_freq
        parts.append(torch.cat([r, c], dim=-1).reshape(h * w, half))
    angles = torch.cat(parts, dim=0)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=0)


#: Tokens rotated at a time, so the temporaries stay small at large scales (the arithmetic is per element).
ROPE_CHUNK = 1024


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2p], x[2p+1]) of x (B, H, L, c) by the L rows of `table` (2, L, c/2), in float32."""
    L = x.shape[-2]
    if L <= ROPE_CHUNK:
        return _rotate(x, table)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in range(0, L, ROPE_CHUNK):
        out[..., s:s + ROPE_CHUNK, :] = _rotate(x[..., s:s + ROPE_CHUNK, :], table[:, s:s + ROPE_CHUNK])
    return out


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    cos, sin = table[0], table[1]
    x = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.reshape(*out.shape[:-2], -1)
