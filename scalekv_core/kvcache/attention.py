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


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention plus each query's float32 log-sum-exp (B, H, n), so partial attentions can merge without a workspace."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=1.0)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                              scale=1.0)[:2]
        return out, lse[..., :q.shape[2]]  # the efficient kernel pads the query axis of its log-sum-exp
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=1.0)[:2]
    return out, lse


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> torch.Tensor:
    """softmax over keys A ∪ B from the two partial attentions, weighting each by its share of the total mass."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * (1 - w_a)).to(out_a.dtype)
