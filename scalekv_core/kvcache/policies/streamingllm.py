"""`streamingllm`: attention sinks (the first tokens) plus the most recent tokens (Xiao et al., 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan, uniform_plan
from .base import EvictionPolicy, StepContext


@dataclass
class StreamingLLM(EvictionPolicy):
    """The sinks are the coarsest `sink_scales` scales, a VAR image's global layout: 1+4+16 = 21 tokens at 1:1,
    11 to 17 at other aspects (a fixed 21 cut into the fourth scale there)."""

    budget: int = 650
    sink_scales: int = 3
    name = "streamingllm"
    scores_keys = False  # select reads positions only: keys and queries may be rounded as made

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        return uniform_plan(schedule, num_layers, self.budget)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        B, H, total, _ = keys.shape
        sinks = min(sum(ctx.schedule.tokens_per_scale[:self.sink_scales]), keep)
        idx = torch.cat([torch.arange(sinks, device=keys.device),
                         torch.arange(total - (keep - sinks), total, device=keys.device)])
        return idx.expand(B, H, keep)
