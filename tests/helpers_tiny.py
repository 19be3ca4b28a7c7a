"""Deterministic tiny random-weight models for tests (no downloads, no dependence on torch's default init).

The weight scales follow the original-code tiny reference (`data/infinity-tiny/infinity_tiny.safetensors`):
fan-in scaled matrices, small biases, norm weights near 1, a bit head at 2/sqrt(C), so sampling produces
non-degenerate bits (some logits decisive, some random).
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

from scalekv_core.model.config import InfinityConfig
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.model.transformer import Infinity
from scalekv_core.model.vae import VAEConfig, make_random_vae_state_dict

DATA = pathlib.Path(__file__).parent / "data"
TINY = DATA / "infinity-tiny"
KEYS = DATA / "infinity-keys"
TINY_TRANSFORMER = TINY / "infinity_tiny.safetensors"
TINY_TRANSFORMER_PTH = TINY / "infinity_tiny.pth"
TINY_VAE = TINY / "vae_tiny.safetensors"
TINY_VAE_PTH = TINY / "vae_tiny.pth"
T5_TINY = TINY / "t5_tiny"
FULL_KV = TINY / "full_kv"

#: 14-bit, patch-8 VAE (the 8B's tokenizer, shrunk). GroupNorm needs channel counts divisible by 32 (or 24).
TINY14_VAE = VAEConfig(codebook_dim=14, patch_size=8, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 2, 2))

#: Transformer that works on 2x2-patchified 14-bit latents: d_vae = 4 * 14 = 56 (the 8B layout, shrunk).
TINY56_TRANSFORMER = InfinityConfig(depth=4, embed_dim=64, num_heads=2, block_chunks=2, ffn_hidden=256,
                                    text_channels=256, text_maxlen=512, pool_heads=2, d_vae=56)


def _std_for(key: str, shape: tuple[int, ...], cfg: InfinityConfig) -> tuple[float, float]:
    """(mean, std) of the random init for one state-dict entry."""
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("zero_k_bias"):
        return 0.0, 0.0
    if key.endswith("scale_mul_1H11"):
        return math.log(4.0), 0.17
    if key.endswith(("ca_norm.weight", "text_norm.weight")):
        return 1.0, 0.1
    if key == "head.weight":
        return 0.0, 2.0 / math.sqrt(shape[1])
    if key in ("cfg_uncond", "text_proj_for_sos.ca.mat_q"):
        return 0.0, 1.0
    if key in ("lvl_embed.weight", "pos_start"):
        return 0.0, 0.2
    if key.endswith("ada_gss"):
        return 0.0, 1.0 / math.sqrt(cfg.embed_dim)
    if leaf == "weight" and len(shape) == 2:
        return 0.0, 1.0 / math.sqrt(shape[1])
    return 0.0, 0.05  # biases (q_bias, v_bias, *.bias)


def make_tiny_transformer_state(cfg: InfinityConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights for every state-dict entry of `Infinity(cfg)` (buffers zero_k_bias are zeros)."""
    with torch.device("meta"):
        template = Infinity(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(template):
        shape = tuple(template[key].shape)
        mean, std = _std_for(key, shape, cfg)
        out[key] = mean + std * torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def make_tiny_vae_state(cfg: VAEConfig = TINY14_VAE, seed: int = 2345) -> dict[str, torch.Tensor]:
    return make_random_vae_state_dict(cfg, seed)


def save_safetensors(sd: dict[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def save_sharded(sd: dict[str, torch.Tensor], folder: pathlib.Path, n_shards: int = 2,
                 index_name: str = "model.safetensors.index.json") -> pathlib.Path:
    """Write `sd` the way HF sharded checkpoints are laid out: shards plus an index with a weight_map."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    per = math.ceil(len(keys) / n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def write_tiny56_files(folder: pathlib.Path, seed: int = 3456) -> tuple[pathlib.Path, pathlib.Path]:
    """The 14-bit patchify pair as .safetensors files: (transformer, vae)."""
    folder.mkdir(parents=True, exist_ok=True)
    t = save_safetensors(make_tiny_transformer_state(TINY56_TRANSFORMER, seed), folder / "infinity_tiny56.safetensors")
    v = save_safetensors(make_tiny_vae_state(TINY14_VAE, seed + 1), folder / "vae_tiny14_patch8.safetensors")
    return t, v


def random_text(length: int = 7, channels: int = 256, seed: int = 0) -> TextConditioning:
    """One prompt's worth of random T5-like features (L, C)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(length, channels, generator=g) * 0.2
    return TextConditioning(kv, [length], torch.tensor([0, length], dtype=torch.int32), length)


def reference_text(case: str = "p0_apple_s0_cfg3_tau0.5") -> TextConditioning:
    """The original code's T5 features for one of the full_kv cases."""
    kv = torch.from_numpy(np.load(FULL_KV / case / "text_kv_compact.npy")).float()
    n = int(kv.shape[0])
    return TextConditioning(kv, [n], torch.tensor([0, n], dtype=torch.int32), n)
