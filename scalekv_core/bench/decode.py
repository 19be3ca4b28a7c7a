"""Tiled VAE decode benchmark: PSNR, measured peak and time of BSQVAE.decode_tiled against the whole decode.

    python -m scalekv_core.bench decode --vae shapes                  # the embedded model's VAE, real latents, 256x256
    python -m scalekv_core.bench decode --vae 2b --latent 64          # 2B's d32 patch-16 VAE shape, random weights, 1024x1024
    python -m scalekv_core.bench decode --vae 8b --latent 128         # 8B's d14 patch-8 VAE shape, random weights, 1024x1024

All figures come from one run on one machine: each tiled decode is compared with the whole decode of the same
latents (PSNR of the 8-bit images and of the float images, max |difference|) and its peak memory with the whole
decode's (`PeakMeter`: allocator events on CPU, `max_memory_allocated` on CUDA) and with the planner's
`decode_peak_bytes`. The tiled decode keeps its full-resolution maps off the device (`offload`, host memory); on
a CPU-only machine they would share the allocator with the compute, so this benchmark allocates them with numpy
there: the measured peak is the compute's (what a GPU would hold) and the maps' own peak is counted apart.
Random-weight VAEs decode "summed codes" built like the sampler's (random bits at every scale of the 1M
schedule, upsampled and added), so the latents have the sampler's multi-scale structure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..kvcache.memory import PeakMeter, decode_peak_bytes
from ..model.vae import BSQVAE, TiledDecoder, VAEConfig, bits_to_codes, check_decode_tiling, make_random_vae_state_dict
from ..pipeline import decoded_to_uint8
from .metrics import psnr, to_unit

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "default_model"
#: The released VAEs' shapes (tests/data/infinity-keys/vae_keys.json): 2B's d32 patch 16, 8B's d14 patch 8.
REAL_SHAPES = {
    "2b": VAEConfig(codebook_dim=32, patch_size=16, base_ch=128, num_res_blocks=2, ch_mult=(1, 2, 4, 4, 4)),
    "8b": VAEConfig(codebook_dim=14, patch_size=8, base_ch=128, num_res_blocks=2, ch_mult=(1, 2, 4, 4)),
}
#: Caption-style prompts of the embedded model (docs/training.md).
PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small yellow star at the center on a black background",
    "a green triangle at the bottom right on a white background",
    "a large blue square at the center on a red background",
]
#: The 1M schedule's grids (square template), which summed_codes() scales to the latent.
GRIDS_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


def summed_codes(d: int, side: int, seed: int) -> torch.Tensor:
    """(1, d, side, side) latent shaped like the sampler's: unit codes of random bits per scale, upsampled, summed."""
    g = torch.Generator().manual_seed(seed)
    grids = sorted({max(1, round(k * side / 64)) for k in GRIDS_1M})
    total = torch.zeros(1, d, side, side)
    for k in grids:
        bits = torch.randint(0, 2, (1, 1, k, k, d), generator=g)
        codes = bits_to_codes(bits)[:, :, 0]  # (1, d, k, k)
        total += codes if k == side else F.interpolate(codes, size=(side, side), mode="bilinear")
    return total


def load_shapes_latents(prompts: list[str], seed: int) -> tuple[BSQVAE, torch.Tensor]:
    """The embedded model's VAE and the summed codes it decodes for each prompt at 256x256 (seeds seed, seed+1, ...)."""
    from ..pipeline import InfinityPipeline

    pipe = InfinityPipeline.from_files(DEFAULT_MODEL / "infinity" / "infinity_shapes.safetensors",
                                       DEFAULT_MODEL / "vae" / "infinity_shapes_vae.safetensors",
                                       DEFAULT_MODEL / "text_encoders" / "t5_shapes")
    zs = []
    for i, prompt in enumerate(prompts):
        out = pipe.generate(prompt, seed=seed + i, width=256, height=256, cfg=3.0, tau=0.5)
        zs.append(out.samples.summed_codes.float())
    return pipe.vae, torch.cat(zs)


