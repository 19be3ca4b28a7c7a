"""Build Infinity transformers and BSQ-VAEs from checkpoint files, with the architecture read off the tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .checkpoint import CheckpointError, check_keys, load_state_dict, safetensors_metadata, tensor_shapes
from .devices import check_dtype, cuda_native_bf16, dtype_problem
from .limits import shown
from .model import quant
from .model.config import InfinityConfig, detect_infinity_config
from .model.transformer import Infinity
from .model.vae import BSQVAE, ENCODER_PREFIX, VAEConfig, detect_vae_config
from .schedules import Schedule, schedule_for_pixels, schedule_from_label

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: A dtype's precision name: the one inversion of PRECISIONS (reports, the planner and the nodes name dtypes so).
PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """'auto' is bf16 where the device computes it natively (CUDA sm80+, as the original runs; MPS on macOS 14+),
    fp16 on older CUDA cards (emulated bf16 is slow there), fp32 on the CPU and elsewhere, where exactness matters
    more than speed. A precision the device cannot hold (bf16 on an MPS before macOS 14) is refused by name."""
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if cuda_native_bf16(dev) else torch.float16
        if dev.type == "mps":
            return torch.bfloat16 if dtype_problem(dev, torch.bfloat16) is None else torch.float32
        return torch.float32
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {shown(precision)}; choose auto, {', '.join(PRECISIONS)}")
    check_dtype(dev, PRECISIONS[precision], "precision", precision, "choose fp32 or fp16 (or auto)")
    return PRECISIONS[precision]


def t5_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype T5 runs in: fp16 on CUDA (the original's choice) unless fp32 is asked, fp32 elsewhere (the CPU)."""
    dtype = resolve_precision(precision, device)
    return torch.float16 if dtype != torch.float32 and torch.device(device).type == "cuda" else torch.float32


def _floating(dtype: torch.dtype | str) -> bool:
    """A torch dtype, or a safetensors header's dtype name (F32, BF16, F8_E4M3, I32 ...), that holds real numbers."""
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else dtype.upper().startswith(("F", "BF"))


def check_float_tensors(expected: Mapping[str, torch.Tensor] | None, dtypes: Mapping[str, torch.dtype | str],
                        source: str) -> None:
    """Refuse integer or bool tensors where the model (`expected`; None: every key) holds floating-point ones,
    naming the file and the keys: load_state_dict fails on them with a page of traceback, and Hugging Face's
    loader casts them silently."""
    wrong = [f"'{k}' is {str(d).replace('torch.', '')}" for k, d in dtypes.items()
             if (expected is None or (k in expected and expected[k].is_floating_point())) and not _floating(d)]
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise CheckpointError(f"{source}: {', '.join(wrong[:5])}{more}; expected floating-point weights "
                              f"(a wrongly converted file?)")


#: (a key only this kind of checkpoint holds, what it is, where it goes): to name a file given in the wrong place.
_KINDS = (("word_embed.weight", "an Infinity transformer",
           "the transformer (the loader's transformer, or --transformer)"),
          ("decoder.conv_in.conv.weight", "a BSQ-VAE", "the VAE (the loader's vae, or --vae)"),
          ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder",
           "the text encoder (the loader's text_encoder, or --text-encoder)"))


def check_kind(keys: Iterable[str], wanted: str, source: str) -> None:
    """A checkpoint of another kind than `wanted` ("an Infinity transformer", "a BSQ-VAE") is refused naming what
    it is and where it goes: a VAE picked as the transformer failed with "missing key 'word_embed.weight'"."""
    keys = set(keys)
    if any(key in keys for key, what, _ in _KINDS if what == wanted):
        return
    for key, what, place in _KINDS:
        if key in keys:
            raise CheckpointError(f"{source} is {what} checkpoint, not {wanted}: give it as {place}")


def build_transformer_on_meta(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> Infinity:
    """Instantiate the detected architecture without memory and check that every key and shape fits."""
    check_kind(shapes, "an Infinity transformer", source)
    cfg = detect_infinity_config(shapes, source)
    with torch.device("meta"):
        model = Infinity(cfg)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, source)
    return model


def transformer_config_of(path: str | Path) -> InfinityConfig:
    """The architecture of a transformer file or shard folder from its tensor shapes alone (a pre-quantized file's
    packed weights read as the layers they hold), so what it needs and fits is known before the weights load."""
    shapes = quant.logical_shapes(tensor_shapes(path))
    check_kind(shapes, "an Infinity transformer", str(path))
    return detect_infinity_config(shapes, str(path))


