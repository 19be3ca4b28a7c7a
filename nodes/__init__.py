"""ComfyUI nodes (V3 API): thin adapters over `scalekv_core`. Imported only inside ComfyUI (see the root __init__)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths

paths.register_folders()  # before the node modules build their file menus

from .cache import ScaleKVCacheConfig, ScaleKVCalibrate  # noqa: E402
from .loading import InfinityModelLoader, InfinityTextEncode  # noqa: E402
from .memory import InfinityMemory  # noqa: E402
from .sampling import InfinitySampler  # noqa: E402
from . import prompt_guard, routes, sampling  # noqa: E402

routes.register()  # POST /scalekv/plan for the budget widget (no-op outside a running server)
sampling.prepare_cpu_meter()  # on ComfyUI's main thread, before a prompt runs on its worker thread

NODES: list[type[io.ComfyNode]] = [InfinityModelLoader, InfinityTextEncode, ScaleKVCacheConfig, InfinitySampler,
                                   ScaleKVCalibrate, InfinityMemory]
# oversized or invalid values of our nodes are shortened before ComfyUI validates (and would echo) them
prompt_guard.register(node.GET_SCHEMA().node_id for node in NODES)


class ScaleKVExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ScaleKVExtension:
    return ScaleKVExtension()
