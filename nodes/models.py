"""What the loader outputs: the engine's pipeline and T5 encoder, each inside a ComfyUI ModelPatcher.

The patchers register the weights with ComfyUI's memory manager: `load_models_gpu` moves them to the compute
device before use, other models' loads can offload them, and the "unload models" button frees them. Weights are
loaded on the offload device (as ComfyUI's own loaders do) and always moved whole (`force_full_load`): the engine's
modules have no partial-offload casting ops.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..scalekv_core.checkpoint import file_version
from ..scalekv_core.devices import DeviceDtypeError
from ..scalekv_core.host_memory import host_free, host_limit_bytes, where_label
from ..scalekv_core.kvcache import CacheConfig
from ..scalekv_core.kvcache.memory import (MemoryPlan, MiB, admission_problem, overcommit_allowed,
                                           preview_peak_bytes)
from ..scalekv_core.loader import (PRECISION_NAMES, PRECISIONS, load_transformer, load_vae, native_resolution,
                                   resolve_precision, t5_dtype, vae_patchify_for)
from ..scalekv_core.model.block_swap import max_block_swap, planned_device_bytes
from ..scalekv_core.model.config import KNOWN_MODELS, InfinityConfig
from ..scalekv_core.model.quant import check_format_on, model_format
from ..scalekv_core.model.text_encoder import T5TextEncoder, TextConditioning
from ..scalekv_core.pipeline import InfinityPipeline, check_text_width
from ..scalekv_core.schedules import Schedule
from . import paths

log = logging.getLogger(__name__)

PRECISION_CHOICES = ["auto", *PRECISIONS]


def device_free(device: torch.device) -> tuple[int, str]:
    """ComfyUI's free memory on `device` and the place to name in a refusal; on the CPU capped by the server
    process's own limits (its cgroup, RLIMIT_AS), which ComfyUI does not read, so a capped server refuses a run
    rather than dying in it."""
    free = mm.get_free_memory(device)
    if not mm.is_device_cpu(device):
        return free, str(device)
    free, cap = host_free(free)
    return free, where_label(str(device), cap)


def device_total_bytes(device: torch.device) -> int:
    """ComfyUI's total memory of `device`; on the CPU no more than the server process's own limits allow."""
    total = mm.get_total_memory(device)
    return host_limit_bytes(total) if mm.is_device_cpu(device) else total


class BlankPrompt(TextConditioning):
    """A blank prompt's features. As a negative it means none, as the original's empty negative_prompt does."""


class InfinityModules(torch.nn.Module):
    """Transformer and VAE under one module, so one ModelPatcher moves and offloads both."""

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae


class T5Module(torch.nn.Module):
    """Holds the Hugging Face T5 encoder: ModelPatcher sets `.device` on its module, which HF models do not allow."""

    def __init__(self, t5: torch.nn.Module) -> None:
        super().__init__()
        self.t5 = t5


def unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's tensors, each storage once: ComfyUI's own count (module_size) adds T5's tied embedding
    twice (shared and encoder.embed_tokens: +126 MiB for flan-t5-xl in fp16), so it evicted more than needed."""
    seen: dict[tuple[str, int], int] = {}
    for t in module.state_dict().values():
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _patcher(module: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device,
                                            size=unique_bytes(module))