def _prepare_transformer_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop buffers the original also discards on load (stale attention masks of training runs)."""
    for stale in ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen"):
        sd.pop(stale, None)
    return sd


def load_transformer(path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32",
                     weights: str = "none", run_device: torch.device | str | None = None,
                     weights_field: str = "weights") -> Infinity:
    """Load an Infinity checkpoint (.safetensors, .pth, or the 8B's sharded folder) strictly.

    `weights` (a `quant.WEIGHT_FORMATS` name) stores the block linears compactly, quantized block by block as the
    model is built. A pre-quantized file (`save_quantized`, `convert --weights`) is recognised by its metadata and
    loads as it is; `weights` must then be "none" or the file's own format. `run_device` is where the model will
    run when it loads elsewhere (ComfyUI loads on the CPU, then moves it): a precision or format that device
    cannot hold (fp8 or, before macOS 14, bf16 on MPS) is refused here, naming `weights_field`, before any weight
    is read (a pre-quantized file's own format once its header is read); 'auto' resolves for that device.
    """
    weights = quant.check_format(weights, weights_field)
    target = torch.device(device if run_device is None else run_device)
    block_dtype = resolve_precision(precision, target)
    quant.check_format_on(weights, target, weights_field)
    sd = _prepare_transformer_state(load_state_dict(path))
    prequantized = _prequantized_format(path, sd)
    if prequantized is not None:
        quant.check_format_on(prequantized[0], target, f"{path}: pre-quantized as")
        model = _build_prequantized(path, sd, prequantized, weights)
    else:
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        model = build_transformer_on_meta(shapes, str(path))
        check_float_tensors(model.state_dict(), {k: v.dtype for k, v in sd.items()}, str(path))
        model.load_state_dict(sd, strict=True, assign=True)
        # each full-precision block weight is freed as its quantized layer replaces it, once `sd` lets go of it
        sd.clear()
        quant.quantize_model(model, weights, device=device)
    del sd
    # what save_quantized carries into a converted file (the trained resolution, ...)
    setattr(model, quant.SOURCE_METADATA, {} if Path(path).is_dir() else safetensors_metadata(path))
    place_transformer(model, device, block_dtype)
    return model.eval().requires_grad_(False)


def place_transformer(model: Infinity, device: torch.device | str, block_dtype: torch.dtype) -> Infinity:
    """Blocks straight to `block_dtype`, one chunk at a time, the rest to fp32 (as the original runs them), so a
    bf16 checkpoint never passes through a float32 copy of the whole model (31 GiB for the 8B)."""
    for chunk in model.block_chunks:
        chunk.to(device=device, dtype=block_dtype)
    for name, child in model.named_children():
        if name != "block_chunks":
            child.to(device=device, dtype=torch.float32)
    for name, param in list(model.named_parameters(recurse=False)):
        setattr(model, name, torch.nn.Parameter(param.detach().to(device=device, dtype=torch.float32),
                                                requires_grad=param.requires_grad))
    return model


#: Metadata key of a transformer file naming the resolution it was trained at (the embedded model's file has it).
META_RESOLUTION = "scalekv_resolution"
#: What the released 2B and 8B were trained at: the 1M-pixel sizes, every aspect template.
RELEASED_RESOLUTION = "1024x1024 (1:1)"


def native_resolution(path: str | Path) -> tuple[str, bool]:
    """(the resolution a transformer file was trained at, whether every aspect at that size was trained too): its
    metadata's, else the released models' 1024x1024 at any aspect. The sampler's "auto" uses it."""
    return native_from_metadata({} if Path(path).is_dir() else safetensors_metadata(path))


def native_from_metadata(meta: dict) -> tuple[str, bool]:
    """native_resolution from a file's metadata already read (a loaded model keeps it: quant.SOURCE_METADATA)."""
    label = meta.get(META_RESOLUTION)
    if label:
        try:
            schedule_from_label(label)
            return label, False
        except ValueError:
            pass  # a label this version does not know: treated as a released model
    return RELEASED_RESOLUTION, True


def schedule_for_size(native: tuple[str, bool], width: int | None = None, height: int | None = None) -> Schedule:
    """The schedule of a size in pixels, a side not given taken from the trained resolution `native`
    (native_resolution); neither given: the trained resolution itself. The CLI's and the API's one rule."""
    trained = schedule_from_label(native[0])
    if width is None and height is None:
        return trained
    th, tw = trained.pixel_size
    return schedule_for_pixels(tw if width is None else width, th if height is None else height)


def resolution_note(native: tuple[str, bool], schedule: Schedule, model: str = "this model",
                    hint: str = "'auto' picks {label}") -> str | None:
    """A sentence when `schedule` is outside what the model was trained at (same size class; same aspect too when
    only one was trained), else None; it ends with `hint` ({label}: the trained resolution), the caller's way back."""
    label, any_aspect = native
    trained = schedule_from_label(label)
    if trained.size == schedule.size and (any_aspect or trained.template == schedule.template):
        return None
    h, w = schedule.pixel_size
    where = f"{label.split(' ')[0]}-class sizes at any aspect" if any_aspect else label
    return (f"{w}x{h} is outside what {model} was trained at ({where}): expect a weaker picture; "
            + hint.format(label=label))


def declared_format(path: str | Path) -> tuple[str, int] | None:
    """(format, group size) a checkpoint's header declares (`convert --weights`), None for an ordinary checkpoint or
    a shard folder: read without loading a tensor, so the planner and the CLI see what the loader will."""
    return quant.file_format({} if Path(path).is_dir() else safetensors_metadata(path), str(path))


def format_to_load(declared: str | None, weights: str, source: str, field: str = "weights") -> str:
    """The format a checkpoint loads in: a pre-quantized file's own (asked as 'none' or as that format), else
    `weights`; another quantized format is refused naming the file, `field` and both formats."""
    if declared is None:
        return weights
    if weights not in ("none", declared):
        raise CheckpointError(f"{source}: the file is already quantized as {declared}; load it with {field} 'none' "
                              f"or '{declared}', or quantize the original checkpoint to {weights}")
    return declared


def _prequantized_format(path: str | Path, sd: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(format, group size) of a pre-quantized file, None for an ordinary checkpoint."""
    packed = next((k for k in sd if k.endswith((quant.PACKED_SUFFIX, quant.SCALE_SUFFIX))), None)
    found = declared_format(path)
    if found is None and packed is not None:
        raise CheckpointError(f"{path}: holds quantized tensors ('{packed}') but no '{quant.META_FORMAT}' metadata; "
                              f"pre-quantized checkpoints are single .safetensors files written by "
                              f"`python -m scalekv_core convert SRC DST --weights FORMAT`")
    return found


def _build_prequantized(path: str | Path, sd: dict[str, torch.Tensor], found: tuple[str, int],
                        weights: str) -> Infinity:
    """A pre-quantized file's model, checked against its metadata, its keys, shapes and dtypes, no quantizing."""
    fmt, group = found
    format_to_load(fmt, weights, str(path))
    model = build_transformer_on_meta(quant.logical_shapes({k: v.shape for k, v in sd.items()}, fmt), str(path))
    quant.check_file_architecture(safetensors_metadata(path), model.cfg, str(path))
    quant.quantize_model(model, fmt, group)  # meta layers in the file's layout
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, str(path))
    quant.check_quantized_tensors(model, sd, str(path))
    check_float_tensors(model.state_dict(), {k: v.dtype for k, v in sd.items()}, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def vae_config_of(shapes: Mapping[str, Sequence[int]], source: str) -> VAEConfig:
    """The BSQ-VAE a checkpoint's shapes describe, or an error naming the file (and what it is, if another kind):
    what the loader builds and the planner sizes."""
    check_kind(shapes, "a BSQ-VAE", source)
    try:
        return detect_vae_config(shapes)
    except ValueError as e:
        raise CheckpointError(f"{source}: not a BSQ-VAE checkpoint: {e}") from e


def load_vae(path: str | Path, device: torch.device | str = "cpu", decoder_only: bool = False) -> BSQVAE:
    """Load a BSQ-VAE checkpoint ({'vae': ...} .pth or .safetensors) strictly; the decoder runs in float32.

    `decoder_only` drops the encoder once the file is checked whole: generation never encodes, and the encoder is
    about 40% of the weights (0.17 GB of the 2B's VAE) that would otherwise sit on the GPU."""
    sd = load_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg = vae_config_of(shapes, str(path))
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    check_keys({k: tuple(v.shape) for k, v in vae.state_dict().items()}, shapes, str(path))
    check_float_tensors(vae.state_dict(), {k: v.dtype for k, v in sd.items()}, str(path))
    if decoder_only:
        vae.encoder = None
        sd = {k: v for k, v in sd.items() if not k.startswith(ENCODER_PREFIX)}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def vae_patchify_for(transformer_cfg: InfinityConfig, vae_cfg: VAEConfig, names: tuple[str, str] = ("transformer", "VAE")) -> bool:
    """Whether the transformer works on 2x2-patchified latents of this VAE; an error if the two don't fit."""
    d = vae_cfg.codebook_dim
    if transformer_cfg.d_vae == d and not vae_cfg.patchify:
        return False
    if transformer_cfg.d_vae == 4 * d and vae_cfg.patchify:
        return True
    raise ValueError(
        f"the VAE ({names[1]}: {d} bits, patch {vae_cfg.patch_size}) does not fit the transformer ({names[0]}: "
        f"{transformer_cfg.d_vae} bits per token). Infinity-2B needs a 32-bit patch-16 VAE such as "
        f"infinity_vae_d32reg.pth; Infinity-8B needs the 14-bit patch-8 infinity_vae_d56_f8_14_patchify.pth")
