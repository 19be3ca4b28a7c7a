"""The transformer's training set: captions plus every scale's bits, tokenized once by the trained VAE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.vae import BSQVAE
from ..schedules import Schedule
from . import shapes
from .quantizer import quantize_multiscale
from .vae_training import images_to_tensor


@dataclass
class TokenSet:
    """N captioned images as bits: `bits[k]` is scale k's (N, h*w, d) uint8."""

    captions: list[str]
    bits: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: np.ndarray) -> tuple[list[str], list[torch.Tensor]]:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return [self.captions[i] for i in index], [b[idx] for b in self.bits]


@torch.no_grad()
def tokenize_scenes(vae: BSQVAE, scene_list: list[shapes.Scene], schedule: Schedule, chunk: int = 32) -> TokenSet:
    """Render, encode and quantize every scene; only bits are kept (8 KB per image)."""
    px = schedule.pixel_size[0]
    parts: list[list[torch.Tensor]] = []
    for s in range(0, len(scene_list), chunk):
        imgs = np.stack([shapes.render(sc, px) for sc in scene_list[s:s + chunk]])
        x = images_to_tensor(imgs).contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
        parts.append(quantize_multiscale(vae.encode(x), schedule).bits)
    bits = [torch.cat([p[k] for p in parts]) for k in range(schedule.num_scales)]
    return TokenSet(captions=[shapes.caption(sc) for sc in scene_list], bits=bits)
