"""ComfyUI-ScaleKV: the pack's entry point for ComfyUI.

The nodes (issue: the ComfyUI node pack) are not written yet; until then ComfyUI finds no node mappings here
and skips the pack. The engine lives in `scalekv_core` and works without ComfyUI.
"""
