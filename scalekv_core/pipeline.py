"""The Python API: load the three parts from files, then generate images (plus every scale's bits) from prompts."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .devices import check_dtype
from .kvcache import CacheConfig
from .kvcache.attention import resolve as resolve_attention, use_backend
from .kvcache.budget import kv_bytes_per_token
from .kvcache.cache import KeptRecorder
from .kvcache.memory import (ALLOW_OVERCOMMIT_ENV, MemoryPlan, MemoryReport, MiB, PeakMeter, admission_problem,
                             build_report, free_memory, plan_memory)
from .limits import LIMITS
from .loader import load_transformer, load_vae, native_from_metadata, schedule_for_size, t5_dtype, vae_patchify_for
from .model.block_swap import check_block_swap, planned_device_bytes, swap_blocks
from .model.quant import SOURCE_METADATA, check_format_on, dequant_workspace_bytes, model_format
from .model.text_encoder import T5TextEncoder, TextConditioning
from .model.transformer import Infinity
from .model.vae import BSQVAE, check_decode_tiling
from .graphs import ScaleGraphRunner, check_graph_mode
from .safe_files import PARTIAL_SUFFIX, atomic_output, named_os_error
from .sampler import BitsHook, SampleOutput, SamplerSettings, ScaleCallback, check_finite, sample
from .schedules import Schedule


@dataclass
class GenerationResult:
    """Images and everything needed to inspect or reproduce them."""

    images: np.ndarray  # (B, H, W, 3) uint8 RGB
    decoded: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1]
    samples: SampleOutput
    schedule: Schedule
    settings: SamplerSettings
    info: dict = field(default_factory=dict)
    memory: MemoryReport | None = None

    def save_images(self, path: str | Path) -> list[Path]:
        """Write PNGs: `path` itself for one image, `stem_00.png`, `stem_01.png`, ... for a batch; each file appears
        under its name only once it is whole."""
        outs = image_paths(path, len(self.images))
        for img, out in zip(self.images, outs):
            save_image(img, out)
        return outs

    def dump(self, folder: str | Path, index: int = 0) -> Path:
        """Write one batch row in the reference layout (`scale_SS_bits.npy`, ..., `decoded.npy`, `image.png`).

        The files an earlier dump left in `folder` (the names in DUMP_FILES, `scalekv_kept_*` included) are removed
        first, so the folder holds one run's arrays; other files there are left alone."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        clear_dump(folder)
        i = slice(index, index + 1)
        for si, (bits, bits_vae) in enumerate(zip(self.samples.bits, self.samples.bits_vae)):
            save_array(bits[i].cpu().numpy(), folder / f"scale_{si:02d}_bits.npy")
            save_array(bits_vae[i].cpu().numpy(), folder / f"scale_{si:02d}_bits_vae.npy")
            save_array(bits_to_token_ids(bits_vae[i]).cpu().numpy(), folder / f"scale_{si:02d}_token_ids.npy")
        save_array(self.samples.summed_codes[i].float().cpu().numpy(), folder / "summed_codes.npy")
        save_array(self.decoded[i].float().cpu().numpy(), folder / "decoded.npy")
        save_image(self.images[index], folder / "image.png")
        return folder


#: Names of the files a dump writes (`GenerationResult.dump`, and the CLI's kept positions), and their `.partial`s.
DUMP_FILES = re.compile(r"(scale_\d+_(bits|bits_vae|token_ids)\.npy|summed_codes\.npy|decoded\.npy|image\.png"
                        r"|scalekv_kept_s\d+_l\d+\.npy)(" + PARTIAL_SUFFIX + ")?")


def clear_dump(folder: str | Path) -> list[Path]:
    """Remove the files an earlier dump wrote in `folder` (only names matching DUMP_FILES); the removed paths."""
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if DUMP_FILES.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise named_os_error(e, Path(entry.path), "cannot remove the earlier dump's") from None
                removed.append(Path(entry.path))
    return removed


