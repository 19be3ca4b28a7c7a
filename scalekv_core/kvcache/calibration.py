"""Offline ScaleKV calibration: measure every layer's Attention Selectivity Index (ASI) per scale, pick drafters.

ASI (paper Eq. 2) of layer l at scale k, from the softmax attention α of the current scale's queries:
- current attention ratio: mean over queries of Σ α over the current scale's own keys;
- history top-K ratio: mean over queries of the K' largest α over history keys, K' = max(1, ceil(f·S)).
The extracted equation shows a product of the two (`combine='product'`, the default); the prose ("focuses on the
current map or is selective toward history") also reads as a sum (`combine='sum'`). Low ASI = drafter (attends
broadly, needs much cache), high ASI = refiner. Per scale the ASI is z-scored across layers (Eq. 3), all compressing
(scale, layer) pairs are ranked globally and the lowest become drafters; `scalekv_plan` then sizes the budgets.
Measurement runs a full-cache generation per prompt and reads attention through the cache's observer hook.
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..model.text_encoder import TextConditioning
from .scoring import check_window
from ..schedules import Schedule
from .budget import BudgetError, BudgetPlan, asi_table_path, plan_to_original_json, scalekv_plan
from .config import CacheConfig

if TYPE_CHECKING:
    from ..model.config import InfinityConfig
    from ..pipeline import InfinityPipeline

COMBINES = ("product", "sum")
#: Default drafter share of the compressing (scale, layer) pairs: the shipped 10% files mark 9 of 160 (2B, 32 layers
#: x 5 compressing scales) and 15 of 200 (8B, 40 x 5) as drafters, 5.6% and 7.5%; this is their mean.
DRAFTER_FRACTION = (9 / 160 + 15 / 200) / 2
ProgressCallback = Callable[[int, int], None]


@dataclass
class AsiTable:
    """Per (scale, layer) ratios averaged over prompts: `current[s][l]`, `history[s][l]` and their `asi`."""

    current: list[list[float]]
    history: list[list[float]]
    asi: list[list[float]]
    combine: str = "product"

    @property
    def num_scales(self) -> int:
        return len(self.asi)

    @property
    def num_layers(self) -> int:
        return len(self.asi[0]) if self.asi else 0

    def zscores(self) -> list[list[float]]:
        """Eq. 3: (ASI - mean) / (std + 1e-6) per scale across layers (population std), so scales compare."""
        out = []
        for row in self.asi:
            mu, sd = statistics.fmean(row), statistics.pstdev(row)
            out.append([(a - mu) / (sd + 1e-6) for a in row])
        return out

    def to_dict(self) -> dict:
        """Plain lists for JSON, so a calibration can be stored and re-ranked without re-measuring."""
        return {"combine": self.combine, "current": self.current, "history": self.history, "asi": self.asi}

    @classmethod
    def from_dict(cls, data: dict) -> AsiTable:
        """Inverse of `to_dict` (floats round-trip exactly through JSON)."""
        return cls([list(map(float, r)) for r in data["current"]], [list(map(float, r)) for r in data["history"]],
                   [list(map(float, r)) for r in data["asi"]], data.get("combine", "product"))


def query_rows(n: int, max_queries: int) -> list[int]:
    """The sampled query rows of an n-token scale: centres of min(n, max_queries) equal segments, fixed per run."""
    m = min(n, max_queries)
    return [(2 * i + 1) * n // (2 * m) for i in range(m)]


def history_k(stored: int, topk_fraction: float) -> int:
    """K' = max(1, ceil(fraction * stored)), rounded first so 0.1 * 30 gives 3, not 4."""
    return max(1, math.ceil(round(topk_fraction * stored, 9)))


