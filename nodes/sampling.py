"""Infinity Sampler: conditioning -> IMAGE, with an optional ScaleKV cache, a preview per scale and a memory report."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..scalekv_core.kvcache import CacheConfig
from ..scalekv_core.kvcache.attention import CHOICES as ATTENTION_CHOICES, resolve as resolve_attention
from ..scalekv_core.model.block_swap import check_block_swap
from ..scalekv_core.model.text_encoder import TextConditioning
from ..scalekv_core.model.vae import check_decode_tiling
from ..scalekv_core.kvcache.memory import MiB, start_profiler_here
from ..scalekv_core.loader import resolution_note
from ..scalekv_core.schedules import resolution_label
from . import models, widgets
from .cache import AUTO_RESOLUTION, resolution_menu, schedule_for
from .memory import MemorySettings
from .io_types import CATEGORY, CacheConfigType, InfinityConditioningType, InfinityMemoryType, InfinityModelType, schema

#: The resolution menu, in its order (a wrong value's error lists its first entries).
RESOLUTIONS = resolution_menu()
log = logging.getLogger(__name__)


def preview_image(decoded: torch.Tensor, pixel_size: tuple[int, int]) -> Image.Image:
    """A decoded preview (1, 3, h, w) in [-1, 1] as a picture of the output's own size (h, w), so the frontend's
    label gives the image's real size; small previews are scaled up smoothly."""
    rgb = ((decoded[0].detach().float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    image = Image.fromarray(np.ascontiguousarray(rgb.permute(1, 2, 0).cpu().numpy()))
    h, w = pixel_size
    return image if image.size == (w, h) else image.resize((w, h), Image.BILINEAR)


def decoded_to_image(decoded: torch.Tensor) -> torch.Tensor:
    """The VAE's (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1] on the intermediate device.

    SaveImage's clip(255 * x) -> uint8 then gives exactly the engine's PNG bytes (same float32 ops, truncation).
    """
    image = ((decoded.float() + 1) / 2).clamp_(0, 1).permute(0, 2, 3, 1).contiguous()
    return image.to(mm.intermediate_device())


def prepare_cpu_meter() -> bool:
    """On a CPU device the sampler measures memory with torch's profiler on ComfyUI's worker thread: its first trace
    there printed a Kineto ERROR line in the console, unless one ran on the main thread first (this, at import)."""
    if mm.get_torch_device().type != "cpu":
        return False
    try:
        start_profiler_here()
    except Exception as e:  # a profiler already running, a torch without Kineto: only a console line is at stake
        log.debug("Infinity Sampler: no profiler warm-up (%s)", e)
        return False
    return True


class InfinitySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="InfinitySampler",
            display_name="Infinity Sampler",
            category=CATEGORY,
            description="Draws the picture coarse to fine, one scale after another (13 at 1024x1024), with the "
                        "full cache or a ScaleKV cache from ScaleKV Cache Config. Shows the picture so far after "
                        "every scale "
                        "and reports the memory it planned and used. Wire an Infinity Memory node into memory on "
                        "small GPUs.",
            inputs=[
                InfinityModelType.Input("model", tooltip="from Infinity Model Loader"),
                InfinityConditioningType.Input("positive", tooltip="the prompt, from Infinity Text Encode"),
                InfinityConditioningType.Input("negative", optional=True,
                                               tooltip="unconnected: the model's learned unconditional embedding"),
                CacheConfigType.Input("cache_config", optional=True, tooltip="unconnected: the full cache"),
                widgets.int_input("seed", default=0, control_after_generate=True,
                                  tooltip="the same seed and settings (batch included) give the same picture. A "
                                          "batch draws all its pictures from one seed, as the original does, so "
                                          "picture 1 of a batch differs from the same seed's single picture. A "
                                          "negative seed is the same as seed + 2^64"),
                widgets.float_input("cfg", default=3.0, step=0.1, tooltip="how closely the picture follows the prompt; 3 is the original's default, 1 turns guidance off"),
                widgets.float_input("tau", default=0.5, step=0.01, tooltip="randomness of each scale's choices: lower is safer and plainer, higher is livelier"),
                widgets.int_input("top_k", default=900, tooltip="draw only among the k likeliest bits (0: no limit)"),
                widgets.float_input("top_p", default=0.97, step=0.01, tooltip="draw only among the likeliest bits that add up to p (0: no limit)"),
                io.Combo.Input("resolution", options=resolution_menu(), default=AUTO_RESOLUTION,
                               tooltip="auto: the model's own size (the 2B and 8B draw 1024x1024, the embedded model 256x256). The others "
                                       "are the sizes Infinity was trained at (aspect x size)"),
                widgets.int_input("batch", default=1,
                                  tooltip="pictures per prompt, drawn together from the one seed (memory grows "
                                          "with it); to remake one of them alone, run the whole batch again"),
                widgets.int_input("decode_tile", default=0, optional=True,
                                  tooltip="0: decode the whole image at once, as the original. 8-512: decode in "
                                          "tiles of this many latent positions per side (x16 pixels for 2B, x8 for "
                                          "8B), so the VAE's memory peak follows the tile, not the image; same "
                                          "image to float rounding, a little slower (maps wait in CPU memory)"),
                InfinityMemoryType.Input("memory", optional=True,
                                         tooltip="from Infinity Memory (block swap): keep some transformer blocks "
                                                 "in CPU memory while sampling. Unconnected: the whole model on "
                                                 "the GPU"),
                io.Combo.Input("attention", options=list(ATTENTION_CHOICES), default="auto", optional=True,
                               tooltip="attention backend. auto: the fastest installed here (PyTorch's own SDPA "
                                       "pick until GPU measurements promote another; the same picture as "
                                       "before). flash, efficient, cudnn, math: SDPA held to one kernel. "
                                       "flash_attn, sage: those packages, if installed (CUDA, bf16/fp16; sage "
                                       "quantizes q.k to 8 bits, so pictures differ slightly). One that cannot "
                                       "run here is refused with the reason",
                               **widgets.ADVANCED),
            ],
            outputs=[io.Image.Output(display_name="image")],
            # its previews and memory report are sent again when ComfyUI serves it from its cache (0.33 and later;
            # the schema helper leaves the field out where ComfyUI lacks it), so /history keeps the report
            has_intermediate_output=True,
        )

    @classmethod
    def validate_inputs(cls, cfg=None, tau=None, top_p=None, resolution=None, decode_tile=None,
                        attention=None) -> bool | str:
        """The float widgets (NaN passes ComfyUI's own range check), the resolution, the decode tile (1-7 are
        in the table's range but refused) and the attention menu, quoted briefly if wrong."""
        problem = widgets.problem(widgets.number("cfg", cfg), widgets.number("tau", tau),
                                  widgets.number("top_p", top_p),
                                  widgets.choice("resolution", resolution, RESOLUTIONS),
                                  lambda: None if decode_tile is None else check_decode_tiling(decode_tile),
                                  widgets.choice("attention", attention, ATTENTION_CHOICES))
        return True if problem is None else problem

    @classmethod
    def execute(cls, model: models.InfinityModel, positive: TextConditioning, seed: int, cfg: float, tau: float,
                top_k: int, top_p: float, resolution: str, batch: int, negative: TextConditioning | None = None,
                cache_config: CacheConfig | None = None, decode_tile: int = 0,
                memory: MemorySettings | None = None, attention: str = "auto") -> io.NodeOutput:
        problem = widgets.problem(*(widgets.number(k, v) for k, v in
                                    dict(seed=seed, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, batch=batch).items()),
                                  widgets.choice("resolution", resolution, RESOLUTIONS),
                                  lambda: check_decode_tiling(decode_tile),
                                  widgets.choice("attention", attention, ATTENTION_CHOICES))
        if problem is not None:  # inputs that came through links were not validated
            raise ValueError(problem)
        # a backend this device cannot run is refused by name before the weights move, and so is a kv_dtype it
        # cannot hold (fp8 on Apple's MPS)
        attention = resolve_attention(attention, model.patcher.load_device, model.pipeline.transformer.block_dtype)
        if cache_config is not None:
            cache_config.validate(model.patcher.load_device)
        schedule = schedule_for(resolution, model.info.get("native_resolution"))
        note = resolution_note(model.info["native_resolution"], schedule, model.info.get("architecture", "the model")) \
            if model.info.get("native_resolution") else None
        if note:
            log.warning("Infinity Sampler: %s", note)
        plan = model.plan(schedule, batch * positive.batch_size, cache_config, cfg != 1)  # notes now, peak in report
        for plan_note in plan.notes:
            log.warning("Infinity Sampler: %s", plan_note)  # also in the run's report (its `notes`)
        if isinstance(negative, models.BlankPrompt):
            negative = None  # an empty negative prompt means none, as in the original and the engine's generate()
        asked = 0 if memory is None else check_block_swap(memory.block_swap, model.pipeline.transformer.cfg.depth)
        swap = model.block_swap_for(asked)
        if swap and not asked:
            log.info("Infinity Sampler: --novram: %d transformer blocks stream from CPU memory", swap)
        model.load(model.memory_required(schedule, batch * positive.batch_size, cache_config, cfg != 1, decode_tile),
                   swap)
        model.admit(schedule, batch * positive.batch_size, cache_config, cfg != 1, decode_tile, swap)
        pbar = comfy.utils.ProgressBar(schedule.num_scales)

        h, w = schedule.pixel_size
        preview_size = max(h, w)  # sent at the image's size: the frontend labels the preview with it

        def on_scale(si: int, n: int, summed_codes: torch.Tensor) -> None:
            mm.throw_exception_if_processing_interrupted()  # raising here stops sampling; the engine frees the cache
            small = model.pipeline.vae.preview(summed_codes)
            pbar.update_absolute(si + 1, n, ("JPEG", preview_image(small, (h, w)), preview_size))

        with model.vae_on_device(swap):
            result = model.pipeline.generate(positive, negative, seed=seed, cfg=cfg, tau=tau, top_k=top_k,
                                             top_p=top_p, schedule=schedule, batch=batch, on_scale=on_scale,
                                             cache=cache_config, memory_report=True, decode_tile=decode_tile,
                                             block_swap=swap, attention=attention)
        # the last preview is the picture itself, so the node shows the result, not the last scale's preview
        pbar.update_absolute(schedule.num_scales, schedule.num_scales,
                             ("JPEG", preview_image(result.decoded[:1], (h, w)), preview_size))
        report = result.memory.to_dict()
        report["model"]["architecture"] = model.info.get("architecture", "")
        # planned as the cache-config widget and the admission check plan it (for prompts up to 512 tokens), with
        # the per-scale preview decode, which runs inside the measured window
        preview_mb = model.preview_bytes(schedule) / MiB
        report["planned_peak_max_prompt_mb"] = plan.sampling_peak_mb + preview_mb  # as peaks_mb, for this batch
        report["planned_peak_mb"] += preview_mb
        report["preview_mb"] = preview_mb
        if note:
            report["note"] = note
        report["attention"] = result.info["attention"]
        # what made this picture, so /history tells runs apart that the memory figures alone do not (a format or
        # block swap barely moves the plan)
        report["run"] = {"seed": seed, "cfg": cfg, "tau": tau, "top_k": top_k, "top_p": top_p,
                         "resolution": resolution_label(schedule), "batch": batch, "decode_tile": decode_tile,
                         "block_swap": swap, "transformer": os.path.basename(model.info.get("transformer", "")),
                         "weights": model.info.get("weights"), "precision": model.info.get("precision")}
        return io.NodeOutput(decoded_to_image(result.decoded), ui={"scalekv_memory": [report]})
