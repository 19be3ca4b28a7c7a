"""The Infinity transformer: text pooling, AdaLN blocks with cos self-attention, cross-attention to T5, bit head.

Parameter names follow the released checkpoints (`block_chunks.{c}.module.{j}...`), so their state dicts load
with strict key checking. Only inference is implemented here; the sampler drives one scale at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kvcache import KVCache, sdpa
from ..kvcache.attention import attention
from ..schedules import Schedule
from .config import InfinityConfig
from .rope import rope_pairs, rope_table, swap_pairs

_MAX_SCALE_MUL = math.log(100.0)
#: Tokens per FFN / QKV slice; scales up to 32x32 run in one piece, exactly as the original computes them.
FFN_CHUNK = 1024
QKV_CHUNK = 1024
#: RoPE tables a model keeps (one per schedule and device; 10.8 MB each for the 2B at 1024x1024).
_ROPE_TABLES_KEPT = 4


@dataclass
class TextKV:
    """Projected text tokens of the whole (CFG-doubled) batch, packed without padding."""

    tokens: torch.Tensor  # (N, D): every prompt's valid tokens, one after another
    lens: list[int]

    def padded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, ...) -> (B, Lmax, ...) plus a key mask, or no mask when all prompts have one length."""
        B, L = len(self.lens), max(self.lens)
        if all(n == L for n in self.lens):
            return x.reshape(B, L, *x.shape[1:]), None
        out = x.new_zeros(B, L, *x.shape[1:])
        mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=x.device)
        start = 0
        for i, n in enumerate(self.lens):
            out[i, :n] = x[start:start + n]
            mask[i, ..., :n] = True
            start += n
        return out, mask


