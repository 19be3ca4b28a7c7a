"""ComfyUI-ScaleKV's engine: Infinity inference and scale-aware KV-cache compression, torch only."""
from __future__ import annotations

__version__ = "0.1.0"

#: The oldest PyTorch the engine imports under (torch.nn.attention's sdpa_kernel with the cuDNN backend, float8).
MIN_TORCH = "2.3"


def torch_problem() -> str | None:
    """What this torch lacks that the engine needs at import (None if nothing), so an old torch fails at once with
    what to do instead of deep inside a module; checked by feature, since version strings vary (+cu130, a0, rocm)."""
    import torch

    missing = []
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        missing.append("torch.nn.attention")
    else:
        if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
            missing.append("SDPBackend.CUDNN_ATTENTION")
    if not hasattr(torch, "float8_e4m3fn"):
        missing.append("torch.float8_e4m3fn")
    if not missing:
        return None
    return (f"ComfyUI-ScaleKV needs PyTorch {MIN_TORCH} or newer; this Python has torch {torch.__version__}, "
            f"which lacks {', '.join(missing)}. Update torch in the Python that runs ComfyUI (or this script).")


_problem = torch_problem()
if _problem is not None:
    raise ImportError(_problem)
