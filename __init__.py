"""ComfyUI-ScaleKV: the pack's entry point for ComfyUI (V3 node API through `comfy_entrypoint`).

The engine lives in `scalekv_core` and never imports ComfyUI; the nodes in `nodes/` are loaded only when ComfyUI's
modules are importable, so the engine and its tests work without ComfyUI. No NODE_CLASS_MAPPINGS here: ComfyUI
would take it instead of `comfy_entrypoint`.
"""
import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