@dataclass
class InfinityModel:
    """INFINITY_MODEL: the pipeline (transformer + VAE), its patcher, and what was loaded."""

    pipeline: InfinityPipeline
    patcher: object  # comfy.model_patcher.ModelPatcher
    info: dict = field(default_factory=dict)

    def plan(self, schedule: Schedule, batch: int, cache: CacheConfig | None, cfg: bool = True,
             decode_tile: int | None = None) -> MemoryPlan:
        """The engine's memory plan for a run; a cache setting that cannot serve this model and resolution (a
        budget that gives no tokens, a budget file for another resolution) is refused here, before any work."""
        try:
            return self.pipeline.plan_memory(schedule, batch, cache, cfg, decode_tile)
        except (ValueError, FileNotFoundError) as e:  # BudgetError is a ValueError
            h, w = schedule.pixel_size
            raise ValueError(f"cache_config: these cache settings cannot run at {w}x{h} on this model: {e}") from e

    def preview_bytes(self, schedule: Schedule) -> int:
        """The per-scale preview's decode (BSQVAE.preview), which runs while the cache is held."""
        h, w = schedule.pixel_size
        vae = self.pipeline.vae.cfg
        return preview_peak_bytes(h, w, vae.base_ch, vae.patch_size)

    def peaks_mb(self, schedule: Schedule, batch: int, cache: CacheConfig | None, cfg: bool = True,
                 decode_tile: int | None = None) -> tuple[float, float]:
        """(sampling with its previews, decode) MB beside the weights, from the engine's planner."""
        plan = self.plan(schedule, batch, cache, cfg, decode_tile)
        return plan.sampling_peak_mb + self.preview_bytes(schedule) / MiB, plan.decode_peak_mb

    def memory_required(self, schedule: Schedule, batch: int, cache: CacheConfig | None, cfg: bool = True,
                        decode_tile: int | None = None) -> int:
        """Bytes sampling (or decoding, whichever is larger) needs beside the weights, from the engine's planner."""
        return int(max(self.peaks_mb(schedule, batch, cache, cfg, decode_tile)) * MiB)

    def admit(self, schedule: Schedule, batch: int, cache: CacheConfig | None, cfg: bool = True,
              decode_tile: int | None = None, block_swap: int = 0) -> None:
        """Refuse a run whose planned peak exceeds the compute device's free memory less ComfyUI's reserve (weights
        already loaded, or with block swap still to be placed); SCALEKV_ALLOW_OVERCOMMIT=1 overrides."""
        if overcommit_allowed():
            return
        sampling_mb, decode_mb = self.peaks_mb(schedule, batch, cache, cfg, decode_tile)
        device = self.patcher.load_device
        free, where = device_free(device)
        free -= self.swapped_weight_bytes(block_swap) if block_swap else 0
        if not mm.is_device_cpu(device):
            free -= mm.extra_reserved_memory()  # what ComfyUI keeps free on a GPU, as the widget plans
        problem = admission_problem(sampling_mb, decode_mb, free, where, batch, decode_tile=decode_tile)
        if problem is not None:
            raise MemoryError(problem)

    def load(self, memory_required: int = 0, block_swap: int = 0) -> None:
        """Move the weights to the compute device (evicting other models if the memory manager must).

        With block swap the weights stay on the offload device: the engine places all but the swapped blocks on
        the device for the sampling call only, so here other models are evicted to make room for those weights
        and the run, and our own patcher, if ComfyUI holds it on the device whole, is unloaded first.
        """
        if not block_swap:
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
            return
        for loaded in list(getattr(mm, "current_loaded_models", [])):
            if loaded.model is self.patcher:
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)
        device = self.patcher.load_device
        if not mm.is_device_cpu(device):  # room as load_models_gpu makes it: weights + 10%, the run or the minimum
            extra = max(mm.minimum_inference_memory(), memory_required + mm.extra_reserved_memory())
            mm.free_memory(self.swapped_weight_bytes(block_swap) * 1.1 + extra, device)

    def block_swap_for(self, requested: int) -> int:
        """`requested`, or under ComfyUI's --novram every block that can stream: there its loader moves none of
        our weights (the modules have no partial-load casts), so the transformer would reach the GPU whole and
        unplanned, and the VAE would stay behind on the CPU. None where the weights wait on the compute device
        itself (--highvram, --gpu-only): a swapped block would stream from where it already is."""
        if mm.is_device_cpu(self.patcher.load_device):
            return requested
        if torch.device(self.patcher.offload_device) == torch.device(self.patcher.load_device):
            if requested:
                log.warning("Infinity Memory: block_swap %d ignored: ComfyUI keeps the weights on %s (--highvram or "
                            "--gpu-only), so there is no host memory to stream them from", requested,
                            self.patcher.load_device)
            return 0
        if requested or mm.vram_state != mm.VRAMState.NO_VRAM:
            return requested
        return max_block_swap(self.pipeline.transformer.cfg.depth)

    def swapped_weight_bytes(self, block_swap: int) -> int:
        """Weights on the device while sampling with `block_swap` blocks streamed: the transformer less N - 2
        blocks, and the VAE (it previews every scale)."""
        vae = sum(t.numel() * t.element_size() for t in self.pipeline.vae.state_dict().values())
        return planned_device_bytes(self.pipeline.transformer, block_swap) + vae

    @contextlib.contextmanager
    def vae_on_device(self, block_swap: int) -> Iterator[None]:
        """With block swap the VAE is not loaded with the patcher: on the device for the run, back after."""
        vae, device = self.pipeline.vae, self.patcher.load_device
        home = next(vae.parameters()).device
        if not block_swap or home == torch.device(device):
            yield
            return
        vae.to(device)
        try:
            yield
        finally:
            vae.to(home)


