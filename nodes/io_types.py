"""The pack's socket types (prefixed, so they never clash with another pack's)."""
from __future__ import annotations

from comfy_api.latest import io

#: InfinityModel: pipeline (transformer + VAE) in a ModelPatcher.
InfinityModelType = io.Custom("INFINITY_MODEL")
#: InfinityT5: the T5 encoder in a ModelPatcher.
InfinityT5Type = io.Custom("INFINITY_T5")
#: scalekv_core TextConditioning (packed T5 features of one prompt).
InfinityConditioningType = io.Custom("INFINITY_CONDITIONING")
#: scalekv_core CacheConfig.
CacheConfigType = io.Custom("SCALEKV_CACHE_CONFIG")

CATEGORY = "Infinity"
CATEGORY_SCALEKV = "Infinity/ScaleKV"
