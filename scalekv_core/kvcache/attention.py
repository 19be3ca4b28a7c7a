"""Every attention call of the model, and the backend that runs it (docs/attention.md).

One table (BACKENDS) names each way to compute attention: PyTorch's SDPA left to choose (`sdpa`), SDPA held to one
of its kernels (`flash`, `efficient`, `cudnn`, `math`), and the optional packages flash-attn (`flash_attn`) and
SageAttention (`sage`). A generation runs under `use_backend(name, device, dtype)`; the cache's `sdpa` /
`sdpa_lse` and the cross-attention's `attention` dispatch to the backend selected there. The default (`sdpa`,
which `auto` resolves to until a measurement promotes another) is exactly today's call, so the bits do not move.
Nothing heavy is imported here: the optional packages are looked up only when a backend is checked or selected.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..limits import shown

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], torch.Tensor]
AttendLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor]"]
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One way to compute attention: when it can run, how to call it, and what it cannot do."""

    name: str
    about: str  # one line: what it is (the CLI's help and the docs)
    problem: Callable[[torch.device, torch.dtype], "str | None"]  # why it cannot run here; None when it can
    attend: Attend  # (q, k, v (B, H, L, c), scale, key mask or None) -> (B, H, Lq, c)
    attend_lse: AttendLse | None = None  # attention plus float32 log-sum-exp; None: sdpa_lse uses SDPA's
    masks: bool = True  # takes a key mask; without, masked calls (cross-attention to padded text) run plain SDPA
    half_on_cuda: bool = False  # on CUDA only fp16/bf16: float32 calls (the prompt pooling) run plain SDPA


def _plain_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's own choice of kernel: today's call, bit for bit."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_lse_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused kernel with its LSE, as F.scaled_dot_product_attention returns none: flash for fp16/bf16 on GPUs
    that have it (sm80+), memory-efficient on other GPUs and dtypes, the CPU flash kernel on the CPU; elsewhere
    (MPS, which has none of these kernels) the math kernel and its float32 LSE."""
    if q.device.type == "cuda":
        if q.dtype in _HALF and torch.cuda.get_device_capability(q.device) >= (8, 0):
            return _flash_lse(q, k, v, scale)
        return _efficient_lse(q, k, v, scale)
    if q.device.type == "cpu":
        return _flash_lse(q, k, v, scale)
    return _math_lse(q, k, v, scale)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's flash kernel with its LSE (the CPU build has its own flash kernel; other devices have none)."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    if q.device.type != "cpu":
        raise ValueError(f"attention backend 'flash' has no kernel on {q.device.type}; use auto, sdpa or math")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def _efficient_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's memory-efficient kernel with its LSE, whose query axis the kernel pads (cut back here)."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                      scale=scale)[:2]
    return out, lse[..., :q.shape[2]]


def _cudnn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's cuDNN kernel with its LSE, which it returns as (B, H, Lq, 1)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(*q.shape[:2], -1)[..., :q.shape[2]]


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The math kernel's output (as `sdpa` under `math` gives it) and the LSE of its scores in float32."""
    out = _kernel_call(SDPBackend.MATH)(q, k, v, scale, None)
    lse = (torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale).logsumexp(-1)
    return out, lse


