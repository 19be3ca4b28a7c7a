"""The eviction-policy interface and the one shared selection path (top-k, forced tokens, sorted indices)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...schedules import Schedule
from ..budget import BudgetPlan


@dataclass
class StepContext:
    """What a policy may look at when a layer finishes a scale's attention.

    The layer's keys for this step are `stored` cached tokens followed by the current scale's `n` tokens.
    """

    layer: int
    scale: int
    schedule: Schedule
    stored: int
    q: torch.Tensor  # (B, H, n, c): the real queries of the current scale (bias, cos-norm, RoPE)
    x: torch.Tensor | None = None  # (B, n, C): the self-attention input, for the original's raw query
    w_q: torch.Tensor | None = None  # (C, C): the query projection weight
    positions: torch.Tensor | None = None  # (B, H, stored + n) int32 ids the policy gave each token, when tracked

    @property
    def grid(self) -> tuple[int, int]:
        return self.schedule.grids[self.scale]

    @property
    def current(self) -> int:
        h, w = self.grid
        return h * w


class EvictionPolicy:
    """Decides which cached tokens a layer keeps; the budget plan decides how many."""

    name = "base"
    #: Whether the cache must track each stored token's absolute position for this policy.
    needs_positions = False
    #: Whether `select` reads the keys and queries (then auto storage keeps keys in float32 and the queries stay
    #: float32, for the scores' bits; else both may be rounded to attention's dtype as they are made). True unless
    #: a policy opts out, so a new scoring policy cannot get rounded keys by forgetting it.
    scores_keys = True
    #: Tokens a budget must at least allow (an observation window that is always kept).
    min_budget = 1

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        raise NotImplementedError

    def prepare(self, schedule: Schedule, batch: int, num_heads: int, device: torch.device) -> None:
        """Build the policy's device tables before the first step, so no step copies data from the host."""

    def token_ids(self) -> torch.Tensor | None:
        """(L,) int32 id the cache stores beside each sequence position when `needs_positions` (after prepare)."""
        return None

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices (B, H, keep) into the step's keys, ascending, of the tokens to keep."""
        raise NotImplementedError


def topk_keep(scores: torch.Tensor, keep: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep `forced` (B, H, f) plus the `keep - f` best-scored others, as sorted indices (B, H, keep).

    Forced positions must already carry -inf scores so they are not picked twice.
    """
    # The indices are sorted by position below, so top-k need not order them by score (on CUDA that is a sort less).
    if forced is None or forced.shape[-1] == 0:
        chosen = scores.topk(keep, dim=-1, sorted=False).indices
    else:
        rest = keep - forced.shape[-1]
        picked = (scores.topk(rest, dim=-1, sorted=False).indices if rest > 0
                  else scores.new_empty((*scores.shape[:-1], 0), dtype=torch.long))
        chosen = torch.cat([picked, forced.to(picked.dtype)], dim=-1)
    return chosen.sort(dim=-1).values
