"""HTTP route for the budget widget: `POST /scalekv/plan` answers with the engine's cache plan, per scale.

The widget (web/js/scalekv_budget.js) sends the cache-config node's widget values plus what it found in the graph
(the sampler's resolution, batch and cfg, the loader's transformer file and precision) and draws what comes back.
Every number is computed here by `scalekv_core` (CacheConfig.build, parse_budget, plan_memory), never in JS.
A body with "report" (the sampler's "scalekv_memory" UI output) instead returns the same rows for the run that
produced it, with the measured figures beside the planned ones.

Imported only inside ComfyUI (nodes/__init__.py registers the route on PromptServer.instance.routes).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

import comfy.model_management as mm

from ..scalekv_core.checkpoint import CheckpointError, file_version, tensor_shapes
from ..scalekv_core.devices import DeviceDtypeError
from ..scalekv_core.kvcache.budget import PRESETS
from ..scalekv_core.kvcache import CacheConfig
from ..scalekv_core.kvcache.budget import kv_bytes_per_token
from ..scalekv_core.job_memory import T5_XL, VAE_PARAMS, JobOptions, eight_bit_weights, plan_job, t5_shape
from ..scalekv_core.kvcache.memory import MiB, plan_memory
from ..scalekv_core.loader import (PRECISION_NAMES, PRECISIONS, declared_format, format_to_load, native_resolution,
                                   transformer_config_of, vae_config_of)
from ..scalekv_core.model.config import KNOWN_MODELS, InfinityConfig
from ..scalekv_core.model.text_encoder import TEXT_MAXLEN, single_file_t5_config
from ..scalekv_core.model.vae import ENCODER_PREFIX
from ..scalekv_core.limits import brief, shown
from ..scalekv_core.safe_files import read_text
from ..scalekv_core.schedules import get_schedule, resolution_choices, resolution_label
from . import models, paths
from .cache import (AUTO_RESOLUTION, DEFAULT_RESOLUTION, budget_file_for, budget_settings_problem, budget_spec,
                    calibration_file_name, schedule_for, set_aside)
from .plan_schema import PlanSettings, ReportBody, ValidationError, describe

PLAN_ROUTE = "/scalekv/plan"
DEFAULT_MODEL = "2b"
#: The cache-config node's widgets and their defaults (what a request leaves out).
CONFIG_DEFAULTS = {name: field.default for name, field in PlanSettings.model_fields.items()}
#: Widgets checked by the node's own budget_settings_problem, so the route and the node say the same words.
NODE_CHECKED = ("policy", "budget_unit", "budget", "window", "kernel", "budget_source", "refiner_decay")
#: Largest request body read: a report of 13 scales x 40 layers is about 30 KB.
MAX_BODY_BYTES = 1 << 20
#: Largest T5 config.json read (flan-t5-xl's is 1.5 KB).
MAX_T5_CONFIG_BYTES = 1 << 20
log = logging.getLogger(__name__)
T = TypeVar("T")


class PlanInputError(ValueError):
    """A request the planner cannot answer; its message is the HTTP 400 body's "error"."""


# ------------------------------------------------------------------------------------------- model shapes


#: Header reads by (what, the file's or folder's version), a broken file's answer included: the widget asks on every
#: change, and neither a shard folder's headers nor a broken file need reading again until a file changes. An OSError
#: (permissions, a file held by a download) is not kept: it can pass without the file changing. Cleared past
#: MAX_CACHED entries.
_header_cache: dict[tuple, object] = {}
MAX_CACHED = 256
_UNREAD = object()


def _read_once(what: str, path: Path, read: Callable[[Path], T]) -> T:
    """`read(path)` once per version of the file (checkpoint.file_version); what it finds wrong in the contents
    (ValueError, KeyError, TypeError) is kept and raised again, as the route's 400 naming `what`."""
    try:
        key = (what, file_version(path))
    except (OSError, ValueError) as e:
        raise PlanInputError(f"{what}: {brief(str(e))}") from None
    found = _header_cache.get(key, _UNREAD)
    if found is _UNREAD:  # (None is an answer: an ordinary checkpoint declares no format)
        try:
            found = read(path)
        except PlanInputError as e:
            found = e
        except OSError as e:  # not the file's contents: asked again next time
            raise PlanInputError(f"{what}: {brief(str(e))}") from None
        except (ValueError, KeyError, TypeError) as e:  # CheckpointError and JSONDecodeError: ValueErrors
            found = PlanInputError(f"{what}: {brief(str(e))}")
        if len(_header_cache) >= MAX_CACHED:
            _header_cache.clear()
        _header_cache[key] = found  # the local `found` is answered: another request may clear the cache meanwhile
    if isinstance(found, PlanInputError):
        raise PlanInputError(str(found))
    return found  # type: ignore[return-value]


