"""Multi-scale bit quantization for training, built from the sampler's own operations.

Tokenizing an image (`quantize_multiscale`) and rebuilding the transformer's per-scale inputs from bits
(`teacher_inputs`) use the same `bits_to_codes` and trilinear resampling as `scalekv_core.sampler.sample`,
so the input a scale sees in training is exactly the one inference feeds it after sampling the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.vae import bits_to_codes
from ..schedules import Schedule


@dataclass
class Quantized:
    """An image's bits per scale and the summed codes the decoder reads."""

    bits: list[torch.Tensor]  # per scale (B, h*w, d) uint8, transformer token order (row-major)
    summed: torch.Tensor  # (B, d, H, W) float32: what the sampler hands the VAE decoder


def _accumulate(summed: torch.Tensor | None, codes: torch.Tensor, last: bool, final_hw: tuple[int, int, int]
                ) -> torch.Tensor:
    """summed += codes, upsampled to the final grid (trilinear), except at the last scale: the sampler's update."""
    up = codes if last else F.interpolate(codes, size=final_hw, mode="trilinear")
    return up if summed is None else summed + up


def _codes(bits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, d) bits -> (B, d, 1, h, w) unit codes."""
    B, _, d = bits.shape
    return bits_to_codes(bits.reshape(B, h, w, d).unsqueeze(1))


def _residual_bits(z: torch.Tensor, schedule: Schedule, num_scales: int,
                   history: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Bits of the first scales, each the sign of the latent minus the codes summed before it; and that sum.

    A scale's codes join the sum from its own bits, or from `history` for the scales it covers.
    """
    B, d, H, W = z.shape
    z = z.detach().float()
    summed: torch.Tensor | None = None
    bits: list[torch.Tensor] = []
    for si in range(num_scales):
        h, w = schedule.grids[si]
        resid = z if summed is None else z - summed.squeeze(2)
        r = F.interpolate(resid, size=(h, w), mode="area") if (h, w) != (H, W) else resid
        b = (r > 0).permute(0, 2, 3, 1).reshape(B, h * w, d).to(torch.uint8)
        bits.append(b)
        coded = history[si] if history is not None and si < len(history) else b
        summed = _accumulate(summed, _codes(coded, h, w), si == schedule.num_scales - 1, (1, H, W))
    assert summed is not None
    return bits, summed


def quantize_multiscale(z: torch.Tensor, schedule: Schedule) -> Quantized:
    """Residual sign quantization over the schedule's grids, as Infinity's MultiScaleBSQ tokenizes latents.

    Scale k takes the sign of the residual (latent minus everything coded so far), area-downsampled to its grid.
    The last scale's grid must be the latent's own size.
    """
    H, W = z.shape[-2:]
    if tuple(schedule.grids[-1]) != (H, W):
        raise ValueError(f"latent grid {H}x{W} does not match the schedule's last scale {schedule.grids[-1]}")
    bits, summed = _residual_bits(z, schedule, schedule.num_scales)
    return Quantized(bits=bits, summed=summed.squeeze(2))


def requantize(z: torch.Tensor, schedule: Schedule, history: list[torch.Tensor]) -> list[torch.Tensor]:
    """Target bits of scales 0..len(history) when scales 0..len(history)-1 were coded with `history`.

    Scale k's target is the sign of what is left of the latent after the codes the sampler really summed, so a
    model trained on (history as input, these as targets) learns to correct its own earlier bits. With the
    latent's own bits as history this is `quantize_multiscale`.
    """
    if len(history) + 1 > schedule.num_scales:
        raise ValueError(f"history of {len(history)} scales, but the schedule has {schedule.num_scales}")
    return _residual_bits(z, schedule, len(history) + 1, history)[0]


def teacher_inputs(bits: list[torch.Tensor], schedule: Schedule, num_scales: int | None = None) -> list[torch.Tensor]:
    """Inputs (B, h*w, d) of scales 1..n-1 given every earlier scale's bits, exactly as the sampler builds them.

    `num_scales` < the schedule's length gives the first scales' inputs only; they are still accumulated on the
    schedule's final grid, as in a full generation.
    """
    n = schedule.num_scales if num_scales is None else num_scales
    if len(bits) < n - 1:
        raise ValueError(f"need bits of at least {n - 1} scales, got {len(bits)}")
    H, W = schedule.grids[-1]
    summed: torch.Tensor | None = None
    out: list[torch.Tensor] = []
    for si in range(n - 1):
        h, w = schedule.grids[si]
        summed = _accumulate(summed, _codes(bits[si], h, w), False, (1, H, W))
        nxt = F.interpolate(summed, size=(1, *schedule.grids[si + 1]), mode="trilinear").squeeze(-3)
        B, d = nxt.shape[:2]
        out.append(nxt.reshape(B, d, -1).permute(0, 2, 1))
    return out


def straight_through(z: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, Quantized]:
    """Quantized latent that passes the decoder's gradient straight to z, plus the bits."""
    q = quantize_multiscale(z, schedule)
    return z + (q.summed - z).detach(), q
