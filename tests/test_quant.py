"""Weight formats (scalekv_core.model.quant): error bounds, the quantized layer, loading, pre-quantized files, sizes,
and the errors for files that do not fit."""
from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scalekv_core import cli
from scalekv_core.checkpoint import CheckpointError, load_state_dict
from scalekv_core.limits import InputError
from scalekv_core.loader import load_transformer, load_vae
from scalekv_core.model import quant, transformer
from scalekv_core.model.config import KNOWN_MODELS
from scalekv_core.model.text_encoder import T5TextEncoder, TextConditioning
from scalekv_core.model.transformer import Infinity
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "infinity-tiny"
EMBEDDED = ROOT / "default_model"
MODELS = {
    "tiny": (TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors"),
    "embedded": (EMBEDDED / "infinity" / "infinity_shapes.safetensors",
                 EMBEDDED / "vae" / "infinity_shapes_vae.safetensors"),
}
FORMATS = list(quant.QUANTIZED_FORMATS)
SCHEDULE = get_schedule(1.0, "0.06M")  # 256x256, 7 scales
#: Relative Frobenius error of dequant(quant(W)) on a Gaussian matrix (measured: 0.0075 / 0.026 / 0.108).
ERROR_BOUNDS = {"int8": 0.009, "fp8_e4m3fn": 0.03, "int4": 0.11}


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so float8 (and NaN) compare bit for bit."""
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def _cond(model: str) -> TextConditioning:
    if model == "tiny":
        return TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")
    return T5TextEncoder.from_folder(EMBEDDED / "text_encoders" / "t5_shapes").encode(
        ["a large red circle at the top left on a blue background"])


def _generate(model: Infinity, vae_path: Path, cond: TextConditioning, seed: int = 3):
    pipe = InfinityPipeline(model, load_vae(vae_path))
    return pipe.generate(cond, seed=seed, cfg=3.0, tau=1.0, schedule=SCHEDULE)


# ------------------------------------------------------------------------------------------ formats and errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_error_on_a_random_matrix(fmt: str) -> None:
    w = _rand(256, 512) * 0.02
    err = quant.quantization_error(w, fmt)
    assert 0 < err < ERROR_BOUNDS[fmt], err


def test_error_ordering_int8_fp8_int4() -> None:
    w = _rand(128, 1024, seed=1)
    errs = [quant.quantization_error(w, f) for f in ("int8", "fp8_e4m3fn", "int4")]
    assert errs == sorted(errs)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_formats_round_to_the_nearest_step(fmt: str) -> None:
    """Every element is within half a step (its scale / 2) of the original: round-to-nearest, no clipping."""
    w = _rand(64, 192, seed=2)
    q, s = quant.quantize_weight(w, fmt, group_size=64)
    back = quant.dequantize_weight(q, s, fmt, 192, torch.float32, group_size=64)
    step = s.float().unsqueeze(-1) if fmt == "int8" else s.float().repeat_interleave(64, dim=1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()


def test_fp8_error_is_within_half_a_mantissa_step() -> None:
    w = _rand(64, 256, seed=3)
    q, s = quant.quantize_weight(w, "fp8_e4m3fn")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (64,)
    back = quant.dequantize_weight(q, s, "fp8_e4m3fn", 256, torch.float32)
    # 3 mantissa bits: half an ulp is 1/16 of the value; below the smallest normal (2^-6) the step is 2^-9
    bound = torch.maximum(w.abs() / 16, s.unsqueeze(-1) * 2.0**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-5)).all()


def test_representable_weights_come_back_exactly() -> None:
    """A weight that is exactly (stored value) x (power-of-two scale) dequantizes to itself, bit for bit."""
    g = torch.Generator().manual_seed(4)
    for fmt, qmax in (("int8", 127), ("int4", 7)):
        ints = torch.randint(-qmax, qmax + 1, (8, 128), generator=g).float()
        ints[:, 0], ints[:, 64] = qmax, -qmax  # every row and group reaches its maximum: amax / qmax is the step
        w = ints * 2.0**-7
        q, s = quant.quantize_weight(w, fmt)
        assert torch.equal(quant.dequantize_weight(q, s, fmt, 128, torch.float32), w), fmt
    values = (torch.randn(8, 128, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    values[:, 0] = 448.0
    w = values * 2.0**-10
    q, s = quant.quantize_weight(w, "fp8_e4m3fn")
    assert torch.equal(quant.dequantize_weight(q, s, "fp8_e4m3fn", 128, torch.float32), w)


def test_int4_packing_layout_and_partial_group() -> None:
    w = _rand(3, 100, seed=5)  # 100 inputs: one group of 64 and a partial one of 36
    q, s = quant.quantize_weight(w, "int4", group_size=64)
    assert q.dtype == torch.uint8 and q.shape == (3, 50) and s.dtype == torch.float16 and s.shape == (3, 2)
    lo, hi = (q & 15).long() - 8, (q >> 4).long() - 8  # even input index in the low nibble
    expected = torch.cat([torch.round(w[:, :64] / s[:, :1].float()), torch.round(w[:, 64:] / s[:, 1:].float())], 1)
    assert torch.equal(lo.float(), expected[:, 0::2]) and torch.equal(hi.float(), expected[:, 1::2])
    back = quant.dequantize_weight(q, s, "int4", 100, torch.float32)
    assert back.shape == (3, 100) and quant.quantization_error(w, "int4") < ERROR_BOUNDS["int4"]


def test_zero_rows_and_odd_widths() -> None:
    w = torch.zeros(4, 64)
    for fmt in FORMATS:
        q, s = quant.quantize_weight(w, fmt)
        assert (s.float() > 0).all() and torch.equal(quant.dequantize_weight(q, s, fmt, 64, torch.float32), w)
    with pytest.raises(ValueError, match="odd"):
        quant.quantize_weight(torch.ones(4, 65), "int4")
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize_weight(torch.full((2, 8), float("nan")), "int8", name="x.weight")


def test_unknown_format_is_named() -> None:
    for call in (lambda: quant.check_format("int3"), lambda: quant.bytes_per_param("int3"),
                 lambda: load_transformer(MODELS["tiny"][0], weights="int3")):
        with pytest.raises(InputError, match=r"weights: unknown value 'int3'; choose one of none, fp8_e4m3fn"):
            call()


# ------------------------------------------------------------------------------------------ the quantized layer


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_casts_compute_not_storage(fmt: str) -> None:
    lin = torch.nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(_rand(96, 128, seed=7) * 0.1)
        lin.bias.copy_(_rand(96, seed=8) * 0.1)
    layer = quant.QuantLinear.from_linear(lin, fmt)
    stored = (layer.weight_q.dtype, layer.weight_scale.dtype)
    x = _rand(2, 5, 128, seed=6)
    y32, w32 = layer(x), layer.weight
    assert y32.dtype == torch.float32
    ref = lin(x).detach()
    assert float(torch.linalg.norm(y32.detach() - ref) / torch.linalg.norm(ref)) < ERROR_BOUNDS[fmt]
    layer.to(torch.bfloat16)
    assert (layer.weight_q.dtype, layer.weight_scale.dtype) == stored  # storage untouched by the cast
    assert layer.compute_dtype == layer.bias.dtype == layer.weight.dtype == torch.bfloat16
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(rows=40), layer.weight[:40])
    layer.float()
    assert torch.equal(layer.weight, w32)  # back to fp32 compute: the same weight, bit for bit


def test_fp8_storage_on_cpu_computes_in_the_block_dtype() -> None:
    model = load_transformer(MODELS["tiny"][0], "cpu", "fp32", weights="fp8_e4m3fn")
    layer = model.blocks[0].sa.mat_qkv
    assert isinstance(layer, quant.QuantLinear) and layer.weight_q.dtype == torch.float8_e4m3fn
    assert layer.weight_q.device.type == "cpu" and layer.weight.dtype == torch.float32  # upcast for compute
    assert model.block_dtype == torch.float32
    bf = load_transformer(MODELS["tiny"][0], "cpu", "bf16", weights="fp8_e4m3fn")
    assert bf.block_dtype == bf.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
    assert bf.blocks[0].ffn.fc1.weight_q.dtype == torch.float8_e4m3fn


def test_which_layers_are_quantized() -> None:
    model = load_transformer(MODELS["tiny"][0], weights="int8")
    quantized = {n for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
    expected = {f"{model.cfg.block_key(i)}.{p}" for i in range(model.cfg.depth) for p in quant.QUANTIZED_LAYERS}
    assert quantized == expected
    plain = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert plain == {"text_proj_for_sos.ca.mat_kv", "text_proj_for_sos.ca.proj", "text_proj_for_ca.0",
                     "text_proj_for_ca.2", "word_embed", "shared_ada_lin.1", "head_nm.ada_lin.1", "head"}
    assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules() if n in plain)


def test_each_weight_dequantizes_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token slices (QKV and FFN) share one dequantization; the cache's query weight takes its rows only."""
    from scalekv_core.kvcache import CacheConfig

    monkeypatch.setattr(transformer, "QKV_CHUNK", 16)
    monkeypatch.setattr(transformer, "FFN_CHUNK", 16)
    model = load_transformer(MODELS["tiny"][0], weights="int4")
    calls: list[tuple[str, int | None]] = []
    names = {m: n for n, m in model.named_modules()}
    real = quant.QuantLinear.dequantize
    monkeypatch.setattr(quant.QuantLinear, "dequantize",
                        lambda self, rows=None: calls.append((names[self], rows)) or real(self, rows))
    pipe = InfinityPipeline(model, load_vae(MODELS["tiny"][1]))
    pipe.generate(_cond("tiny"), seed=0, schedule=SCHEDULE, cache=CacheConfig(policy="snapkv", budget="50%"))
    per_layer: dict[tuple[str, int | None], int] = {}
    for c in calls:
        per_layer[c] = per_layer.get(c, 0) + 1
    n = SCHEDULE.num_scales
    C = model.cfg.embed_dim
    for i in range(model.cfg.depth):
        key = model.cfg.block_key(i)
        for path in quant.QUANTIZED_LAYERS:
            # once per scale, whatever the slices; the text's keys and values are projected once per image
            expected = 1 if path == "ca.mat_kv" else n
            assert per_layer[(f"{key}.{path}", None)] == expected, (key, path)
        assert per_layer[(f"{key}.sa.mat_qkv", C)] == n  # the policy's query rows: a third of the weight


# ------------------------------------------------------------------------------------------ loading and files


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Per model and format: the model quantized on load, its saved file, and the same file reloaded."""
    out: dict[tuple[str, str], dict] = {}
    folder = tmp_path_factory.mktemp("quantized")
    for name, (path, _) in MODELS.items():
        for fmt in FORMATS:
            model = load_transformer(path, "cpu", "fp32", weights=fmt)
            file = quant.save_quantized(model, folder / f"{name}_{fmt}.safetensors")
            out[(name, fmt)] = {"model": model, "file": file, "reloaded": load_transformer(file, "cpu", "fp32")}
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_saved_file_reloads_bit_for_bit(converted: dict, name: str, fmt: str) -> None:
    entry = converted[(name, fmt)]
    a, b = entry["model"].state_dict(), entry["reloaded"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k
    layer = entry["reloaded"].blocks[-1].ffn.fc2
    assert isinstance(layer, quant.QuantLinear) and layer.fmt == fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_models_generate_identically_from_both_paths(converted: dict, name: str, fmt: str) -> None:
    entry = converted[(name, fmt)]
    vae = MODELS[name][1]
    cond = _cond(name)
    on_load = _generate(entry["model"], vae, cond)
    from_file = _generate(entry["reloaded"], vae, cond)
    for x, y in zip(on_load.samples.bits, from_file.samples.bits):
        assert torch.equal(x, y)
    assert np.array_equal(on_load.images, from_file.images)
    img = on_load.images
    assert img.shape == (1, 256, 256, 3) and img.dtype == np.uint8 and img.std() > 1  # an image, not a flat field


def test_int8_stays_close_to_the_unquantized_model(converted: dict) -> None:
    """On the trained embedded model int8 keeps most bits; int4 keeps fewer (the fidelity benchmark measures more)."""
    path, vae = MODELS["embedded"]
    cond = _cond("embedded")
    ref = _generate(load_transformer(path), vae, cond)
    agree = {}
    for fmt in FORMATS:
        out = _generate(converted[("embedded", fmt)]["model"], vae, cond)
        same = sum(int((a == b).sum()) for a, b in zip(out.samples.bits, ref.samples.bits))
        agree[fmt] = same / sum(b.numel() for b in ref.samples.bits)
    assert agree["int8"] > 0.9 and agree["int8"] >= agree["int4"], agree


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_file_is_smaller_by_the_counted_bytes(converted: dict, name: str, fmt: str) -> None:
    original, file = MODELS[name][0], converted[(name, fmt)]["file"]
    cfg = converted[(name, fmt)]["model"].cfg
    assert _data_bytes(file) == quant.weight_bytes(cfg, fmt, torch.float32)
    assert _data_bytes(original) == quant.weight_bytes(cfg, "none", torch.float32)  # the fp32 originals
    ratio = _data_bytes(file) / _data_bytes(original)
    # the block linears shrink to 1/4 (fp8, int8) or 0.133 (int4) of fp32; the rest (a third here) stays fp32
    blocks = quant.quantized_param_count(cfg) * 4 / _data_bytes(original)
    expected = 1 - blocks + blocks * {"int4": 0.53125 / 4}.get(fmt, (1 + 4 / cfg.embed_dim) / 4)
    assert ratio == pytest.approx(expected, rel=0.02)
    assert file.stat().st_size < original.stat().st_size * (0.55 if fmt != "int4" else 0.45)


@pytest.mark.parametrize("fmt", quant.WEIGHT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_counts_the_loaded_model(fmt: str, dtype: torch.dtype) -> None:
    model = load_transformer(MODELS["tiny"][0], "cpu", {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
                             weights=fmt)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert quant.weight_bytes(model.cfg, fmt, dtype) == held


def test_bytes_per_param() -> None:
    assert quant.bytes_per_param("none") == 2.0
    assert quant.bytes_per_param("int8") == quant.bytes_per_param("fp8_e4m3fn") == 1 + 4 / 4096
    assert quant.bytes_per_param("int4") == 0.5 + 2 / 64
    assert quant.bytes_per_param("int4", 100) == (50 + 2 * 2) / 100  # a partial group still has a scale
    for fmt in FORMATS:  # what one layer really stores, per weight
        layer = quant.QuantLinear(3584, 14336, fmt, device="meta")
        stored = layer.weight_q.numel() * layer.weight_q.element_size() + \
            layer.weight_scale.numel() * layer.weight_scale.element_size()
        assert stored == pytest.approx(quant.bytes_per_param(fmt, 3584) * 3584 * 14336, rel=1e-12)


def test_real_model_sizes() -> None:
    """The released 2B and 8B: block linears are 97-98% of the weights; GiB per format (docs/quantization.md)."""
    for name, params, gib in (("2b", 2_147_483_648, {"none": 4.2106, "fp8_e4m3fn": 2.2137, "int4": 1.2731}),
                              ("8b", 8_220_835_840, {"none": 15.8852, "fp8_e4m3fn": 8.2359, "int4": 4.6401})):
        cfg = KNOWN_MODELS[name]
        assert quant.quantized_param_count(cfg) == params
        with torch.device("meta"):
            model = Infinity(cfg)
        linears = sum(m.weight.numel() for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
        assert linears == params
        sizes = quant.weights_gib(cfg, torch.bfloat16)
        for fmt, value in gib.items():
            assert sizes[fmt] == pytest.approx(value, abs=1e-4), (name, fmt)
        assert quant.weight_bytes(cfg, "int8", torch.bfloat16) == quant.weight_bytes(cfg, "fp8_e4m3fn", torch.bfloat16)


# ------------------------------------------------------------------------------------------ files that do not fit


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_meta=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def int8_file(converted: dict) -> Path:
    return converted[("tiny", "int8")]["file"]


KEY = "block_chunks.0.module.1.sa.proj"


@pytest.mark.parametrize("edit_meta, match", [
    (lambda m: m.update(scalekv_depth="40"), r"metadata scalekv_depth = '40' but the tensors describe depth 4"),
    (lambda m: m.update(scalekv_width="3584"), r"metadata scalekv_width = '3584'.*embed_dim 128"),
    (lambda m: m.update(scalekv_weights="int3"), r"metadata scalekv_weights = 'int3' is not a weight format"),
    (lambda m: m.update(scalekv_version="2"), r"scalekv_version = '2'.*newer"),
    (lambda m: m.update(scalekv_group_size="0"), r"scalekv_group_size = '0' is not a group size"),
    (lambda m: m.update(scalekv_layers="ffn.fc1"), r"scalekv_layers = 'ffn.fc1'"),
], ids=["depth", "width", "format", "version", "group", "layers"])
def test_bad_metadata_is_named(int8_file: Path, tmp_path: Path, edit_meta, match: str) -> None:
    bad = _rewrite(int8_file, tmp_path / "bad.safetensors", edit_meta=edit_meta)
    with pytest.raises(CheckpointError, match=match) as e:
        load_transformer(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(f"{KEY}.weight_scale"), rf"1 missing keys: {KEY}\.weight_scale"),
    (lambda t: t.__setitem__(f"{KEY}.weight_scale", t[f"{KEY}.weight_scale"][:64]),
     rf"wrong shapes: {KEY}\.weight_scale: file \[64\] vs model \[128\]"),
    (lambda t: t.__setitem__(f"{KEY}.weight_q", t[f"{KEY}.weight_q"][:, :64].contiguous()),
     rf"wrong shapes: {KEY}\.weight"),
    (lambda t: t.__setitem__(f"{KEY}.weight_scale", t[f"{KEY}.weight_scale"].clone().index_fill_(0, torch.tensor([5]),
                                                                                                 float("nan"))),
     rf"'{KEY}\.weight_scale' holds nan at index 5"),
    (lambda t: t.__setitem__(f"{KEY}.weight_scale", -t[f"{KEY}.weight_scale"]), r"scales must be positive, and finite"),
    (lambda t: t.__setitem__(f"{KEY}.weight_scale", t[f"{KEY}.weight_scale"].clone().index_fill_(0, torch.tensor([7]),
                                                                                                 2.0**121)),
     rf"'{KEY}\.weight_scale' holds 2\.658455991569832e\+36 at index 7; scales must be positive, and finite times the largest "
     r"code \(128\)"),  # finite times 127 but not times int8's -128
    (lambda t: t.__setitem__(f"{KEY}.weight_q", t[f"{KEY}.weight_q"].float()),
     rf"'{KEY}\.weight_q' is float32, expected int8"),
    (lambda t: t.__setitem__(f"{KEY}.weight", torch.zeros(128, 128)), rf"unexpected keys: {KEY}\.weight"),
], ids=["missing-scale", "scale-shape", "packed-shape", "nan-scale", "negative-scale", "overflowing-scale", "dtype",
        "extra-weight"])
def test_bad_tensors_are_named(int8_file: Path, tmp_path: Path, edit, match: str) -> None:
    bad = _rewrite(int8_file, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_transformer(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_a_nan_fp8_code_is_refused_naming_the_tensor(converted: dict, tmp_path: Path, code: int) -> None:
    """e4m3fn's NaN (S.1111.111) would dequantize to NaN weights and draw a black image without an error."""
    src = converted[("tiny", "fp8_e4m3fn")]["file"]

    def corrupt(t: dict) -> None:
        codes = t[f"{KEY}.weight_q"].view(torch.uint8).clone()
        codes.view(-1)[300] = code
        t[f"{KEY}.weight_q"] = codes.view(torch.float8_e4m3fn)

    assert load_transformer(_rewrite(src, tmp_path / "ok.safetensors")) is not None  # the rewrite alone is fine
    bad = _rewrite(src, tmp_path / "bad.safetensors", edit_tensors=corrupt)
    with pytest.raises(CheckpointError, match=rf"'{KEY}\.weight_q' holds a NaN fp8 code at index 300") as e:
        load_transformer(bad)
    assert str(bad) in str(e.value)


def test_a_file_for_another_architecture_is_refused(converted: dict, tmp_path: Path) -> None:
    """The tiny model's packed blocks under the embedded model's other tensors: the shapes disagree, by name."""
    tiny = load_file(str(converted[("tiny", "int4")]["file"]))
    emb = load_file(str(converted[("embedded", "int4")]["file"]))
    mixed = {k: tiny[k] if k.endswith(("weight_q", "weight_scale")) else v for k, v in emb.items()}
    mixed["block_chunks.0.module.0.ffn.fc1.weight_q"] = torch.zeros(512, 32, dtype=torch.uint8)  # 64 inputs
    from safetensors import safe_open

    with safe_open(str(converted[("embedded", "int4")]["file"]), "pt") as f:
        meta = dict(f.metadata())
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"mixed\.safetensors: does not match the detected architecture; "
                                              r".*wrong shapes: block_chunks\.0\.module\.0\.ffn\.fc1\.weight"):
        load_transformer(tmp_path / "mixed.safetensors")


