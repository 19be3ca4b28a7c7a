"""BSQ-VAE, Infinity's visual tokenizer: images <-> d-channel latents, plus the bit <-> code maps the transformer uses.

Only 2-D convolutions, GroupNorm and swish; no attention. The submodule names reproduce the released checkpoints'
state-dict keys exactly (``encoder.down.0.block.0.conv1.conv.weight``, ``quantizer.lfq.mask``, ...), so the files
load with ``strict=True`` and no key renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import statistics_device


@dataclass(frozen=True)
class VAEConfig:
    """Everything that fixes the tensor shapes; the defaults are the released d32 tokenizer (patch 16)."""

    codebook_dim: int = 32  # d: bits (= latent channels) per latent pixel
    patch_size: int = 16  # image pixels per latent pixel, per side
    base_ch: int = 128
    num_res_blocks: int = 2  # per encoder level; every decoder level has one more
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)  # channels of level i = base_ch * ch_mult[i]
    in_channels: int = 3  # image channels (decoder output too)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        n = self.num_resamples
        if 2**n != self.patch_size or not 1 <= n <= len(self.ch_mult) - 1:
            raise ValueError(f"patch_size {self.patch_size} must be 2**k with 1 <= k <= len(ch_mult)-1")

    @property
    def num_resamples(self) -> int:
        """Number of x2 down/up-sampling steps, log2(patch_size)."""
        return max(self.patch_size, 1).bit_length() - 1

    @property
    def patchify(self) -> bool:
        """Patch-8 VAEs (the 8B model) are paired with a 2x2 pixel-unshuffle, so the transformer sees 4*d channels."""
        return self.patch_size == 8


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)  # same op order as the original (not F.silu) to stay bit-close


def _bit_mask(d: int) -> Tensor:
    """2**(d-1..0) as int64, the MSB-first int-label weights (wraps to -2**63 at d=64, like the original)."""
    return torch.ones(d, dtype=torch.long) << torch.arange(d - 1, -1, -1)


class Norm(nn.Module):
    """GroupNorm(32 groups, or 24 if 32 does not divide), nested under '.norm' as in the checkpoints."""

    def __init__(self, ch: int):
        super().__init__()
        groups = 32 if ch % 32 == 0 else 24
        if ch % groups:
            raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {ch}")
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class Conv(nn.Module):
    """Conv2d nested under '.conv' as in the checkpoints; 'same' padding unless told otherwise."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 'nin_shortcut' only where the channel count changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin), Conv(cin, cout)
        self.norm2, self.conv2 = Norm(cout), Conv(cout, cout)
        self.nin_shortcut = Conv(cin, cout, k=1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:  # (B,cin,H,W) -> (B,cout,H,W)
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only right/bottom by 1 (the original's asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,H/2,W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,2H,2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResBlocks ('block.k'), then an optional 'downsample' or 'upsample'."""

    def __init__(self, cin: int, cout: int, n_blocks: int, down: bool = False, up: bool = False):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if k == 0 else cout, cout) for k in range(n_blocks))
        self.downsample = Downsample(cout) if down else None
        self.upsample = Upsample(cout) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """Two ResBlocks at the lowest resolution (the attention slot of the original is off: cnn_attention='no')."""

    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.block_2 = ResBlock(ch, ch), ResBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Image -> raw latent; level i downsamples iff i < log2(patch)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.in_channels, cfg.base_ch)
        ins = [cfg.base_ch] + chs[:-1]
        self.down = nn.ModuleList(
            Level(ins[i], chs[i], cfg.num_res_blocks, down=i < cfg.num_resamples) for i in range(len(chs))
        )
        self.mid = Mid(chs[-1])
        self.norm_out = Norm(chs[-1])
        self.conv_out = Conv(chs[-1], cfg.codebook_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B,3,H,W) -> (B,d,H/p,W/p)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image (unclamped); runs levels L-1..0, level i upsamples iff 1 <= i <= log2(patch)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.codebook_dim, chs[-1])
        self.mid = Mid(chs[-1])
        ins = chs[1:] + chs[-1:]  # level i reads what level i+1 wrote (the last level reads mid's output)
        self.up = nn.ModuleList(
            Level(ins[i], chs[i], cfg.num_res_blocks + 1, up=1 <= i <= cfg.num_resamples) for i in range(len(chs))
        )
        self.norm_out = Norm(chs[0])
        self.conv_out = Conv(chs[0], cfg.in_channels)

    def forward(self, z: Tensor) -> Tensor:  # (B,d,h,w) -> (B,3,h*p,w*p)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BitMask(nn.Module):
    """Holds only the 'mask' buffer (int-label weights); kept so state dicts match the released files."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", _bit_mask(d))


class BitQuantizer(nn.Module):
    """Weightless BSQ quantizer; its state is just 'lfq.mask'."""

    def __init__(self, d: int):
        super().__init__()
        self.lfq = BitMask(d)

    def forward(self, z: Tensor) -> Tensor:  # (B,d,H,W) -> (B,H,W,d) bits
        return quantize_to_bits(z)


#: Latent positions per tile side when a caller asks for tiling without a size; 32 = 512 pixels at patch 16.
DEFAULT_DECODE_TILE = 32
#: Latent positions per side a preview decodes at most: at 1024x1024 all 13 previews together cost about half of
#: the final decode (scales up to 16x16 decode whole, larger ones at 16x16), and each holds 1/16 of its memory.
PREVIEW_GRID = 16
#: Smaller tiles are refused: the halo and per-tile overheads would dominate.
MIN_DECODE_TILE = 8


#: The encoder's state-dict prefix: what a decode-only VAE leaves out (loader.load_vae) and plans without.
ENCODER_PREFIX = "encoder."


class BSQVAE(nn.Module):
    """The tokenizer; 'quantize' aliases 'quantizer' (one module, two state-dict prefixes, as in the original)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = BitQuantizer(cfg.codebook_dim)
        self.quantize = self.quantizer

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> BSQVAE:
        """Build the architecture the weights imply and load them strictly, so a wrong file fails loudly."""
        model = cls(detect_vae_config({k: v.shape for k, v in sd.items()}))
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def encode(self, x: Tensor) -> Tensor:
        """Continuous latent (B,d,H/p,W/p) before quantization, for training-time tokenization.

        The original feeds this raw encoder output to MultiScaleBSQ unchanged (identity projections, no
        LayerNorm, no scale/shift factor); the quantizer itself L2-normalises over d per position.
        """
        if self.encoder is None:
            raise RuntimeError("this VAE was loaded to decode only (load_vae(..., decoder_only=False) keeps its "
                               "encoder)")
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Image in [-1,1], (B,3,H*p,W*p): the original clamps after the decoder."""
        return self.decoder(z).clamp(-1.0, 1.0)

    def preview(self, z: Tensor, max_grid: int = PREVIEW_GRID) -> Tensor:
        """The first image of latents z decoded small (at most `max_grid` positions per side, area-averaged), so a
        per-scale preview looks like the picture for a small part of the final decode's time and memory."""
        z = z[:1].float()
        h, w = z.shape[-2:]
        shrink = min(1.0, max_grid / max(h, w))
        if shrink < 1.0:
            z = F.interpolate(z, size=(max(1, round(h * shrink)), max(1, round(w * shrink))), mode="area")
        return self.decode(z)

    def decode_tiled(self, z: Tensor, tile: int = DEFAULT_DECODE_TILE,
                     offload: torch.device | str | None = "cpu") -> Tensor:
        """decode(z) with the device's peak bounded by a tile of `tile` latent positions per side, not the image.

        The decoder runs one step (the work between two GroupNorms) at a time over all tiles: each step reads its
        tile plus a one-pixel halo from full-resolution maps kept on `offload` (host memory; None keeps them on
        z's device) and writes the tile back, and every GroupNorm uses the statistics of the whole map, gathered
        while the step before wrote it. So the result is decode(z) to float rounding, whatever the weights (tiles
        decoded apart and blended differ; docs/low_vram.md). One image at a time; a tile covering the latent (or
        tile 0) is decode(z) itself.
        """
        tile = check_decode_tiling(tile)
        B, _, H, W = z.shape
        if tile == 0 or (tile >= H and tile >= W):
            return self.decode(z)
        p = self.cfg.patch_size
        out = torch.empty(B, self.cfg.in_channels, H * p, W * p, dtype=torch.float32, device=z.device)
        for b in range(B):  # GroupNorm's statistics are per image
            TiledDecoder(self.decoder, tile, z.device, offload).run(z[b:b + 1], out[b:b + 1])
        return out.clamp_(-1.0, 1.0)