def save_array(array: np.ndarray, path: str | Path) -> Path:
    """np.save to exactly `path` (no .npy added), written whole or not at all."""
    with atomic_output(path) as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def image_paths(path: str | Path, count: int) -> list[Path]:
    """The files `count` images are saved to: `path` for one; `stem_00.png`, `stem_01.png`, ... for a batch."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i:02d}{path.suffix or '.png'}") for i in range(count)]


def image_format(path: str | Path) -> str:
    """The PIL format that writes RGB images to `path` by its extension; ValueError naming the path otherwise
    (a 1x1 RGB image is test-saved in memory, so formats PIL knows but cannot write in RGB, .xbm, are refused)."""
    import io

    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    problem = None
    if fmt is None or fmt not in Image.SAVE:
        problem = "unknown or read-only"
    else:
        try:
            Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
        except Exception as e:  # PIL raises OSError, ValueError, KeyError, ... for a mode it cannot write
            problem = f"PIL cannot write RGB images as {fmt}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    if problem:
        raise ValueError(f"{path}: cannot write images of type {suffix or '(no extension)'!r} ({problem}); "
                         f"use .png (or .jpg, .webp)")
    return fmt


def save_image(img: np.ndarray, path: str | Path) -> Path:
    """One (H, W, 3) uint8 image to `path` in the format its extension names, written whole or not at all."""
    from PIL import Image

    fmt = image_format(path)
    with atomic_output(path) as f:
        Image.fromarray(img).save(f, format=fmt)
    return Path(path)


def bits_to_token_ids(bits_vae: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W, d) bits -> (B, 1, H, W) int64 ids, first bit most significant (the VAE's int-label order)."""
    d = bits_vae.shape[-1]
    weights = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64, device=bits_vae.device)
    return (bits_vae.to(torch.int64) * weights).sum(-1)


def decoded_to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> (B, H, W, 3) uint8 RGB, truncating like the original's `.to(uint8)`."""
    img = ((decoded.float() + 1) / 2).permute(0, 2, 3, 1).mul_(255).to(torch.uint8)
    return img.cpu().numpy()


def check_text_width(expected: int, got: int, transformer_name: str, encoder_name: str) -> None:
    """The transformer cross-attends to T5 features of a fixed width (`expected`, its cfg.text_channels); a T5 of
    another width (`got`) is an error naming both files and the encoder the released models use."""
    if got != expected:
        raise ValueError(f"text encoder {encoder_name} gives {got}-channel features but the transformer "
                         f"{transformer_name} expects {expected} (the released 2B and 8B use flan-t5-xl, 2048: "
                         f"google/flan-t5-xl's folder)")


def load_text_encoder(folder: str | Path, device: str = "cpu", precision: str = "fp32",
                      weights: str = "none", tokenizer: str | Path | None = None) -> T5TextEncoder:
    """T5 as the pipeline runs it: fp16 on CUDA unless fp32 is asked (the original's choice), fp32 on the CPU;
    `weights` "fp8_e4m3fn" stores its linears in 8 bits. `folder` is a Hugging Face folder, or one .safetensors
    file (as ComfyUI keeps text encoders) with `tokenizer`, a folder holding T5's tokenizer."""
    te_dtype = t5_dtype(precision, device)
    check_format_on(weights, device, "t5_weights")  # fp8 on MPS: refused before T5 loads
    path = Path(folder).expanduser()
    if path.is_file():
        if tokenizer is None:
            raise ValueError(f"T5 {path} is a single file, which holds no tokenizer: also give a folder with T5's "
                             "tokenizer (spiece.model or tokenizer.json; the CLI's --t5-tokenizer), e.g. "
                             "ComfyUI's comfy/text_encoders/t5_tokenizer or a flan-t5-xl folder")
        return T5TextEncoder.from_single_file(path, tokenizer, device=device, dtype=te_dtype, weights=weights)
    if tokenizer is not None:
        raise ValueError(f"a T5 tokenizer ({tokenizer}) is for a single-file T5; the folder {path} has its own")
    return T5TextEncoder.from_folder(folder, device=device, dtype=te_dtype, weights=weights)