@dataclass
class InfinityT5:
    """INFINITY_T5: the T5 encoder and its patcher."""

    encoder: T5TextEncoder
    patcher: object  # comfy.model_patcher.ModelPatcher
    info: dict = field(default_factory=dict)

    def encode(self, prompts: list[str]) -> TextConditioning:
        """T5 features of the prompts, on ComfyUI's intermediate device."""
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.encoder.encode(list(prompts)).to(mm.intermediate_device())


def precision_name(precision: str, device: torch.device) -> str:
    """'auto' resolved on the device that will run the model (bf16 on CUDA sm80+ and MPS on macOS 14+, fp16 on
    older CUDA cards, fp32 on CPU), as the engine rules; a precision the device cannot hold is refused by name."""
    return PRECISION_NAMES[resolve_precision(precision, device)]


def device_problem(precision: str | None, weight_format: str | None, t5_weights: str | None) -> str | None:
    """Why the loader's settings cannot run on this server's devices (fp8 or float64 on Apple's MPS; bf16 there
    before macOS 14), or None: the loader refuses them before any file loads, not the sampler when they move."""
    try:
        device = mm.get_torch_device()
        if precision is not None:
            resolve_precision(precision, device)
        if weight_format is not None:
            check_format_on(weight_format, device, "weight_format")
        if t5_weights is not None:
            check_format_on(t5_weights, mm.text_encoder_device(), "t5_weights")
    except DeviceDtypeError as e:
        return str(e)
    return None


#: What the embedded default model (default_model/, paths.DEFAULT_TRANSFORMER) is called in notes and the widget.
EMBEDDED_MODEL_NAME = "infinity-shapes"
#: What any other transformer that is none of the released shapes is called.
UNKNOWN_MODEL_NAME = "this model"


def architecture_name(cfg: InfinityConfig, transformer: str | os.PathLike | None = None) -> str:
    """The model's name in user-facing text ("512x512 is outside what <name> was trained at", the widget's header):
    a released shape's ("infinity-2b"), the embedded model's by its file name, or "this model" for any other shape
    (a name like "custom" read as if it were a model called that)."""
    for name, known in KNOWN_MODELS.items():
        if (known.depth, known.embed_dim, known.num_heads, known.d_vae) == (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.d_vae):
            return f"infinity-{name}"
    name = os.path.basename(os.fspath(transformer).rstrip("/\\")) if transformer is not None else None
    if name == paths.DEFAULT_TRANSFORMER:
        return EMBEDDED_MODEL_NAME
    return UNKNOWN_MODEL_NAME


#: What the loader made, by its files' versions and settings, while something else (ComfyUI's output cache) still
#: holds it: weak references, so nothing is kept alive here.
_recent: dict[tuple, weakref.ref] = {}


def _reuse(key: tuple, load):
    """The object made for `key` if it is still alive, else `load()`: ComfyUI runs the whole loader when any of its
    inputs changes, so switching T5's settings reloaded the transformer too (16 GB for the 8B)."""
    for stale in [k for k, ref in _recent.items() if ref() is None]:
        del _recent[stale]
    found = _recent[key]() if key in _recent else None
    if found is None:
        found = load()
        _recent[key] = weakref.ref(found)
    return found


