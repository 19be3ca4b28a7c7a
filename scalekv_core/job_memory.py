"""The whole job's memory on the GPU: T5 encode, sampling and VAE decode, weights included, for every low-VRAM option.

`plan_job` predicts each phase's peak for a model shape, resolution, batch and a `JobOptions` (weight format, T5
offload and precision, tiled decode, block swap, KV policy). `cheapest_fit` answers "does it fit this card?" and,
if not, walks the options cheapest in quality first (offloaded T5, tiled decode, a ScaleKV budget, the KV cache in
bf16, fp8 weights, block swap once the engine has it, 4-bit weights) and names the first setting that fits.
Everything is counted from shapes: no weights are needed, so `python -m scalekv_core plan --vram 12` answers
before anything is downloaded.

Phases, as the ComfyUI nodes run them (each model is loaded when its node runs; ComfyUI's memory manager evicts
what the next phase does not use): encode holds T5 (plus the transformer and VAE unless T5 is offloaded, i.e. kept
off the device while they are on it); sampling holds the transformer's resident blocks, the VAE and the cache and
activations (and, in ComfyUI, one preview decode: `previews`); decode holds the same weights (a block-swapped
transformer is back in host memory by then) and the decoder's activations.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .devices import check_dtype
from .kvcache import CacheConfig
from .kvcache.budget import PRESETS
from .kvcache.config import check_kv_dtype_on
from .kvcache.memory import MiB, decode_peak_bytes, plan_memory, preview_peak_bytes
from .limits import LIMITS, shown
from .model.config import KNOWN_MODELS, InfinityConfig
from .model.quant import (T5_WEIGHT_FORMATS, check_format, check_format_on, dequant_workspace_bytes, format_problem,
                          quantize_model, weight_bytes)
from .schedules import Schedule, schedule_for_pixels

GiB = 2**30
#: flan-t5-xl's encoder (what every Infinity model conditions on): d_model, d_ff, layers, heads x d_kv, vocab.
T5_XL = dict(d_model=2048, d_ff=5120, layers=24, inner=32 * 64, vocab=32128)
#: The released VAEs' parameters a generation holds, decoder and quantizer (the encoder is not loaded; all of it:
#: 110,118,051 and 81,624,209), in float32, and their decoders' widths and patch sizes.
VAE_PARAMS = {32: 65_092_355, 56: 48_484_611}
VAE_PATCH = {32: 16, 56: 8}
VAE_BASE_CH = 128
#: The decode tile the ladder tries (latent positions); small enough for any card, large enough to blend well.
LADDER_DECODE_TILE = 32
#: Blocks kept on the device beside the swapped ones: the running block and the one being fetched.
SWAP_BUFFERS = 2
#: Block swap (model/block_swap.py) runs in the engine, the CLI and the nodes, so `cheapest_fit` proposes it.
BLOCK_SWAP_READY = True
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class JobOptions:
    """What the artist can change to fit a card (every option of issue 20's planner)."""

    weights: str = "none"  # transformer block linears: none (block dtype), fp8_e4m3fn, int8, int4
    dtype: str = "bf16"  # transformer blocks' compute dtype
    t5_offload: bool = False  # T5 leaves the device once the prompt is encoded
    t5_weights: str = "none"  # T5's linears: none (in t5_dtype), fp8_e4m3fn, int8
    t5_dtype: str = "fp16"  # T5's dtype: fp16 as the original runs it on a GPU; fp32 where it runs on the CPU
    t5_on_device: bool = True  # False: T5 runs elsewhere (the CPU in ComfyUI's low-VRAM modes), not on this device
    decode_tile: int | None = None  # latent positions per tile; None = the whole decode at once
    block_swap: int = 0  # transformer blocks kept in CPU memory and streamed in when their turn comes
    policy: str = "full"
    budget: str = "10%"
    kv_dtype: str = "auto"  # auto: values in the block dtype, keys too unless scored (then fp32, as the original)
    previews: bool = False  # the ComfyUI sampler decodes a small preview per scale while the cache is held
    budget_file: str | None = None  # scalekv: an original-format budget JSON or a preset name (checked on the depth)
    window: int = 16  # observation window of the scoring policies (a budget below it is refused)
    refiner_decay: float = 0.0  # scalekv's generated plans: moves tokens between refiners and drafters per scale

    def cache_config(self) -> CacheConfig:
        """The cache these options plan; a budget file and refiner_decay only apply to scalekv (the ladder's other
        policies drop them)."""
        scalekv = self.policy == "scalekv"
        return CacheConfig(policy=self.policy, budget=self.budget, kv_dtype=self.kv_dtype, window=self.window,
                           budget_file=self.budget_file if scalekv else None,
                           refiner_decay=self.refiner_decay if scalekv else 0.0)

    def describe(self, cache: CacheConfig | None = None) -> str:
        """The setting in words; `cache` is the cache actually planned when plan_job was given one."""
        cache = cache or self.cache_config()
        t5 = self.t5_dtype if self.t5_weights == "none" else self.t5_weights
        parts = [f"weights {self.weights}" if self.weights != "none" else f"weights {self.dtype}",
                 f"T5 {t5}" + (" on another device" if not self.t5_on_device else
                                " offloaded" if self.t5_offload else " resident"),
                 f"decode tiles of {self.decode_tile}" if self.decode_tile else "whole decode",
                 "full cache" if cache.policy == "full" else f"{cache.policy} {_budget_words(cache.budget)}"
                 + _budget_file_words(cache)]
        if cache.policy == "scalekv" and cache.refiner_decay and not cache.budget_file:
            parts.append(f"refiner decay {cache.refiner_decay:g}")
        if cache.kv_dtype != "auto":
            parts.append(f"KV stored in {cache.kv_dtype}")
        if self.block_swap:
            parts.append(f"block swap {self.block_swap}")
        return ", ".join(parts)


def _budget_words(budget: str | int) -> str:
    """A CacheConfig budget as the artist sets it: '10%', '900MB', or '650 tokens'."""
    return f"{budget} tokens" if isinstance(budget, int) or str(budget).isdigit() else str(budget)


def _budget_file_words(cache: CacheConfig) -> str:
    if not cache.budget_file or cache.policy != "scalekv":
        return ""
    named = cache.budget_file
    return f" with preset budget {named}" if named in PRESETS else f" with budget file {Path(named).name}"


@dataclass
class JobPlan:
    """Predicted device memory of each phase (MiB), and the parts it is made of."""

    options: JobOptions
    model: str
    resolution: tuple[int, int]  # (width, height)
    batch: int
    transformer_mb: float  # resident transformer weights (swapped blocks excluded, swap buffers included)
    t5_mb: float
    vae_mb: float
    encode_mb: float
    sampling_mb: float
    decode_mb: float
    sampling_extra_mb: float  # cache + activations (+ dequantization workspace) above the weights
    decode_extra_mb: float
    kv_stored_mb: float
    parts: dict = field(default_factory=dict)
    cache: CacheConfig | None = None  # the cache planned (the options' own unless plan_job was given one)

    @property
    def setting(self) -> str:
        """The setting planned, in words."""
        return self.options.describe(self.cache)

    @property
    def peak_mb(self) -> float:
        return max(self.encode_mb, self.sampling_mb, self.decode_mb)

    def fits(self, vram_gib: float) -> bool:
        return self.peak_mb <= vram_gib * 1024

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_mb"] = self.peak_mb
        d["peak_gib"] = self.peak_mb / 1024
        d["setting"] = self.setting
        return d


def t5_bytes(fmt: str = "none", shape: dict = T5_XL, dtype: str = "fp16") -> int:
    """T5 encoder weights: the linears in `fmt` (8-bit: 1 byte + a float32 scale per output row), the rest in
    `dtype` (fp16 on a GPU, fp32 on the CPU; fp16 keeps the `wo` projections in float32)."""
    if fmt not in T5_WEIGHT_FORMATS:
        raise ValueError(f"t5_weights: unknown format {shown(fmt)}; choose {', '.join(T5_WEIGHT_FORMATS)}")
    d, f, inner = shape["d_model"], shape["d_ff"], shape["inner"]
    per_layer = [(inner, d)] * 4 + [(f, d), (f, d), (d, f)]  # q, k, v, o; gated-GELU wi_0, wi_1, wo
    linear = shape["layers"] * sum(o * i for o, i in per_layer)
    rows = shape["layers"] * sum(o for o, _ in per_layer)
    other = shape["vocab"] * d + (2 * shape["layers"] + 1) * d + 32 * shape.get("heads", shape["inner"] // 64)  # + position buckets
    if dtype not in _DTYPES:
        raise ValueError(f"t5_dtype: unknown {shown(dtype)}; choose {', '.join(_DTYPES)}")
    size = _DTYPES[dtype].itemsize
    if fmt != "none":
        return linear + 4 * rows + size * other
    # in fp16 the feed-forward's output projection (`wo`) stays float32, as Hugging Face's T5 keeps it (overflow)
    wo_fp32 = (4 - size) * shape["layers"] * d * f if dtype == "fp16" else 0
    return size * (linear + other) + wo_fp32


def t5_activation_bytes(prompts: int, tokens: int = 512, shape: dict = T5_XL) -> int:
    """The peak of T5's live tensors encoding `prompts` prompts padded to `tokens`, in float32 (an upper bound for
    bf16/fp16, whose softmax runs in float32): per prompt one layer's hidden states, its gated feed-forward, q/k/v and
    its attention scores with their softmax; the relative position bias is one (heads, tokens, tokens) for the batch.
    Within 1.0-1.6x of measured encodes of several shapes (tests/test_job_memory.py)."""
    heads = shape.get("heads", shape["inner"] // 64)
    per_token = 4 * shape["d_model"] + 3 * shape["d_ff"] + 2 * shape["inner"] + 2 * heads * tokens
    return 4 * tokens * (prompts * per_token + heads * tokens)


@functools.lru_cache(maxsize=64)
def block_bytes(cfg: InfinityConfig, fmt: str, block_dtype: torch.dtype) -> int:
    """One transformer block's weights in `fmt` (what block swap moves per block), counted on the meta device."""
    from .model.transformer import Infinity

    with torch.device("meta"):
        model = Infinity(cfg)
    quantize_model(model, check_format(fmt))
    model.set_block_dtype(block_dtype)
    return sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())


def _model(model: str | InfinityConfig) -> tuple[str, InfinityConfig]:
    if isinstance(model, InfinityConfig):
        return "custom", model
    if model not in KNOWN_MODELS:
        raise ValueError(f"model: unknown model {model!r}; choose one of {', '.join(KNOWN_MODELS)}")
    return model, KNOWN_MODELS[model]


def t5_shape(config: dict) -> dict:
    """A T5 encoder's shape from its Hugging Face config.json (so a planner can size any T5 folder, not only XL)."""
    try:
        heads, d_kv = int(config["num_heads"]), int(config["d_kv"])
        return dict(d_model=int(config["d_model"]), d_ff=int(config["d_ff"]), layers=int(config["num_layers"]),
                    inner=heads * d_kv, heads=heads, vocab=int(config["vocab_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"T5 config.json: missing or bad field {e}") from None


def plan_job(model: str | InfinityConfig, width: int, height: int, batch: int = 1,
             options: JobOptions = JobOptions(), cfg_on: bool = True, prompts: int = 1,
             cache: CacheConfig | None = None, t5: dict = T5_XL, vae_params: int | None = None,
             vae_shape: tuple[int, int] | None = None) -> JobPlan:
    """Each phase's predicted device memory for one job (T5 encode of `prompts` prompts, sampling, decode).

    `cache` replaces the options' policy/budget/kv_dtype with a full cache setting (budget files, windows);
    `t5`, `vae_params` and `vae_shape` (the decoder's base width and patch size) size other encoders and VAEs than
    the released ones (the embedded model's, say), as the sampler's own plan does.
    """
    from .model.block_swap import check_block_swap  # (block_swap reads SWAP_BUFFERS from here)
    from .model.vae import check_decode_tiling

    name, cfg = _model(model)
    fmt = check_format(options.weights)
    if options.dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown {options.dtype!r}; choose {', '.join(_DTYPES)}")
    check_block_swap(options.block_swap, cfg.depth)  # the checks generate applies, so a plan is never of a
    if options.decode_tile is not None:  # setting that would be refused
        check_decode_tiling(options.decode_tile)
    LIMITS["batch"].check(batch, "batch")
    dtype = _DTYPES[options.dtype]
    schedule: Schedule = schedule_for_pixels(width, height)
    h, w = schedule.pixel_size
    base_ch, patch = vae_shape if vae_shape is not None else (VAE_BASE_CH, VAE_PATCH.get(cfg.d_vae, 16))
    memory = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, batch,
                         cache or options.cache_config(), dtype, cfg=cfg_on, vae_base_ch=base_ch,
                         vae_patch=patch)
    transformer = weight_bytes(cfg, fmt, dtype)
    if options.block_swap:
        transformer -= (options.block_swap - SWAP_BUFFERS) * block_bytes(cfg, fmt, dtype)
    # cfg's unconditional rows are the model's learned prefix, not T5's work: T5 encodes the prompts alone (a
    # negative prompt in a call of its own, never larger)
    t5_act = t5_activation_bytes(prompts, shape=t5) if options.t5_on_device else 0
    t5 = t5_bytes(options.t5_weights, t5, options.t5_dtype) if options.t5_on_device else 0
    vae = 4 * (vae_params if vae_params is not None else VAE_PARAMS.get(cfg.d_vae, VAE_PARAMS[32]))
    sampling_extra = memory.sampling_peak_mb * MiB + dequant_workspace_bytes(cfg, fmt, dtype)
    if options.previews:
        sampling_extra += preview_peak_bytes(h, w, base_ch, patch)
    decode_extra = decode_peak_bytes(batch, h, w, base_ch, patch, options.decode_tile)
    resident_t5 = 0 if options.t5_offload else t5
    encode = t5 + t5_act + (0 if options.t5_offload else transformer + vae)
    sampling = transformer + vae + resident_t5 + sampling_extra
    # a swapped transformer goes back to host memory when sampling ends: the decode holds no transformer weights
    decode = (0 if options.block_swap else transformer) + vae + resident_t5 + decode_extra
    return JobPlan(options=options, model=name, resolution=(w, h), batch=batch, transformer_mb=transformer / MiB,
                   t5_mb=t5 / MiB, vae_mb=vae / MiB, encode_mb=encode / MiB, sampling_mb=sampling / MiB,
                   decode_mb=decode / MiB, sampling_extra_mb=sampling_extra / MiB, decode_extra_mb=decode_extra / MiB,
                   kv_stored_mb=memory.analytic_mb, cache=cache or options.cache_config(),
                   parts={"t5_activations_mb": t5_act / MiB, "cache_peak_mb": memory.cache_peak_mb,
                          "activations_peak_mb": memory.activations_peak_mb})


def check_options_on(options: JobOptions, device: torch.device | str | None,
                     fields: dict[str, str] | None = None) -> None:
    """A DeviceDtypeError when the job's weights, T5 weights or KV storage cannot live on `device` (fp8 on MPS),
    naming the setting (`fields` renames them: the CLI's flags); None plans for any device, as before."""
    if device is None:
        return
    names = {"weights": "weights", "t5_weights": "t5_weights", "kv_dtype": "kv_dtype", "dtype": "dtype",
             **(fields or {})}
    check_dtype(device, _DTYPES[options.dtype], names["dtype"], options.dtype, "choose fp32 or fp16")
    check_format_on(options.weights, device, names["weights"])
    check_format_on(options.t5_weights, device, names["t5_weights"])
    check_kv_dtype_on(options.kv_dtype, device, names["kv_dtype"])


def eight_bit_weights(device: torch.device | str | None) -> str:
    """The 1-byte weight format the ladder offers: fp8 (as issue 20 asked), int8 where the device cannot hold fp8
    (MPS): the same bytes, and the closer to bf16 (docs/quantization.md)."""
    if device is not None and format_problem("fp8_e4m3fn", device) is not None:
        return "int8"
    return "fp8_e4m3fn"


def ladder(options: JobOptions, depth: int, block_swap: bool = BLOCK_SWAP_READY,
           device: torch.device | str | None = None) -> list[tuple[str, JobOptions]]:
    """The settings to try, each adding one change to the last, cheapest in quality first; with a `device`, only
    settings it can hold (int8 weights instead of fp8 on MPS)."""
    steps: list[tuple[str, JobOptions]] = [("as asked", options)]

    def add(label: str, **change) -> None:
        steps.append((label, dataclasses.replace(steps[-1][1], **change)))

    if not options.t5_offload:
        add("offload T5", t5_offload=True)
    if not options.decode_tile:
        add(f"tiled decode ({LADDER_DECODE_TILE})", decode_tile=LADDER_DECODE_TILE)
    if options.policy == "full":
        add("ScaleKV 10%", policy="scalekv", budget="10%")
    if options.kv_dtype == "auto":
        add("KV stored in bf16", kv_dtype="bf16")
    if options.weights == "none":  # int8 weights take the bytes fp8 would, with less error (docs/quantization.md)
        eight = eight_bit_weights(device)
        add(f"{eight.split('_')[0]} weights", weights=eight)
    base = steps[-1][1]
    # n blocks off the device save n - 2 blocks (the two slots): every n from 3, so the fewest that fit is named
    swaps = range(SWAP_BUFFERS + 1, depth - SWAP_BUFFERS + 1) if block_swap else range(0)
    steps += [(f"block swap {n}", dataclasses.replace(base, block_swap=n)) for n in swaps if n > base.block_swap]
    if options.weights != "int4":
        four = dataclasses.replace(base, weights="int4", block_swap=0)
        steps.append(("4-bit weights", four))
        steps += [(f"4-bit weights, block swap {n}", dataclasses.replace(four, block_swap=n)) for n in swaps]
    return steps


def cheapest_fit(model: str | InfinityConfig, width: int, height: int, vram_gib: float, batch: int = 1,
                 options: JobOptions = JobOptions(), cfg_on: bool = True,
                 device: torch.device | str | None = None) -> dict:
    """Does the job fit `vram_gib`? If not, the first setting of the ladder that does (or none), with every try;
    with a `device` (the kind the job runs on), only settings it can hold are asked or tried."""
    _, cfg = _model(model)
    vram_gib = LIMITS["vram_gib"].check(vram_gib, "vram_gib")
    check_options_on(options, device)
    tried = []
    found = None
    for label, opts in ladder(options, cfg.depth, device=device):
        plan = plan_job(model, width, height, batch, opts, cfg_on)
        tried.append({"step": label, "setting": opts.describe(), "peak_gib": round(plan.peak_mb / 1024, 3),
                      "fits": plan.fits(vram_gib)})
        if plan.fits(vram_gib):
            found = (label, plan)
            break
    asked = plan_job(model, width, height, batch, options, cfg_on)
    return {"vram_gib": vram_gib, "asked": asked.to_dict(), "fits_as_asked": asked.fits(vram_gib),
            "cheapest": None if found is None else {"step": found[0], **found[1].to_dict()}, "tried": tried}


def smallest_swap(model: str | InfinityConfig, width: int, height: int, vram_gib: float, options: JobOptions,
                  batch: int = 1) -> int | None:
    """The fewest blocks to swap for the job to fit `vram_gib` with these options (None: no number fits)."""
    _, cfg = _model(model)
    for n in [0, *range(SWAP_BUFFERS + 1, cfg.depth - SWAP_BUFFERS + 1)]:  # 1 or 2 blocks save nothing
        if plan_job(model, width, height, batch, dataclasses.replace(options, block_swap=n)).fits(vram_gib):
            return n
    return None


#: Issue 20's targets for 1024x1024, batch 1 (GiB), by model and weight format: the table adds block swap to reach
#: a target the other options miss.
TARGETS = {("2b", "none"): 5.0, ("2b", "fp8_e4m3fn"): 3.5, ("8b", "fp8_e4m3fn"): 11.0, ("8b", "int4"): 7.0}


def table(models: Sequence[str] = ("2b", "8b"), width: int = 1024, height: int = 1024) -> list[dict]:
    """The planner's figures for the issue's settings, for docs/benchmarks.md."""
    low = dict(t5_offload=True, decode_tile=LADDER_DECODE_TILE, policy="scalekv", budget="10%", kv_dtype="bf16")
    rows = []
    for model in models:
        low_vram = ", T5 offloaded, tiled decode, ScaleKV 10%, KV bf16"
        settings = [("bf16, as released", JobOptions()), ("bf16" + low_vram, JobOptions(**low)),
                    ("fp8" + low_vram, JobOptions(weights="fp8_e4m3fn", **low)),
                    ("int8" + low_vram, JobOptions(weights="int8", **low)),
                    ("4-bit" + low_vram, JobOptions(weights="int4", **low))]
        for label, opts in list(settings[1:]):
            target = TARGETS.get((model, opts.weights))
            if target is not None and not plan_job(model, width, height, 1, opts).fits(target):
                n = smallest_swap(model, width, height, target, opts)
                if n is not None:
                    settings.append((f"{label}, block swap {n} (fits {target:g} GiB)",
                                     dataclasses.replace(opts, block_swap=n)))
        for label, opts in settings:
            plan = plan_job(model, width, height, 1, opts)
            rows.append({"model": model, "setting": label, **{k: round(v / 1024, 2) for k, v in (
                ("transformer_gib", plan.transformer_mb), ("t5_gib", plan.t5_mb), ("encode_gib", plan.encode_mb),
                ("sampling_gib", plan.sampling_mb), ("decode_gib", plan.decode_mb), ("peak_gib", plan.peak_mb))}})
    return rows