def _transformer_path(name: str) -> Path:
    """The loader's transformer file, or the route's 400 naming it (shape and format reads share the lookup)."""
    try:
        return Path(paths.resolve_transformer(name))
    except (FileNotFoundError, ValueError) as e:
        raise PlanInputError(f"transformer: {brief(str(e))}") from None


def transformer_config(name: str) -> InfinityConfig:
    """The architecture of a models/infinity transformer, read from its header."""
    return _read_once("transformer", _transformer_path(name), transformer_config_of)


def transformer_format(name: str) -> tuple[str, int] | None:
    """(format, group size) a pre-quantized transformer file declares in its metadata (`convert --weights`), None
    for an ordinary checkpoint; read from its header alone, as the loader recognises it.
    A shard folder is never pre-quantized (convert writes one .safetensors file)."""
    # CheckpointError (a ValueError): an unknown format, version or group size
    return _read_once("transformer format", _transformer_path(name), declared_format)


def job_weights(s: PlanSettings) -> str:
    """The transformer weight format the loader will hold: a pre-quantized file's own format (the loader loads it
    as it is, with weight_format none or that format), else weight_format. A different quantized weight_format is
    the loader's error, so it is the route's too."""
    found = transformer_format(s.transformer) if s.transformer else None
    try:  # the job planner sizes every format with the default group size
        return format_to_load(None if found is None else found[0], s.weight_format,
                              f"the transformer {shown(s.transformer)}", "weight_format")
    except CheckpointError as e:
        raise PlanInputError(f"weight_format: {e}") from None


def native_for(transformer: str | None) -> tuple[str, bool] | None:
    """The loader's transformer's own resolution (the sampler's "auto"); None without a loader or a readable file."""
    if not transformer:
        return None
    try:  # read once per version of the file, as the shapes are (its header can be 100 MB)
        return _read_once("transformer resolution", _transformer_path(transformer), native_resolution)
    except PlanInputError:  # an unknown or broken file is reported by model_config, naming it
        return None


def model_config(s: PlanSettings) -> tuple[InfinityConfig, dict]:
    """The model shape to plan for: the loader's transformer file if given, else a known name (2b, 8b, ...)."""
    if s.transformer:
        cfg = transformer_config(s.transformer)
        return cfg, {"name": models.architecture_name(cfg, s.transformer), "source": s.transformer}
    name = s.model or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise PlanInputError(f"model: unknown model {shown(name)}; choose one of {', '.join(KNOWN_MODELS)} "
                             f"(or give the loader's transformer file)")
    return KNOWN_MODELS[name], {"name": f"infinity-{name}", "source": "default" if s.model is None else name}


def _t5_shape(folder: Path) -> dict:
    if folder.is_file():  # a single-file T5 encoder: its shape is in its tensors (header only), as the loader reads it
        return t5_shape(single_file_t5_config(folder).to_dict())
    return t5_shape(json.loads(read_text(folder / "config.json", MAX_T5_CONFIG_BYTES, "T5 config.json",
                                          PlanInputError)))


def t5_config(name: str | None) -> dict:
    """The loader's T5 folder's shape (its config.json), or flan-t5-xl's when no loader is connected."""
    if not name:
        return T5_XL
    try:
        folder = Path(paths.resolve_text_encoder(name))
    except (OSError, ValueError) as e:
        raise PlanInputError(f"text_encoder: {brief(str(e))}") from None
    # a folder's mtime changes when its config.json is replaced (an editor writes a new file)
    return _read_once("text_encoder", folder, _t5_shape)


