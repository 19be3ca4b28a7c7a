"""A BSQ-VAE initialised as a plain colour codec, so training starts from weights that already round-trip colour.

Trained from random weights on this CPU budget, the small VAE only learns "warm versus cool" in the minutes it
gets: GroupNorm with a few channels per group normalises a flat region to (almost) a constant, so gradients
barely carry its colour. This init routes colour around that problem, with the real modules and no new layers:

- Channels come in GroupNorm groups of three, (value, +1, -1): the two constant helpers (conv biases) make the
  group's normalised value a monotonic function of the colour component instead of a constant.
- The encoder copies R, G, B into three such groups, and every stride-2 conv averages 2x2, so the latent cell
  sees its 16x16 patch's mean colour. The residual branches of all ResBlocks start at zero (identity).
- The 16 latent channels are a thermometer code: channel k is sign-centred at a threshold t_k of one colour
  component, scaled to the range the multi-scale codes can sum to. The coarsest bits already say "is the red
  component above t_k".
- The decoder inverts the same chain: its conv_in reads the thermometer back into (value, +1, -1) groups, the
  upsamplers copy (nearest x2, then an identity conv), and conv_out is the least-squares inverse of the output
  norm and swish, fitted on a grid of colour values.
Training then refines edges and the remaining non-linearity from here.
"""
from __future__ import annotations


import torch

from ..model.vae import BSQVAE, VAEConfig

#: Thresholds per colour component, in [-1, 1] image units (from 0..255: R 85 180 232, G 58 105 155 200 235,
#: B 50 120 210; plus mid-grey levels), 16 in all: the latent's 16 channels.
THRESHOLDS: tuple[tuple[int, float], ...] = tuple(
    (c, v / 127.5 - 1.0) for c, levels in ((0, (60, 85, 128, 180, 232)), (1, (58, 105, 155, 200, 235)),
                                          (2, (50, 90, 120, 170, 210, 238)))
    for v in levels)
_OUT_BIAS = 3.0  # output-norm bias that puts swish in its nearly linear range
_Z_SCALE = 1.2  # latent magnitude of a full-range colour difference (the 7 codes sum to at most 7/4 per channel)


def _gn_value(v: torch.Tensor) -> torch.Tensor:
    """Normalised first entry of the group (v, 1, -1), as GroupNorm computes it."""
    m = v / 3
    var = ((v - m) ** 2 + (1 - m) ** 2 + (-1 - m) ** 2) / 3
    return (v - m) / torch.sqrt(var + 1e-6)


def _chain(v: torch.Tensor) -> torch.Tensor:
    """Value channel -> what leaves an output norm + swish (bias _OUT_BIAS)."""
    x = _gn_value(v) + _OUT_BIAS
    return x * torch.sigmoid(x)


def _identity_conv(conv: torch.nn.Conv2d, scale: float = 1.0) -> None:
    w = torch.zeros_like(conv.weight)
    k = conv.kernel_size[0] // 2
    for i in range(min(w.shape[0], w.shape[1])):
        w[i, i, k, k] = scale
    conv.weight.copy_(w)
    if conv.bias is not None:
        conv.bias.zero_()


def _avg_down(conv: torch.nn.Conv2d) -> None:
    """Stride-2 3x3 conv on right/bottom-padded input -> mean of the 2x2 block (taps 0..1)."""
    w = torch.zeros_like(conv.weight)
    for i in range(w.shape[0]):
        w[i, i, :2, :2] = 0.25
    conv.weight.copy_(w)
    conv.bias.zero_()


def _zero_residuals(module: torch.nn.Module) -> None:
    """Every ResBlock starts as the identity: its second conv (and thus its branch) is zero."""
    for name, m in module.named_modules():
        if name.endswith("conv2") and hasattr(m, "conv"):
            m.conv.weight.zero_()
            m.conv.bias.zero_()


def _set_helpers(conv: torch.nn.Conv2d, groups: int) -> None:
    """Channels 3g+1 and 3g+2 of the first `groups` groups: constants +1 and -1 (bias only)."""
    for g in range(groups):
        conv.weight[3 * g + 1].zero_()
        conv.weight[3 * g + 2].zero_()
        conv.bias[3 * g + 1] = 1.0
        conv.bias[3 * g + 2] = -1.0


