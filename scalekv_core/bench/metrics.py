"""Image-fidelity metrics for comparing a compressed-cache image with the full-cache one: PSNR, SSIM, LPIPS, FID.

PSNR and SSIM need nothing but torch. LPIPS (AlexNet) and FID (Inception-V3) need network weights, which this
module never downloads: `find_weights` looks for them where the usual tools keep them, and the callers skip
the metric with a note when they are absent.

Images are float tensors (B, 3, H, W) or (3, H, W) with values in [0, 1]; `to_unit` converts uint8 HWC arrays.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) RGB -> float64 (B, 3, H, W) in [0, 1], the metrics' common input."""
    t = torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {t.dtype}")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) or (H, W, 3) images, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float64) / 255.0


def _batched(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x


def _same_shape(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batched(x, "x"), _batched(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB (B,), as the paper's per-image-then-mean protocol needs; identical images give +inf."""
    x, y = _same_shape(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> +inf, by IEEE division
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised 1-D Gaussian of Wang et al. (2004): 11 taps, sigma 1.5."""
    if size <= 0 or size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd number, got {size}")
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of every channel (Wang's filter2(..., 'valid'))."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image mean SSIM (B,) of Wang et al. 2004, Gaussian window, per channel then averaged over channels."""
    x, y = _same_shape(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are smaller than the {window}-pixel SSIM window")
    x, y = x.double(), y.double()
    g = gaussian_window(window, sigma).to(x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)


def bits_agreement(bits: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Fraction of all sampled bits (every scale) equal to the reference's: 1.0 means the same token choices."""
    if len(bits) != len(reference):
        raise ValueError(f"{len(bits)} scales of bits vs {len(reference)} in the reference")
    same = total = 0
    for si, (a, b) in enumerate(zip(bits, reference)):
        if a.shape != b.shape:
            raise ValueError(f"scale {si}: bits of shape {tuple(a.shape)} vs {tuple(b.shape)} in the reference")
        same += int((a == b).sum())
        total += a.numel()
    return same / total if total else 1.0


# ------------------------------------------------------------------------------------------ weights on disk


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints), so users' existing copies are found."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


#: File names the usual tools download: torchvision's AlexNet, the LPIPS v0.1 linear layers, and the
#: TorchScript Inception-V3 of StyleGAN2-ADA that clean-fid uses.
ALEXNET_FILES = ("alexnet-owt-7be5be79.pth", "alexnet-owt-4df8aa71.pth")
LPIPS_FILES = ("alex.pth", "lpips_alex.pth")
INCEPTION_FILES = ("inception-2015-12-05.pt",)


def find_weights(explicit: str | None, names: Sequence[str]) -> Path | None:
    """The file given on the command line (which must exist), else the first of `names` in the torch hub cache."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        return path
    for name in names:
        path = torch_hub_checkpoints() / name
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------------------ LPIPS


class _AlexFeatures(nn.Module):
    """AlexNet's convolutional trunk, returning the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU())
        self.taps = (1, 4, 7, 9, 11)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al. 2018), the default the paper's torchmetrics call uses."""

    CHANNELS = (64, 192, 384, 256, 256)
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self) -> None:
        super().__init__()
        self.net = _AlexFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_files(cls, alexnet: str | Path, lins: str | Path, device: str | torch.device = "cpu") -> "LPIPS":
        """torchvision's AlexNet state dict plus the LPIPS `lin{i}.model.1.weight` layers."""
        model = cls()
        trunk = torch.load(alexnet, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in trunk.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(f"{alexnet}: no 'features.*' keys; expected torchvision's AlexNet state dict")
        model.net.features.load_state_dict(feats)
        lin_sd = torch.load(lins, map_location="cpu", weights_only=True)
        for i, lin in enumerate(model.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lin_sd:
                raise ValueError(f"{lins}: missing key {key!r}; expected the LPIPS v0.1 alex linear layers")
            lin.weight.data.copy_(lin_sd[key])
        return model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between [0, 1] images."""
        x, y = _same_shape(x, y)
        dev = self.shift.device
        fx = self.net(((x.float().to(dev) * 2 - 1) - self.shift) / self.scale)
        fy = self.net(((y.float().to(dev) * 2 - 1) - self.shift) / self.scale)
        total = torch.zeros(x.shape[0], device=dev)
        for a, b, lin in zip(fx, fy, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((a - b) ** 2).mean(dim=(1, 2, 3))
        return total.cpu().double()


# ------------------------------------------------------------------------------------------ FID


class InceptionFeatures:
    """2048-d pool features from the TorchScript Inception-V3 (`inception-2015-12-05.pt`) that clean-fid uses."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] (B, 3, H, W) -> (B, 2048) float64; the network takes [0, 255] and resizes to 299 itself."""
        x = _batched(images, "images").float().to(self.device) * 255.0
        return self.model(x, return_features=True).reshape(x.shape[0], -1).double().cpu()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between two feature sets (N, D): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    a, b = feats_a.double(), feats_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least two images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    # tr((S_a S_b)^1/2) = tr((R S_b R)^1/2) with R = S_a^1/2: a symmetric PSD matrix, so eigvalsh applies.
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0)
    tr_cross = inner.sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_cross)