# ------------------------------------------------------------------------------------------ tiled decoding

def check_decode_tiling(tile: object, field: str = "decode_tile") -> int:
    """`tile` checked against the limits table, errors naming `field`; 0 means the whole latent at once."""
    from ..limits import LIMITS, InputError

    tile = LIMITS["decode_tile"].check(tile, field)
    if 0 < tile < MIN_DECODE_TILE:
        raise InputError(f"{field}: {tile} is too small; expected 0 (decode the whole latent at once) or "
                         f"{MIN_DECODE_TILE} to {int(LIMITS['decode_tile'].max)} latent positions")
    return int(tile)


@dataclass
class _Map:
    """One full feature map of the decoder between two steps, and its per-channel statistics (for the next norm)."""

    data: Tensor  # (1, C, h, w), on the offload device (or the compute device when small)
    count: float = 0.0  # pixels per channel gathered so far
    mean: Tensor | None = None  # (C,) float64, on the compute device (the CPU where it has no float64: MPS)
    m2: Tensor | None = None  # (C,) float64: sum of squared deviations from the mean

    def gather(self, core: Tensor) -> None:
        """Merge one tile's core (1, C, h, w) into the per-channel statistics (Chan et al.'s parallel update)."""
        var, mean = torch.var_mean(core, dim=(0, 2, 3), correction=0)
        n = float(core.shape[0] * core.shape[2] * core.shape[3])
        where = statistics_device(core.device)  # core's own device unless it has no float64: no copy then
        mean, m2 = mean.to(where).double(), var.to(where).double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def group_norm(self, norm: Norm, x: Tensor) -> Tensor:
        """norm(x) with the statistics of this whole map instead of x's own (GroupNorm: biased variance)."""
        gn = norm.norm
        g = gn.num_groups
        mean_c, m2_c = self.mean.view(g, -1), self.m2.view(g, -1)
        mean_g = mean_c.mean(1)
        var_g = (m2_c + self.count * (mean_c - mean_g[:, None]) ** 2).sum(1) / (self.count * mean_c.shape[1])
        mean_f = mean_g.float().view(1, g, 1).to(x.device)
        rstd = torch.rsqrt(var_g.float() + gn.eps).view(1, g, 1).to(x.device)
        y = x.reshape(x.shape[0], g, -1) - mean_f  # the one new tensor; the rest in place
        y = y.mul_(rstd).view_as(x)
        return y.mul_(gn.weight.view(1, -1, 1, 1)).add_(gn.bias.view(1, -1, 1, 1))


