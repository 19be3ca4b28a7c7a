"""`full`: keep every token, as the original Infinity does (the baseline every ratio is measured against)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan, full_plan
from .base import EvictionPolicy, StepContext


@dataclass
class FullCache(EvictionPolicy):
    name = "full"
    scores_keys = False  # select reads positions only: keys and queries may be rounded as made

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        return full_plan(schedule, num_layers)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        B, H, total, _ = keys.shape
        return torch.arange(total - keep, total, device=keys.device).expand(B, H, keep)
