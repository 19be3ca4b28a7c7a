"""BSQ-VAE: checkpoint layout, decoder numerics vs the original code's outputs, bit/code/patchify conventions."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from scalekv_core.model.vae import (
    BSQVAE,
    VAEConfig,
    bits_to_codes,
    detect_vae_config,
    make_random_vae_state_dict,
    patchify_latent,
    quantize_to_bits,
    unpatchify_bits,
)

DATA = pathlib.Path(__file__).parent / "data"
TINY = DATA / "infinity-tiny"
CASES = ["p0_apple_s0_cfg3_tau0.5", "p1_spaceship_s99_cfg4_tau1"]
VAE_KEYS = json.loads((DATA / "infinity-keys" / "vae_keys.json").read_text())
TINY14 = VAEConfig(codebook_dim=14, patch_size=8, base_ch=32, num_res_blocks=1, ch_mult=(1, 2, 2, 2))


def _load_tiny(fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        return load_file(str(TINY / "vae_tiny.safetensors"))
    return torch.load(TINY / "vae_tiny.pth", weights_only=True, map_location="cpu")["vae"]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_decode_matches_original_outputs(fmt: str) -> None:
    sd = _load_tiny(fmt)
    model = BSQVAE(detect_vae_config({k: v.shape for k, v in sd.items()})).eval()
    model.load_state_dict(sd, strict=True)
    case_dirs = [TINY / "full_kv" / c for c in CASES]
    z = torch.from_numpy(np.concatenate([np.load(d / "summed_codes.npy") for d in case_dirs]))  # (2,32,16,16)
    ref = torch.from_numpy(np.concatenate([np.load(d / "decoded.npy") for d in case_dirs]))  # (2,3,256,256)
    with torch.no_grad():
        img = model.decode(z)
    assert img.shape == ref.shape == (2, 3, 256, 256)
    # Bit-identical to the original code on the same CPU; other CPUs' conv kernels give ~4e-5.
    assert (img - ref).abs().max().item() <= 1e-4


def test_tiny_config_matches_its_builder_args() -> None:
    vae = json.loads((TINY / "config.json").read_text())["vae"]
    cfg = detect_vae_config({k: v.shape for k, v in load_file(str(TINY / "vae_tiny.safetensors")).items()})
    assert cfg == VAEConfig(
        codebook_dim=vae["codebook_dim"], patch_size=vae["patch_size"], base_ch=vae["base_ch"],
        num_res_blocks=vae["num_res_blocks"], ch_mult=tuple(vae["decoder_ch_mult"]), in_channels=3,
    )
    assert not cfg.patchify


def test_fresh_mask_buffers_equal_the_files() -> None:
    sd = load_file(str(TINY / "vae_tiny.safetensors"))
    model = BSQVAE(detect_vae_config({k: v.shape for k, v in sd.items()}))
    expected = torch.tensor([2**k for k in range(31, -1, -1)], dtype=torch.int64)
    for key in ("quantizer.lfq.mask", "quantize.lfq.mask"):
        assert torch.equal(sd[key], expected)
        assert torch.equal(model.state_dict()[key], expected)


def test_bits_to_codes_matches_original() -> None:
    case = TINY / "full_kv" / CASES[0]
    n = 0
    for bits_file in sorted(case.glob("scale_*_bits_vae.npy")):
        bits = torch.from_numpy(np.load(bits_file))  # (1,1,h,w,32) uint8
        ref = torch.from_numpy(np.load(case / bits_file.name.replace("_bits_vae", "_codes")))  # (1,32,1,h,w)
        codes = bits_to_codes(bits)
        assert codes.dtype == torch.float32 and codes.shape == ref.shape
        torch.testing.assert_close(codes, ref, rtol=0, atol=1e-7)
        n += 1
    assert n == 7


@pytest.mark.parametrize("name", list(VAE_KEYS))
def test_detect_config_and_meta_state_dict(name: str) -> None:
    entry = VAE_KEYS[name]
    args = entry["builder_args"]
    shapes = {t["name"]: t["shape"] for t in entry["tensors"]}
    cfg = detect_vae_config(shapes)
    assert cfg.codebook_dim == args["codebook_dim"]
    assert cfg.patch_size == args["patch_size"]
    assert cfg.base_ch == args["base_ch"] and cfg.num_res_blocks == args["num_res_blocks"]
    assert cfg.ch_mult == tuple(args["decoder_ch_mult"]) == tuple(args["encoder_ch_mult"])
    assert cfg.patchify == (args["patch_size"] == 8)
    with torch.device("meta"):
        model = BSQVAE(cfg)
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert sorted(got) == sorted((t["name"], t["shape"], t["dtype"]) for t in entry["tensors"])
    assert len(got) == entry["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == entry["num_param_elements"]


def test_detect_config_names_missing_keys() -> None:
    shapes = {t["name"]: t["shape"] for t in VAE_KEYS["vae_d32"]["tensors"]}
    with pytest.raises(ValueError, match="encoder.conv_in.conv.weight"):
        detect_vae_config({"blocks.0.ca.mat_q.weight": [2048, 2048]})
    broken = {k: v for k, v in shapes.items() if k != "decoder.conv_in.conv.weight"}
    with pytest.raises(ValueError, match="decoder.conv_in.conv.weight"):
        detect_vae_config(broken)


def test_unpatchify_channel_convention() -> None:
    B, h, w, d = 2, 3, 4, 5
    bits = torch.randint(0, 2, (B, h, w, 4 * d), generator=torch.Generator().manual_seed(0))
    out = unpatchify_bits(bits)
    assert out.shape == (B, 2 * h, 2 * w, d)
    for c in range(d):
        for i in range(2):
            for j in range(2):
                assert torch.equal(out[:, i::2, j::2, c], bits[..., c * 4 + 2 * i + j])
    # Same as the original's permute -> pixel_shuffle(2) -> permute.
    shuffled = F.pixel_shuffle(bits.permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1)
    assert torch.equal(out.float(), shuffled)


def test_patchify_latent_matches_pixel_unshuffle_and_round_trips() -> None:
    z = torch.randn(2, 14, 6, 8, generator=torch.Generator().manual_seed(1))
    p = patchify_latent(z)
    assert p.shape == (2, 56, 3, 4)
    assert torch.equal(p, F.pixel_unshuffle(z, 2))
    assert torch.equal(p[:, 5 * 4 + 2 * 1 + 0], z[:, 5, 1::2, 0::2])
    assert torch.equal(unpatchify_bits(p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), z)


def test_quantize_to_bits_is_sign() -> None:
    z = torch.tensor([[[[0.5]], [[-0.1]], [[0.0]], [[2.0]]]])  # (1,4,1,1)
    assert quantize_to_bits(z).tolist() == [[[[1, 0, 0, 1]]]]


def test_tiny_patch8_vae_end_to_end(tmp_path: pathlib.Path) -> None:
    sd = make_random_vae_state_dict(TINY14, seed=5)
    assert torch.equal(sd["quantizer.lfq.mask"], torch.tensor([2**k for k in range(13, -1, -1)]))
    path = tmp_path / "vae14.safetensors"
    save_file(sd, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    cfg = detect_vae_config({k: v.shape for k, v in loaded.items()})
    assert cfg == TINY14 and cfg.patchify
    model = BSQVAE(cfg).eval()
    model.load_state_dict(loaded, strict=True)

    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 14, 4, 6)
        bits = quantize_to_bits(z)  # (2,4,6,14)
        assert torch.equal(bits, (z > 0).permute(0, 2, 3, 1).to(torch.uint8))
        codes = bits_to_codes(bits.unsqueeze(1))  # (2,14,1,4,6)
        assert codes.shape == (2, 14, 1, 4, 6)
        torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 1, 4, 6))
        assert patchify_latent(codes.squeeze(2)).shape == (2, 56, 2, 3)
        img = model.decode(codes.squeeze(2))
        assert img.shape == (2, 3, 32, 48)
        assert img.abs().max() <= 1.0 and img.std() > 0
        assert model.decode(torch.zeros(1, 14, 3, 5)).shape == (1, 3, 24, 40)


def test_random_state_dict_is_deterministic() -> None:
    a, b = make_random_vae_state_dict(TINY14, 3), make_random_vae_state_dict(TINY14, 3)
    c = make_random_vae_state_dict(TINY14, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.conv_in.conv.weight"], c["decoder.conv_in.conv.weight"])


def test_a_decode_only_vae_decodes_as_the_whole_one_and_holds_no_encoder() -> None:
    """Generation loads the VAE without its encoder (about 40% of its weights): the same decoded pixels, no encoder
    tensors held, and encode() refused by name rather than failing inside."""
    from helpers_tiny import TINY_VAE
    from scalekv_core.loader import load_vae

    whole, decoder = load_vae(TINY_VAE), load_vae(TINY_VAE, decoder_only=True)
    assert not [k for k in decoder.state_dict() if k.startswith("encoder.")]
    assert sum(t.numel() for t in decoder.state_dict().values()) < 0.8 * sum(
        t.numel() for t in whole.state_dict().values())
    z = torch.randn(1, whole.cfg.codebook_dim, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole.decode(z), decoder.decode(z))
    with pytest.raises(RuntimeError, match="loaded to decode only"):
        decoder.encode(torch.zeros(1, 3, 64, 64))