def load_infinity(transformer_path: str, vae_path: str, precision: str = "auto",
                  weights: str = "none") -> InfinityModel:
    """Transformer + VAE from files (architecture read off the tensors), checked to fit each other; `weights` is the
    block linears' storage format (quantized on the offload device as they load). The model of the same files
    and settings is reused while ComfyUI still holds it."""
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    prec = precision_name(precision, load_device)  # 'auto' and what it resolves to are the same model
    key = ("infinity", file_version(transformer_path), file_version(vae_path), prec, weights,
           str(load_device), str(offload_device))
    return _reuse(key, lambda: _load_infinity(transformer_path, vae_path, prec, weights, load_device,
                                              offload_device))


def _load_infinity(transformer_path: str, vae_path: str, prec: str, weights: str, load_device: torch.device,
                   offload_device: torch.device) -> InfinityModel:
    transformer = load_transformer(transformer_path, device=offload_device, precision=prec, weights=weights,
                                   run_device=load_device, weights_field="weight_format")
    vae = load_vae(vae_path, device=offload_device, decoder_only=True)  # generation never encodes
    vae_patchify_for(transformer.cfg, vae.cfg, (str(transformer_path), str(vae_path)))  # names both files if not
    pipeline = InfinityPipeline(transformer, vae, device=load_device)  # runs there, wherever the weights wait
    cfg = transformer.cfg
    info = {"architecture": architecture_name(cfg, transformer_path), "transformer": str(transformer_path), "vae": str(vae_path),
            "precision": prec, "weights": model_format(transformer)[0], "depth": cfg.depth, "width": cfg.embed_dim, "heads": cfg.num_heads,
            "bits_per_token": cfg.d_vae, "text_channels": cfg.text_channels,
            "vae_bits": vae.cfg.codebook_dim, "vae_patch": vae.cfg.patch_size, "patchify": pipeline.vae_patchify,
            "load_device": str(load_device), "offload_device": str(offload_device),
            "native_resolution": native_resolution(transformer_path)}
    return InfinityModel(pipeline, _patcher(InfinityModules(transformer, vae), load_device, offload_device), info)


def t5_dtype_name(load_device: torch.device | str, precision: str = "auto") -> str:
    """The dtype T5 loads in on `load_device` (loader.t5_dtype), by name: what the planner sizes it as."""
    return PRECISION_NAMES[t5_dtype(precision, load_device)]


def load_t5(folder: str, precision: str = "auto", weights: str = "none") -> InfinityT5:
    """T5 encoder from a Hugging Face folder in `t5_dtype` (fp16 on CUDA unless fp32 is asked, fp32 on the CPU);
    `weights` stores its linears in 8 bits (quant.T5_WEIGHT_FORMATS), about half the memory. Reused as the
    transformer is (a changed transformer setting reloaded T5 too)."""
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = t5_dtype(precision, load_device)
    check_format_on(weights, load_device, "t5_weights")  # fp8 on MPS: refused here, not when T5 first encodes
    key = ("t5", file_version(folder), str(dtype), weights, str(load_device), str(offload_device))
    return _reuse(key, lambda: _load_t5(folder, dtype, weights, load_device, offload_device))


def _load_t5(folder: str, dtype: torch.dtype, weights: str, load_device: torch.device,
             offload_device: torch.device) -> InfinityT5:
    if os.path.isfile(folder):  # a single-file T5: the tokenizer ComfyUI ships (paths.single_file_t5s)
        encoder = T5TextEncoder.from_single_file(folder, paths.host_t5_tokenizer(), device=offload_device,
                                                 dtype=dtype, weights=weights)
    else:
        encoder = T5TextEncoder.from_folder(folder, device=offload_device, dtype=dtype, weights=weights)
    info = {"text_encoder": str(folder), "text_channels": encoder.text_channels, "dtype": PRECISION_NAMES[dtype],
            "weights": encoder.weights,
            "load_device": str(load_device), "offload_device": str(offload_device)}
    return InfinityT5(encoder, _patcher(T5Module(encoder.module), load_device, offload_device), info)


def check_text_channels(model: InfinityModel, t5: InfinityT5) -> None:
    """The transformer cross-attends to T5 features of a fixed width: the two must agree."""
    check_text_width(model.pipeline.transformer.cfg.text_channels, t5.encoder.text_channels, model.info["transformer"],
                     t5.info["text_encoder"])
