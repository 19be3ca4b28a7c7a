"""`sliding_window`: keep the most recent tokens (the latest scales), a positional baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan, uniform_plan
from .base import EvictionPolicy, StepContext


@dataclass
class SlidingWindow(EvictionPolicy):
    budget: int = 650
    name = "sliding_window"
    scores_keys = False  # select reads positions only: keys and queries may be rounded as made

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        return uniform_plan(schedule, num_layers, self.budget)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        # The cache is ordered by position, so the most recent tokens are its tail.
        B, H, total, _ = keys.shape
        return torch.arange(total - keep, total, device=keys.device).expand(B, H, keep)
