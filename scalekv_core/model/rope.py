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


def rope_pairs(table: torch.Tensor) -> torch.Tensor:
    """(2, L, c) from rope_table's (2, L, c/2): each cos twice, and (-sin, +sin) per pair, so `rotate` needs 4 ops.

    Built once per schedule: the values are the table's own (negation is exact), so rotations keep their bits.
    """
    cos, sin = table[0], table[1]
    return torch.stack((cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)))


def rotate(x: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the pairs (x[2p], x[2p+1]) of float32 x (..., L, c) by `pairs` (2, L, c) from `rope_pairs`.

    x*cos + swap(x)*(-sin, +sin) gives cos*x0 - sin*x1 and sin*x0 + cos*x1 with the same roundings as the direct
    formula (a + (-b) is a - b and addition commutes), in 4 element-wise ops instead of 7. `out` may be a view of
    any float dtype (a cache slot): the float32 sum is rounded once on the way in.
    """
    return torch.add(x * pairs[0], swap_pairs(x) * pairs[1], out=out)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x0, x3, x2, ...): each pair of the last dim swapped (one copy), the partner `rotate` multiplies by sin."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


#: Tokens rotated at a time, so the temporaries stay small at large scales (the arithmetic is per element).
ROPE_CHUNK = 1024


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2p], x[2p+1]) of x (B, H, L, c) by the L rows of `table` (2, L, c/2), in float32."""
    pairs = rope_pairs(table)
    L = x.shape[-2]
    if L <= ROPE_CHUNK:
        return rotate(x.float(), pairs)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in range(0, L, ROPE_CHUNK):
        rotate(x[..., s:s + ROPE_CHUNK, :].float(), pairs[:, s:s + ROPE_CHUNK], out=out[..., s:s + ROPE_CHUNK, :])
    return out
