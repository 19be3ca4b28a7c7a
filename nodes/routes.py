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
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import comfy.model_management as mm

from ..scalekv_core.checkpoint import load_state_dict
from ..scalekv_core.kvcache import CacheConfig
from ..scalekv_core.kvcache.budget import kv_bytes_per_token
from ..scalekv_core.kvcache.memory import MiB, plan_memory
from ..scalekv_core.loader import PRECISIONS
from ..scalekv_core.model.config import KNOWN_MODELS, InfinityConfig, detect_infinity_config
from ..scalekv_core.schedules import get_schedule, resolution_choices, resolution_label, schedule_from_label
from . import models, paths
from .cache import DEFAULT_RESOLUTION, budget_file_for, budget_settings_problem, budget_spec

PLAN_ROUTE = "/scalekv/plan"
DEFAULT_MODEL = "2b"
#: The cache-config node's widgets and their defaults (the route fills in what a request leaves out).
CONFIG_DEFAULTS: dict[str, Any] = dict(policy="scalekv", budget_unit="percent", budget=10.0, window=16, kernel=5,
                                       pooling="maxpool", scoring="improved", kv_dtype="auto",
                                       budget_source="generated", refiner_decay=0.0)
_NUMBERS = {"budget": float, "window": int, "kernel": int, "refiner_decay": float, "batch": int, "cfg": float}
MAX_BATCH = 64


class PlanInputError(ValueError):
    """A request the planner cannot answer; its message is the HTTP 400 body's "error"."""


# ------------------------------------------------------------------------------------------- request fields


