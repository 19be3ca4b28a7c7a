"""Self-attention over the KV cache: the current scale's queries see every cached token, with no mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache


def cached_attention(q: torch.Tensor, kv: list[torch.Tensor], cache: KVCache | None, layer: int,
                     compute_dtype: torch.dtype, x: torch.Tensor | None = None,
                     w_q: torch.Tensor | None = None) -> torch.Tensor:
    """Attend q (B, H, n, c) over the layer's cache plus this scale's keys and values; the cache then evicts.

    `kv` is a two-item list [k, v] that the cache empties once it has copied them into its storage, so their
    memory is freed before attention runs. Keys are cos-normalised and queries carry the learned scale, so the
    softmax scale is 1. SDPA picks the flash or memory-efficient kernel on CUDA and the fused CPU kernel
    elsewhere. `x` and `w_q` (the self-attention input and query weight) are read by the original ScaleKV scoring.
    """
    if cache is None:
        k, v = kv
        kv.clear()
        return F.scaled_dot_product_attention(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), scale=1.0)
    return cache.attend(layer, q, kv, compute_dtype, x=x, w_q=w_q)