def _vae_shape(path: Path) -> tuple[int, tuple[int, int]]:
    shapes = tensor_shapes(path)
    cfg = vae_config_of(shapes, str(path))  # a file that is no VAE is the route's 400, as it is the loader's error
    held = [shape for key, shape in shapes.items() if not key.startswith(ENCODER_PREFIX)]  # loaded decode-only
    return sum(math.prod(shape) for shape in held), (cfg.base_ch, cfg.patch_size)


def vae_size(name: str | None, d_vae: int) -> tuple[int, tuple[int, int] | None]:
    """The loader's VAE's parameter count and (decoder base width, patch size), read from its header, as the
    sampler plans with the loaded VAE; the released VAE's for the model's bits (None: plan_job's) without one."""
    if not name:
        return VAE_PARAMS.get(d_vae, VAE_PARAMS[32]), None
    try:
        path = Path(paths.resolve_vae(name))
    except (OSError, ValueError) as e:
        raise PlanInputError(f"vae: {brief(str(e))}") from None
    return _read_once("vae", path, _vae_shape)


def compact_weights(device: torch.device) -> str:
    """The weight formats the panel suggests when a job does not fit, as the planner's ladder offers them."""
    return f"{eight_bit_weights(device).split('_')[0]} or int4"


def job_for_settings(s: PlanSettings, cfg: InfinityConfig, block_dtype: torch.dtype, schedule, batch: int,
                     cfg_on: bool, config: CacheConfig) -> dict:
    """The whole job (T5 encode, sampling, decode, weights included) against the compute device's memory.

    ComfyUI's memory manager moves T5 off the device when the sampler needs the room, so T5 is planned offloaded;
    the sampler decodes a preview per scale, so that is planned too. A pre-quantized transformer file is planned in
    its own format (the loader's weight_format is "none" for it).
    """
    options = JobOptions(weights=job_weights(s), dtype=PRECISION_NAMES[block_dtype], t5_offload=True,
                         t5_weights=s.t5_weights, t5_dtype=models.t5_dtype_name(mm.text_encoder_device(), s.precision),
                         t5_on_device=torch.device(mm.text_encoder_device()) == torch.device(mm.get_torch_device()),
                         decode_tile=s.decode_tile or None, block_swap=s.block_swap, previews=True)
    h, w = schedule.pixel_size
    try:
        vae_params, vae_shape = vae_size(s.vae, cfg.d_vae)
        plan = plan_job(cfg, w, h, batch, options, cfg_on, cache=config, t5=t5_config(s.text_encoder),
                        vae_params=vae_params, vae_shape=vae_shape)
    except ValueError as e:
        raise PlanInputError(brief(str(e))) from None
    device = mm.get_torch_device()
    total_mb = models.device_total_bytes(device) / MiB
    # what ComfyUI keeps free on a GPU whatever loads (400 MB, 600 on Windows): the job must fit beside it
    reserve_mb = 0.0 if mm.is_device_cpu(device) else mm.extra_reserved_memory() / MiB
    fits = plan.peak_mb <= total_mb - reserve_mb
    phase = max(("T5 encode", plan.encode_mb), ("sampling", plan.sampling_mb), ("decode", plan.decode_mb),
                key=lambda p: p[1])[0]
    kept = f", {reserve_mb / 1024:.1f} GiB of it kept free by ComfyUI" if reserve_mb else ""
    available_mb = available_memory_mb(device) - reserve_mb
    verdict = "fits" if fits else f"does not fit: try {compact_weights(device)} weights, a tiled decode or block swap"
    # the admission check, at run time, counts what is free then; not said on the CPU, where unloading frees no RAM
    # and our own weights wait there unlisted before the first run
    if fits and plan.peak_mb > available_mb and not mm.is_device_cpu(device):
        verdict += (f" the card, but only {max(available_mb, 0) / 1024:.1f} GiB is available now: other programs "
                    f"hold the rest, and the sampler will refuse the run until they let it go")
    line = (f"whole job {plan.peak_mb / 1024:.2f} GiB ({phase}) of {total_mb / 1024:.1f} GiB on {device}{kept}: "
            f"{verdict}")
    return {"encode_mb": plan.encode_mb, "sampling_mb": plan.sampling_mb, "decode_mb": plan.decode_mb,
            "peak_mb": plan.peak_mb, "transformer_mb": plan.transformer_mb, "t5_mb": plan.t5_mb,
            "vae_mb": plan.vae_mb, "sampling_extra_mb": plan.sampling_extra_mb,
            "decode_extra_mb": plan.decode_extra_mb,
            "device": str(device), "device_mb": total_mb, "reserved_mb": reserve_mb, "available_mb": available_mb,
            "setting": plan.setting,
            "fits": fits, "line": line}


