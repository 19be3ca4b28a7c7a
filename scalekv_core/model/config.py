"""Infinity transformer architecture, detected from a checkpoint's key names and shapes so users never type a config."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..limits import LIMITS


@dataclass(frozen=True)
class InfinityConfig:
    """Every shape-determining hyper-parameter of an Infinity transformer."""

    depth: int
    embed_dim: int
    num_heads: int
    block_chunks: int
    ffn_hidden: int
    text_channels: int
    text_maxlen: int
    pool_heads: int
    d_vae: int  # bits per transformer token: VAE codebook dim, x4 when the VAE latent is 2x2-patchified
    num_levels: int = 15  # rows of lvl_embed
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def vocab(self) -> int:
        """Bit-label head width: two logits per bit."""
        return 2 * self.d_vae

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    def block_key(self, index: int) -> str:
        """State-dict prefix of block `index` in the original's chunked layout."""
        c, j = divmod(index, self.blocks_per_chunk)
        return f"block_chunks.{c}.module.{j}"

    def describe(self) -> str:
        return (f"depth {self.depth}, width {self.embed_dim}, {self.num_heads} heads of {self.head_dim}, "
                f"{self.block_chunks} block chunks, text width {self.text_channels}, {self.d_vae} bits/token")


_BLOCK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{source}: not an Infinity transformer checkpoint: missing key '{key}'")
    shape = tuple(int(s) for s in shapes[key])
    if not shape or min(shape) <= 0:
        raise ValueError(f"{source}: '{key}' has shape {list(shape)}; every Infinity tensor read for the "
                         f"architecture has at least one element along each dimension")
    return shape


def detect_infinity_config(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> InfinityConfig:
    """Read depth, width, heads, chunks, text width and bit count off the tensors, as the released files have them."""
    embed_dim, d_vae = _shape(shapes, "word_embed.weight", source)
    chunks: dict[int, set[int]] = {}
    for key in shapes:
        m = _BLOCK_RE.match(key)
        if m:
            chunks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not chunks:
        raise ValueError(f"{source}: not an Infinity transformer checkpoint: no 'block_chunks.*' keys")
    n_chunks = max(chunks) + 1
    per_chunk = max(max(v) for v in chunks.values()) + 1
    depth_limit = int(LIMITS["depth"].max)
    if n_chunks * per_chunk > depth_limit:  # before any range: one stray key must not make a billion-entry set
        raise ValueError(f"{source}: its 'block_chunks.*' keys name chunk {n_chunks - 1} and block {per_chunk - 1}, "
                         f"a depth of {n_chunks * per_chunk}; Infinity models have at most {depth_limit} blocks")
    for c in range(n_chunks):
        if chunks.get(c) != set(range(per_chunk)):
            raise ValueError(f"{source}: block chunk {c} has blocks {sorted(chunks.get(c, []))}, "
                             f"expected 0..{per_chunk - 1} like every other chunk")
    if n_chunks < 2:
        raise ValueError(f"{source}: Infinity needs at least 2 block chunks, found {n_chunks}")
    b0 = "block_chunks.0.module.0"
    heads = _shape(shapes, f"{b0}.sa.scale_mul_1H11", source)[1]
    ffn_hidden = _shape(shapes, f"{b0}.ffn.fc1.weight", source)[0]
    text_channels = _shape(shapes, "text_norm.weight", source)[0]
    text_maxlen = _shape(shapes, "cfg_uncond", source)[0]
    pool_heads = _shape(shapes, "text_proj_for_sos.ca.mat_q", source)[1]
    levels = _shape(shapes, "lvl_embed.weight", source)[0]
    head = _shape(shapes, "head.weight", source)
    if head != (2 * d_vae, embed_dim):
        raise ValueError(f"{source}: 'head.weight' has shape {list(head)}, expected {[2 * d_vae, embed_dim]} "
                         f"for {d_vae} bits per token")
    if embed_dim % heads:
        raise ValueError(f"{source}: width {embed_dim} is not divisible by {heads} heads")
    return InfinityConfig(depth=n_chunks * per_chunk, embed_dim=embed_dim, num_heads=heads, block_chunks=n_chunks,
                          ffn_hidden=ffn_hidden, text_channels=text_channels, text_maxlen=text_maxlen,
                          pool_heads=pool_heads, d_vae=d_vae, num_levels=levels)


def _known(depth: int, width: int, heads: int, chunks: int, d_vae: int, pool_heads: int = 16) -> InfinityConfig:
    return InfinityConfig(depth=depth, embed_dim=width, num_heads=heads, block_chunks=chunks,
                          ffn_hidden=round(width * 4 / 256) * 256, text_channels=2048, text_maxlen=512,
                          pool_heads=pool_heads, d_vae=d_vae)


#: The released architectures (from the original's constructors), for planning memory without a checkpoint.
KNOWN_MODELS: dict[str, InfinityConfig] = {
    "2b": _known(32, 2048, 16, 8, 32),
    "8b": _known(40, 3584, 28, 8, 56),
    "layer12": _known(12, 768, 8, 4, 32),
    "layer16": _known(16, 1152, 12, 4, 32),
    "layer24": _known(24, 1536, 16, 4, 32),
    "layer32": _known(32, 2080, 20, 4, 32),
    "layer40": _known(40, 2688, 24, 4, 32),
    "layer48": _known(48, 3360, 28, 4, 32),
}