class InfinityPipeline:
    """Transformer, VAE and (optionally) T5 on one device, with the original sampler.

    `device` (default: where the transformer is) is where generation runs; a transformer kept elsewhere (on the CPU,
    for block swap) is placed there for each sampling call and put back after. `block_swap` is generate's default.
    """

    def __init__(self, transformer: Infinity, vae: BSQVAE, text_encoder: T5TextEncoder | None = None,
                 device: torch.device | str | None = None, block_swap: int = 0) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.vae_patchify = vae_patchify_for(transformer.cfg, vae.cfg)
        self._text_encoder_home: torch.device | None = None  # where T5 encodes while it is offloaded
        self._device = None if device is None else torch.device(device)
        if self._device is not None and self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())  # compares equal to tensors' devices
        if self._device is not None:  # weights kept elsewhere: what they are stored in must be able to move here
            check_format_on(model_format(transformer)[0], self._device, "weights")
            check_dtype(self._device, transformer.block_dtype, "precision",
                        str(transformer.block_dtype).replace("torch.", ""), "load it in fp32 or fp16")
        self.block_swap = check_block_swap(block_swap, transformer.cfg.depth)
        self._graph_runner: ScaleGraphRunner | None = None  # kept between images: capture once, replay after

    @classmethod
    def from_files(cls, transformer: str | Path, vae: str | Path, text_encoder: str | Path | None = None,
                   device: str = "cpu", precision: str = "fp32", weights: str = "none",
                   t5_weights: str = "none", block_swap: int = 0,
                   t5_tokenizer: str | Path | None = None, vae_encoder: bool = False) -> "InfinityPipeline":
        """Load everything from the original release's files (or converted .safetensors); `weights` is the block
        linears' storage format (loader.load_transformer), `t5_weights` T5's and `t5_tokenizer` a single-file T5's
        tokenizer folder (load_text_encoder). The VAE is loaded without its encoder unless `vae_encoder` (generation
        never encodes; training and evaluation do).

        With `block_swap` N > 0 the transformer stays in CPU memory (in the precision `device` runs) and each
        generate places it on `device` with N blocks streamed (model.block_swap), so it never has to fit whole.
        """
        home = "cpu" if block_swap and torch.device(device).type != "cpu" else device
        # 'auto' resolves for `device`, where the model runs, not for `home`
        model = load_transformer(transformer, device=home, weights=weights, run_device=device, precision=precision)
        if block_swap:
            check_block_swap(block_swap, model.cfg.depth)
        vae_model = load_vae(vae, device=device, decoder_only=not vae_encoder)  # generation never encodes
        try:
            vae_patchify_for(model.cfg, vae_model.cfg, (str(transformer), str(vae)))
        except ValueError as e:
            raise ValueError(str(e)) from None
        te = None
        if text_encoder is not None:
            te = load_text_encoder(text_encoder, device, precision, t5_weights, t5_tokenizer)
            check_text_width(model.cfg.text_channels, te.text_channels, str(transformer), str(text_encoder))
        return cls(model, vae_model, te, device=device, block_swap=block_swap)

    @property
    def device(self) -> torch.device:
        return self._device or self.transformer.pos_start.device

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        """T5 features for a list of prompts."""
        if self.text_encoder is None:
            raise RuntimeError("this pipeline has no text encoder; pass text_encoder= or precomputed conditioning")
        if self._text_encoder_home is not None and self.text_encoder.device != self._text_encoder_home:
            self.text_encoder.to(self._text_encoder_home)  # offloaded: back to its device to encode
        return self.text_encoder.encode(list(prompts))

    def offload_text_encoder(self) -> None:
        """Move T5 to the CPU until it must encode again (encode moves it back), freeing its device memory."""
        te = self.text_encoder
        if te is not None and te.device.type != "cpu":
            self._text_encoder_home = te.device
            te.to("cpu")

    def schedule_for_size(self, width: int | None = None, height: int | None = None) -> Schedule:
        """The schedule for a size in pixels, a side not given taken from the resolution the transformer file says
        it was trained at (the embedded model's 256x256; else the released models' 1024x1024), as the CLI does."""
        native = native_from_metadata(getattr(self.transformer, SOURCE_METADATA, None) or {})
        return schedule_for_size(native, width, height)

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str] | TextConditioning, negative_prompt: str | TextConditioning | None = None,
                 *, seed: int | None = 0, cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 0.5,
                 top_k: int = 900, top_p: float = 0.97, width: int | None = None, height: int | None = None,
                 schedule: Schedule | None = None, batch: int = 1, keep_logits: bool = False,
                 on_scale: ScaleCallback | None = None, cache: CacheConfig | None = None,
                 record_kept: KeptRecorder | None = None, memory_report: bool = False,
                 bits_hook: BitsHook | None = None, decode_tile: int | None = None,
                 offload_text_encoder: bool = False, block_swap: int | None = None,
                 attention: str = "auto", graphs: str = "off") -> GenerationResult:
        """Generate `batch` images per prompt; the same seed and settings give the same image as the original.

        `bits_hook` is the sampler's (diagnostics: replace a scale's drawn bits). `decode_tile` decodes in tiles of
        that many latent positions (BSQVAE.decode_tiled; None or 0: the whole latent at once, as the original).
        `offload_text_encoder` moves T5 to the CPU once the prompts are encoded (see offload_text_encoder).
        `block_swap` (None: the pipeline's) keeps that many transformer blocks in host memory while sampling and
        streams each to the device in turn (model/block_swap.py); the bits are the same as without.
        `attention` is the attention backend sampling runs with (kvcache/attention.py, docs/attention.md; "auto":
        the fastest installed here, today's SDPA call on the CPU); one that cannot run here is refused by name
        before any work, and `info["attention"]` says which ran.
        `graphs` "cuda" replays one captured CUDA graph per scale (docs/cuda_graphs.md); the pipeline keeps the
        graphs for the next image of the same shape until release_graphs(). "off": the exact eager path.
        """
        batch = LIMITS["batch"].check(batch)
        swap = check_block_swap(self.block_swap if block_swap is None else block_swap, self.transformer.cfg.depth)
        decode_tile = check_decode_tiling(decode_tile or 0)  # refused by name before any work
        attention = resolve_attention(attention, self.device, self.transformer.block_dtype)
        if graphs != "off" and swap:  # refused before T5 runs: a graph would point at the swap slots' last block
            raise ValueError(f"graphs={graphs!r} with block_swap={swap}: graphs need every block on the device; "
                             "use one or the other")
        runner = self._runner_for(graphs)
        settings = SamplerSettings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, seed=seed)
        settings.validate()  # before T5 runs: a NaN cfg is refused by name, not as a failed draw
        cache = cache or CacheConfig(policy="full")
        cache.validate(self.device)  # a kv_dtype this device cannot hold (fp8 on MPS) too, before T5 runs
        schedule = schedule or self.schedule_for_size(width, height)
        if isinstance(prompt, TextConditioning):
            cond = prompt
        else:  # each prompt through T5 once; its `batch` images share the rows
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:  # T5 failed on it with a bare IndexError
                raise ValueError("prompt: an empty list; give a prompt, a list of at least one, or TextConditioning")
            cond = self.encode(prompts)
        if batch > 1:
            cond = cond.repeat_each(batch)
        neg = None
        if negative_prompt is not None and not (isinstance(negative_prompt, str) and not negative_prompt.strip()):
            neg = negative_prompt if isinstance(negative_prompt, TextConditioning) else self.encode([negative_prompt])
        if offload_text_encoder:
            self.offload_text_encoder()
        meter = PeakMeter(self.device)
        with (meter.measure() if memory_report else contextlib.nullcontext()), self.placed(swap), \
                use_backend(attention, self.device, self.transformer.block_dtype):
            samples = sample(self.transformer, cond.to(self.device), schedule, settings, self.vae_patchify,
                             negative=None if neg is None else neg.to(self.device), keep_logits=keep_logits,
                             on_scale=on_scale, cache_config=cache, record_kept=record_kept, bits_hook=bits_hook,
                             graphs=graphs, runner=runner)
        check_finite(samples, self.transformer.block_dtype)
        decoded = self._decode(samples.summed_codes.float(), decode_tile)
        result = GenerationResult(images=decoded_to_uint8(decoded), decoded=decoded, samples=samples,
                                  schedule=schedule, settings=settings, info={"attention": attention})
        if memory_report:
            result.memory = self.memory_report(samples, cond.batch_size, settings, schedule, meter)
        return result

    def _runner_for(self, graphs: str) -> ScaleGraphRunner | None:
        """The pipeline's graph runner for this mode (a new one, the old released, when the mode changes). An eager
        image releases it: its pool would otherwise hold about one more sampling peak beside the eager run's."""
        if check_graph_mode(graphs) == "off":
            self.release_graphs()
            return None
        if self._graph_runner is not None and self._graph_runner.mode != graphs:
            self.release_graphs()
        if self._graph_runner is None:
            self._graph_runner = ScaleGraphRunner(graphs)
        return self._graph_runner

    def release_graphs(self) -> None:
        """Free the captured graphs, their memory pool and the cache they own (the next graphed image captures again)."""
        if self._graph_runner is not None:
            self._graph_runner.release()
            self._graph_runner = None

    def _decode(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """The VAE decode on the pipeline's device; a VAE kept elsewhere is placed there for it and put back."""
        home = next(self.vae.parameters()).device
        if home != self.device:
            self.vae.to(self.device)
        try:
            return self.vae.decode_tiled(z, tile) if tile else self.vae.decode(z)
        finally:
            if home != self.device:
                self.vae.to(home)

    def placed(self, block_swap: int = 0) -> contextlib.AbstractContextManager:
        """The transformer on this pipeline's device for the body with `block_swap` blocks streamed, and back
        where it was after (an error included); nothing to do when it is there already and none swap."""
        swap = check_block_swap(block_swap, self.transformer.cfg.depth)
        if swap or self.transformer.pos_start.device != self.device:
            return swap_blocks(self.transformer, swap, self.device)
        return contextlib.nullcontext()

    def plan_memory(self, schedule: Schedule, batch: int, cache: CacheConfig | None = None,
                    cfg: bool = True, decode_tile: int | None = None) -> MemoryPlan:
        """The planner's figures for a run of `batch` images (all prompts) on this pipeline's model and VAE;
        quantized weights add the block's dequantized weights while it runs, as the whole-job planner counts them."""
        c = self.transformer.cfg
        plan = plan_memory(c.depth, c.embed_dim, c.num_heads, c.ffn_hidden, c.d_vae, schedule, batch,
                           cache or CacheConfig(policy="full"), self.transformer.block_dtype, cfg=cfg,
                           vae_base_ch=self.vae.cfg.base_ch, vae_patch=self.vae.cfg.patch_size,
                           decode_tile=decode_tile or None)
        if not self.dequant_workspace_mb():
            return plan
        sampling = plan.sampling_peak_mb + self.dequant_workspace_mb()
        return dataclasses.replace(plan, sampling_peak_mb=sampling,
                                   total_mb=plan.weights_mb + max(sampling, plan.decode_peak_mb))

    def dequant_workspace_mb(self) -> float:
        """MB of one block's weights dequantized while it runs (0 unless the blocks are stored quantized)."""
        c = self.transformer.cfg
        return dequant_workspace_bytes(c, model_format(self.transformer)[0], self.transformer.block_dtype) / MiB

    def admission_problem(self, schedule: Schedule, batch: int, cache: CacheConfig | None = None, cfg: bool = True,
                          override: str = f"set {ALLOW_OVERCOMMIT_ENV}=1",
                          decode_tile: int | None = None, tile_field: str = "decode_tile") -> str | None:
        """Why a run must not start on this device (its planned peak exceeds the free memory), or None."""
        plan = self.plan_memory(schedule, batch, cache, cfg, decode_tile)
        free, where = free_memory(self.device)
        if free is not None and self.transformer.pos_start.device != self.device:  # its weights arrive at sampling
            free -= planned_device_bytes(self.transformer, self.block_swap)
        return admission_problem(plan.sampling_peak_mb, plan.decode_peak_mb, free, where, batch, override,
                                 decode_tile, tile_field)

    def memory_report(self, samples: SampleOutput, batch: int, settings: SamplerSettings, schedule: Schedule,
                      meter: PeakMeter | None = None) -> MemoryReport:
        """Planned and measured memory of a finished generation."""
        cfg = self.transformer.cfg
        n = schedule.num_scales
        cfgs, _ = settings.per_scale(n)
        rows = batch * (2 if any(c != 1 for c in cfgs) else 1)
        config = samples.cache_config or CacheConfig(policy="full")
        k_dtype, v_dtype = config.storage_dtypes(self.transformer.block_dtype)
        tb = kv_bytes_per_token(cfg.num_heads, cfg.head_dim, k_dtype.itemsize, v_dtype.itemsize, rows)
        report = build_report(samples.plan, samples.usage, schedule, config,
                              {"depth": cfg.depth, "width": cfg.embed_dim, "heads": cfg.num_heads,
                               "block_dtype": str(self.transformer.block_dtype).replace("torch.", ""),
                               "device": str(self.device)}, batch, rows, tb)
        planned = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, batch,
                              config, self.transformer.block_dtype, text_tokens=max(samples.text_len, 1),
                              cfg=rows > batch)
        report.planned_peak_mb = planned.sampling_peak_mb + self.dequant_workspace_mb()
        if meter is not None and meter.method:  # a device without a peak counter: no figure, and the reason
            report.measured_peak_mb = None if meter.peak_bytes is None else meter.peak_bytes / 2**20
            report.measurement = meter.method
            report.sampling_seconds = meter.seconds
        return report