def _number(body: Mapping[str, Any], key: str, default: Any) -> Any:
    value = body.get(key, default)
    kind = _NUMBERS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanInputError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise PlanInputError(f"{key}: expected a finite number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise PlanInputError(f"{key}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def _text(body: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise PlanInputError(f"{key}: expected a string, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- model shapes


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header alone (8-byte length + JSON), without reading the weights."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= path.stat().st_size - 8:
            raise PlanInputError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanInputError(f"{path}: unreadable safetensors header: {e}") from e
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if _is_safetensors(path):
        return _safetensors_shapes(path)
    # torch.save zip files are memory-mapped by the checkpoint reader: only the pickle's metadata is read
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}


def _strip_module(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if shapes and all(k.startswith("module.") for k in shapes):
        return {k[len("module."):]: v for k, v in shapes.items()}
    return shapes


_shape_cache: dict[tuple[str, float], InfinityConfig] = {}


def transformer_config(name: str) -> InfinityConfig:
    """The architecture of a models/infinity transformer, read from its header (cached per file and mtime)."""
    try:
        path = Path(paths.resolve_transformer(name))
    except (FileNotFoundError, ValueError) as e:
        raise PlanInputError(str(e)) from e
    key = (str(path), path.stat().st_mtime)
    if key not in _shape_cache:
        try:
            if path.is_dir():
                index = sorted(path.glob("*.index.json"))
                if not index:
                    raise PlanInputError(f"{path}: a shard folder needs a '*.index.json'")
                shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
                shapes: dict[str, tuple[int, ...]] = {}
                for shard in shards:
                    shapes.update(_file_shapes(path / shard))
            else:
                shapes = _file_shapes(path)
            _shape_cache[key] = detect_infinity_config(_strip_module(shapes), str(path))
        except PlanInputError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanInputError(f"{path}: cannot read the transformer's shape: {e}") from e
    return _shape_cache[key]


def model_config(body: Mapping[str, Any]) -> tuple[InfinityConfig, dict]:
    """The model shape to plan for: the loader's transformer file if given, else a known name (2b, 8b, ...)."""
    transformer = _text(body, "transformer", None)
    if transformer:
        cfg = transformer_config(transformer)
        return cfg, {"name": models.architecture_name(cfg), "source": transformer}
    name = _text(body, "model", DEFAULT_MODEL)
    if name not in KNOWN_MODELS:
        raise PlanInputError(f"model: unknown model {name!r}; choose one of {', '.join(KNOWN_MODELS)} "
                             f"(or give the loader's transformer file)")
    return KNOWN_MODELS[name], {"name": f"infinity-{name}", "source": "default" if "model" not in body else name}


def block_dtype_for(precision: str) -> torch.dtype:
    """The loader's precision as it resolves on this server's device (auto = bf16 on CUDA, fp32 on CPU)."""
    if precision not in models.PRECISION_CHOICES:
        raise PlanInputError(f"precision: unknown precision {precision!r}; choose one of "
                             f"{', '.join(models.PRECISION_CHOICES)}")
    return PRECISIONS[models.precision_name(precision, mm.get_torch_device())]


# ------------------------------------------------------------------------------------------- rows


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
    s = {k: (_number(body, k, d) if k in _NUMBERS else _text(body, k, d)) for k, d in CONFIG_DEFAULTS.items()}
    problem = budget_settings_problem(s["policy"], s["budget_unit"], s["budget"], s["window"], s["kernel"],
                                      s["budget_source"])
    if problem is not None:
        raise PlanInputError(problem)
    budget_file = _text(body, "budget_file", None)
    if budget_file and s["policy"] != "scalekv":
        raise PlanInputError(f"budget file '{budget_file}' only applies to the scalekv policy "
                             f"(policy is {s['policy']})")
    resolution = _text(body, "resolution", DEFAULT_RESOLUTION)
    try:
        schedule = schedule_from_label(resolution)
    except ValueError as e:
        raise PlanInputError(f"resolution: {e}") from e
    batch = _number(body, "batch", 1)
    if not 1 <= batch <= MAX_BATCH:
        raise PlanInputError(f"batch: expected 1 to {MAX_BATCH}, got {batch}")
    cfg_on = _number(body, "cfg", 3.0) != 1
    cfg, model = model_config(body)
    block_dtype = block_dtype_for(_text(body, "precision", "auto"))
    try:
        config = CacheConfig(policy=s["policy"], budget=budget_spec(s["budget_unit"], s["budget"]),
                             window=s["window"], kernel=s["kernel"], pooling=s["pooling"], scoring=s["scoring"],
                             kv_dtype=s["kv_dtype"], budget_file=budget_file_for(s["budget_source"], budget_file),
                             refiner_decay=s["refiner_decay"])
        config.validate()
        rows = batch * (2 if cfg_on else 1)
        _, plan = config.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, rows, block_dtype)
        memory = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule, batch,
                             config, block_dtype, cfg=cfg_on)
        budget_tokens = (None if config.policy == "full" else
                         config.budget_tokens(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, rows, block_dtype))
    except (ValueError, FileNotFoundError) as e:  # BudgetError is a ValueError
        raise PlanInputError(str(e)) from e
    k_dtype, v_dtype = config.storage_dtypes(block_dtype)
    tb = kv_bytes_per_token(cfg.num_heads, cfg.head_dim, k_dtype.itemsize, v_dtype.itemsize, rows)
    model.update(depth=cfg.depth, width=cfg.embed_dim, heads=cfg.num_heads, block_dtype=_dtype_name(block_dtype))
    return {
        "mode": "plan", "model": model, "resolution": resolution_label(schedule), "num_scales": schedule.num_scales,
        "batch": batch, "batch_rows": rows, "policy": config.policy,
        "budget": budget_spec(s["budget_unit"], s["budget"]),
        "budget_tokens": budget_tokens, "budget_source": plan.source, "token_bytes": tb,
        "scales": scale_rows(schedule.grids, plan.kept, plan.drafters, tb, memory.per_scale_cache_mb),
        "totals": {"stored_peak_mb": memory.analytic_mb, "full_mb": memory.full_analytic_mb,
                   "stored_ratio": memory.analytic_mb / memory.full_analytic_mb if memory.full_analytic_mb else 1.0,
                   "cache_peak_mb": memory.cache_peak_mb, "planned_peak_mb": memory.sampling_peak_mb,
                   "decode_peak_mb": memory.decode_peak_mb},
        "measured": None,
        "choices": {"models": [m for m in KNOWN_MODELS if m in ("2b", "8b")], "resolutions": resolution_choices()},
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _config_from_report(policy: Mapping[str, Any]) -> CacheConfig:
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    return CacheConfig(**{k: v for k, v in policy.items() if k in fields})


def plan_for_report(report: Mapping[str, Any]) -> dict:
    """The rows of a finished run (its own planned tokens), with what the cache really held and stored."""
    try:
        scales = report["scales"]
        schedule = get_schedule(report["schedule"]["template"], report["schedule"]["size"])
        tb = int(report["bytes_per_token_layer"])
        model = dict(report["model"])
        stored = scales[:-1]
        kept = [list(s["planned_tokens"]) for s in stored]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanInputError(f"report: not a ScaleKV memory report ({e!r} missing or malformed)") from e
    if len(scales) != schedule.num_scales:
        raise PlanInputError(f"report: {len(scales)} scales for a {schedule.num_scales}-scale schedule")
    config = _config_from_report(report.get("policy") or {})
    drafters: list[list[int]] = []
    note = None
    try:  # the drafter layers are the plan's; the report keeps only the token counts
        dtype = getattr(torch, str(model.get("block_dtype", "float32")))
        _, plan = config.build(schedule, int(model["depth"]), int(model["heads"]),
                               int(model["width"]) // int(model["heads"]), int(report["batch_rows"]), dtype)
        if [list(r) for r in plan.kept] == kept:
            drafters = plan.drafters
        else:
            note = "the plan rebuilt from the report's settings differs from the run's; drafters not shown"
    except (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError) as e:
        note = f"drafter layers unknown: {e}"
    rows = scale_rows(schedule.grids, kept, drafters, tb)
    for row, s in zip(rows, stored):
        held, sb = list(s.get("held_tokens") or []), list(s.get("stored_bytes") or [])
        ds = set(row["drafter_layers"])
        d_held = [held[i] for i in range(len(held)) if i in ds]
        r_held = [held[i] for i in range(len(held)) if i not in ds]
        row["measured"] = {
            "drafter_tokens": max(d_held) if d_held else None, "refiner_tokens": max(r_held) if r_held else None,
            "stored_tokens": sum(held), "matches_plan": held == list(s["planned_tokens"]),
            "stored_mb": sum(sb) / MiB, "drafter_mb": sum(sb[i] for i in range(len(sb)) if i in ds) / MiB,
            "refiner_mb": sum(sb[i] for i in range(len(sb)) if i not in ds) / MiB,
            "allocated_mb": sum(s.get("allocated_bytes") or []) / MiB,
        }
    full_mb = float(report.get("full_analytic_mb") or 0.0)
    analytic = float(report.get("analytic_mb") or 0.0)
    policy = report.get("policy") or {}
    return {
        "mode": "report", "model": model, "resolution": resolution_label(schedule), "num_scales": schedule.num_scales,
        "batch": report.get("batch"), "batch_rows": report.get("batch_rows"), "policy": config.policy,
        "budget": policy.get("budget"), "budget_tokens": None, "budget_source": policy.get("budget_file") or "",
        "token_bytes": tb, "scales": rows, "note": note,
        "totals": {"stored_peak_mb": analytic, "full_mb": full_mb,
                   "stored_ratio": analytic / full_mb if full_mb else 1.0,
                   "planned_peak_mb": report.get("planned_peak_mb")},
        "measured": {"peak_mb": report.get("measured_peak_mb"), "measurement": report.get("measurement", ""),
                     "sampling_seconds": report.get("sampling_seconds"),
                     "stored_peak_mb": max((r["measured"]["stored_mb"] for r in rows), default=0.0),
                     "matches_plan": all(r["measured"]["matches_plan"] for r in rows)},
    }


def plan_request(body: Any) -> dict:
    """The route's answer for a parsed JSON body; PlanInputError for anything the planner cannot use."""
    if not isinstance(body, dict):
        raise PlanInputError(f"expected a JSON object, got {type(body).__name__}")
    if "report" in body:
        if not isinstance(body["report"], dict):
            raise PlanInputError("report: expected the sampler's scalekv_memory object")
        return plan_for_report(body["report"])
    return plan_for_settings(body)


# ------------------------------------------------------------------------------------------- aiohttp


async def handle_plan(request) -> Any:
    """POST /scalekv/plan: 200 with the plan, or 400 {"error": message} for settings the node would refuse."""
    from aiohttp import web

    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return web.json_response({"error": f"the request body is not JSON: {e}"}, status=400)
    try:
        # header reads and the planner's meta-device buffers: off the event loop that serves the UI
        return web.json_response(await asyncio.to_thread(plan_request, body))
    except PlanInputError as e:
        return web.json_response({"error": str(e)}, status=400)


def register(routes=None) -> bool:
    """Add the route to `routes` (default: the running PromptServer's); False when no server exists (tests)."""
    if routes is None:
        from server import PromptServer

        routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
        if routes is None:
            return False
    routes.post(PLAN_ROUTE)(handle_plan)
    return True
