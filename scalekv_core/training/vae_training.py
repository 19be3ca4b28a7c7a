"""Training the BSQ-VAE (scalekv_core.model.vae) with the multi-scale bit quantizer in the loop.

The decoder learns to read exactly what the sampler hands it: the sum of every scale's upsampled unit codes.
To fit a 2-core CPU budget the VAE is trained on whole scenes drawn at 64x64 (4x4 latents, scales 1, 2, 4
of the schedule); the nets are fully convolutional and the scenes' layout is relative, so the weights apply to
256x256 and its 16x16 latents. Whole images matter: GroupNorm normalises over the whole picture, so decoding
crops would train the decoder on statistics it never sees at inference.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..model.vae import BSQVAE, VAEConfig
from ..schedules import Schedule
from . import shapes
from .quantizer import straight_through

#: The default model's tokenizer: 16 bits per 16x16 patch, 72 channels at every level, one ResBlock per decoder
#: level. 72 channels make GroupNorm groups of three (24 groups), which `vae_init.colour_codec_init` needs.
DEFAULT_VAE = VAEConfig(codebook_dim=16, patch_size=16, base_ch=72, num_res_blocks=0, ch_mult=(1, 1, 1, 1, 1))


@dataclass
class VAETrainConfig:
    init: str = "colour_codec"  # "colour_codec" (vae_init.colour_codec_init) or "random"
    steps: int = 0  # the default recipe spends its CPU time on the transformer (docs/training.md)
    batch: int = 8
    image_size: int = 64  # scenes are drawn at this size for VAE training (same layout, 1/16 of the pixels)
    crop: int = 0  # latent cells per side of a decoded crop (x16 pixels); 0 decodes whole images
    lr: float = 2e-3
    commit: float = 0.25  # weight of ||z - quantized||^2, keeping latents in the codes' range
    seed: int = 0
    log_every: int = 25


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the VAE's image range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def init_vae(cfg: VAEConfig, seed: int) -> BSQVAE:
    """A fresh VAE whose initial weights depend only on the seed."""
    torch.manual_seed(seed)
    return BSQVAE(cfg)


def vae_loss(vae: BSQVAE, x: torch.Tensor, schedule: Schedule, crop: int, rng: np.random.Generator,
             commit: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (MSE + L1) of a random crop of every image through the quantizer, plus commitment."""
    z = vae.encoder(x)
    zq, q = straight_through(z, schedule)
    H, W = z.shape[-2:]
    p = vae.cfg.patch_size
    c = min(crop, H, W) if crop > 0 else min(H, W)
    outs, targets = [], []
    for b in range(x.shape[0]):
        i, j = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
        outs.append(zq[b:b + 1, :, i:i + c, j:j + c])
        targets.append(x[b:b + 1, :, i * p:(i + c) * p, j * p:(j + c) * p])
    y = vae.decoder(torch.cat(outs))
    t = torch.cat(targets)
    mse, l1 = F.mse_loss(y, t), F.l1_loss(y, t)
    com = F.mse_loss(z, q.summed)
    loss = mse + l1 + commit * com
    return loss, {"mse": float(mse.detach()), "l1": float(l1.detach()), "commit": float(com.detach())}


def train_vae(schedule: Schedule, tc: VAETrainConfig, cfg: VAEConfig = DEFAULT_VAE,
              log: Callable[[str], None] = print) -> tuple[BSQVAE, list[dict]]:
    """Train on freshly drawn training scenes; returns the model (eval mode) and the loss history."""
    vae = init_vae(cfg, tc.seed)
    if tc.init == "colour_codec":
        from .vae_init import colour_codec_init
        colour_codec_init(vae)
    elif tc.init != "random":
        raise ValueError(f"unknown VAE init {tc.init!r}; choose colour_codec or random")
    vae = vae.train().to(memory_format=torch.channels_last)  # faster CPU convolutions
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / max(1, tc.steps)))))
    data_rng = np.random.default_rng([tc.seed, 101])
    crop_rng = np.random.default_rng([tc.seed, 102])
    px = tc.image_size
    p = cfg.patch_size
    # the schedule's scales up to this size's latent grid: 128 px -> 1, 2, 4, 6, 8
    schedule = Schedule(schedule.template, schedule.size, tuple(g for g in schedule.grids if max(g) <= px // p))
    if schedule.grids[-1] != (px // p, px // p):
        raise ValueError(f"image_size {px} is not a scale of the schedule ({schedule.grids})")
    history: list[dict] = []
    t0 = time.time()
    for step in range(tc.steps):
        batch = [shapes.random_scene(data_rng) for _ in range(tc.batch)]
        x = images_to_tensor(np.stack([shapes.render(s, px) for s in batch])).contiguous(
            memory_format=torch.channels_last)
        loss, parts = vae_loss(vae, x, schedule, tc.crop, crop_rng, tc.commit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        parts["step"], parts["loss"] = step, float(loss.detach())
        history.append(parts)
        if step % tc.log_every == 0 or step == tc.steps - 1:
            if os.environ.get("SCALEKV_VAE_SNAPSHOT"):  # to inspect a run in progress; changes nothing
                torch.save(vae.state_dict(), os.environ["SCALEKV_VAE_SNAPSHOT"])
            log(f"vae step {step}/{tc.steps} loss {parts['loss']:.4f} mse {parts['mse']:.4f} "
                f"commit {parts['commit']:.4f} ({time.time() - t0:.0f}s)")
    return vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False), history


@torch.no_grad()
def reconstruct(vae: BSQVAE, images: np.ndarray, schedule: Schedule) -> np.ndarray:
    """Encode, quantize over all scales and decode: what a perfect transformer would produce."""
    from ..pipeline import decoded_to_uint8
    from .quantizer import quantize_multiscale
    q = quantize_multiscale(vae.encode(images_to_tensor(images)), schedule)
    return decoded_to_uint8(vae.decode(q.summed))
