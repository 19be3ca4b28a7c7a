"""KV-cache subsystem: cache storage and attention over it."""
from .attention import cached_attention
from .cache import KVCache

__all__ = ["KVCache", "cached_attention"]
