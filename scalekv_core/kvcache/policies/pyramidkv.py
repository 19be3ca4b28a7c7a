"""`pyramidkv`: SnapKV's scoring with budgets that fall with depth, the same total (Cai et al., 2024)."""
from __future__ import annotations

from dataclasses import dataclass

from ...schedules import Schedule
from ..budget import BudgetError, BudgetPlan, pyramid_plan
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    beta: float = 20.0
    name = "pyramidkv"

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        if self.budget < self.window:
            raise BudgetError(f"a budget of {self.budget} tokens is below the observation window of {self.window}")
        return pyramid_plan(schedule, num_layers, self.budget, self.beta, min_tokens=self.window)
