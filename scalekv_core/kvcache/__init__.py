"""KV-cache subsystem: storage, eviction policies, budgets, scoring and attention over the cache."""
from .attention import sdpa
from .budget import BudgetError, BudgetPlan
from .cache import KVCache
from .config import POLICIES, CacheConfig

__all__ = ["BudgetError", "BudgetPlan", "CacheConfig", "KVCache", "POLICIES", "sdpa"]
