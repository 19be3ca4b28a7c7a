"""Weight formats for the transformer blocks' linear layers: the one place that knows how weights are stored.

`none` keeps the checkpoint's weights in the block dtype. The other formats store each block linear's weight in
fewer bytes and dequantize it to the block dtype (bf16/fp16 on a GPU, fp32 on a CPU) when the layer is used, with
plain torch ops, so every matmul still runs in the block dtype and fp8 storage works on any device:

- `fp8_e4m3fn`: torch.float8_e4m3fn values, one float32 scale per output channel (amax / 448);
- `int8`: symmetric int8 values in [-127, 127], one float32 scale per output channel (amax / 127);
- `int4`: symmetric values in [-7, 7] in groups of `group_size` (64) along the input dimension, two per uint8
  (even input index in the low nibble, stored as value + 8), one float16 scale per group (amax / 7).

Only the blocks' linears are quantized (self-attention qkv/proj, cross-attention q/kv/proj, FFN fc1/fc2: 98% of
the 8B's weights); embeddings, norms, the text path, `shared_ada_lin` and the head stay as they are. A quantized
layer keeps its packed weight and scales as buffers `weight_q` and `weight_scale` (the state-dict keys of a
pre-quantized file) and its bias unchanged; its `weight` property returns the dequantized weight, so call sites
that read `layer.weight` work unchanged.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, write_safetensors
from ..devices import DeviceDtypeError, dtype_problem
from ..safe_files import whole_number
from ..limits import check_choice, shown
from .config import InfinityConfig

WEIGHT_FORMATS = ("none", "fp8_e4m3fn", "int8", "int4")
#: The formats that change the stored weights.
QUANTIZED_FORMATS = WEIGHT_FORMATS[1:]
#: The formats offered for T5's linears: 8-bit only (measured close, docs/low_vram.md); int4 was not measured there.
T5_WEIGHT_FORMATS = ("none", "fp8_e4m3fn", "int8")
#: int4 scales cover this many consecutive input channels of one output channel.
DEFAULT_GROUP_SIZE = 64
#: Version of the pre-quantized file layout written by `save_quantized`; files of a later version are refused.
FILE_VERSION = 1
#: The linear layers quantized inside every block, by their path in the block.
QUANTIZED_LAYERS = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")
PACKED_SUFFIX = ".weight_q"
SCALE_SUFFIX = ".weight_scale"
#: What each format saves and costs, in one line (the node's tooltip and the CLI's help are built from these).
FORMAT_NOTES = {
    "none": "the checkpoint's weights in the block dtype (bf16 on a GPU: 2 bytes per weight)",
    "fp8_e4m3fn": "1 byte per weight (about half of bf16), per-channel scale; small quality loss",
    "int8": "1 byte per weight (about half of bf16), per-channel scale; the closest to bf16 of the three",
    "int4": "0.53 bytes per weight (about a quarter of bf16), a scale per 64 weights; visible quality loss",
}

_STORAGE = {"fp8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8}
_SCALE_DTYPE = {"fp8_e4m3fn": torch.float32, "int8": torch.float32, "int4": torch.float16}
_QMAX = {"fp8_e4m3fn": 448.0, "int8": 127.0, "int4": 7.0}
# The largest code magnitude a stored file can hold (int8 -128, int4 code 0 minus 8), which a scale must survive.
_CODE_MAGNITUDE = {"fp8_e4m3fn": 448.0, "int8": 128.0, "int4": 8.0}
# Metadata keys of a pre-quantized file (safetensors metadata is str -> str).
META_FORMAT, META_GROUP, META_VERSION, META_LAYERS = ("scalekv_weights", "scalekv_group_size", "scalekv_version",
                                                      "scalekv_layers")
_META_ARCH = {"scalekv_depth": "depth", "scalekv_width": "embed_dim", "scalekv_heads": "num_heads",
              "scalekv_ffn_hidden": "ffn_hidden", "scalekv_bits_per_token": "d_vae",
              "scalekv_block_chunks": "block_chunks"}


def check_format(fmt: object, field: str = "weights") -> str:
    """`fmt` if it names a weight format; an InputError (a ValueError) naming `field` and the value otherwise."""
    return check_choice(field, fmt, WEIGHT_FORMATS)


def format_problem(fmt: str, device: torch.device | str) -> str | None:
    """Why `device` cannot hold weights stored in `fmt` (its codes' or scales' dtype: fp8 on Apple's MPS), or None
    (devices.GAPS is the one table of such facts)."""
    if fmt not in QUANTIZED_FORMATS:
        return None
    return next((why for why in (dtype_problem(device, _STORAGE[fmt]), dtype_problem(device, _SCALE_DTYPE[fmt]))
                 if why is not None), None)


def check_format_on(fmt: str, device: torch.device | str, field: str = "weights") -> None:
    """A DeviceDtypeError (a ValueError) naming `field` and `fmt` when `device` cannot hold its stored codes or
    scales (fp8 on Apple's MPS): refused as the model loads, not when it first moves to the device."""
    why = format_problem(fmt, device)
    if why is not None:
        raise DeviceDtypeError(f"{field} {fmt}: cannot run on {torch.device(device)}: {why}; use int8 instead: "
                               f"the same size, and the closer to bf16")


def _group_count(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def storage_shapes(fmt: str, out_features: int, in_features: int,
                   group_size: int = DEFAULT_GROUP_SIZE) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the packed weight and of its scales for one (out, in) linear layer."""
    if fmt == "int4":
        if in_features % 2:
            raise ValueError(f"int4 packs two input channels per byte; {in_features} input channels is odd")
        return (out_features, in_features // 2), (out_features, _group_count(in_features, group_size))
    return (out_features, in_features), (out_features,)


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales) of an (out, in) weight, computed in float32 on the weight's device."""
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"{name}: cannot quantize to {shown(fmt)}; choose one of {', '.join(QUANTIZED_FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {list(w.shape)}")
    w = w.detach().float()
    out_f, in_f = w.shape
    qmax = _QMAX[fmt]
    if fmt == "int4":
        storage_shapes(fmt, out_f, in_f, group_size)  # refuses odd widths
        groups = _group_count(in_f, group_size)
        w = F.pad(w, (0, groups * group_size - in_f)).view(out_f, groups, group_size)
    amax = w.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"{name}: the weight holds NaN or infinite values; it cannot be quantized")
    if fmt == "int4":
        # float16 scales: clamp into its range first, so a tiny group never gets a zero scale
        scale = (amax / qmax).clamp(2.0**-24, 65504.0).to(torch.float16)
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax).add_(8).to(torch.uint8)
        q = q.view(out_f, -1)[:, :in_f]
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.contiguous()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    x = w / scale.unsqueeze(-1)
    q = x.clamp_(-qmax, qmax).to(torch.float8_e4m3fn) if fmt == "fp8_e4m3fn" else \
        torch.round(x).clamp_(-qmax, qmax).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int, dtype: torch.dtype,
                      group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """The (out, in) weight in `dtype`: each stored value times its scale, rounded once to `dtype`."""
    if fmt == "int4":
        rows = q.shape[0]
        w = torch.stack((q & 0x0F, q >> 4), dim=-1).view(rows, in_features).to(dtype).sub_(8)
        full = in_features // group_size
        if full:
            w[:, :full * group_size].view(rows, full, group_size).mul_(scale[:, :full].unsqueeze(-1))
        if full * group_size < in_features:  # a last, partial group
            w[:, full * group_size:].mul_(scale[:, full:])
        return w
    # values are exact in bf16/fp16/fp32; the product is computed in float32 and rounded once into `dtype`
    return q.to(dtype).mul_(scale.unsqueeze(-1))


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored packed and dequantized to the compute dtype at each use.

    Moving the module moves its buffers, but a cast (`.to(torch.bfloat16)`, `.float()`) only changes the compute
    dtype (and the bias): the packed weight and its scales keep their storage dtypes.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = True,
                 group_size: int = DEFAULT_GROUP_SIZE, device: torch.device | str | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if fmt not in QUANTIZED_FORMATS:
            raise ValueError(f"QuantLinear: format {shown(fmt)} is not one of {', '.join(QUANTIZED_FORMATS)}")
        if group_size < 1:
            raise ValueError(f"QuantLinear: group size {group_size} must be positive")
        self.in_features, self.out_features, self.fmt, self.group_size = in_features, out_features, fmt, group_size
        self.compute_dtype = compute_dtype
        q_shape, s_shape = storage_shapes(fmt, out_features, in_features, group_size)
        self.register_buffer("weight_q", torch.empty(q_shape, dtype=_STORAGE[fmt], device=device))
        self.register_buffer("weight_scale", torch.empty(s_shape, dtype=_SCALE_DTYPE[fmt], device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                    device: torch.device | str | None = None, name: str = "weight") -> "QuantLinear":
        """Quantize an nn.Linear (on `device`, default its own); the bias is kept as it is, not copied."""
        w = linear.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        layer = cls(linear.in_features, linear.out_features, fmt, bias=False, group_size=group_size, device="meta",
                    compute_dtype=dtype)
        if not w.is_meta:  # a meta weight (planning, or a file's layout) keeps meta buffers
            q, s = quantize_weight(w.detach().to(device=device or w.device), fmt, group_size, name)
            layer._buffers["weight_q"], layer._buffers["weight_scale"] = q, s
        layer.bias = linear.bias
        return layer

    def dequantize(self, rows: int | None = None) -> torch.Tensor:
        """The weight (or its first `rows` output channels) in the compute dtype; scales are per row, so a row
        slice dequantizes to exactly the same values as the whole weight's rows."""
        q, s = self.weight_q, self.weight_scale
        if rows is not None:
            q, s = q[:rows], s[:rows]
        return dequantize_weight(q, s, self.fmt, self.in_features, self.compute_dtype, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight: a new tensor at each read, so read it once per use."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul:
            return self.scaled_matmul(x, self.bias)
        w = self.dequantize()
        return F.linear(x.to(w.dtype), w, self.bias)

    #: Run the matmul in fp8 on the tensor cores (enable_fp8_matmul), instead of dequantizing the weight.
    fp8_matmul = False

    def scaled_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T + bias with fp8 operands: x quantized per row (token) to e4m3 with its own scale, W's stored
        codes and per-channel scales used as they are, accumulated by torch._scaled_mm in the compute dtype."""
        if self.fmt != "fp8_e4m3fn":
            raise ValueError(f"the fp8 matmul needs fp8_e4m3fn weights, this layer's are {self.fmt}")
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        scale_a = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / _QMAX["fp8_e4m3fn"]
        xq = (rows / scale_a).clamp_(-_QMAX["fp8_e4m3fn"], _QMAX["fp8_e4m3fn"]).to(torch.float8_e4m3fn)
        scale_b = self.weight_scale.float().reshape(1, -1)
        out = _scaled_mm(xq, self.weight_q.t(), scale_a, scale_b, self.compute_dtype)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantLinear":
        # What `fn` does to a float tensor says where the module goes and in which dtype it should compute.
        probe = fn(torch.empty((), dtype=self.compute_dtype, device=self.weight_q.device))
        packed = {name: self._buffers.pop(name) for name in ("weight_q", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in packed.items():
                self._buffers[name] = buf.to(probe.device) if buf is not None else buf
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}{group}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}")


def _block_layers(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, parent module, attribute) of every quantizable linear of one block."""
    out = []
    for path in QUANTIZED_LAYERS:
        parent_name, leaf = path.split(".")
        out.append((path, getattr(block, parent_name), leaf))
    return out


def quantize_model(model: nn.Module, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                   device: torch.device | str | None = None) -> nn.Module:
    """Replace every block linear of an Infinity model by a QuantLinear, in place, one layer at a time.

    Each layer is quantized on `device` (default: where its weight is) and its full-precision weight is dropped
    as soon as it is replaced, so the peak stays near the model's own size. "none" returns the model unchanged.
    """
    fmt = check_format(fmt)
    if fmt == "none":
        return model
    if group_size < 1:
        raise ValueError(f"group size {group_size} must be positive")
    cfg = model.cfg
    for index, block in enumerate(model.blocks):
        for path, parent, leaf in _block_layers(block):
            layer = getattr(parent, leaf)
            if isinstance(layer, QuantLinear):
                raise ValueError(f"{cfg.block_key(index)}.{path} is already quantized ({layer.fmt})")
            setattr(parent, leaf, QuantLinear.from_linear(layer, fmt, group_size, device,
                                                          name=f"{cfg.block_key(index)}.{path}.weight"))
            del layer
    return model


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """a @ b with fp8 operands scaled per row of a and per column of b, in `dtype` (torch 2.4 and older also
    returned amax)."""
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)
    return out[0] if isinstance(out, tuple) else out


def scaled_mm_problem(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why this torch cannot run the row-wise scaled fp8 matmul on `device` in `dtype` (None if it can), found by
    running a tiny one: support depends on the torch release, the GPU and the output dtype together."""
    a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
    b = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
    try:
        out = _scaled_mm(a, b.t(), torch.ones(16, 1, device=device), torch.ones(1, 16, device=device), dtype)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"torch {torch.__version__} cannot run the row-wise scaled fp8 matmul here in {dtype}: {first}"
    if out.dtype != dtype or not bool((out == 32).all()):
        return f"torch {torch.__version__}'s row-wise scaled fp8 matmul gave a wrong result here in {dtype}"
    return None


def fp8_matmul_problem(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why `device` cannot run the scaled fp8 matmul in `dtype` (None if it can): it needs CUDA fp8 tensor cores
    (compute capability 8.9: Ada, Hopper and later) and a torch whose `_scaled_mm` takes row-wise scales there."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if device.type != "cuda":
        return f"it needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or later); this device is {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"it needs fp8 tensor cores (compute capability 8.9 or later: Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return scaled_mm_problem(device, dtype)


def enable_fp8_matmul(model: nn.Module, device: torch.device | str, force: bool = False) -> str | None:
    """Run every fp8 block linear's matmul in fp8 where `device` has fp8 tensor cores; elsewhere keep the
    dequantized bf16 matmul and return the note saying why (`force` skips the device check: tests on the CPU)."""
    fmt, _ = model_format(model)
    if fmt != "fp8_e4m3fn":
        raise ValueError(f"the fp8 matmul needs weights stored as fp8_e4m3fn (weights fp8_e4m3fn); this model's "
                         f"are {fmt}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    problem = None if force else fp8_matmul_problem(device, layers[0].compute_dtype)
    if problem is not None:
        return f"fp8 matmul not used, the dequantized matmul runs instead: {problem}"
    for layer in layers:
        layer.fp8_matmul = True
    return None


def model_format(model: nn.Module) -> tuple[str, int]:
    """(format, group size) of a model's block linears: ("none", 0) when they are plain nn.Linear."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return "none", 0
    kinds = {(m.fmt, m.group_size if m.fmt == "int4" else 0) for m in layers}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes weight formats {sorted(kinds)}")
    return kinds.pop()


# ------------------------------------------------------------------------------------------ sizes, for planning


def linear_shapes(cfg: InfinityConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantized linear of one block."""
    C, Fh = cfg.embed_dim, cfg.ffn_hidden
    return {"sa.mat_qkv": (3 * C, C), "sa.proj": (C, C), "ca.mat_q": (C, C), "ca.mat_kv": (2 * C, C),
            "ca.proj": (C, C), "ffn.fc1": (Fh, C), "ffn.fc2": (C, Fh)}


def quantized_param_count(cfg: InfinityConfig) -> int:
    """Weights the formats store compactly (every block linear's weight, biases excluded)."""
    return cfg.depth * sum(o * i for o, i in linear_shapes(cfg).values())


def bytes_per_param(fmt: str, in_features: int = 4096) -> float:
    """Storage bytes per weight element of a block linear with `in_features` inputs, scales included.

    "none" is 2.0 (bf16/fp16 blocks, as on a GPU); fp32 blocks take 4, see `weight_bytes` for any block dtype.
    """
    fmt = check_format(fmt)
    if in_features < 1:
        raise ValueError(f"in_features: {in_features} must be positive")
    if fmt == "none":
        return 2.0
    if fmt == "int4":
        return (in_features / 2 + 2 * _group_count(in_features, DEFAULT_GROUP_SIZE)) / in_features
    return 1.0 + 4.0 / in_features


@functools.lru_cache(maxsize=64)
def weight_bytes(cfg: InfinityConfig, fmt: str, block_dtype: torch.dtype) -> int:
    """Bytes the loaded transformer holds: the block linears in `fmt`, the rest of the blocks in `block_dtype`,
    everything outside the blocks in float32 (as the loader keeps them). Counted on the meta device, exactly."""
    fmt = check_format(fmt)
    from .transformer import Infinity

    with torch.device("meta"):
        model = Infinity(cfg)
    quantize_model(model, fmt)
    model.set_block_dtype(block_dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def dequant_workspace_bytes(cfg: InfinityConfig, fmt: str, block_dtype: torch.dtype) -> int:
    """Transient bytes of dequantized weights while a block runs (0 for "none"): the FFN holds fc1 and fc2 across
    its token slices, the attention its qkv weight."""
    if check_format(fmt) == "none":
        return 0
    C, Fh = cfg.embed_dim, cfg.ffn_hidden
    return max(2 * C * Fh, 3 * C * C) * torch.empty((), dtype=block_dtype, device="meta").element_size()


# ------------------------------------------------------------------------------------------ pre-quantized files


def file_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata of a quantized model: its format, group size, file version and architecture."""
    fmt, group = model_format(model)
    if fmt == "none":
        raise ValueError("the model is not quantized; call quantize_model (or load with weights=...) first")
    cfg = model.cfg
    meta = {"format": "pt", META_FORMAT: fmt, META_GROUP: str(group or DEFAULT_GROUP_SIZE),
            META_VERSION: str(FILE_VERSION), META_LAYERS: ",".join(QUANTIZED_LAYERS)}
    meta.update({key: str(getattr(cfg, attr)) for key, attr in _META_ARCH.items()})
    return meta


#: Attribute `load_transformer` sets on a model: its file's safetensors metadata ({} for .pth and shard folders).
SOURCE_METADATA = "source_metadata"


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write a quantized model as one .safetensors file (packed weights, scales, the rest as loaded) plus metadata
    that `load_transformer` recognises, so it loads without quantizing again; the source file's own metadata (e.g.
    the resolution it was trained at) is carried over, except the entries this format sets itself."""
    carried = getattr(model, SOURCE_METADATA, None) or {}
    return write_safetensors(model.state_dict(), path, {**carried, **file_metadata(model)})


#: Largest group size a pre-quantized file's metadata may declare.
MAX_GROUP_SIZE = 2**20


def file_format(metadata: Mapping[str, str], source: str) -> tuple[str, int] | None:
    """(format, group size) a pre-quantized file's metadata declares, None for an ordinary checkpoint; a
    CheckpointError naming the file and the entry for an unknown format, version or group size."""
    if META_FORMAT not in metadata:
        return None
    version = metadata.get(META_VERSION, "")
    if not whole_number(version, FILE_VERSION):  # None (not ASCII digits, too large) or 0
        raise CheckpointError(f"{source}: metadata {META_VERSION} = {shown(version)}; this version reads "
                              f"pre-quantized files of version 1 to {FILE_VERSION} (a newer ScaleKV wrote it?)")
    fmt = metadata[META_FORMAT]
    if fmt not in QUANTIZED_FORMATS:
        raise CheckpointError(f"{source}: metadata {META_FORMAT} = {shown(fmt)} is not a weight format this "
                              f"version knows ({', '.join(QUANTIZED_FORMATS)})")
    group = metadata.get(META_GROUP, "")
    group_size = whole_number(group, MAX_GROUP_SIZE)
    if not group_size:  # None or 0
        raise CheckpointError(f"{source}: metadata {META_GROUP} = {shown(group)} is not a group size "
                              f"(a whole number from 1 to {MAX_GROUP_SIZE})")
    layers = metadata.get(META_LAYERS, ",".join(QUANTIZED_LAYERS))
    if layers != ",".join(QUANTIZED_LAYERS):
        raise CheckpointError(f"{source}: metadata {META_LAYERS} = {shown(layers)}; this version quantizes "
                              f"{','.join(QUANTIZED_LAYERS)}")
    return fmt, group_size


def logical_shapes(shapes: Mapping[str, Sequence[int]], fmt: str | None = None) -> dict[str, tuple[int, ...]]:
    """A pre-quantized file's shapes as the unquantized checkpoint's: `X.weight_q` -> `X.weight` (out, in), scales
    dropped; what architecture detection and key checks expect. Without `fmt` an int4 layer keeps its packed input
    width (enough for `detect_infinity_config`, which reads output widths only); other shapes pass unchanged."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if key.endswith(SCALE_SUFFIX):
            continue
        if key.endswith(PACKED_SUFFIX) and len(shape) == 2:
            out[key[:-len(PACKED_SUFFIX)] + ".weight"] = (shape[0], shape[1] * (2 if fmt == "int4" else 1))
        else:
            out[key] = shape
    return out


def check_file_architecture(metadata: Mapping[str, str], cfg: InfinityConfig, source: str) -> None:
    """The architecture the metadata declares must be the one the tensors describe."""
    for key, attr in _META_ARCH.items():
        if key in metadata and metadata[key] != str(getattr(cfg, attr)):
            raise CheckpointError(f"{source}: metadata {key} = {shown(metadata[key])} but the tensors describe "
                                  f"{attr} {getattr(cfg, attr)} ({cfg.describe()}): the file was written for "
                                  f"another architecture or altered")


def check_quantized_tensors(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Every packed weight and scale has its format's dtype, every scale is positive and finite in float32 times
    the largest code, and no fp8 code is NaN: a corrupt file is refused here, not drawn as a black image."""
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        for suffix, expected in ((PACKED_SUFFIX, _STORAGE[layer.fmt]), (SCALE_SUFFIX, _SCALE_DTYPE[layer.fmt])):
            key = name + suffix
            t = sd[key]
            if t.dtype != expected:
                raise CheckpointError(f"{source}: '{key}' is {str(t.dtype).replace('torch.', '')}, expected "
                                      f"{str(expected).replace('torch.', '')} for {layer.fmt}")
        scale = sd[name + SCALE_SUFFIX]
        top = _CODE_MAGNITUDE[layer.fmt]
        bad = ~(torch.isfinite(scale) & (scale > 0) & torch.isfinite(scale.float() * top))
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise CheckpointError(f"{source}: '{name}{SCALE_SUFFIX}' holds {float(scale.flatten()[i])!r} at index "
                                  f"{i}; scales must be positive, and finite times the largest code ({top:g}) "
                                  f"(a corrupt file?)")
        if layer.fmt == "fp8_e4m3fn":  # e4m3fn has no infinity; S.1111.111 is its NaN
            codes = sd[name + PACKED_SUFFIX].view(torch.uint8)
            nan = (codes & 0x7F) == 0x7F
            if nan.any():
                i = int(nan.flatten().nonzero()[0])
                raise CheckpointError(f"{source}: '{name}{PACKED_SUFFIX}' holds a NaN fp8 code at index {i} "
                                      f"(a corrupt file?)")


def quantization_error(w: torch.Tensor, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Relative Frobenius error ||dequant(quant(w)) - w|| / ||w|| of one weight, in float32."""
    if check_format(fmt) == "none":
        return 0.0
    q, s = quantize_weight(w, fmt, group_size)
    back = dequantize_weight(q, s, fmt, w.shape[1], torch.float32, group_size)
    return float(torch.linalg.norm(back - w.float()) / torch.linalg.norm(w.float()).clamp_min(1e-30))


def weights_gib(cfg: InfinityConfig, block_dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GiB of the loaded transformer in every format (a table for the docs)."""
    return {fmt: weight_bytes(cfg, fmt, block_dtype) / 2**30 for fmt in WEIGHT_FORMATS}

