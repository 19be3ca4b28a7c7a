"""The planner route's request body, declared as pydantic models whose bounds come from the one table of limits.

`POST /scalekv/plan` takes either the cache-config widgets plus what the widget found in the graph (settings
mode) or a finished run's memory report (report mode). Every field is typed and bounded here, so a body the
planner cannot use is one 400 that names each bad field, before any work: no field can make the planner loop,
allocate or divide by zero. Messages never quote what was sent (pydantic's `input` is left out).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..scalekv_core.kvcache.config import KV_DTYPES, POLICIES
from ..scalekv_core.kvcache.policies.scalekv import SCORINGS
from ..scalekv_core.kvcache.scoring import POOLINGS
from ..scalekv_core.limits import LIMITS, MAX_BATCH, MAX_SCALES, TEXTS, InputError
from ..scalekv_core.model.quant import T5_WEIGHT_FORMATS, WEIGHT_FORMATS

#: Most fields one request may list per layer (40 layers for the real models); per scale: MAX_SCALES.
MAX_LAYERS = int(LIMITS["depth"].max)
#: Longest model, file or resolution name the route accepts.
MAX_NAME = TEXTS["name"].max_chars


def _bounded(name: str, kind: type) -> Any:
    """A JSON number within LIMITS[name]: ints must be whole (no bools, no strings), floats finite."""
    lim = LIMITS[name]
    low = {"gt": lim.min} if lim.min_exclusive else {"ge": lim.min}
    if kind is int:
        kind_ann: Any = Annotated[int, Field(strict=True, le=int(lim.max), **{k: int(v) for k, v in low.items()})]
    else:
        kind_ann = Annotated[float, Field(strict=True, allow_inf_nan=False, le=lim.max, **low)]
    if lim.odd:
        kind_ann = Annotated[kind_ann, AfterValidator(_odd)]
    return kind_ann


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be an odd number")
    return value


def _text_name(value: str) -> str:
    try:
        return TEXTS["name"].check(value, "-")
    except InputError as e:  # pydantic puts the field's path in front
        raise ValueError(str(e)[len("-: "):]) from None


Name = Annotated[str, Field(strict=True, max_length=MAX_NAME), AfterValidator(_text_name)]


def _literal(options: Any) -> Any:
    return Literal[tuple(options)]  # type: ignore[valid-type]


PolicyName = _literal(POLICIES)
Pooling = _literal(POOLINGS)
Scoring = _literal(SCORINGS)
KVDtype = _literal(KV_DTYPES)
WeightFormat = _literal(WEIGHT_FORMATS)
T5WeightFormat = _literal(T5_WEIGHT_FORMATS)
BudgetUnit = Literal["percent", "tokens", "MB"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CalibrationLink(_Body):
    """A ScaleKV Calibrate node linked to the config's budget_file: the widgets that name the file it writes, and the
    transformer of its model input (its "auto" resolution)."""

    filename_prefix: Name
    resolution: Name
    budget: _bounded("calibration_budget", float)
    transformer: Optional[Name] = None


class PlanSettings(_Body):
    """Settings mode: the cache-config widgets, the sampler's resolution/batch/cfg/decode tile, the loader's files
    and formats, and the block swap of a memory node (the last ones size the whole job); a linked ScaleKV Calibrate
    names the budget file."""

    policy: PolicyName = "scalekv"
    budget_unit: BudgetUnit = "percent"
    budget: _bounded("budget", float) = 10.0
    window: _bounded("window", int) = 16
    kernel: _bounded("kernel", int) = 5
    pooling: Pooling = "maxpool"
    scoring: Scoring = "improved"
    kv_dtype: KVDtype = "auto"
    budget_source: Name = "generated"
    refiner_decay: _bounded("refiner_decay", float) = 0.0
    budget_file: Optional[Name] = None
    resolution: Optional[Name] = None
    batch: _bounded("batch", int) = 1
    cfg: _bounded("cfg", float) = 3.0
    transformer: Optional[Name] = None
    model: Optional[Name] = None
    precision: Name = "auto"
    vae: Optional[Name] = None
    text_encoder: Optional[Name] = None
    weight_format: WeightFormat = "none"
    t5_weights: T5WeightFormat = "none"
    decode_tile: _bounded("decode_tile", int) = 0
    block_swap: _bounded("block_swap", int) = 0
    calibration: Optional[CalibrationLink] = None


LayerTokens = Annotated[list[_bounded("layer_tokens", int)], Field(max_length=MAX_LAYERS)]
LayerBytes = Annotated[list[_bounded("layer_bytes", int)], Field(max_length=MAX_LAYERS)]
Megabytes = _bounded("report_mb", float)


class ReportScale(_Body):
    planned_tokens: LayerTokens
    held_tokens: Optional[LayerTokens] = None
    stored_bytes: Optional[LayerBytes] = None
    allocated_bytes: Optional[LayerBytes] = None


class ReportModel(_Body):
    depth: _bounded("depth", int)
    width: _bounded("model_width", int)
    heads: _bounded("heads", int)
    block_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    architecture: Optional[Name] = None
    device: Optional[Name] = None


class ReportSchedule(_Body):
    template: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=10)]
    size: Annotated[str, Field(strict=True, max_length=32)]


class ReportPolicy(_Body):
    policy: PolicyName = "full"
    budget: Union[Annotated[str, Field(strict=True, max_length=32)], _bounded("budget", float)] = "10%"
    window: _bounded("window", int) = 16
    kernel: _bounded("kernel", int) = 5
    pooling: Pooling = "maxpool"
    scoring: Scoring = "improved"
    kv_dtype: KVDtype = "auto"
    budget_file: Optional[Name] = None
    refiner_decay: _bounded("refiner_decay", float) = 0.0


class Report(_Body):
    """Report mode: the sampler's `scalekv_memory` UI output of a finished run."""

    scales: Annotated[list[ReportScale], Field(min_length=1, max_length=MAX_SCALES)]
    schedule: ReportSchedule
    bytes_per_token_layer: _bounded("layer_bytes", int)
    model: ReportModel
    batch: Optional[_bounded("batch", int)] = None
    batch_rows: _bounded("batch_rows", int)
    policy: Optional[ReportPolicy] = None
    full_analytic_mb: Optional[Megabytes] = None
    analytic_mb: Optional[Megabytes] = None
    planned_peak_mb: Optional[Megabytes] = None  # the engine's, for this run's prompt length
    planned_peak_max_prompt_mb: Optional[Megabytes] = None  # the sampler's, for the longest prompt (512 tokens)
    measured_peak_mb: Optional[Megabytes] = None
    measurement: Annotated[str, Field(strict=True, max_length=200)] = ""
    sampling_seconds: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1e7)]] = None
    # the budget plan's notes (a budget file calibrated for another budget)
    notes: Annotated[list[Annotated[str, Field(strict=True, max_length=1000)]], Field(max_length=8)] = []


class ReportBody(_Body):
    report: Report


def describe(error: ValidationError, limit: int = 5) -> str:
    """'field.path: what is wrong' for up to `limit` errors, never quoting the value that was sent."""
    parts = []
    for e in error.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


__all__ = ["MAX_BATCH", "CalibrationLink", "PlanSettings", "Report", "ReportBody", "ValidationError", "describe"]