class TiledDecoder:
    """Runs a Decoder step by step over tiles, so only one tile (plus a one-pixel halo) is ever on the device.

    A step is the work between two GroupNorms: conv_in; per ResBlock, norm1-swish-conv1, then norm2-swish-conv2
    plus the shortcut; each upsample; norm_out-swish-conv_out. Each step has one 3x3 convolution, so a tile's
    core is exact given one pixel of its neighbours. Its output goes to a full map (on `offload`, or on the
    device if it is no larger than one tile's share), and its per-channel statistics are gathered on the way,
    which is what the next step's GroupNorm needs.
    """

    def __init__(self, decoder: Decoder, tile: int, device: torch.device | str,
                 offload: torch.device | str | None = "cpu") -> None:
        self.decoder = decoder
        self.tile = tile
        self.device = torch.device(device)
        self.offload = self.device if offload is None else torch.device(offload)
        self.latent_h = 1
        self.small_bytes = 0  # maps up to this size stay on the device

    def run(self, z: Tensor, out: Tensor) -> Tensor:
        """Decode one latent (1, d, h, w) into `out` (1, 3, h*p, w*p) on the device (unclamped, as Decoder)."""
        dec = self.decoder
        self.latent_h = z.shape[2]
        patch = 2 ** sum(level.upsample is not None for level in dec.up)
        # half of one full-resolution tile map: the low-resolution levels' maps stay on the device, no transfer
        self.small_bytes = (self.tile * patch) ** 2 * dec.norm_out.norm.num_channels * 4 // 2
        x = self.step(lambda t: dec.conv_in(t[0]), [_Map(z)])
        for blk in (dec.mid.block_1, dec.mid.block_2):
            x = self.resblock(blk, x)
        for level in reversed(dec.up):
            for blk in level.block:
                x = self.resblock(blk, x)
            if level.upsample is not None:
                x = self.step(lambda t, up=level.upsample: up(t[0]), [x], scale=2)
        self.step(lambda t: dec.conv_out(_swish(x.group_norm(dec.norm_out, t[0]))), [x], out=out)
        return out

    def resblock(self, blk: ResBlock, x: _Map) -> _Map:
        """One ResBlock as two steps, each normalising with its input map's whole statistics."""
        h = self.step(lambda t: blk.conv1(_swish(x.group_norm(blk.norm1, t[0]))), [x])

        def second(t: list[Tensor]) -> Tensor:
            y = blk.conv2(_swish(h.group_norm(blk.norm2, t[1])))
            return y.add_(t[0] if blk.nin_shortcut is None else blk.nin_shortcut(t[0]))

        return self.step(second, [x, h])

    def step(self, fn: Callable[[list[Tensor]], Tensor], inputs: list[_Map], scale: int = 1,
             out: Tensor | None = None) -> _Map:
        """fn over every tile of the inputs (same size), each read with a one-pixel halo; the cores form the output."""
        _, _, h, w = inputs[0].data.shape
        ts = self.tile * (h // self.latent_h)  # the tile at this map's resolution
        result: _Map | None = None if out is None else _Map(out)
        for y0 in range(0, h, ts):
            for x0 in range(0, w, ts):
                y1, x1 = min(y0 + ts, h), min(x0 + ts, w)
                ry0, rx0, ry1, rx1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, h), min(x1 + 1, w)
                tiles = [m.data[:, :, ry0:ry1, rx0:rx1].to(self.device).contiguous() for m in inputs]
                o = fn(tiles)
                del tiles
                core = o[:, :, (y0 - ry0) * scale:(y1 - ry0) * scale, (x0 - rx0) * scale:(x1 - rx0) * scale]
                if result is None:
                    result = _Map(self._new_map(o.shape[1], h * scale, w * scale))
                if out is None:
                    result.gather(core)
                result.data[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale].copy_(core)
                del o, core
        assert result is not None
        return result

    def _new_map(self, channels: int, h: int, w: int) -> Tensor:
        """Where a step's output lives: on the device if small (the low-resolution levels), else on `offload`."""
        small = channels * h * w * 4 <= self.small_bytes
        device = self.device if small else self.offload
        return torch.empty(1, channels, h, w, dtype=torch.float32, device=device)