@dataclass
class CrossKV:
    """One layer's cross-attention keys and values (B, H, Lk, c) and key mask: the text is the same at every scale,
    so they are projected once per image (the same product as projecting them at each scale, so the same bits)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None


_LAYER_BIAS = object()


def _linear(x: torch.Tensor, layer: nn.Module, weight: torch.Tensor | None = None,
            bias: torch.Tensor | None | object = _LAYER_BIAS) -> torch.Tensor:
    """nn.Linear in the layer's own dtype, so bf16 blocks take fp32 activations; `weight` is the layer's weight
    already read (a quantized layer's weight is read once: each read dequantizes it), `bias` another bias. A
    quantized layer with the fp8 matmul on (quant.enable_fp8_matmul) multiplies in fp8 instead."""
    b = layer.bias if bias is _LAYER_BIAS else bias
    if getattr(layer, "fp8_matmul", False):
        return layer.scaled_matmul(x, b)
    w = layer.weight if weight is None else weight
    return F.linear(x.to(w.dtype), w, b)


def _read_weight(layer: nn.Module) -> torch.Tensor | None:
    """The layer's weight for repeated use, or None when it multiplies in fp8 (its codes are used as they are)."""
    return None if getattr(layer, "fp8_matmul", False) else layer.weight


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine in float32, modulated as LN(x)(1+scale)+shift."""
    x = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return x.mul(scale.add(1)).add_(shift)


def ada_norm(x: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor, eps: float,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ada_layer_norm with 1+scale made once per image, rounded once into `dtype` (the next matmul's): 3 ops, the
    same bits as ada_layer_norm followed by .to(dtype)."""
    x = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul_(scale1p)
    if dtype == x.dtype:
        return x.add_(shift)
    return torch.add(x, shift, out=torch.empty(x.shape, dtype=dtype, device=x.device))


class RMSNorm(nn.Module):
    """Root-mean-square norm of the T5 features, in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, for pooling) to each prompt's own text tokens."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, pooled: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.pooled = pooled
        if pooled:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def project(self, text: TextKV) -> CrossKV:
        """Keys and values of the text tokens, (B, H, Lk, c) each, and the key mask for prompts of unequal length."""
        H, c = self.num_heads, self.head_dim
        kv = _linear(text.tokens, self.mat_kv, bias=torch.cat((self.zero_k_bias, self.v_bias)))  # (N, 2D)
        kv, mask = text.padded(kv.view(-1, 2, H, c))  # (B, Lk, 2, H, c)
        return CrossKV(kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), mask)

    def forward(self, x: torch.Tensor | None, text: TextKV | CrossKV) -> torch.Tensor:
        """Attention of x (B, Lq, D) to the text; `text` already projected (CrossKV) or not (TextKV)."""
        H, c = self.num_heads, self.head_dim
        kv = self.project(text) if isinstance(text, TextKV) else text
        k, v, mask = kv.k, kv.v, kv.mask
        B = k.shape[0]
        if self.pooled:
            q = self.mat_q.to(k.dtype).expand(B, H, c).unsqueeze(2)  # (B, H, 1, c)
        else:
            q = _linear(x, self.mat_q).view(B, -1, H, c).transpose(1, 2)  # (B, H, Lq, c)
        out = attention(q.to(k.dtype), k, v, 1 / math.sqrt(c), mask)  # the selected backend; masked: SDPA
        out = out.transpose(1, 2).reshape(B, -1, H * c)  # (B, Lq, D)
        return _linear(out, self.proj)


class TextPool(nn.Module):
    """Pools the prompt into one vector: the start token and the AdaLN condition."""

    def __init__(self, text_channels: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ca = CrossAttention(dim, text_channels, num_heads, pooled=True)

    def forward(self, text: TextKV) -> torch.Tensor:
        return self.ca(None, text).squeeze(1)  # (B, D)


def _rotated_qk(qk: torch.Tensor, pairs: torch.Tensor, qk_scale: torch.Tensor, q_out: torch.Tensor | None = None,
                k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (2, B, H, L, c) cos-normalised, scaled and rotated as one stacked tensor: 10 ops where
    separate q and k took 25 (with the copy of k into the cache and of q's layout).

    Keys are scaled by exactly 1, so each half gets the bits it would get alone, and the rotation is `rope.rotate`'s
    arithmetic; `q_out` and `k_out` (views of any float dtype, such as cache slots) receive the last add directly.
    """
    if torch.is_grad_enabled():  # teacher forcing: autograd needs the ops out of place
        qk = F.normalize(qk.float(), dim=-1, eps=1e-12) * qk_scale
        cos_part, sin_part = qk * pairs[0], swap_pairs(qk) * pairs[1]
    else:  # the same ops in place (qk is a slice of the projection's own output): two stacked temporaries, not four
        qk = qk.float()
        qk.div_(torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(1e-12)).mul_(qk_scale)  # F.normalize
        sin_part = swap_pairs(qk).mul_(pairs[1])
        cos_part = qk.mul_(pairs[0])
    del qk
    return (torch.add(cos_part[0], sin_part[0], out=q_out), torch.add(cos_part[1], sin_part[1], out=k_out))


def _query_buffer(B: int, L: int, H: int, c: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Queries (B, H, L, c) laid out (B, L, H, c), as a one-piece projection's are, so attention's output reshapes
    without a copy."""
    return torch.empty(B, L, H, c, device=device, dtype=dtype).transpose(1, 2)


class SelfAttention(nn.Module):
    """Cos-attention with 2-D RoPE; keys and values go through the KV cache."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def qkv_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed qkv bias and (2, 1, H, 1, 1) float32 multipliers: the queries' learned scale, 1 for keys."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        log_scale = self.scale_mul_1H11.float().clamp_max(_MAX_SCALE_MUL)
        return bias, torch.stack((log_scale, torch.zeros_like(log_scale))).exp()  # exp(0) is exactly 1

    def qkv(self, x: torch.Tensor, rope: torch.Tensor, into: tuple[torch.Tensor, torch.Tensor] | None = None,
            consts: "LayerConstants | None" = None, q_dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys normalised, scaled and rotated in float32; values in the block's dtype. (B, H, L, c) each.

        `rope` is rope_pairs' (2, L, c) table (or rope_table's (2, L, c/2), converted here). With `into` (the
        cache's slots for this scale), keys and values are written there and those views returned, so at large
        scales no full-size key or value tensor exists beside the cache. `consts` holds the bias and query scale
        made once per image; without it they are made here. The queries are rounded to `q_dtype` by the last add
        (the bits of a float32 result cast after it, without the cast).
        """
        B, L, _ = x.shape
        H, c = self.num_heads, self.head_dim
        w = _read_weight(self.mat_qkv)
        bias, qk_scale = (consts.qkv_bias, consts.qk_scale) if consts is not None else self.qkv_constants()
        pairs = rope if rope.shape[-1] == c else rope_pairs(rope)
        if L <= QKV_CHUNK:
            qkv = _linear(x, self.mat_qkv, w, bias).view(B, L, 3, H, c).permute(2, 0, 3, 1, 4)  # (3, B, H, L, c)
            q_out = None if q_dtype == torch.float32 else _query_buffer(B, L, H, c, q_dtype, x.device)
            q, k = _rotated_qk(qkv[:2], pairs, qk_scale, q_out=q_out, k_out=None if into is None else into[0])
            if into is None:
                return q, k, qkv[2]
            into[1].copy_(qkv[2])
            return q, into[0], into[1]
        # Large scales: project a slice of tokens at a time into preallocated q, k, v (no full packed qkv). q is
        # laid out (B, L, H, c), as a one-piece q is, so attention's output reshapes without a copy.
        q = _query_buffer(B, L, H, c, q_dtype, x.device)
        k, v = into if into is not None else (torch.empty_like(q, dtype=torch.float32),
                                              torch.empty_like(q, dtype=self.q_bias.dtype))
        for s in range(0, L, QKV_CHUNK):
            e = min(L, s + QKV_CHUNK)
            part = _linear(x[:, s:e], self.mat_qkv, w, bias).view(B, e - s, 3, H, c).permute(2, 0, 3, 1, 4)
            _rotated_qk(part[:2], pairs[:, s:e], qk_scale, q_out=q[:, :, s:e], k_out=k[:, :, s:e])
            v[:, :, s:e] = part[2]
            del part
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.modulated(x, None, None, 0.0, rope, cache, layer)

    def modulated(self, x: torch.Tensor, scale1p: torch.Tensor | None, shift: torch.Tensor | None, eps: float,
                  rope: torch.Tensor, cache: KVCache | None, layer: int,
                  consts: "LayerConstants | None" = None) -> torch.Tensor:
        """Attention of AdaLN(x) (`scale1p` is 1 + the AdaLN scale); the normalised input and the queries are
        dropped as soon as they are used.

        Called directly (not through nn.Module.__call__, whose argument tuple would keep the input alive), so at
        large scales neither outlives the attention.
        """
        B, L, C = x.shape
        dtype = self.q_bias.dtype  # the block dtype, without dequantizing a quantized proj
        xs = x if scale1p is None else ada_norm(x, scale1p, shift, eps, dtype)  # the qkv matmul's input dtype
        del x
        if cache is None:
            q, k, v = self.qkv(xs, rope, consts=consts)
            del xs
            out = sdpa(q, k, v, dtype)
        else:
            slots = cache.new_slots(layer, L)  # first: the step it opens decides the queries' dtype
            q = self.qkv(xs, rope, into=slots, consts=consts, q_dtype=cache.query_dtype(layer, dtype))[0]
            del slots  # a view of a buffer the last scale frees inside attend
            w_q = self.mat_qkv.dequantize(C) if hasattr(self.mat_qkv, "dequantize") else self.mat_qkv.weight[:C]
            out = cache.attend(layer, q, dtype, x=xs, w_q=w_q)
        del q
        out = out.transpose(1, 2).reshape(B, L, C)
        return _linear(out, self.proj)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fc1 -> GELU -> fc2; `weights` (fc1's, fc2's) lets token slices share one dequantization."""
        w1, w2 = weights or (_read_weight(self.fc1), _read_weight(self.fc2))
        h = F.gelu(_linear(x, self.fc1, w1), approximate="tanh")
        return _linear(h, self.fc2, w2)


class Block(nn.Module):
    """x += SA(AdaLN(x))·γ1; x += CA(LN(x), text); x += FFN(AdaLN(x))·γ2, modulated by the shared condition."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_hidden)

    def constants(self, gss: torch.Tensor, text: TextKV) -> "LayerConstants":
        """What this block reuses at every scale of one image, made from its weights as they are now (new tensors
        only: a swapped block's weights are views of a slot that the next block overwrites)."""
        ada = self.ada_gss + gss  # (B, 1, 6, C) float32
        ada[:, :, 2:4].add_(1)  # AdaLN multiplies by 1 + scale
        bias, qk_scale = self.sa.qkv_constants()
        norm = (self.ca_norm.weight.to(torch.float32, copy=True), self.ca_norm.bias.to(torch.float32, copy=True))
        return LayerConstants(ada.unbind(2), bias, qk_scale, norm, self.ca.project(text))

    def forward(self, x: torch.Tensor, image: "ImageConstants", rope: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        """Updates x (B, L, C), float32, in place: the caller hands over a tensor nobody else reads."""
        consts = image.layer(self, layer)
        gamma1, gamma2, scale1p, scale2p, shift1, shift2 = consts.ada  # (B, 1, C) each
        h = self.sa.modulated(x, scale1p, shift1, self.eps, rope, cache, layer, consts)
        x.add_(torch.mul(h, gamma1))  # bf16 h times float32 gamma is computed in float32: h.float() * gamma
        del h
        n = F.layer_norm(x, (x.shape[-1],), *consts.ca_norm, self.eps)
        x.add_(self.ca(n, consts.text))  # a bf16 output is added in float32, as .float() then add
        del n
        # The FFN's hidden layer is the largest activation; large scales run it a slice of tokens at a time.
        weights = (_read_weight(self.ffn.fc1), _read_weight(self.ffn.fc2))  # read once: a quantized layer
        dtype = self.sa.q_bias.dtype  # dequantizes per read; the block dtype, which the FFN's weights have
        for s in range(0, x.shape[1], FFN_CHUNK):
            xs = x[:, s:s + FFN_CHUNK]
            xs.add_(torch.mul(self.ffn(ada_norm(xs, scale2p, shift2, self.eps, dtype), weights), gamma2))
        return x


@dataclass
class LayerConstants:
    """One block's per-image constants: none of them changes between scales, so each is made once, not 13 times."""

    ada: tuple[torch.Tensor, ...]  # gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2: (B, 1, C) float32
    qkv_bias: torch.Tensor  # (3D,): q bias, zero k bias, v bias
    qk_scale: torch.Tensor  # (2, 1, H, 1, 1) float32: the queries' learned scale, 1 for keys
    ca_norm: tuple[torch.Tensor, torch.Tensor]  # cross-attention LayerNorm weight and bias, float32
    text: CrossKV  # the text's keys and values for this block's cross-attention


class ImageConstants:
    """The AdaLN table and text of one image, and each block's constants, made at the block's first scale (when a
    swapped block's weights are on the device) and reused at every later scale."""

    def __init__(self, gss: torch.Tensor, text: TextKV, depth: int) -> None:
        self.gss, self.text = gss, text
        self.layers: list[LayerConstants | None] = [None] * depth

    def layer(self, block: Block, index: int) -> LayerConstants:
        """Block `index`'s constants, made on first use."""
        consts = self.layers[index]
        if consts is None:
            consts = self.layers[index] = block.constants(self.gss, self.text)
        return consts


class BlockChunk(nn.Module):
    """A group of consecutive blocks; exists so parameter names match the released checkpoints."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNHead(nn.Module):
    """Final AdaLN before the bit head."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def table(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), (B, 1, C) each: the condition is the same at every scale, so made once per image."""
        scale, shift = self.ada_lin(cond).view(cond.shape[0], 1, 2, -1).unbind(2)
        return scale.add(1), shift

    def forward(self, h: torch.Tensor, cond: torch.Tensor,
                table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        scale1p, shift = table if table is not None else self.table(cond)
        return ada_norm(h, scale1p, shift, self.eps)


class Infinity(nn.Module):
    """Infinity's transformer, for inference one scale at a time."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, D = cfg.embed_dim, cfg.embed_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, cfg.text_channels))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(cfg.text_channels, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextPool(cfg.text_channels, D, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(cfg.text_channels, D), nn.GELU(approximate="tanh"),
                                              nn.Linear(D, D))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * C))
        n = cfg.blocks_per_chunk
        blocks = [Block(cfg) for _ in range(cfg.depth)]
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i:i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = AdaLNHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab)
        self.block_swap = None  # a block_swap.BlockSwap while it streams blocks to the device (forward_scale's hooks)
        self._rope_tables: dict[tuple, torch.Tensor] = {}  # Infinity.rope's tables, per schedule and device

    def _apply(self, fn, recurse: bool = True) -> "Infinity":
        # .to()/.cuda()/.half() would copy the swapped blocks' host buffers and the slots' views: undo the swap first
        if self.block_swap is not None:
            raise RuntimeError("this Infinity model has block swap active; restore it (BlockSwap.restore, or leave "
                               "swap_blocks) before moving or casting the model")
        self._rope_tables = {}  # a moved model must not keep tables on the device it left
        return super()._apply(fn, recurse)

    def rope(self, schedule: Schedule) -> torch.Tensor:
        """rope_pairs' (2, L, c) table of `schedule` on the model's device, built on the host and copied once per
        schedule (kept with the model), not at every generation."""
        device = self.pos_start.device
        key = (schedule.grids, schedule.full_grids[-1], str(device))
        tables = self.__dict__.setdefault("_rope_tables", {})
        table = tables.get(key)
        if table is None:
            if len(tables) >= _ROPE_TABLES_KEPT:
                tables.pop(next(iter(tables)))
            table = tables[key] = rope_pairs(rope_table(self.cfg.head_dim, schedule)).to(device)
        return table

    def drop_rope_tables_elsewhere(self) -> None:
        """Forget tables on devices the model is no longer on (a block swap that placed it on the GPU for one call
        moves it back without `.to()`), so none stays allocated there."""
        here = str(self.pos_start.device)
        tables = self.__dict__.setdefault("_rope_tables", {})
        for key in [k for k in tables if k[2] != here]:
            del tables[key]

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    def set_block_dtype(self, dtype: torch.dtype) -> "Infinity":
        """Cast only the blocks, as the original's bf16 run does; embeddings, text path and head stay float32."""
        for chunk in self.block_chunks:
            chunk.to(dtype)
        return self

    @property
    def block_dtype(self) -> torch.dtype:
        return self.block_chunks[0].module[0].sa.q_bias.dtype  # not a weight: a quantized one would dequantize

    def condition(self, text_tokens: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, TextKV]:
        """From packed T5 features: the pooled condition (B, D), the AdaLN table (B, 1, 6, C), and the CA tokens."""
        kv = self.text_norm(text_tokens.float())
        cond = self.text_proj_for_sos(TextKV(kv, lens))
        ca = TextKV(self.text_proj_for_ca(kv), lens)
        gss = self.shared_ada_lin(cond.float()).float().reshape(-1, 1, 6, self.cfg.embed_dim).contiguous()
        return cond, gss, ca

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The first scale's single token per row: pooled text plus the learned start position."""
        B = cond.shape[0]
        return cond.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Next scale's input (B, L, d_vae) -> (B, L, C)."""
        return self.word_embed(codes)

    def image_constants(self, gss: torch.Tensor, text: TextKV) -> ImageConstants:
        """The per-image holder forward_scale takes: the AdaLN table and text, and each block's constants once made."""
        return ImageConstants(gss, text, self.cfg.depth)

    def forward_scale(self, x: torch.Tensor, scale_index: int, image: ImageConstants, rope: torch.Tensor,
                      cache: KVCache | None) -> torch.Tensor:
        """Run every block over one scale's tokens (B, L, C); keys and values accumulate in `cache`.

        `rope` is the scale's rows of `Infinity.rope(schedule)`. A float32 `x` that needs no gradient is consumed:
        updated in place and returned as the hidden state.
        """
        lvl = self.lvl_embed.weight[scale_index]
        if x.dtype == torch.float32 and not x.requires_grad:
            x.add_(lvl)  # the caller hands x over: no second scale-sized tensor beside it
        else:
            x = (x + lvl).float()  # a fresh tensor: the blocks update it in place
        swap = self.block_swap
        if swap is not None:
            swap.begin_scale()
        for layer, block in enumerate(self.blocks):
            if swap is not None:
                swap.before_block(layer)  # a swapped block: its weights are on the device from here
            x = block(x, image, rope, cache, layer)
            if swap is not None:
                swap.after_block(layer)
        return x

    def logits(self, h: torch.Tensor, cond: torch.Tensor,
               head_table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Bit logits (B, L, 2·d_vae), in float32; `head_table` is head_nm.table(cond), made once per image."""
        return self.head(self.head_nm(h.float(), cond.float(), head_table))
