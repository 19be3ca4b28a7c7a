"""Self-attention over the KV cache: the current scale's queries see every cached token, with no mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """Write this scale's k, v (B, H, n, c) into the cache and attend q over all stored tokens with SDPA.

    Keys are cos-normalised and queries carry the learned scale, so the softmax scale is 1. SDPA picks the
    flash or memory-efficient kernel on CUDA and the fused CPU kernel elsewhere.
    """
    if cache is not None:
        k, v = cache.append(layer, k, v)
    return F.scaled_dot_product_attention(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), scale=1.0)