def _need(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"not a BSQ-VAE state dict: missing key {key!r}")
    shape = tuple(int(s) for s in shapes[key])
    if len(shape) < 2 or min(shape) <= 0:
        raise ValueError(f"not a BSQ-VAE state dict: {key!r} has shape {list(shape)}, expected a convolution weight "
                         f"with at least one element along each dimension")
    return shape


def _count(shapes: Mapping[str, Sequence[int]], fmt: str) -> int:
    n = 0
    while fmt.format(n) in shapes:
        n += 1
    return n


def detect_vae_config(shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
    """Lets loaders build the right tokenizer (d16..d64, patch-8 d14, test files) from key names and shapes alone."""
    base_ch, in_ch = _need(shapes, "encoder.conv_in.conv.weight")[:2]
    top_ch, d = _need(shapes, "decoder.conv_in.conv.weight")[:2]
    n_levels = _count(shapes, "decoder.up.{}.block.0.conv1.conv.weight")
    if n_levels < 2:
        _need(shapes, f"decoder.up.{n_levels}.block.0.conv1.conv.weight")
    ch_mult = []
    for i in range(n_levels):
        c = _need(shapes, f"decoder.up.{i}.block.0.conv1.conv.weight")[0]
        if c % base_ch:
            raise ValueError(f"decoder level {i} has {c} channels, not a multiple of base_ch {base_ch}")
        ch_mult.append(c // base_ch)
    if top_ch != base_ch * ch_mult[-1]:
        raise ValueError(f"decoder.conv_in has {top_ch} channels, expected {base_ch * ch_mult[-1]}")
    n_blocks = _count(shapes, "decoder.up.0.block.{}.conv1.conv.weight") - 1
    n_enc_blocks = _count(shapes, "encoder.down.0.block.{}.conv1.conv.weight")
    if n_enc_blocks != n_blocks:
        _need(shapes, f"encoder.down.0.block.{n_blocks - 1}.conv1.conv.weight")  # names the missing one, if any
        raise ValueError(f"encoder has {n_enc_blocks} blocks per level, decoder {n_blocks + 1} (expected +1)")
    # The original upsamples at levels 1..log2(patch), so counting upsamplers recovers the patch size exactly.
    n_up = sum(f"decoder.up.{i}.upsample.conv.conv.weight" in shapes for i in range(n_levels))
    if n_up == 0:
        _need(shapes, "decoder.up.1.upsample.conv.conv.weight")
    return VAEConfig(
        codebook_dim=d, patch_size=2**n_up, base_ch=base_ch, num_res_blocks=n_blocks,
        ch_mult=tuple(ch_mult), in_channels=in_ch,
    )


def bits_to_codes(bits: Tensor) -> Tensor:
    """0/1 bits (B,1,H,W,d) -> unit-norm codes (B,d,1,H,W) f32, bit-exact with indices_to_codes('bit_label')."""
    d = bits.shape[-1]
    s = 1.0 / math.sqrt(d)  # becomes float32 inside the op, as the original's numpy scalar does
    codes = bits.to(torch.float32) * s * 2 - s  # {0,1} -> {-s,+s}, same op order as the original
    codes = F.normalize(codes, dim=-1)
    return codes.movedim(-1, 1).contiguous()


def unpatchify_bits(bits: Tensor) -> Tensor:
    """Transformer-side (B,h,w,4d) -> VAE-side (B,2h,2w,d): channel c*4+2i+j is sub-pixel (i,j) of channel c."""
    B, h, w, c4 = bits.shape
    x = bits.reshape(B, h, w, c4 // 4, 2, 2)  # (B,h,w,c,i,j)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(B, 2 * h, 2 * w, c4 // 4)  # (B,h,i,w,j,c)


def patchify_latent(z: Tensor) -> Tensor:
    """VAE-side (B,d,2h,2w) -> transformer-side (B,4d,h,w), the inverse layout of unpatchify_bits (pixel_unshuffle)."""
    B, d, H, W = z.shape
    x = z.reshape(B, d, H // 2, 2, W // 2, 2)  # (B,c,h,i,w,j)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * d, H // 2, W // 2)  # (B,c,i,j,h,w)


def quantize_to_bits(z: Tensor) -> Tensor:
    """Sign bits (B,H,W,d) uint8 of a latent (B,d,H,W); L2-normalising first (as BSQ does) cannot change a sign."""
    return (z > 0).permute(0, 2, 3, 1).to(torch.uint8)


def make_random_vae_state_dict(cfg: VAEConfig, seed: int) -> dict[str, Tensor]:
    """Reproducible weights for tiny test checkpoints, with no download and no dependence on torch's default init."""
    with torch.device("meta"):
        template = BSQVAE(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, t in template.items():
        shape = tuple(t.shape)
        if key.endswith(".mask"):
            out[key] = _bit_mask(cfg.codebook_dim)  # a fresh tensor per alias: safetensors rejects shared storage
        elif key.endswith(".norm.weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".weight"):  # conv, fan-in scaled so activations stay O(1) through the stack
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            out[key] = 0.02 * torch.randn(shape, generator=g)
    return out