def attention_ratios(q: torch.Tensor, keys: torch.Tensor, stored: int, max_queries: int,
                     topk_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(current ratio, history top-K ratio) as 0-d float32 tensors, averaged over rows, heads and sampled queries.

    Only the sampled query rows' attention, (B, H, m, S+n), is ever formed, so memory stays small at any size.
    """
    idx = torch.tensor(query_rows(q.shape[2], max_queries), device=q.device)
    probs = torch.softmax(q.index_select(2, idx).float() @ keys.float().transpose(-1, -2), dim=-1)  # scale 1
    current = probs[..., stored:].sum(-1).mean()
    if stored == 0:
        return current, torch.zeros_like(current)
    k = history_k(stored, topk_fraction)
    return current, probs[..., :stored].topk(k, dim=-1, sorted=False).values.sum(-1).mean()


def measurement_cache() -> CacheConfig:
    """The cache a measurement runs on: full, keys in float32 as the observer reads them; plan a calibration with it."""
    return CacheConfig(policy="full", float_keys=True)


@torch.no_grad()
def measure_asi(pipe: InfinityPipeline, prompts: Sequence[str] | Sequence[TextConditioning], schedule: Schedule,
                seed: int = 0, cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 0.5,
                top_k: int = 900, top_p: float = 0.97, max_queries: int = 64, topk_fraction: float = 0.1,
                combine: str = "product", on_prompt: ProgressCallback | None = None,
                block_swap: int | None = None) -> AsiTable:
    """Run one full-cache generation per prompt (seed + i for prompt i) and average its attention ratios.

    Only the conditional rows of the CFG batch are measured: the unconditional branch is not what the image follows.
    `block_swap` (None: the pipeline's) streams that many transformer blocks from host memory, as generate does.
    """
    from ..sampler import SamplerSettings, sample  # here, so the kvcache package never imports the sampler eagerly

    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; choose {', '.join(COMBINES)}")
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if max_queries < 1 or not 0 < topk_fraction <= 1:
        raise ValueError(f"need max_queries >= 1 and 0 < topk_fraction <= 1, got {max_queries}, {topk_fraction}")
    check_prompts(seed, len(prompts))
    model = pipe.transformer
    n, layers = schedule.num_scales, model.cfg.depth
    cur = torch.zeros(n, layers, dtype=torch.float32, device=pipe.device)  # accumulated on device: no sync per layer
    hist = torch.zeros_like(cur)
    with pipe.placed(pipe.block_swap if block_swap is None else block_swap):  # as generate places it
        for i, prompt in enumerate(prompts):
            cond = pipe.encode([prompt]) if isinstance(prompt, str) else prompt
            rows = cond.batch_size  # CFG puts the conditional rows first; without CFG every row is conditional

            def observer(scale: int, layer: int, q: torch.Tensor, keys: torch.Tensor, stored: int) -> None:
                c, h = attention_ratios(q[:rows], keys[:rows], stored, max_queries, topk_fraction)
                cur[scale, layer] += c
                hist[scale, layer] += h

            settings = SamplerSettings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, seed=seed + i)
            sample(model, cond.to(pipe.device), schedule, settings, pipe.vae_patchify,
                   cache_config=measurement_cache(), observer=observer)
            if on_prompt is not None:
                on_prompt(i + 1, len(prompts))
    cur_l = (cur / len(prompts)).cpu().tolist()
    hist_l = (hist / len(prompts)).cpu().tolist()
    join = (lambda a, b: a * b) if combine == "product" else (lambda a, b: a + b)
    asi = [[join(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(cur_l, hist_l)]
    return AsiTable(cur_l, hist_l, asi, combine)


def compressing_scales(schedule: Schedule, budget_tokens: int) -> list[int]:
    """Scales after which `scalekv_plan` prunes: cumulative tokens above the budget, the last scale excluded."""
    cum = 0
    out = []
    for si, n in enumerate(schedule.tokens_per_scale[:-1]):
        cum += n
        if cum > budget_tokens:
            out.append(si)
    return out


def select_drafters(table: AsiTable, num_drafters: int | None = None,
                    scales: range | Sequence[int] | None = None) -> list[list[int]]:
    """Drafter layers per scale: the `num_drafters` lowest z-scores over all (scale, layer) pairs of `scales`.

    `scales` defaults to every scale but the last; `num_drafters` to round(DRAFTER_FRACTION * pairs). A scale that
    gets none still receives its lowest-z layer: the budget rule N_d·Max + N_r·Min = B·L needs N_d >= 1, otherwise
    the scale falls back to uniform budgets and the written file would mark an arbitrary layer as drafter. So the
    result can hold more than `num_drafters` pairs. Ties go to the earlier scale, then the lower layer.
    """
    n, layers = table.num_scales, table.num_layers
    scales = list(range(n - 1) if scales is None else scales)
    bad = [s for s in scales if not 0 <= s < n]
    if bad:
        raise ValueError(f"scales {bad} are outside the table's {n} scales")
    if num_drafters is None:
        num_drafters = round(DRAFTER_FRACTION * layers * len(scales))
    if num_drafters < 0:
        raise ValueError(f"num_drafters must be >= 0, got {num_drafters}")
    z = table.zscores()
    ranked = sorted((z[s][l], s, l) for s in scales for l in range(layers))
    out: list[list[int]] = [[] for _ in range(n)]
    for _, s, l in ranked[:num_drafters]:
        out[s].append(l)
    for s in scales:
        if not out[s]:
            out[s].append(min(range(layers), key=lambda l: (z[s][l], l)))
    return [sorted(d) for d in out]


@dataclass
class CalibrationResult:
    """The measured table, the chosen drafters, their budget plan and the original-format JSON of that plan."""

    table: AsiTable
    drafters: list[list[int]]
    plan: BudgetPlan
    budget_json: dict
    settings: dict = field(default_factory=dict)

    def write(self, path: str | Path) -> tuple[Path, Path]:
        """Write the budget file the sampler reads, and `<stem>.asi.json` beside it to reproduce or re-rank it.

        Each file appears under its name only once it is whole (written as NAME.XXXXXXXX.partial, then renamed), and the
        `.asi.json` goes first: a failure leaves no budget file without the table it was chosen from."""
        from ..safe_files import write_text

        path = Path(path)
        side = asi_table_path(path)
        usage = {"policy": "scalekv", "budget_file": path.name, "budget": self.settings.get("budget_tokens")}
        write_text(side, json.dumps({"settings": self.settings, "cache_config": usage, "drafters": self.drafters,
                                     "zscores": self.table.zscores(), "table": self.table.to_dict()}, indent=2) + "\n")
        write_text(path, json.dumps(self.budget_json, indent=2) + "\n")
        return path, side


def prompt_lines(text: str) -> list[str]:
    """A calibration's prompts as artists write them: one per non-empty line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_prompts(seed: int, prompts: int, field: str = "seed", prompts_field: str = "prompts") -> int:
    """Prompt i is measured with seed + i: the last of them must be a seed too (InputError naming `field`); and
    no more prompts than the limits table allows (each is a generation; all their encodings are held at once)."""
    from ..limits import LIMITS, InputError

    count = LIMITS["calibration_prompts"]
    if prompts > count.max:
        raise InputError(f"{prompts_field}: {prompts} prompts; a calibration takes at most {int(count.max)} (one "
                         f"generation each; 5-10 like your pictures are enough)")
    seed = LIMITS["seed"].check(seed, field)
    last = seed + max(prompts, 1) - 1
    if last > LIMITS["seed"].max:
        raise InputError(f"{field}: {seed} is too large for {prompts} prompts: prompt i uses seed + i, and "
                         f"{seed} + {prompts - 1} is above the largest seed {LIMITS['seed'].max}; use a seed of at "
                         f"most {LIMITS['seed'].max - prompts + 1}")
    return seed


def check_settings(schedule: Schedule, budget_tokens: int, window: int = 16, refiner_decay: float = 0.0,
                   num_layers: int = 1) -> list[int]:
    """Everything about a calibration's budget that the model is not needed for, checked before any generation:
    the window (`check_window`), a budget that compresses this schedule and that its plan accepts (not below the
    window). Returns the compressing scales."""
    check_window(window)
    scales = compressing_scales(schedule, budget_tokens)
    if not scales:
        raise BudgetError(f"a budget of {budget_tokens} tokens never compresses the {schedule.size} schedule "
                          f"({sum(schedule.tokens_per_scale[:-1])} tokens before the last scale); nothing to calibrate")
    scalekv_plan(schedule, num_layers, budget_tokens, [[0] for _ in range(schedule.num_scales)], refiner_decay,
                 window)  # any drafters: the budget rule's refusals depend on the budget and window
    return scales


def calibrate(pipe: InfinityPipeline, prompts: Sequence[str] | Sequence[TextConditioning], schedule: Schedule,
              budget_tokens: int, num_drafters: int | None = None, seed: int = 0, refiner_decay: float = 0.0,
              window: int = 16, on_prompt: ProgressCallback | None = None, block_swap: int | None = None,
              **sampling) -> CalibrationResult:
    """Measure ASI on `prompts`, pick drafters among the compressing scales and build the ScaleKV plan and file.

    `sampling` goes to `measure_asi` (cfg, tau, top_k, top_p, max_queries, topk_fraction, combine). Load the file
    with CacheConfig(policy='scalekv', budget_file=path, budget=budget_tokens) on the same schedule.
    """
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    check_prompts(seed, len(prompts))
    scales = check_settings(schedule, budget_tokens, window, refiner_decay, pipe.transformer.cfg.depth)
    table = measure_asi(pipe, prompts, schedule, seed=seed, on_prompt=on_prompt, block_swap=block_swap, **sampling)
    drafters = select_drafters(table, num_drafters, scales)
    plan = scalekv_plan(schedule, table.num_layers, budget_tokens, drafters, refiner_decay, window)
    plan.source = f"calibrated on {len(prompts)} prompts, " + plan.source
    used = {k: p.default for k, p in inspect.signature(measure_asi).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("seed", "on_prompt", "block_swap")}
    used.update(sampling)
    settings = {"prompts": [p if isinstance(p, str) else {"text_tokens": list(p.lens)} for p in prompts],
                "seed": seed, "schedule": {"template": schedule.template, "size": schedule.size},
                "budget_tokens": budget_tokens, "num_drafters": num_drafters, "refiner_decay": refiner_decay,
                "window": window, "compressing_scales": scales, "model": model_shape(pipe.transformer.cfg), **used}
    return CalibrationResult(table, drafters, plan, plan_to_original_json(plan), settings)


def model_shape(cfg: InfinityConfig) -> dict:
    """What a budget file's measurements were taken on (depth, width, heads), recorded in its measurement table."""
    return {"depth": cfg.depth, "width": cfg.embed_dim, "heads": cfg.num_heads}


def overwrite_problem(path: str | Path, cfg: InfinityConfig, field: str = "filename_prefix") -> str | None:
    """Why writing a calibration to `path` would lose another model's (its measurement table names another shape),
    or None: a file name holds the prefix, resolution and budget, not the model. `field` is what to change."""
    from .budget import calibration_settings

    made = calibration_settings(path).get("model")
    if isinstance(made, dict) and made != model_shape(cfg):
        described = ", ".join(f"{k} {v}" for k, v in made.items() if isinstance(v, int))
        return (f"{Path(path).name} was calibrated for another model ({described}); this one has depth {cfg.depth}, "
                f"width {cfg.embed_dim}: choose another {field}, so that file is kept")
    return None
