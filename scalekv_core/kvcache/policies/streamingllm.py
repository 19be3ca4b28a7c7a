"""`streamingllm`: attention sinks (the first tokens) plus the most recent tokens (Xiao et al., 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan, uniform_plan
from .base import EvictionPolicy, StepContext


@dataclass
class StreamingLLM(EvictionPolicy):
    """The first `sink_tokens` are the coarsest scales (1+4+16 = the first three), a VAR image's global layout."""

    budget: int = 650
    sink_tokens: int = 21
    name = "streamingllm"
    scores_keys = False  # select reads positions only: keys and queries may be rounded as made

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        return uniform_plan(schedule, num_layers, self.budget)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        B, H, total, _ = keys.shape
        sinks = min(self.sink_tokens, keep)
        idx = torch.cat([torch.arange(sinks, device=keys.device),
                         torch.arange(total - (keep - sinks), total, device=keys.device)])
        return idx.expand(B, H, keep)
