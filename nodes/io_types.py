"""The pack's socket types (prefixed, so they never clash with another pack's)."""
from __future__ import annotations

import dataclasses
from typing import Any

from comfy_api.latest import io

#: InfinityModel: pipeline (transformer + VAE) in a ModelPatcher.
InfinityModelType = io.Custom("INFINITY_MODEL")
#: InfinityT5: the T5 encoder in a ModelPatcher.
InfinityT5Type = io.Custom("INFINITY_T5")
#: scalekv_core TextConditioning (packed T5 features of one prompt).
InfinityConditioningType = io.Custom("INFINITY_CONDITIONING")
#: scalekv_core CacheConfig.
CacheConfigType = io.Custom("SCALEKV_CACHE_CONFIG")
#: nodes.memory.MemorySettings (block swap).
InfinityMemoryType = io.Custom("INFINITY_MEMORY")

CATEGORY = "Infinity"
CATEGORY_SCALEKV = "Infinity/ScaleKV"
#: Words every node of the pack is found by in the node search, whatever its name says.
SEARCH_ALIASES = ["Infinity", "ScaleKV", "text to image", "autoregressive"]
_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


#: The words the node search must find every node by; where the host cannot carry search aliases (0.3.75, whose
#: frontend 1.32 searches names and display names only) the display name carries them.
SEARCH_WORDS = ("Infinity", "ScaleKV")


def schema(**fields: Any) -> io.Schema:
    """io.Schema with the pack's search aliases; a field this ComfyUI's Schema lacks (0.3.75 has no
    search_aliases) is left out, so one declaration serves every supported version. Without aliases the display
    name gains the search words it lacks ("Infinity Sampler · ScaleKV"), so searching either word finds every node."""
    fields["search_aliases"] = [*fields.get("search_aliases", []), *SEARCH_ALIASES]
    if "search_aliases" not in _SCHEMA_FIELDS:
        missing = [w for w in SEARCH_WORDS if w not in fields["display_name"]]
        fields["display_name"] = " · ".join([fields["display_name"], *missing])
    return io.Schema(**{k: v for k, v in fields.items() if k in _SCHEMA_FIELDS})
