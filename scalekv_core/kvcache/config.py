"""Cache settings by name (what the CLI and the nodes expose) and the factory that turns them into a policy and plan."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from ..devices import check_dtype
from ..limits import LIMITS, shown
from ..schedules import Schedule
from .budget import BudgetError, BudgetPlan, kv_bytes_per_token, parse_budget
from .policies.base import EvictionPolicy
from .policies.full import FullCache
from .policies.pyramidkv import PyramidKV
from .policies.scalekv import SCORINGS, ScaleKV
from .policies.sliding_window import SlidingWindow
from .policies.snapkv import SnapKV
from .policies.streamingllm import StreamingLLM
from .scoring import POOLINGS

POLICIES: dict[str, type[EvictionPolicy]] = {
    "full": FullCache, "sliding_window": SlidingWindow, "streamingllm": StreamingLLM, "snapkv": SnapKV,
    "pyramidkv": PyramidKV, "scalekv": ScaleKV,
}
#: Storage formats by name, the one table the CLI, the nodes and the plan route offer. None (auto): values in the
#: block dtype; keys in float32 where a policy scores them or `float_keys` asks (as the original stores them), else
#: in the block dtype, which attention casts them to anyway (same bits, a third fewer bytes). The one-byte
#: formats are stored as codes with a float32 scale per token and head (cache.py).
KV_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8,
}


def check_kv_dtype_on(kv_dtype: str, device: torch.device | str, field: str = "kv_dtype") -> None:
    """A DeviceDtypeError naming `field` when the cache's storage dtype cannot live on `device` (fp8 on Apple's
    MPS), with the way out: the one check the cache, the planner and the CLI share."""
    chosen = KV_DTYPES.get(kv_dtype)
    if chosen is not None:
        check_dtype(device, chosen, field, kv_dtype, "use int8 instead: the same size")


#: Which policies read each setting (CacheConfig.build's use of them), so a UI can mark the ones that do not apply.
POLICY_SETTINGS: dict[str, tuple[str, ...]] = {
    "budget": ("sliding_window", "streamingllm", "snapkv", "pyramidkv", "scalekv"),
    "window": ("snapkv", "pyramidkv", "scalekv"),
    "kernel": ("snapkv", "pyramidkv", "scalekv"),
    "pooling": ("snapkv", "pyramidkv", "scalekv"),
    "scoring": ("scalekv",),
    "budget_file": ("scalekv",),
    "refiner_decay": ("scalekv",),
    "kv_dtype": tuple(POLICIES),
}


def unread_settings(policy: str, settings: Iterable[str]) -> list[str]:
    """Those of `settings` (POLICY_SETTINGS names) that `policy` does not read, in the order given, so a front end
    can say which of the values it was handed are ignored."""
    return [name for name in settings if name in POLICY_SETTINGS and policy not in POLICY_SETTINGS[name]]


def _is_layer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_drafters(drafters: object) -> None:
    """Drafters are layer indices for every scale ([0, 23]) or one list of them per scale ([[0], [0, 23], ...]);
    a string, a number or floats are refused by name (they failed deep inside the plan, or matched no layer)."""
    ok = isinstance(drafters, (list, tuple)) and (
        all(_is_layer(d) for d in drafters)
        or all(isinstance(ds, (list, tuple)) and all(_is_layer(d) for d in ds) for ds in drafters))
    if not ok:
        raise ValueError(f"drafters {shown(drafters)}: expected a list of layer indices for every scale, e.g. "
                         f"[0, 23], or one such list per scale, e.g. [[0], [0, 23], ...]")


@dataclass
class CacheConfig:
    """Which policy, how large a budget, and how tokens are scored and stored."""

    policy: str = "scalekv"
    budget: str | int = "10%"  # '10%' of the cache before the last scale, '650' tokens, or '900MB'
    window: int = 16
    kernel: int = 5
    pooling: str = "maxpool"
    scoring: str = "improved"
    kv_dtype: str = "auto"  # auto: values in the block dtype, keys too unless scored (then fp32, as the original)
    budget_file: str | None = None  # original-format JSON or a preset name (scalekv only)
    drafters: Sequence[int] | Sequence[Sequence[int]] | None = None
    refiner_decay: float = 0.0
    float_keys: bool = False  # auto: float32 keys whatever the policy, for a reader besides attention (calibration)

    def validate(self, device: torch.device | str | None = None) -> None:
        """Reject impossible settings with a message naming the value; with the `device` the cache will live on,
        also a kv_dtype it cannot hold (fp8_e4m3fn on Apple's MPS), before anything is allocated."""
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"unknown KV policy {shown(self.policy)}; choose one of {', '.join(POLICIES)}")
        if not isinstance(self.scoring, str) or self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {shown(self.scoring)}; choose {', '.join(SCORINGS)}")
        if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {shown(self.pooling)}; choose {', '.join(POOLINGS)}")
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv dtype {shown(self.kv_dtype)}; choose {', '.join(KV_DTYPES)}")
        LIMITS["window"].check(self.window)
        LIMITS["kernel"].check(self.kernel)
        LIMITS["refiner_decay"].check(self.refiner_decay)
        if self.budget_file and self.policy != "scalekv":
            raise ValueError("a budget file applies to the scalekv policy only")
        if self.drafters is not None:
            _check_drafters(self.drafters)
        if device is not None:
            check_kv_dtype_on(self.kv_dtype, device)

    def to_dict(self) -> dict:
        return asdict(self)

    def storage_dtypes(self, block_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """(key, value) storage dtypes KVCache takes; a one-byte dtype there means scaled 8-bit codes."""
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_DTYPES:
            self.validate()
        chosen = KV_DTYPES[self.kv_dtype]
        if chosen is not None:
            return chosen, chosen
        if self.float_keys or self.policy not in POLICIES or POLICIES[self.policy].scores_keys:
            return torch.float32, block_dtype
        return block_dtype, block_dtype

    def token_bytes(self, num_heads: int, head_dim: int, batch_rows: int, block_dtype: torch.dtype) -> int:
        """Bytes one token costs in one layer as stored (codes plus scales), the figure budgets in MB divide by."""
        k, v = self.storage_dtypes(block_dtype)
        return kv_bytes_per_token(num_heads, head_dim, k.itemsize, v.itemsize, batch_rows)

    def budget_tokens(self, schedule: Schedule, num_layers: int, num_heads: int, head_dim: int, batch_rows: int,
                      block_dtype: torch.dtype) -> int:
        per = self.token_bytes(num_heads, head_dim, batch_rows, block_dtype)
        return parse_budget(self.budget, schedule, num_layers, per)

    def build(self, schedule: Schedule, num_layers: int, num_heads: int, head_dim: int, batch_rows: int,
              block_dtype: torch.dtype) -> tuple[EvictionPolicy, BudgetPlan]:
        """The policy object and its budget plan for one generation."""
        self.validate()
        if self.policy == "full":
            policy: EvictionPolicy = FullCache()
            return policy, policy.plan(schedule, num_layers)
        tokens = self.budget_tokens(schedule, num_layers, num_heads, head_dim, batch_rows, block_dtype)
        common = dict(budget=tokens)
        scored = dict(window=self.window, kernel=self.kernel, pooling=self.pooling)
        if self.policy in ("sliding_window", "streamingllm"):
            policy = POLICIES[self.policy](**common)
        elif self.policy in ("snapkv", "pyramidkv"):
            policy = POLICIES[self.policy](**common, **scored)
        else:
            policy = ScaleKV(**common, **scored, scoring=self.scoring, budget_file=self.budget_file,
                             drafters=self.drafters, refiner_decay=self.refiner_decay)
        prefix = sum(schedule.tokens_per_scale[:-1])
        if tokens < policy.min_budget and tokens < prefix:
            raise BudgetError(f"a budget of {tokens} tokens is below the observation window of {policy.min_budget}")
        plan = policy.plan(schedule, num_layers)
        if tokens >= prefix and not self.budget_file:  # e.g. '1000MB' at a small size: say it, as it is no saving
            plan.notes.append(f"a budget of {tokens} tokens ({self.budget}) holds the whole cache at this resolution "
                              f"({prefix} tokens before the last scale): nothing is evicted, as with the full cache")
        return policy, plan