def test_quantized_tensors_without_metadata_and_format_mismatch(int8_file: Path, tmp_path: Path) -> None:
    plain = tmp_path / "nometa.safetensors"
    save_file(load_file(str(int8_file)), str(plain))
    with pytest.raises(CheckpointError, match=r"nometa\.safetensors: holds quantized tensors .* no 'scalekv_weights'"):
        load_transformer(plain)
    with pytest.raises(CheckpointError, match=r"already quantized as int8; load it with weights 'none' or 'int8'"):
        load_transformer(int8_file, weights="int4")
    assert isinstance(load_transformer(int8_file, weights="int8").blocks[0].ffn.fc1, quant.QuantLinear)


# ------------------------------------------------------------------------------------------ command line


def test_cli_convert_then_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, vae = MODELS["tiny"]
    dst = tmp_path / "tiny_int4.safetensors"
    assert cli.main(["convert", str(path), str(dst), "--weights", "int4"]) == 0
    assert quant.file_format(json.loads(dst.read_bytes()[8:8 + struct.unpack("<Q", dst.read_bytes()[:8])[0]])
                             ["__metadata__"], str(dst)) == ("int4", 64)
    assert load_state_dict(dst)[f"{KEY}.weight_q"].dtype == torch.uint8
    text_kv = TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"
    common = ["generate", "--vae", str(vae), "--text-kv", str(text_kv), "--width", "256", "--height", "256",
              "--seed", "1"]
    assert cli.main(common + ["--transformer", str(dst), "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main(common + ["--transformer", str(path), "--weights", "int4", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # without --weights convert writes the same tensors as before
    assert cli.main(["convert", str(path), str(tmp_path / "same.safetensors")]) == 0
    assert "scalekv_weights" not in dst.with_name("same.safetensors").read_bytes()[:4096].decode("latin-1")


def test_cli_convert_keeps_a_pre_quantized_file_loadable_and_readable(converted: dict, tmp_path: Path) -> None:
    """Converting a converted file without --weights copies it as it is: its metadata too, so it still loads as int8
    (it had lost the metadata and was then refused); the file is readable by others as ordinary files are."""
    src = converted[("tiny", "int8")]["file"]
    dst = tmp_path / "copy.safetensors"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    again = load_transformer(dst)
    assert quant.model_format(again) == ("int8", 0)
    a, b = again.state_dict(), converted[("tiny", "int8")]["reloaded"].state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~umask


def test_cli_convert_never_replaces_a_file_unasked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = MODELS["tiny"]
    src = tmp_path / "model.safetensors"
    src.write_bytes(path.read_bytes())
    before = src.read_bytes()
    for dst, words in ((src, "is src itself"), (tmp_path / "image.png", "name it .safetensors")):
        assert cli.main(["convert", str(src), str(dst), "--weights", "int4", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(dst) in err
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    assert cli.main(["convert", str(src), str(other), "--weights", "int4"]) == 2
    err = capsys.readouterr().err
    assert "exists; give another name, or --overwrite" in err and str(other) in err
    assert other.read_bytes() == b"keep me" and src.read_bytes() == before and not (tmp_path / "image.png").exists()
    assert cli.main(["convert", str(src), str(other), "--weights", "int4", "--overwrite"]) == 0
    assert quant.model_format(load_transformer(other)) == ("int4", quant.DEFAULT_GROUP_SIZE)


def test_cli_fp8_matmul_reads_the_files_own_format(converted: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An fp8 file named .sft is taken as fp8 (ComfyUI's other safetensors suffix); an int8 file is named with its
    format, not "--weights is none"."""
    base = ["generate", "--vae", str(MODELS["tiny"][1]), "--text-kv", str(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5"
            / "text_kv_compact.npy"), "--width", "256", "--height", "256", "--fp8-matmul"]
    int8 = converted[("tiny", "int8")]["file"]
    assert cli.main([*base, "--transformer", str(int8), "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{int8} holds int8 weights" in err
    sft = tmp_path / "tiny_fp8.sft"
    sft.write_bytes(converted[("tiny", "fp8_e4m3fn")]["file"].read_bytes())
    assert cli.main([*base, "--transformer", str(sft), "--out", str(tmp_path / "b.png")]) == 0
    assert "fp8 matmul not used" in capsys.readouterr().err and (tmp_path / "b.png").is_file()


def test_cli_fp8_matmul_note_and_the_resolution_note_each_print_once(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The fp8 note reused the variable of the resolution note: it printed twice and the resolution note was lost."""
    from scalekv_core.loader import native_resolution, resolution_note
    from scalekv_core.schedules import schedule_for_pixels

    tiny = MODELS["tiny"][0]
    rc = cli.main(["generate", "--transformer", str(tiny), "--vae", str(MODELS["tiny"][1]), "--text-kv",
                   str(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"), "--width", "336",
                   "--height", "224", "--weights", "fp8_e4m3fn", "--fp8-matmul", "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    fp8 = [n for n in notes if "fp8 matmul not used" in n]
    resolution = resolution_note(native_resolution(tiny), schedule_for_pixels(336, 224), tiny.name)
    assert resolution is not None and len(fp8) == 1, notes
    assert [n for n in notes if resolution.split(":")[0] in n] == [n for n in notes if n not in fp8] != [], notes


@pytest.mark.parametrize("argv", [
    ["generate", "--transformer", "x", "--vae", "y", "--prompt", "p", "--weights", "int3"],
    ["calibrate", "--transformer", "x", "--vae", "y", "--text-encoder", "t", "--prompts", "p", "--weights", "nf4"],
    ["convert", "a", "b", "--weights", "fp8"],
])
def test_cli_unknown_format_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --weights: invalid choice:") and "int4" in err


def test_cli_weights_on_a_file_of_another_format(converted: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = converted[("tiny", "int8")]["file"]
    assert cli.main(["convert", str(src), str(tmp_path / "x.safetensors"), "--weights", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already quantized as int8" in err and str(src) in err


# ------------------------------------------------------------------------------------------ fp8 matmul


def test_fp8_matmul_falls_back_with_a_note_where_the_device_has_no_fp8_tensor_cores() -> None:
    """Asked on a device without fp8 tensor cores (this CPU), the dequantized matmul stays and the note says why;
    the image is the one without the option."""
    model = load_transformer(MODELS["tiny"][0], weights="fp8_e4m3fn")
    before = _generate(model, MODELS["tiny"][1], _cond("tiny"))
    note = quant.enable_fp8_matmul(model, "cpu")
    assert note and "compute capability 8.9" in note and "dequantized matmul runs instead" in note
    assert not any(m.fp8_matmul for m in model.modules() if isinstance(m, quant.QuantLinear))
    assert np.array_equal(_generate(model, MODELS["tiny"][1], _cond("tiny")).images, before.images)


def test_fp8_matmul_needs_fp8_weights() -> None:
    model = load_transformer(MODELS["tiny"][0], weights="int8")
    with pytest.raises(ValueError, match="needs weights stored as fp8_e4m3fn.*are int8"):
        quant.enable_fp8_matmul(model, "cpu")


def test_scaled_fp8_matmul_is_close_to_the_dequantized_one() -> None:
    """torch._scaled_mm runs on this CPU too, so the fp8 path (activations quantized per token) is checked here:
    a layer's output against the dequantized matmul, and a whole generation's bits against the dequantized run."""
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(256, 128), "fp8_e4m3fn")
    x = _rand(3, 17, 256, seed=4)
    ref = layer(x)
    layer.fp8_matmul = True
    out = layer(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # e4m3 activations: a step of 2^-3 relative, averaged over 256 products
    model = load_transformer(MODELS["tiny"][0], weights="fp8_e4m3fn")
    plain = _generate(model, MODELS["tiny"][1], _cond("tiny"))
    assert quant.enable_fp8_matmul(model, "cpu", force=True) is None
    fast = _generate(model, MODELS["tiny"][1], _cond("tiny"))
    equal = [(a == b).float().mean().item() for a, b in zip(plain.samples.bits, fast.samples.bits)]
    assert min(equal) > 0.9, equal  # tau 1: a few draws near 50:50 flip (measured: 0.945-0.969 per scale)


def test_scaled_mm_probe_says_why_this_torch_cannot_and_accepts_the_old_tuple_result(monkeypatch) -> None:
    """Row-wise scaled fp8 matmuls depend on the torch release, GPU and output dtype together, so the GPU check ends
    with a tiny real one: a torch that refuses it, or answers wrongly, gets the dequantized matmul and a note naming
    torch's reason; torch 2.4's (out, amax) result is read as the output."""
    real = torch._scaled_mm
    assert quant.scaled_mm_problem("cpu", torch.bfloat16) is None  # this CPU torch runs it

    def refuses(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration.\nmore detail")

    monkeypatch.setattr(torch, "_scaled_mm", refuses)
    why = quant.scaled_mm_problem("cpu", torch.float16)
    assert why == (f"torch {torch.__version__} cannot run the row-wise scaled fp8 matmul here in torch.float16: "
                   "Invalid scaling configuration.")
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: real(*a, **k) * 0)
    assert "gave a wrong result" in quant.scaled_mm_problem("cpu", torch.bfloat16)

    layer = quant.QuantLinear.from_linear(torch.nn.Linear(64, 32), "fp8_e4m3fn")
    layer.fp8_matmul = True
    x = _rand(2, 5, 64, seed=1)
    monkeypatch.setattr(torch, "_scaled_mm", real)
    expected = layer(x)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (real(*a, **k), torch.zeros(())))
    assert torch.equal(layer(x), expected)
    assert quant.scaled_mm_problem("cpu", torch.bfloat16) is None


def test_cli_fp8_matmul(tmp_path: Path) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "scalekv_core", "generate", "--transformer", str(MODELS["tiny"][0]), "--vae",
            str(MODELS["tiny"][1]), "--text-kv", str(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"),
            "--width", "256", "--height", "256", "--out", str(tmp_path / "x.png"), "--fp8-matmul"]
    wrong = subprocess.run(base, cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--fp8-matmul needs --weights fp8_e4m3fn" in wrong.stderr
    ok = subprocess.run([*base, "--weights", "fp8_e4m3fn"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "note: fp8 matmul not used" in ok.stderr and (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_admission_counts_the_dequantized_block_weights(fmt: str) -> None:
    """A quantized model's sampling plan (what the sampler admits a run by) holds one block's largest dequantized
    weights beside the cache, as the whole-job planner does: the FFN's fc1 + fc2 in the block dtype. It planned
    the same bytes as the unquantized model, so a run could be admitted and then run out of memory."""
    from helpers_tiny import TINY_TRANSFORMER, TINY_VAE

    plain = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE)
    packed = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, weights=fmt)
    c = plain.transformer.cfg
    schedule = get_schedule(1.0, "0.06M")
    a, b = plain.plan_memory(schedule, 2), packed.plan_memory(schedule, 2)
    extra_mb = max(2 * c.embed_dim * c.ffn_hidden, 3 * c.embed_dim**2) * 4 / 2**20  # fp32 blocks on the CPU
    assert b.sampling_peak_mb - a.sampling_peak_mb == pytest.approx(extra_mb, rel=1e-12)
    assert b.total_mb - a.total_mb == pytest.approx(max(b.sampling_peak_mb, b.decode_peak_mb)
                                                    - max(a.sampling_peak_mb, a.decode_peak_mb), rel=1e-12)
    assert b.decode_peak_mb == a.decode_peak_mb and b.analytic_mb == a.analytic_mb


# ------------------------------------------------------------------------------- the source file's metadata


@pytest.fixture
def declared_256(tmp_path: Path) -> Path:
    """The tiny transformer declaring the embedded model's trained resolution, a note of its own, and a stale
    architecture entry (depth 99) that a quantized file must not inherit."""
    path = tmp_path / "tiny_256.safetensors"
    save_file(load_file(str(MODELS["tiny"][0])), str(path),
              metadata={"format": "pt", "scalekv_resolution": "256x256 (1:1)", "trained_by": "someone",
                        "scalekv_depth": "99"})
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_weights_keeps_the_source_metadata(declared_256: Path, tmp_path: Path, fmt: str) -> None:
    """`convert --weights` (like plain convert) keeps what the source declares, e.g. the trained resolution that
    generate's default size reads; the entries the quantized format sets are its own."""
    from scalekv_core.checkpoint import safetensors_metadata
    from scalekv_core.loader import native_resolution

    dst = tmp_path / f"q_{fmt}.safetensors"
    assert cli.main(["convert", str(declared_256), str(dst), "--weights", fmt]) == 0
    meta = safetensors_metadata(dst)
    assert meta["scalekv_resolution"] == "256x256 (1:1)" and meta["trained_by"] == "someone"
    assert meta[quant.META_FORMAT] == fmt and meta["scalekv_depth"] == str(load_transformer(dst).cfg.depth) != "99"
    assert native_resolution(dst) == native_resolution(declared_256) == ("256x256 (1:1)", False)


def test_save_quantized_keeps_the_source_metadata(declared_256: Path, tmp_path: Path) -> None:
    from scalekv_core.checkpoint import safetensors_metadata

    out = quant.save_quantized(load_transformer(declared_256, weights="int8"), tmp_path / "api.safetensors")
    meta = safetensors_metadata(out)
    assert meta["scalekv_resolution"] == "256x256 (1:1)" and meta["trained_by"] == "someone"
    # a .pth source has no metadata to carry: the file holds the format's entries only
    plain = quant.save_quantized(load_transformer(TINY / "infinity_tiny.pth", weights="int8"),
                                 tmp_path / "plain.safetensors")
    assert "scalekv_resolution" not in safetensors_metadata(plain)


def test_generate_on_a_converted_file_runs_at_the_trained_resolution(declared_256: Path, tmp_path: Path) -> None:
    from PIL import Image

    dst = tmp_path / "q.safetensors"
    assert cli.main(["convert", str(declared_256), str(dst), "--weights", "int8"]) == 0
    text_kv = TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"
    out = tmp_path / "img.png"
    assert cli.main(["generate", "--transformer", str(dst), "--vae", str(MODELS["tiny"][1]), "--text-kv",
                     str(text_kv), "--out", str(out)]) == 0
    assert Image.open(out).size == (256, 256)