def available_memory_mb(device: torch.device) -> float:
    """What a run could have on `device` now: its free memory plus what ComfyUI's loaded models hold there (it
    unloads them for the sampler; on the CPU this counts our own weights, which the job includes)."""
    held = sum(lm.model_loaded_memory() for lm in list(getattr(mm, "current_loaded_models", []))
               if getattr(lm, "model", None) is not None and torch.device(lm.device) == torch.device(device))
    return (models.device_free(device)[0] + held) / MiB




def block_dtype_for(precision: str) -> torch.dtype:
    """The loader's precision as it resolves on this server's device (loader.resolve_precision's rule); one the
    device cannot hold (bf16 on a Mac before macOS 14) is the request's error, as the loader's validation says."""
    if precision not in models.PRECISION_CHOICES:
        raise PlanInputError(f"precision: unknown precision {shown(precision)}; choose one of "
                             f"{', '.join(models.PRECISION_CHOICES)}")
    try:
        return PRECISIONS[models.precision_name(precision, mm.get_torch_device())]
    except DeviceDtypeError as e:
        raise PlanInputError(str(e)) from None


# ------------------------------------------------------------------------------------------- rows


def last_scale_row(schedule) -> dict:
    """The last scale, which is never stored: its keys and values are used once and not cached."""
    h, w = schedule.grids[-1]
    return {"scale": schedule.num_scales - 1, "grid": [h, w], "new_tokens": h * w}


def calibration_file(s: PlanSettings) -> tuple[str | None, str | None]:
    """(name, note) of the budget file a linked ScaleKV Calibrate writes; name is None until it is in models/scalekv."""
    link = s.calibration
    if link is None:
        return None, None
    try:
        native = native_for(link.transformer) if link.resolution == AUTO_RESOLUTION else None
        name = calibration_file_name(link.filename_prefix, schedule_for(link.resolution, native), link.budget)
    except ValueError as e:
        return None, (f"budget_file is linked to ScaleKV Calibrate, whose file name is unusable ({brief(str(e))}); "
                      "this is budget_source's plan")
    if s.policy != "scalekv":  # the node sets it aside, as the run will
        return None, set_aside(s.policy, s.budget_source, name)[2]
    try:
        paths.resolve_budget_file(name)
    except (FileNotFoundError, ValueError):
        return None, (f"budget_file is linked to ScaleKV Calibrate: {name} is not in models/scalekv yet (run the "
                      "calibration); until then this is budget_source's plan")
    return name, f"budget_file: {name}, written by the linked ScaleKV Calibrate"


def scale_rows(grids: Sequence[tuple[int, int]], kept: Sequence[Sequence[int]], drafters: Sequence[Sequence[int]],
               token_bytes: int, buffer_mb: Sequence[float] | None = None) -> list[dict]:
    """One row per stored scale: full-cache tokens, drafter and refiner capacities, and their bytes."""
    rows = []
    full = 0
    for si, row in enumerate(kept):
        h, w = grids[si]
        full += h * w
        layers = len(row)
        ds = sorted({int(d) for d in drafters[si]}) if si < len(drafters) else []
        rs = [layer for layer in range(layers) if layer not in ds]
        d_tok, r_tok = [row[i] for i in ds], [row[i] for i in rs]
        rows.append({
            "scale": si, "grid": [h, w], "new_tokens": h * w, "full_tokens": full, "layers": layers,
            "drafters": len(ds), "drafter_layers": ds, "refiners": len(rs),
            "drafter_tokens": max(d_tok) if d_tok else None,
            "refiner_tokens": max(r_tok) if r_tok else None, "refiner_tokens_min": min(r_tok) if r_tok else None,
            "stored_tokens": sum(row),
            "drafter_mb": sum(d_tok) * token_bytes / MiB, "refiner_mb": sum(r_tok) * token_bytes / MiB,
            "stored_mb": sum(row) * token_bytes / MiB, "full_mb": full * layers * token_bytes / MiB,
            "buffer_mb": buffer_mb[si] if buffer_mb is not None else None,
        })
    return rows


