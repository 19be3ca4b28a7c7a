"""Teacher-forced forward of the Infinity transformer: every scale in one pass, with a block-causal mask.

It runs the inference modules' own parameters and sub-modules (`Block.sa.qkv`, `Block.ca`, `Block.ffn`,
`Infinity.condition`, `Infinity.logits`, the same RoPE table), so nothing is defined twice. What differs from
`Block.forward` is only what autograd needs: no in-place updates, and one masked attention over all scales in
place of the KV cache (a token sees every token of its own and earlier scales, which is what the cache holds
when its scale runs). `tests/test_training.py` checks that the logits equal the sampler's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.rope import rope_table
from ..model.transformer import Block, Infinity, TextKV, _linear, ada_layer_norm
from ..schedules import Schedule
from .quantizer import teacher_inputs


def block_causal_mask(schedule: Schedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, L) bool, True where query token i may attend to key j: scale(j) <= scale(i)."""
    scale_of = torch.cat([torch.full((n,), i) for i, n in enumerate(schedule.tokens_per_scale)]).to(device)
    return scale_of[None, :] <= scale_of[:, None]


def scale_index(schedule: Schedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L,) scale number of every token in sequence order."""
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(schedule.tokens_per_scale)]).to(device)


def block_forward(block: Block, x: torch.Tensor, gss: torch.Tensor, text: TextKV, rope: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Block.forward's arithmetic, out of place, with the KV cache replaced by a mask over the full sequence."""
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (block.ada_gss + gss).unbind(2)
    B, L, C = x.shape
    q, k, v = block.sa.qkv(ada_layer_norm(x, scale1, shift1, block.eps), rope)
    dtype = block.sa.proj.weight.dtype
    attn = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=1.0)
    x = x + _linear(attn.transpose(1, 2).reshape(B, L, C), block.sa.proj).float() * gamma1
    n = F.layer_norm(x, (C,), block.ca_norm.weight.float(), block.ca_norm.bias.float(), block.eps)
    x = x + block.ca(n, text).float()
    return x + block.ffn(ada_layer_norm(x, scale2, shift2, block.eps)).float() * gamma2


def teacher_forced_logits(model: Infinity, text_tokens: torch.Tensor, lens: list[int], bits: list[torch.Tensor],
                          schedule: Schedule, num_scales: int | None = None) -> torch.Tensor:
    """Bit logits (B, L, 2*d_vae) of every token of every scale, given the ground-truth bits of the earlier scales.

    With `num_scales` only the first scales run (L = their token count): attention is block-causal, so their
    logits are the same as in the full pass, at a fraction of the cost.
    """
    n = schedule.num_scales if num_scales is None else num_scales
    L = sum(schedule.tokens_per_scale[:n])
    device = model.pos_start.device
    cond, gss, ca = model.condition(text_tokens, lens)
    inputs = teacher_inputs(bits, schedule, n)
    x = torch.cat([model.start_tokens(cond)] + [model.embed_codes(t.to(device)) for t in inputs], dim=1)
    x = (x + model.lvl_embed(scale_index(schedule, device)[:L])).float()
    rope = rope_table(model.cfg.head_dim, schedule).to(device)[:, :L]
    mask = block_causal_mask(schedule, device)[:L, :L]
    for block in model.blocks:
        x = block_forward(block, x, gss, ca, rope, mask)
    return model.logits(x, cond)


def bit_loss(logits: torch.Tensor, bits: list[torch.Tensor], schedule: Schedule,
             shape_tokens: list[torch.Tensor] | None = None, shape_weight: float = 0.0
             ) -> tuple[torch.Tensor, list[float]]:
    """Cross-entropy on every bit, averaged per scale and then over scales, so coarse scales weigh as much as fine.

    The coarse scales carry the layout and colours a prompt names; averaging per token would let the 16x16 scale
    (half of all tokens) dominate. With `shape_weight` w, a token that touches a shape (`shape_tokens`, per scale
    (B, h*w) bool) weighs 1 + w in its scale's mean: shapes cover a few percent of a picture, and a mean over all
    tokens barely notices their errors. Returns the loss and each scale's plain mean for logging.
    """
    B, L, V = logits.shape
    sizes = [n for n in _prefix(schedule.tokens_per_scale, L)]
    target = torch.cat(bits[:len(sizes)], dim=1).long()  # (B, L, d)
    ce = F.cross_entropy(logits.reshape(B, L, V // 2, 2).permute(0, 3, 1, 2), target, reduction="none")  # (B, L, d)
    parts = ce.split(sizes, dim=1)
    plain = [float(part.detach().mean()) for part in parts]
    if shape_weight == 0.0:
        return torch.stack([part.mean() for part in parts]).mean(), plain
    if shape_tokens is None:
        raise ValueError("shape_weight needs shape_tokens")
    weighted = []
    for part, focus in zip(parts, shape_tokens):
        w = 1.0 + shape_weight * focus.to(part.device, part.dtype)  # (B, n)
        weighted.append((part.mean(-1) * w).sum() / w.sum())
    return torch.stack(weighted).mean(), plain


def _prefix(tokens_per_scale: tuple[int, ...], L: int) -> list[int]:
    """The scale sizes whose tokens make up the first L tokens (L must end on a scale boundary)."""
    out, acc = [], 0
    for n in tokens_per_scale:
        if acc == L:
            break
        out.append(n)
        acc += n
    if acc != L:
        raise ValueError(f"{L} logits do not end on a scale boundary of {tokens_per_scale}")
    return out
