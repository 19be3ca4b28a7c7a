"""`snapkv`: score the cache by the attention an observation window of the newest queries pays it (Li et al., 2024).

Uniform budgets; the window is the last `window` tokens of the current scale, kept, with 1-D pooled scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan, uniform_plan
from ..scoring import pool_1d, softmax_window_scores
from .base import EvictionPolicy, StepContext, topk_keep


@dataclass
class SnapKV(EvictionPolicy):
    budget: int = 650
    window: int = 16
    kernel: int = 5
    pooling: str = "maxpool"
    name = "snapkv"

    @property
    def min_budget(self) -> int:  # type: ignore[override]
        return self.window

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        if self.budget < self.window:
            from ..budget import BudgetError
            raise BudgetError(f"a budget of {self.budget} tokens is below the observation window of {self.window}")
        return uniform_plan(schedule, num_layers, self.budget)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        B, H, total, _ = keys.shape
        w = min(self.window, ctx.current, keep)
        q_win = ctx.q[:, :, ctx.current - w:]
        scores = pool_1d(softmax_window_scores(q_win, keys), self.kernel, self.pooling)
        forced = torch.arange(total - w, total, device=keys.device).expand(B, H, w)
        scores[..., total - w:] = -torch.inf
        return topk_keep(scores, keep, forced)