def load_vae_and_latents(a: argparse.Namespace) -> tuple[BSQVAE, torch.Tensor, str]:
    """What to decode: the embedded model with real latents, a real VAE shape with random weights, or a VAE file."""
    if a.vae == "shapes":
        vae, z = load_shapes_latents(a.prompts or PROMPTS, a.seed)
        return vae, z, f"embedded VAE (default_model), latents of {len(z)} prompts"
    if a.vae in REAL_SHAPES:
        cfg = REAL_SHAPES[a.vae]
        vae = BSQVAE(cfg)
        vae.load_state_dict(make_random_vae_state_dict(cfg, a.seed))
        vae.eval().requires_grad_(False)
        what = f"{a.vae} VAE shape (d{cfg.codebook_dim}, patch {cfg.patch_size}), random weights"
    else:
        from ..loader import load_vae

        vae = load_vae(a.vae, device="cpu").requires_grad_(False)
        cfg = vae.cfg
        what = f"VAE {a.vae}"
    side = a.latent or 1024 // cfg.patch_size
    z = torch.cat([summed_codes(cfg.codebook_dim, side, a.seed + i) for i in range(a.images)])
    return vae, z, f"{what}, {len(z)} random summed-code latents of {side}x{side}"


def pooled_psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """PSNR over all images' pixels together (one figure for the batch; identical images give inf)."""
    mse = float((x.double() - y.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


@contextlib.contextmanager
def host_maps_apart(counter: dict[str, int]) -> Iterator[None]:
    """While active, TiledDecoder's offloaded maps on a CPU-only machine come from numpy (outside torch's allocator,
    so PeakMeter sees the compute alone); counter["peak"] gets the most bytes they held at once."""
    original = TiledDecoder._new_map
    counter.update(live=0, peak=0)

    def release(nbytes: int) -> None:
        counter["live"] -= nbytes

    def new_map(self: TiledDecoder, channels: int, h: int, w: int) -> torch.Tensor:
        if self.device.type != "cpu" or channels * h * w * 4 <= self.small_bytes:
            return original(self, channels, h, w)
        array = np.empty((1, channels, h, w), dtype=np.float32)
        counter["live"] += array.nbytes
        counter["peak"] = max(counter["peak"], counter["live"])
        weakref.finalize(array, release, array.nbytes)
        return torch.from_numpy(array)

    TiledDecoder._new_map = new_map  # type: ignore[method-assign]
    try:
        yield
    finally:
        TiledDecoder._new_map = original  # type: ignore[method-assign]


def measure(fn, device: torch.device) -> tuple[torch.Tensor, int, float]:
    """Run fn() once under the peak meter: (output, peak bytes above the start, seconds)."""
    meter = PeakMeter(device)
    with torch.no_grad(), meter.measure():
        out = fn()
    return out, int(meter.peak_bytes or 0), meter.seconds


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, parsed with the CLI's one-line errors."""
    from ..cli_args import Parser, device_flag

    p = Parser(prog="python -m scalekv_core.bench decode", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="shapes",
                   help="shapes (the embedded model), 2b or 8b (the released shapes, random weights), or a VAE file")
    p.add_argument("--latent", type=int, default=0,
                   help="latent side for random latents (default: 1024x1024's, 64 at patch 16, 128 at patch 8)")
    p.add_argument("--images", type=int, default=1, help="random latents to decode (2b/8b/file)")
    p.add_argument("--prompts", nargs="*", help="embedded model: prompts to generate latents from (default: 4)")
    p.add_argument("--tiles", default="8", help="comma-separated tile sizes in latent positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", type=device_flag)
    p.add_argument("--json", help="also write every figure here")
    return p


def check_args(a: argparse.Namespace) -> list[int]:
    """Every value and the output path, before any latent is made: the tiles (checked), --vae, --json."""
    from ..cli_args import output_file
    from ..limits import InputError, shown
    from ..safe_files import regular_file

    tiles = []
    for text in a.tiles.split(","):
        try:
            tiles.append(check_decode_tiling(int(text.strip()), field="--tiles"))
        except ValueError as e:
            raise InputError(str(e) if str(e).startswith("--tiles") else
                             f"--tiles: expected comma-separated tile sizes (latent positions), got {shown(text)}"
                             ) from None
    if a.vae != "shapes" and a.vae not in REAL_SHAPES:
        regular_file(a.vae, f"VAE file (--vae: shapes, {', '.join(REAL_SHAPES)} or a file)", InputError)
    for flag, value in (("--images", a.images), ("--latent", a.latent)):
        if value < (1 if flag == "--images" else 0):
            raise InputError(f"{flag}: {value} is out of range")
    if a.json:
        output_file(a.json, "--json")
    return tiles


def main(argv: list[str] | None = None) -> int:
    """`python -m scalekv_core.bench decode ...`: a bad value or path is one line, `error: ...`, exit 2."""
    from ..cli_args import run_reporting_errors

    return run_reporting_errors(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from ..safe_files import write_text

    a = build_parser().parse_args(argv)
    tiles = check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    vae, z, what = load_vae_and_latents(a)
    vae, z = vae.to(device), z.to(device)
    cfg = vae.cfg
    B, _, H, W = z.shape
    p = cfg.patch_size
    print(f"{what}; image {W * p}x{H * p}, batch {B}, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}", flush=True)

    whole, whole_peak, whole_s = measure(lambda: vae.decode(z), device)
    whole_img = to_unit(decoded_to_uint8(whole))
    whole_plan = decode_peak_bytes(B, H * p, W * p, cfg.base_ch, p)
    rows = [{"tile": 0, "psnr_db": math.inf, "psnr_min_db": math.inf, "float_psnr_db": math.inf,
             "max_abs_diff": 0.0, "pixels_equal": 1.0, "peak_bytes": whole_peak, "host_bytes": 0,
             "planned_bytes": whole_plan, "seconds": whole_s}]
    for tile in tiles:
        host: dict[str, int] = {}
        with host_maps_apart(host):
            out, peak, secs = measure(lambda: vae.decode_tiled(z, tile), device)
        img = to_unit(decoded_to_uint8(out))
        rows.append({"tile": tile, "psnr_db": pooled_psnr(img, whole_img, 1.0),
                     "psnr_min_db": float(psnr(img, whole_img).min()), "float_psnr_db": pooled_psnr(out, whole, 2.0),
                     "max_abs_diff": float((out - whole).abs().max()),
                     "pixels_equal": float((img == whole_img).all(1).float().mean()),
                     "peak_bytes": peak, "host_bytes": host["peak"],
                     "planned_bytes": decode_peak_bytes(B, H * p, W * p, cfg.base_ch, p, tile), "seconds": secs})
        r = rows[-1]
        print(f"  tile {tile:>3}: PSNR {r['float_psnr_db']:.2f} dB (float), peak {peak / 2**20:.1f} MiB, host maps "
              f"{host['peak'] / 2**20:.1f} MiB, {secs:.1f} s", flush=True)

    print("\n| tile | PSNR 8-bit (dB, all / worst image) | PSNR float (dB) | max abs diff | pixels equal | peak MiB | "
          "peak / whole | planned MiB | measured / planned | host maps MiB | time / whole |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def db(v: float) -> str:
            return "identical" if math.isinf(v) else f"{v:.2f}"
        print(f"| {'whole' if r['tile'] == 0 else r['tile']} | {db(r['psnr_db'])} / {db(r['psnr_min_db'])} | "
              f"{db(r['float_psnr_db'])} | {r['max_abs_diff']:.2e} | {r['pixels_equal']:.4f} | "
              f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / whole_peak:.3f} | "
              f"{r['planned_bytes'] / 2**20:.1f} | {r['peak_bytes'] / r['planned_bytes']:.3f} | "
              f"{r['host_bytes'] / 2**20:.1f} | {r['seconds'] / whole_s:.2f} |")
    if a.json:
        finite = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
        write_text(a.json, json.dumps({"what": what, "device": str(device), "torch": torch.__version__,
                                       "threads": torch.get_num_threads(), "image": [H * p, W * p],
                                       "batch": B, "rows": finite}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
