"""Training the BSQ-VAE (scalekv_core.model.vae) with the multi-scale bit quantizer in the loop.

The decoder learns to read exactly what the sampler hands it: the sum of every scale's upsampled unit codes.
To fit a 2-core CPU budget the decoder is trained on random latent crops (a fully convolutional net, so the
weights apply to the whole 16x16 latent at inference); the encoder always sees and quantizes whole images,
because the coarse scales summarise the whole latent.
"""
from __future__ import annotations

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

#: The default model's tokenizer: 16 bits per 16x16 patch, 48 channels at every level, one ResBlock per decoder
#: level. 48 channels make GroupNorm groups of two: with one channel per group (24 or 32 channels) the norm
#: would remove each channel's mean, and with it the colour of a flat region.
DEFAULT_VAE = VAEConfig(codebook_dim=16, patch_size=16, base_ch=48, num_res_blocks=0, ch_mult=(1, 1, 1, 1, 1))


@dataclass
class VAETrainConfig:
    steps: int = 200
    batch: int = 4
    crop: int = 4  # latent cells per side of the decoded crop (x16 pixels)
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
    c = min(crop, H, W)
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
    vae = init_vae(cfg, tc.seed).train().to(memory_format=torch.channels_last)  # faster CPU convolutions
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / tc.steps))))
    data_rng = np.random.default_rng([tc.seed, 101])
    crop_rng = np.random.default_rng([tc.seed, 102])
    px = schedule.pixel_size[0]
    history: list[dict] = []
    t0 = time.time()
    for step in range(tc.steps):
        batch = [shapes.random_scene(data_rng) for _ in range(tc.batch)]
        x = images_to_tensor(np.stack([shapes.render(s, px) for s in batch])).contiguous(
            memory_format=torch.channels_last)
        loss, parts = vae_loss(vae, x, schedule, tc.crop, crop_rng, tc.commit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        parts["step"], parts["loss"] = step, float(loss.detach())
        history.append(parts)
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"vae step {step}/{tc.steps} loss {parts['loss']:.4f} mse {parts['mse']:.4f} "
                f"commit {parts['commit']:.4f} ({time.time() - t0:.0f}s)")
    return vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False), history


@torch.no_grad()
def reconstruct(vae: BSQVAE, images: np.ndarray, schedule: Schedule) -> np.ndarray:
    """Encode, quantize over all scales and decode: what a perfect transformer would produce."""
    from .quantizer import quantize_multiscale
    q = quantize_multiscale(vae.encode(images_to_tensor(images)), schedule)
    y = vae.decode(q.summed)
    return ((y + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).numpy()
