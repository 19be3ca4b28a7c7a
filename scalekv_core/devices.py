"""What each kind of device can store: the one table of dtypes a device type lacks, and the checks built on it.

The loader, the KV cache, the tiled decode, the CLI and the planner ask `dtype_problem` before they put a tensor of
some dtype on a device, so a setting the device cannot hold is refused by name when it is given (at load, before
sampling), not as torch's TypeError when the first tensor moves. Where the device is present a tiny probe on it has
the last word (a newer torch may add a dtype); where it is not (planning for another machine) the table does.
"""
from __future__ import annotations

import torch


def _float8_dtypes() -> tuple[torch.dtype, ...]:
    """Every float8 dtype this torch defines (the FNUZ ones came later than e4m3fn and e5m2)."""
    names = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


#: (device type, dtype) -> why a tensor of that dtype cannot live on that kind of device: the one table of such facts.
GAPS: dict[tuple[str, torch.dtype], str] = {
    ("mps", torch.float64): "Apple's MPS (Metal) has no float64",
    **{("mps", d): f"Apple's MPS (Metal) has no {str(d).replace('torch.', '')}" for d in _float8_dtypes()},
    ("mps", torch.bfloat16): "Apple's MPS has bfloat16 only from macOS 14 on",
}
#: The gaps only some devices of the type have (the OS decides): assumed absent when no probe can run here.
SOMETIMES: frozenset[tuple[str, torch.dtype]] = frozenset({("mps", torch.bfloat16)})

_PROBED: dict[tuple[str, torch.dtype], bool] = {}


class DeviceDtypeError(ValueError):
    """A setting asks for a dtype the device cannot hold (fp8 or float64 on MPS): a user error, named as one."""


def _present(device: torch.device) -> bool:
    """Whether `device` exists in this process, so a probe on it answers for it."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available()
    backend = getattr(torch.backends, device.type, None)
    available = getattr(backend, "is_available", None)
    try:
        return bool(available()) if available is not None else False
    except Exception:  # a backend that cannot even say: treat as absent, the table answers
        return False


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a tiny tensor of `dtype` reaches `device` and converts there (and computes, for 16-bit floats)."""
    try:
        x = torch.ones(4, dtype=dtype).to(device)
        if dtype.is_floating_point and dtype.itemsize >= 2:
            x = x * x
        return bool(x.to(torch.float32).sum().item() == 4.0)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def dtype_problem(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why a tensor of `dtype` cannot live on `device` (one sentence), or None when it can: MPS has no float64 and
    no float8, and bfloat16 only on macOS 14 and later."""
    device = torch.device(device)
    key = (device.type, dtype)
    why = GAPS.get(key)
    if why is None:
        return None
    if _present(device):
        where = (str(device), dtype)
        if where not in _PROBED:
            _PROBED[where] = _probe(device, dtype)
        return None if _PROBED[where] else why
    return None if key in SOMETIMES else why


def check_dtype(device: torch.device | str, dtype: torch.dtype, field: str, value: object,
                instead: str = "") -> None:
    """DeviceDtypeError naming `field`, its `value`, the device and the reason (and `instead`, a way out) when
    `dtype` cannot live on `device`."""
    why = dtype_problem(device, dtype)
    if why is not None:
        hint = f"; {instead}" if instead else ""
        raise DeviceDtypeError(f"{field} {value}: cannot run on {torch.device(device)}: {why}{hint}")


def statistics_device(device: torch.device | str) -> torch.device:
    """Where float64 statistics for work on `device` are kept: there, unless it has no float64 (MPS), then the
    CPU, so every device sums in the same float64 and CPU/CUDA results stay bit for bit as they were."""
    device = torch.device(device)
    return device if dtype_problem(device, torch.float64) is None else torch.device("cpu")


def cuda_native_bf16(device: torch.device | str) -> bool:
    """Whether a CUDA device computes bf16 natively (Ampere, sm80, and later). torch.cuda.is_bf16_supported()
    also says True for Turing and Pascal, where bf16 is emulated (slow, and SDPA's fused kernels need sm80).
    False where no CUDA device is present (as is_bf16_supported said: auto then names fp16, nothing crashes)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device)
    try:
        return torch.cuda.get_device_capability(device if device.index is not None else None) >= (8, 0)
    except (AssertionError, RuntimeError, ValueError):  # no such device index: torch names it when the model moves
        return False


#: Fragments of torch's own messages when a dtype cannot reach a device (MPS: float64, float8, bf16 before macOS 14).
_TORCH_PHRASES = ("doesn't support float64", "does not have support for that dtype", "is only supported on macos",
                  "bfloat16 is only supported")


def torch_dtype_message(error: BaseException) -> str | None:
    """The one-line user error for torch's TypeError or RuntimeError when a tensor's dtype cannot reach a device
    (a path no check covered), else None: the CLI reports it as an error, not a traceback."""
    if not isinstance(error, (TypeError, RuntimeError)):
        return None
    text = str(error).strip()
    if not any(p in text.lower() for p in _TORCH_PHRASES):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return (f"{first} (this device cannot hold a dtype the settings ask for: on Apple's MPS use int8 instead of "
            f"fp8_e4m3fn for --weights, --t5-weights and --kv-dtype, and fp32 or fp16 if bf16 is refused)")
