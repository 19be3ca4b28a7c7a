"""Self-attention of one scale's queries over the keys and values it may see (cached plus its own), no mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One attention call for every path, so CPU, CUDA, cached and uncached runs share their numerics.

    Keys are cos-normalised and queries carry the learned scale, so the softmax scale is 1. SDPA picks the flash
    or memory-efficient kernel on CUDA and the fused CPU kernel elsewhere.
    """
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=1.0)
