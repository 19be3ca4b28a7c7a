"""The one KV-cache type: per-layer key/value buffers, allocated once and written in place."""
from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    """Holds every layer's cached keys and values for one generation (the CFG-doubled batch).

    Each layer owns a (B, H, capacity, c) buffer for keys and one for values. `append` writes the current
    scale's keys and values after what is stored and returns views of everything stored, so attention never
    concatenates and the memory is fixed when the cache is made.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int,
                 capacity: int | Sequence[int], device: torch.device | str = "cpu",
                 k_dtype: torch.dtype = torch.float32, v_dtype: torch.dtype = torch.float32) -> None:
        caps = [int(capacity)] * num_layers if isinstance(capacity, int) else [int(c) for c in capacity]
        if len(caps) != num_layers:
            raise ValueError(f"capacity has {len(caps)} entries for {num_layers} layers")
        if any(c <= 0 for c in caps):
            raise ValueError(f"every layer needs a positive capacity, got {caps}")
        self.num_layers, self.batch, self.num_heads, self.head_dim = num_layers, batch, num_heads, head_dim
        self.capacity = caps
        self.device = torch.device(device)
        self.k_dtype, self.v_dtype = k_dtype, v_dtype
        self.keys = [torch.empty(batch, num_heads, c, head_dim, device=self.device, dtype=k_dtype) for c in caps]
        self.values = [torch.empty(batch, num_heads, c, head_dim, device=self.device, dtype=v_dtype) for c in caps]
        self.lengths = [0] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, n, c) after the layer's cached tokens and return views of all of them."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.capacity[layer]:
            raise RuntimeError(f"KV cache overflow in layer {layer}: {end} tokens for a capacity of "
                               f"{self.capacity[layer]}")
        self.keys[layer][:, :, start:end].copy_(k)
        self.values[layer][:, :, start:end].copy_(v)
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def stored(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values a layer holds now."""
        n = self.lengths[layer]
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def nbytes(self) -> int:
        """Bytes the buffers occupy, whatever is filled."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def release(self) -> None:
        """Drop the buffers so their memory returns to the allocator at once (also after an interrupt)."""
        self.keys, self.values = [], []
        self.lengths = [0] * self.num_layers
