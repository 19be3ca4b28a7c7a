"""ComfyUI node adapters over `scalekv_core` (not written yet: they arrive with the node-pack issue)."""