def plan_for_settings(body: Mapping[str, Any]) -> dict:
    """The cache plan for the cache-config widgets plus the resolution, batch, cfg and model the widget found."""
    # the cache-config widgets first, through the node's own check: the widget shows the node's words
    problem = budget_settings_problem(**{k: body.get(k, CONFIG_DEFAULTS[k]) for k in NODE_CHECKED})
    if problem is not None:
        raise PlanInputError(problem)
    try:
        s = PlanSettings.model_validate(body)
    except ValidationError as e:
        raise PlanInputError(describe(e)) from None
    budget_source, budget_file_name, aside = set_aside(s.policy, s.budget_source, s.budget_file)
    s = s.model_copy(update={"budget_source": budget_source, "budget_file": budget_file_name})
    resolution = s.resolution if s.resolution is not None else DEFAULT_RESOLUTION
    try:
        schedule = schedule_for(resolution, native_for(s.transformer) if resolution == AUTO_RESOLUTION else None)
    except ValueError as e:
        raise PlanInputError(f"resolution: {e}") from None
    batch = s.batch
    cfg_on = s.cfg != 1
    cfg, model = model_config(s)
    block_dtype = block_dtype_for(s.precision)
    linked_file, link_note = calibration_file(s)
    try:
        budget_file = budget_file_for(s.budget_source, s.budget_file or linked_file)
    except (ValueError, FileNotFoundError) as e:
        raise PlanInputError(f"{'budget_file' if s.budget_file else 'budget_source'}: {brief(str(e))}") from None
    try:
        config = CacheConfig(policy=s.policy, budget=budget_spec(s.budget_unit, s.budget), window=s.window,
                             kernel=s.kernel, pooling=s.pooling, scoring=s.scoring, kv_dtype=s.kv_dtype,
                             budget_file=budget_file, refiner_decay=s.refiner_decay)
        config.validate()
        rows = batch * (2 if cfg_on else 1)
        _, plan = config.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, rows, block_dtype)
        # prompts up to T5's 512 tokens, as the sampler's admission check plans (a shorter prompt needs less)
        memory = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, batch,
                             config, block_dtype, text_tokens=TEXT_MAXLEN, cfg=cfg_on)
        budget_tokens = (None if config.policy == "full" else
                         config.budget_tokens(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, rows, block_dtype))
    except (ValueError, FileNotFoundError) as e:  # BudgetError is a ValueError
        raise PlanInputError(brief(str(e))) from None
    job = job_for_settings(s, cfg, block_dtype, schedule, batch, cfg_on, config)
    k_dtype, v_dtype = config.storage_dtypes(block_dtype)
    tb = kv_bytes_per_token(cfg.num_heads, cfg.head_dim, k_dtype.itemsize, v_dtype.itemsize, rows)
    model.update(depth=cfg.depth, width=cfg.embed_dim, heads=cfg.num_heads, block_dtype=_dtype_name(block_dtype))
    return {
        "mode": "plan", "model": model, "resolution": resolution_label(schedule), "num_scales": schedule.num_scales,
        "batch": batch, "batch_rows": rows, "policy": config.policy,
        "budget": budget_spec(s.budget_unit, s.budget),
        "budget_tokens": budget_tokens, "budget_source": plan.source, "token_bytes": tb,
        "scales": scale_rows(schedule.grids, plan.kept, plan.drafters, tb, memory.per_scale_cache_mb),
        "last_scale": last_scale_row(schedule), "text_tokens": TEXT_MAXLEN,
        "budget_file": linked_file,
        "budget_file_note": " ".join(n for n in (aside, link_note, *plan.notes) if n) or None,
        "totals": {"stored_peak_mb": memory.analytic_mb, "full_mb": memory.full_analytic_mb,
                   "stored_ratio": memory.analytic_mb / memory.full_analytic_mb if memory.full_analytic_mb else 1.0,
                   # beside the weights, as the sampler admits a run: previews and dequantized weights included,
                   # the decode sized from the loader's VAE and the sampler's decode tile
                   "cache_peak_mb": memory.cache_peak_mb, "planned_peak_mb": job["sampling_extra_mb"],
                   "decode_peak_mb": job["decode_extra_mb"]},
        "job": job,
        "measured": None,
        "choices": {"models": [m for m in KNOWN_MODELS if m in ("2b", "8b")], "resolutions": resolution_choices()},
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _report_budget_file(value: str | None) -> str | None:
    """A report's budget file, resolved as the config node resolves names: a preset, or a file in models/scalekv."""
    if not value or value in PRESETS:
        return value or None
    try:
        return paths.budget_file_from_report(value)
    except (FileNotFoundError, ValueError) as e:
        raise PlanInputError(f"report.policy.budget_file: {brief(str(e))}") from None


def plan_for_report(body: Mapping[str, Any]) -> dict:
    """The rows of a finished run (its own planned tokens), with what the cache really held and stored."""
    try:
        report = ReportBody.model_validate(body).report
    except ValidationError as e:
        raise PlanInputError(describe(e)) from None
    model = report.model
    try:
        schedule = get_schedule(report.schedule.template, report.schedule.size)
    except ValueError as e:
        raise PlanInputError(f"report.schedule: {brief(str(e))}") from None
    if len(report.scales) != schedule.num_scales:
        raise PlanInputError(f"report.scales: {len(report.scales)} scales for a {schedule.num_scales}-scale schedule")
    if model.width % model.heads:
        raise PlanInputError(f"report.model: width {model.width} is not a multiple of heads {model.heads}")
    stored = report.scales[:-1]
    for si, sc in enumerate(stored):
        for name in ("planned_tokens", "held_tokens", "stored_bytes"):
            values = getattr(sc, name)
            if values is not None and len(values) not in (0, model.depth):
                raise PlanInputError(f"report.scales.{si}.{name}: {len(values)} layers for a model of depth "
                                     f"{model.depth}")
        if len(sc.planned_tokens) != model.depth:
            raise PlanInputError(f"report.scales.{si}.planned_tokens: {len(sc.planned_tokens)} layers for a model "
                                 f"of depth {model.depth}")
    kept = [list(sc.planned_tokens) for sc in stored]
    tb = report.bytes_per_token_layer
    policy = report.policy
    drafters: list[list[int]] = []
    note = None
    if policy is not None:
        try:  # the drafter layers are the plan's; the report keeps only the token counts
            config = CacheConfig(policy=policy.policy, budget=policy.budget, window=policy.window,
                                 kernel=policy.kernel, pooling=policy.pooling, scoring=policy.scoring,
                                 kv_dtype=policy.kv_dtype, budget_file=_report_budget_file(policy.budget_file),
                                 refiner_decay=policy.refiner_decay)
            _, plan = config.build(schedule, model.depth, model.heads, model.width // model.heads,
                                   report.batch_rows, getattr(torch, model.block_dtype))
            if [list(r) for r in plan.kept] == kept:
                drafters = plan.drafters
            else:
                note = "the plan rebuilt from the report's settings differs from the run's; drafters not shown"
        except (ValueError, FileNotFoundError) as e:  # PlanInputError is a ValueError too
            note = f"drafter layers unknown: {brief(str(e))}"
    else:
        note = "drafter layers unknown: the report has no policy"
    note = " ".join(n for n in (note, *report.notes) if n) or None  # the run's budget-file advice too
    rows = scale_rows(schedule.grids, kept, drafters, tb)
    for row, sc in zip(rows, stored):
        held, sb = list(sc.held_tokens or []), list(sc.stored_bytes or [])
        ds = set(row["drafter_layers"])
        d_held = [held[i] for i in range(len(held)) if i in ds]
        r_held = [held[i] for i in range(len(held)) if i not in ds]
        row["measured"] = {
            "drafter_tokens": max(d_held) if d_held else None, "refiner_tokens": max(r_held) if r_held else None,
            "stored_tokens": sum(held), "matches_plan": held == list(sc.planned_tokens),
            "stored_mb": sum(sb) / MiB, "drafter_mb": sum(sb[i] for i in range(len(sb)) if i in ds) / MiB,
            "refiner_mb": sum(sb[i] for i in range(len(sb)) if i not in ds) / MiB,
            "allocated_mb": sum(sc.allocated_bytes or []) / MiB,
        }
    full_mb = report.full_analytic_mb or 0.0
    analytic = report.analytic_mb or 0.0
    return {
        "mode": "report", "model": model.model_dump(), "resolution": resolution_label(schedule),
        "num_scales": schedule.num_scales, "batch": report.batch, "batch_rows": report.batch_rows,
        "policy": policy.policy if policy else "full", "budget": policy.budget if policy else None,
        "budget_tokens": None, "budget_source": (policy.budget_file if policy else None) or "",
        "token_bytes": tb, "scales": rows, "note": note, "last_scale": last_scale_row(schedule),
        # the planned peak as the cache-config widget shows it (prompts up to 512 tokens); an older report has only
        # the engine's figure for its own prompt (text_tokens None then)
        "text_tokens": TEXT_MAXLEN if report.planned_peak_max_prompt_mb is not None else None,
        "totals": {"stored_peak_mb": analytic, "full_mb": full_mb,
                   "stored_ratio": analytic / full_mb if full_mb else 1.0,
                   "planned_peak_mb": (report.planned_peak_max_prompt_mb if report.planned_peak_max_prompt_mb
                                       is not None else report.planned_peak_mb),
                   "prompt_peak_mb": report.planned_peak_mb},
        "measured": {"peak_mb": report.measured_peak_mb, "measurement": report.measurement,
                     "sampling_seconds": report.sampling_seconds,
                     "stored_peak_mb": max((r["measured"]["stored_mb"] for r in rows), default=0.0),
                     "matches_plan": all(r["measured"]["matches_plan"] for r in rows)},
    }


def plan_request(body: Any) -> dict:
    """The route's answer for a parsed JSON body; PlanInputError for anything the planner cannot use."""
    if not isinstance(body, dict):
        raise PlanInputError(f"expected a JSON object, got {type(body).__name__}")
    if "report" in body:
        return plan_for_report(body)
    return plan_for_settings(body)


def _answer(raw: bytes) -> tuple[int, dict]:
    """(status, JSON answer) for a raw body: parsing and planning together, off the event loop."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else brief(str(e), 200)
        return 400, {"error": f"the request body is not JSON: {what}"}
    try:
        return 200, plan_request(body)
    except PlanInputError as e:
        return 400, {"error": str(e)}
    except RecursionError:
        return 400, {"error": "the request body is nested too deeply"}


# ------------------------------------------------------------------------------------------- aiohttp


async def handle_plan(request) -> Any:
    """POST /scalekv/plan: 200 with the plan, or 400 {"error": message} for a body the planner cannot use."""
    from aiohttp import web

    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return web.json_response({"error": f"the request body is {request.content_length} bytes; at most "
                                           f"{MAX_BODY_BYTES}"}, status=413)
    chunks, size = [], 0
    while size <= MAX_BODY_BYTES:  # read() may return less than asked: read to the end or past the cap
        chunk = await request.content.read(MAX_BODY_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_BODY_BYTES:
        return web.json_response({"error": f"the request body is larger than {MAX_BODY_BYTES} bytes"}, status=413)
    raw = b"".join(chunks)
    try:
        # JSON parsing, header reads and the planner's meta-device buffers: off the event loop that serves the UI
        status, answer = await asyncio.to_thread(_answer, raw)
    except Exception as e:  # a bug, not the user's input: say so briefly, log the traceback
        log.exception("scalekv plan route failed")
        return web.json_response({"error": f"internal error in the planner: {type(e).__name__}"}, status=500)
    return web.json_response(answer, status=status)


def register(routes=None) -> bool:
    """Add the route to `routes` (default: the running PromptServer's); False when no server exists (tests)."""
    if routes is None:
        from server import PromptServer

        routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
        if routes is None:
            return False
    routes.post(PLAN_ROUTE)(handle_plan)
    return True