def _kernel_call(kernel: SDPBackend) -> Attend:
    """SDPA held to one kernel: torch refuses with 'No available kernel' rather than silently picking another."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return attend


_PROBED: dict[tuple[str, str, torch.dtype], str | None] = {}


def _kernel_problem(name: str, cuda_only: bool, half_only_on_cuda: bool) -> Callable[[torch.device, torch.dtype],
                                                                                      str | None]:
    """Whether SDPA can run this kernel here: device and dtype by rule, the rest (GPU generation, build) by one
    tiny call on the device, remembered per device and dtype. The fused kernels exist on CUDA (and flash on the
    CPU) only: on MPS SDPA ignores the choice and runs its own, which has no LSE for sdpa_lse."""
    def problem(device: torch.device, dtype: torch.dtype) -> str | None:
        if cuda_only and device.type != "cuda":
            return f"needs a CUDA device (this run is on {device.type})"
        if device.type not in ("cuda", "cpu"):
            return f"needs a CUDA device or the CPU (this run is on {device.type})"
        if half_only_on_cuda and device.type == "cuda" and dtype not in _HALF:
            return f"needs fp16 or bf16 on CUDA (this model runs {str(dtype).replace('torch.', '')})"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available here"
        key = (name, str(device), dtype)
        if key not in _PROBED:
            _PROBED[key] = _probe(BACKENDS[name].attend, device, dtype)
        return _PROBED[key]
    return problem


def _probe(attend: Attend, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the backend once on a small head-dim-128 attention; torch's reason (its warnings) if it refuses."""
    q = torch.zeros(1, 2, 16, 128, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            attend(q, q, q, 1.0, None)
        except RuntimeError as e:
            why = "; ".join(str(w.message).strip() for w in caught) or str(e)
            return f"PyTorch has no such kernel for this device and dtype ({why.splitlines()[0][:300]})"
    return None


def _module(package: str) -> object:
    """The installed package, imported on first use (a fake one put in sys.modules counts)."""
    return sys.modules[package] if package in sys.modules else importlib.import_module(package)


def _package_problem(package: str, function: str, pip: str) -> Callable[[torch.device, torch.dtype], str | None]:
    """A CUDA-only fp16/bf16 package backend: installed, importable, on CUDA, in half precision."""
    def problem(device: torch.device, dtype: torch.dtype) -> str | None:
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            return f"package {package} is not installed (pip install {pip})"
        if device.type != "cuda":
            return f"needs a CUDA device (this run is on {device.type})"
        if dtype not in _HALF:
            return f"needs fp16 or bf16 (this model runs {str(dtype).replace('torch.', '')})"
        try:
            getattr(_module(package), function)
        except Exception as e:  # a broken build: an ImportError, an OSError from its CUDA library, ...
            return f"package {package} is installed but {function} does not load ({type(e).__name__}: {e})"[:400]
        return None
    return problem


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn takes (B, L, H, c): a transposed view, not a copy (it needs only the last stride to be 1)."""
    fn = _module("flash_attn").flash_attn_func
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, softmax_scale=scale,
             causal=False)
    return out.transpose(1, 2)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SageAttention in our (B, H, L, c) layout, which it calls HND."""
    return _module("sageattention").sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _table() -> dict[str, Backend]:
    K = SDPBackend
    return {b.name: b for b in (
        Backend("sdpa", "PyTorch SDPA, its own pick (flash for fp16/bf16 on recent GPUs, memory-efficient for "
                        "fp32; the fused flash kernel on the CPU)", _always, _plain_sdpa, _sdpa_lse_default),
        Backend("flash", "SDPA's FlashAttention-2 kernel only (on the CPU: its fused CPU flash kernel)",
                _kernel_problem("flash", cuda_only=False, half_only_on_cuda=True), _kernel_call(K.FLASH_ATTENTION),
                _flash_lse, masks=False, half_on_cuda=True),
        Backend("efficient", "SDPA's memory-efficient (xFormers) kernel only",
                _kernel_problem("efficient", cuda_only=True, half_only_on_cuda=False),
                _kernel_call(K.EFFICIENT_ATTENTION), _efficient_lse),
        Backend("cudnn", "SDPA's cuDNN kernel only (recent GPUs)",
                _kernel_problem("cudnn", cuda_only=True, half_only_on_cuda=True), _kernel_call(K.CUDNN_ATTENTION),
                _cudnn_lse, masks=False, half_on_cuda=True),
        Backend("math", "SDPA's unfused reference (slow, materialises the scores)", _always,
                _kernel_call(K.MATH), _math_lse),
        Backend("flash_attn", "the flash-attn package's flash_attn_func (CUDA, fp16/bf16)",
                _package_problem("flash_attn", "flash_attn_func", "flash-attn"), _flash_attn, masks=False,
                half_on_cuda=True),
        Backend("sage", "SageAttention's sageattn (CUDA, fp16/bf16; 8-bit q.k, so not exact)",
                _package_problem("sageattention", "sageattn", "sageattention"), _sage, masks=False,
                half_on_cuda=True),
    )}


BACKENDS: dict[str, Backend] = _table()
#: What `use_backend` takes: `auto` and every backend's name.
CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
#: `auto` takes the first of these that can run here, per device type (docs/attention.md says why this order:
#: SDPA's own pick until measurements on a GPU show an installed backend faster at our shapes).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("sdpa",), "cpu": ("sdpa",)}
_DEFAULT = BACKENDS["sdpa"]
_selected: contextvars.ContextVar[Backend] = contextvars.ContextVar("scalekv_attention", default=_DEFAULT)


def problem(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run on this device in this dtype, or None when it can (`auto` always can)."""
    if name == "auto":
        return None
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}"
    return BACKENDS[name].problem(torch.device(device), dtype)


def available(device: torch.device | str, dtype: torch.dtype) -> dict[str, str | None]:
    """Every backend's problem here (None: it runs), for reports and the GPU measurement."""
    return {name: problem(name, device, dtype) for name in BACKENDS}


def resolve(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend a run with `name` uses here; ValueError naming it, the reason and the choices if it cannot."""
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("sdpa",)):
            if problem(candidate, device, dtype) is None:
                return candidate
        return "sdpa"
    known = isinstance(name, str) and name in BACKENDS
    why = BACKENDS[name].problem(device, dtype) if known else None
    if not known or why is not None:
        usable = [n for n in CHOICES if problem(n, device, dtype) is None]
        what = f"attention backend {name!r} cannot run here: {why}" if known else \
            f"unknown attention backend {shown(name)}"
        raise ValueError(f"{what}; choose one of {', '.join(CHOICES)} (usable on {device.type} in "
                         f"{str(dtype).replace('torch.', '')}: {', '.join(usable)})")
    return name


@contextlib.contextmanager
def use_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> Iterator[str]:
    """Run the attention inside with backend `name` (checked here, before any work); yields the resolved name."""
    resolved = resolve(name, device, dtype)
    token = _selected.set(BACKENDS[resolved])
    try:
        yield resolved
    finally:
        _selected.reset(token)


def current() -> str:
    """The backend attention runs with right now."""
    return _selected.get().name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, L, c) attention with the selected backend; a key mask or a CUDA dtype it cannot take (the prompt
    pooling runs in float32) goes to plain SDPA."""
    backend = _selected.get()
    if backend is _DEFAULT or runs_plain_sdpa(backend, q.device, q.dtype, mask is not None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return backend.attend(q, k, v, scale, mask)


def runs_plain_sdpa(backend: Backend, device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Whether a call the backend cannot take (a key mask; float32 on CUDA for a half-only kernel) goes to SDPA."""
    return (masked and not backend.masks) or (backend.half_on_cuda and device.type == "cuda" and dtype not in _HALF)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One attention call for every self-attention path, so CPU, CUDA, cached and uncached runs share their numerics.

    Keys are cos-normalised and queries carry the learned scale, so the softmax scale is 1. The selected backend
    runs it (default: SDPA's own pick, the flash or memory-efficient kernel on CUDA, the fused CPU kernel elsewhere).
    """
    return attention(q.to(dtype), k.to(dtype), v.to(dtype), 1.0)


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention plus each query's float32 log-sum-exp (B, H, n), so partial attentions can merge without a workspace.

    SDPA's kernels return their own LSE; backends that cannot (flash_attn, sage) are served by SDPA's default
    fused kernel here, so their merged results are SDPA's, exactly as with the default.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    attend_lse = _selected.get().attend_lse or _sdpa_lse_default
    return attend_lse(q, k, v, 1.0)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> torch.Tensor:
    """softmax over keys A ∪ B from the two partial attentions, weighting each by its share of the total mass."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * (1 - w_a)).to(out_a.dtype)
