"""The transformer's training set: captions plus every scale's bits, tokenized once by the trained VAE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model.vae import BSQVAE
from ..schedules import Schedule
from . import shapes
from .quantizer import quantize_multiscale
from .vae_training import images_to_tensor


@dataclass
class TokenSet:
    """N captioned images as bits: `bits[k]` is scale k's (N, h*w, d) uint8.

    `shape_tokens[k]` is scale k's (N, h*w) bool: the token's patch touches a shape. The shapes are a small part of
    every picture, so the loss can weigh their tokens more (`TransformerTrainConfig.shape_weight`).
    """

    captions: list[str]
    bits: list[torch.Tensor]
    shape_tokens: list[torch.Tensor] | None = None
    latents: torch.Tensor | None = None  # (N, d, H, W): self-correction re-quantizes them after the model's bits

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: np.ndarray) -> tuple[list[str], list[torch.Tensor]]:
        idx = _rows(index)
        return [self.captions[i] for i in index], [b[idx] for b in self.bits]

    def shape_token_batch(self, index: np.ndarray) -> list[torch.Tensor]:
        """The `shape_tokens` rows of `index`, per scale."""
        if self.shape_tokens is None:
            raise ValueError("this token set has no shape_tokens (made by an older tokenize_scenes); rebuild it")
        idx = _rows(index)
        return [m[idx] for m in self.shape_tokens]

    def latent_batch(self, index: np.ndarray) -> torch.Tensor:
        """The latents of `index`."""
        if self.latents is None:
            raise ValueError("this token set keeps no latents (made by an older tokenize_scenes); rebuild it")
        return self.latents[_rows(index)]


def _rows(index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(index, dtype=np.int64))


def shape_tokens(scene: shapes.Scene, schedule: Schedule) -> list[torch.Tensor]:
    """Per scale, (h*w,) bool: whether any pixel of the token's patch belongs to a shape of the scene."""
    px = schedule.pixel_size[0]
    covered = np.zeros((px, px), dtype=bool)
    for s in scene.shapes:
        covered |= shapes.shape_mask(s, px)
    pix = torch.from_numpy(covered).float()[None, None]
    return [F.adaptive_max_pool2d(pix, (h, w)).reshape(-1) > 0 for h, w in schedule.grids]


@torch.no_grad()
def encode_scenes(vae: BSQVAE, scene_list: list[shapes.Scene], schedule: Schedule,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scenes -> (latents, every scale's bits): the same tokens for the training set and for diagnosis."""
    px = schedule.pixel_size[0]
    x = images_to_tensor(np.stack([shapes.render(sc, px) for sc in scene_list])).to(device)
    z = vae.encode(x.contiguous(memory_format=torch.channels_last))  # faster CPU convolutions
    return z, quantize_multiscale(z, schedule).bits


@torch.no_grad()
def tokenize_scenes(vae: BSQVAE, scene_list: list[shapes.Scene], schedule: Schedule, chunk: int = 32) -> TokenSet:
    """Render, encode and quantize every scene; bits (8 KB per image), shape tokens and latents (16 KB) are kept."""
    parts: list[list[torch.Tensor]] = []
    latents: list[torch.Tensor] = []
    for s in range(0, len(scene_list), chunk):
        z, bits = encode_scenes(vae, scene_list[s:s + chunk], schedule)
        parts.append(bits)
        latents.append(z.float().contiguous())
    bits = [torch.cat([p[k] for p in parts]) for k in range(schedule.num_scales)]
    masks = [shape_tokens(sc, schedule) for sc in scene_list]
    focus = [torch.stack([m[k] for m in masks]) for k in range(schedule.num_scales)]
    return TokenSet(captions=[shapes.caption(sc) for sc in scene_list], bits=bits, shape_tokens=focus,
                    latents=torch.cat(latents))
