"""`scalekv`: scale-aware budgets (drafters keep much, refiners little) and window-scored selection (Li et al., 2025).

Two scoring modes:
- `original` reproduces the released patch exactly, quirks included: a raw query (no bias, norm or RoPE) from
  the self-attention input, raw logits / sqrt(c) summed over a 4x4 grid window, max pooling along the flattened
  sequence (crossing rows and scales), and the window always kept.
- `improved` uses the model's real queries for the window rows (already computed for attention: no second QKV
  projection), softmax probabilities, and pooling inside each scale's own 2-D token map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ...schedules import Schedule
from ..budget import (BudgetError, BudgetPlan, calibration_notes, default_drafters, load_budget_file,
                      resolve_budget_file, scalekv_plan)
from ..scoring import ScheduleTables, pool_1d, pool_in_canvas, schedule_tables, softmax_window_scores
from .base import EvictionPolicy, StepContext, topk_keep

SCORINGS = ("original", "improved")


@dataclass
class ScaleKV(EvictionPolicy):
    budget: int = 650
    window: int = 16
    kernel: int = 5
    pooling: str = "maxpool"
    scoring: str = "improved"
    budget_file: str | None = None  # an original-format JSON, or a preset name
    drafters: Sequence[int] | Sequence[Sequence[int]] | None = None  # per scale or for all; default: by depth
    refiner_decay: float = 0.0
    name = "scalekv"
    _tables: ScheduleTables | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown ScaleKV scoring {self.scoring!r}; choose {', '.join(SCORINGS)}")

    @property
    def needs_positions(self) -> bool:  # type: ignore[override]
        return self.scoring == "improved"

    @property
    def min_budget(self) -> int:  # type: ignore[override]
        return self.window

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        if self.budget_file:
            path = resolve_budget_file(self.budget_file)
            plan = load_budget_file(path, schedule, num_layers, base_capacity=self.budget)
            plan.notes += calibration_notes(path, self.budget, schedule)
            ignored = [name for name, unset in (("refiner_decay", not self.refiner_decay),
                                                ("drafters", self.drafters is None)) if not unset]
            if ignored:  # a budget file fixes both: say so rather than run as if they applied
                plan.notes.append(f"{' and '.join(ignored)} do{'es' if len(ignored) == 1 else ''} not apply with "
                                  f"a budget file ({path.name}): its caps and drafters are used as they are")
            low = [(si, layer) for si, row in enumerate(plan.kept) for layer, k in enumerate(row)
                   if plan.evicts(si, layer) and k < self.window]
            if low:
                raise BudgetError(f"{path}: scale {low[0][0]} layer {low[0][1]} keeps fewer tokens than the "
                                  f"observation window of {self.window}")
            return plan
        drafters = self.drafters if self.drafters is not None else default_drafters(num_layers)
        plan = scalekv_plan(schedule, num_layers, self.budget, drafters, self.refiner_decay, self.window)
        if self.refiner_decay and plan.kept == scalekv_plan(schedule, num_layers, self.budget, drafters, 0.0,
                                                            self.window).kept:
            plan.notes.append(f"refiner_decay {self.refiner_decay:g} gives the same caps as 0 at this resolution and "
                              f"budget (the observation window's floor of {self.window} tokens, or the budget, "
                              f"decides them): it changes nothing here")
        return plan

    def prepare(self, schedule: Schedule, batch: int, num_heads: int, device: torch.device) -> None:
        """Windows, canvas cells and index rows for this schedule, from the process-wide device tables."""
        self._tables = schedule_tables(tuple(schedule.grids), self.window, self.kernel, self.pooling, batch,
                                       num_heads, str(device))

    def token_ids(self) -> torch.Tensor | None:
        """Each position's canvas cell: what pooling inside the token maps indexes by."""
        return self._tables.slots if self._tables is not None else None

    def _ready(self, ctx: StepContext, keys: torch.Tensor) -> ScheduleTables:
        if self._tables is None:  # a caller outside KVCache: build (or fetch) the tables now
            self.prepare(ctx.schedule, keys.shape[0], keys.shape[1], keys.device)
        return self._tables

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        if self.scoring == "original":
            return self._select_original(ctx, keys, keep)
        return self._select_improved(ctx, keys, keep)

    def _select_improved(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        tables = self._ready(ctx, keys)
        scores = softmax_window_scores(ctx.q[:, :, tables.windows[ctx.scale]], keys)
        if ctx.positions is None:
            raise RuntimeError("improved ScaleKV scoring needs the cache to track positions")
        scores = pool_in_canvas(scores, ctx.positions, tables, ctx.scale, self.pooling)
        return topk_keep(scores, keep)

    def _select_original(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        B, H, total, c = keys.shape
        n = ctx.current
        h, w = ctx.grid
        g = math.isqrt(self.window)
        if h >= g and w >= g:
            local = self._ready(ctx, keys).windows[ctx.scale]
            window = local + ctx.stored
        else:  # the original falls back to the newest tokens while the map is smaller than the grid
            size = min(self.window, total)
            window = torch.arange(total - size, total, device=keys.device)
            local = (window - (total - n)).clamp(0, n - 1)
        if ctx.x is None or ctx.w_q is None:
            raise RuntimeError("original ScaleKV scoring needs the self-attention input and query weight")
        q = F.linear(ctx.x[:, local].to(ctx.w_q.dtype), ctx.w_q)  # (B, w, C): no bias, norm or RoPE
        q = q.view(B, -1, H, c).transpose(1, 2).to(keys.dtype)  # (B, H, w, c)
        logits = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(c)  # (B, H, w, total)
        # index_fill_, not `x[..., window] = -inf`: on CUDA that setitem copies a host scalar (a sync, and an error
        # inside CUDA-graph capture); the values written are the same.
        logits.index_fill_(-1, window, -torch.inf)
        scores = pool_1d(logits.sum(dim=2), self.kernel, self.pooling)
        scores.index_fill_(-1, window, -torch.inf)
        return topk_keep(scores, keep, window.expand(B, H, -1))
