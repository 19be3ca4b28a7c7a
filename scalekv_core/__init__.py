"""ComfyUI-ScaleKV's engine: Infinity inference and scale-aware KV-cache compression, torch only."""

__version__ = "0.1.0"