@torch.no_grad()
def colour_codec_init(vae: BSQVAE) -> BSQVAE:
    """Overwrite `vae`'s weights with the colour codec described in the module docstring."""
    cfg: VAEConfig = vae.cfg
    chs = {cfg.base_ch * m for m in cfg.ch_mult}
    if len(chs) != 1 or cfg.base_ch % 3 or cfg.base_ch < 9 or (cfg.base_ch % 32 == 0) or cfg.codebook_dim != len(THRESHOLDS):
        raise ValueError(f"colour_codec_init needs uniform channels in GroupNorm groups of three (24 groups, e.g. "
                         f"base_ch 72) and {len(THRESHOLDS)} latent channels, got {cfg}")
    C = cfg.base_ch
    enc, dec = vae.encoder, vae.decoder
    for m in vae.modules():  # small random weights everywhere else, so nothing is exactly degenerate
        if isinstance(m, torch.nn.Conv2d):
            m.weight.mul_(0.01)
    # ---- encoder: RGB -> three (value, +1, -1) groups, 16x16 average, thermometer latent
    w = torch.zeros_like(enc.conv_in.conv.weight)
    for c in range(3):
        w[3 * c, c, 1, 1] = 1.0
    enc.conv_in.conv.weight.copy_(w)
    enc.conv_in.conv.bias.zero_()
    _set_helpers(enc.conv_in.conv, 3)
    for level in enc.down:
        if level.downsample is not None:
            _avg_down(level.downsample.conv.conv)
    _zero_residuals(enc)
    enc.norm_out.norm.weight.fill_(1.0)
    enc.norm_out.norm.bias.fill_(_OUT_BIAS)
    grid = torch.linspace(-1, 1, 201)
    lo, hi = float(_chain(grid).min()), float(_chain(grid).max())
    alpha = 2 * _Z_SCALE / (hi - lo)
    w = torch.zeros_like(enc.conv_out.conv.weight)
    b = torch.zeros_like(enc.conv_out.conv.bias)
    for k, (c, t) in enumerate(THRESHOLDS):
        w[k, 3 * c, 1, 1] = alpha
        b[k] = -alpha * float(_chain(torch.tensor([t])))
    enc.conv_out.conv.weight.copy_(w)
    enc.conv_out.conv.bias.copy_(b)
    # ---- decoder: thermometer -> value groups (mean over each component's channels), copy up, fitted output
    w = torch.zeros_like(dec.conv_in.conv.weight)
    b = torch.zeros_like(dec.conv_in.conv.bias)
    for c in range(3):
        ks = [k for k, (cc, _) in enumerate(THRESHOLDS) if cc == c]
        for k in ks:  # z_k / alpha + chain(t_k) estimates chain(v); average them, then map chain -> v linearly
            w[3 * c, k, 1, 1] = 1.0 / (alpha * len(ks))
        b[3 * c] = sum(float(_chain(torch.tensor([THRESHOLDS[k][1]]))) for k in ks) / len(ks)
    # chain(v) is monotonic: fit v ~ p * chain(v) + q, and fold it into conv_in
    ch = _chain(grid)
    A = torch.stack([ch, torch.ones_like(ch)], 1)
    p, q = torch.linalg.lstsq(A, grid[:, None]).solution[:, 0].tolist()
    for c in range(3):
        w[3 * c] *= p
        b[3 * c] = b[3 * c] * p + q
    dec.conv_in.conv.weight.copy_(w)
    dec.conv_in.conv.bias.copy_(b)
    _set_helpers(dec.conv_in.conv, 3)
    _zero_residuals(dec)
    for level in dec.up:
        if level.upsample is not None:
            _identity_conv(level.upsample.conv.conv)
    dec.norm_out.norm.weight.fill_(1.0)
    dec.norm_out.norm.bias.fill_(_OUT_BIAS)
    # conv_out: image = a * chain(v) + b per component, least squares over the grid (v ~ the colour itself)
    a, bb = torch.linalg.lstsq(A, grid[:, None]).solution[:, 0].tolist()
    w = torch.zeros_like(dec.conv_out.conv.weight)
    for c in range(3):
        w[c, 3 * c, 1, 1] = a
    dec.conv_out.conv.weight.copy_(w)
    dec.conv_out.conv.bias.fill_(bb)
    return vae
