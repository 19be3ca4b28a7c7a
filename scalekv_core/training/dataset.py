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
    """N captioned images as bits: `bits[k]` is scale k's (N, h*w, d) uint8; `latents` (N, d, H, W) when kept."""

    captions: list[str]
    bits: list[torch.Tensor]
    latents: torch.Tensor | None = None  # for bitwise self-correction, which re-quantizes with flips

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: np.ndarray) -> tuple[list[str], list[torch.Tensor]]:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return [self.captions[i] for i in index], [b[idx] for b in self.bits]

    def latents_of(self, index: np.ndarray) -> torch.Tensor:
        if self.latents is None:
            raise ValueError("this token set keeps no latents; tokenize_scenes(keep_latents=True) keeps them")
        return self.latents[torch.from_numpy(np.asarray(index, dtype=np.int64))]


@torch.no_grad()
def tokenize_scenes(vae: BSQVAE, scene_list: list[shapes.Scene], schedule: Schedule, chunk: int = 32,
                    keep_latents: bool = False) -> TokenSet:
    """Render, encode and quantize every scene; bits are kept (8 KB per image), latents too on request (16 KB)."""
    px = schedule.pixel_size[0]
    parts: list[list[torch.Tensor]] = []
    latents: list[torch.Tensor] = []
    for s in range(0, len(scene_list), chunk):
        imgs = np.stack([shapes.render(sc, px) for sc in scene_list[s:s + chunk]])
        x = images_to_tensor(imgs).contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
        z = vae.encode(x)
        parts.append(quantize_multiscale(z, schedule).bits)
        if keep_latents:
            latents.append(z.float().contiguous())
    bits = [torch.cat([p[k] for p in parts]) for k in range(schedule.num_scales)]
    return TokenSet(captions=[shapes.caption(sc) for sc in scene_list], bits=bits,
                    latents=torch.cat(latents) if keep_latents else None)
