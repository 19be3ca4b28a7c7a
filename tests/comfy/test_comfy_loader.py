"""Infinity Model Loader and Infinity Text Encode: outputs, ModelPatcher integration, and errors that name the file."""
from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

import comfy.model_management as mm
import folder_paths

from helpers_tiny import TINY14_VAE, make_tiny_vae_state, save_safetensors

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "infinity-tiny"


@pytest.fixture
def vae_dir():
    return pathlib.Path(folder_paths.get_folder_paths("vae")[0])


def test_loader_outputs_model_and_t5_with_patchers(pack, loaded):
    model, t5 = loaded
    models = pack.nodes.models
    assert isinstance(model, models.InfinityModel) and isinstance(t5, models.InfinityT5)
    pipe = model.pipeline
    assert model.patcher.model.transformer is pipe.transformer and model.patcher.model.vae is pipe.vae
    assert t5.patcher.model.t5 is t5.encoder.module
    assert model.info["architecture"] == "this model"  # the tiny model is none of the released ones
    assert (model.info["depth"], model.info["width"], model.info["heads"], model.info["bits_per_token"]) == (4, 128, 4, 32)
    assert model.info["precision"] == "fp32"  # auto on CPU
    assert model.info["transformer"].endswith("infinity/infinity_tiny.safetensors")
    assert pipe.vae_patchify is False and pipe.text_encoder is None  # T5 is its own output
    assert t5.info["text_channels"] == pipe.transformer.cfg.text_channels == 256
    for patcher in (model.patcher, t5.patcher):
        assert patcher.load_device == mm.get_torch_device() and patcher.model_size() > 0


def test_patchers_count_tied_weights_once(loaded):
    """T5's shared embedding is encoder.embed_tokens too: the size ComfyUI evicts for counts it once (its own
    module_size counted it twice), and each patcher's size is its parameters' bytes."""
    model, t5 = loaded
    module = t5.encoder.module
    assert module.shared.weight is module.encoder.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in module.parameters())  # parameters() yields a tied one once
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    assert t5.patcher.model_size() == params + buffers
    assert mm.module_size(t5.patcher.model) == t5.patcher.model_size() + module.shared.weight.nbytes
    infinity = model.patcher.model  # its VAE registers one quantizer under two names: counted once too
    assert model.patcher.model_size() == sum(t.numel() * t.element_size()
                                             for t in [*infinity.parameters(), *infinity.buffers()])


def test_patchers_load_and_unload_through_the_memory_manager(loaded):
    model, t5 = loaded
    mm.unload_all_models()
    model.load()
    t5.encode(["x"])
    loaded_now = mm.loaded_models()
    assert any(p is model.patcher for p in loaded_now) and any(p is t5.patcher for p in loaded_now)
    mm.unload_all_models()  # what the UI's "unload models" button runs
    assert not any(p is model.patcher or p is t5.patcher for p in mm.loaded_models())
    assert model.pipeline.device == mm.unet_offload_device()
    model.load()  # and it comes back for the next run
    assert any(p is model.patcher for p in mm.loaded_models())


def test_precision_choice_reaches_the_blocks(run):
    model, _ = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                   text_encoder="t5_tiny", precision="bf16").result
    assert model.pipeline.transformer.block_dtype == torch.bfloat16 and model.info["precision"] == "bf16"


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "int8", "int4"])
def test_weight_format_quantizes_the_blocks_and_the_patcher_moves_them(pack, run, loaded, fmt):
    quant = importlib.import_module(f"{pack.__name__}.scalekv_core.model.quant")  # the pack's own classes
    QuantLinear, weight_bytes = quant.QuantLinear, quant.weight_bytes
    model, _ = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                   text_encoder="t5_tiny", precision="auto", weight_format=fmt).result
    transformer = model.pipeline.transformer
    assert model.info["weights"] == fmt and loaded[0].info["weights"] == "none"
    assert isinstance(transformer.blocks[0].ffn.fc1, QuantLinear) and transformer.blocks[0].ffn.fc1.fmt == fmt
    held = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
    assert held == weight_bytes(transformer.cfg, fmt, transformer.block_dtype)
    assert model.patcher.model_size() < loaded[0].patcher.model_size()  # the memory manager sees the smaller size
    mm.unload_all_models()
    model.load()
    assert transformer.blocks[0].ffn.fc1.weight_q.device == mm.get_torch_device()
    mm.unload_all_models()


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "int8"])
def test_t5_weights_store_t5_in_8_bits_and_encode_close_to_plain(pack, run, loaded, fmt):
    """The loader's t5_weights reaches T5's linears: the patcher sees about half the bytes, and features stay close."""
    QuantLinear = importlib.import_module(f"{pack.__name__}.scalekv_core.model.quant").QuantLinear
    _, t5 = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                text_encoder="t5_tiny", precision="auto", t5_weights=fmt).result
    plain = loaded[1]
    assert t5.info["weights"] == fmt and plain.info["weights"] == "none"
    quantized = [m for m in t5.encoder.module.modules() if isinstance(m, QuantLinear)]
    linears = [m for m in plain.encoder.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(quantized) == len(linears) > 0 and all(m.fmt == fmt for m in quantized)
    assert t5.patcher.model_size() < plain.patcher.model_size()
    prompt = "a red fox in the snow"
    a, b = plain.encode([prompt]).kv_compact.float(), t5.encode([prompt]).kv_compact.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.95, cos  # 8-bit weights: one step is 1/127 (int8) or 2^-3 relative (fp8) of a row's max
    mm.unload_all_models()


def test_text_encode_matches_the_engine(run, loaded):
    from scalekv_core.model.text_encoder import T5TextEncoder

    cond = run("InfinityTextEncode", t5=loaded[1], prompt="a red fox in the snow").result[0]
    ref = T5TextEncoder.from_folder(TINY / "t5_tiny").encode(["a red fox in the snow"])
    assert cond.lens == ref.lens and cond.kv_compact.device == mm.intermediate_device()
    assert torch.equal(cond.kv_compact, ref.kv_compact)


def test_missing_transformer_is_named(run):
    with pytest.raises(FileNotFoundError, match=r"infinity_2b_reg\.pth.*models/infinity"):
        run("InfinityModelLoader", transformer="infinity_2b_reg.pth", vae="vae_tiny.safetensors",
            text_encoder="t5_tiny", precision="auto")


def test_missing_t5_folder_is_named(run):
    with pytest.raises(FileNotFoundError, match="flan-t5-xl"):
        run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
            text_encoder="flan-t5-xl", precision="auto")


def test_vae_that_does_not_fit_names_both_files(run, vae_dir):
    """A 14-bit patch-8 VAE (the 8B's kind) with the 32-bit tiny transformer."""
    path = save_safetensors(make_tiny_vae_state(TINY14_VAE), vae_dir / "vae_tiny14.safetensors")
    try:
        with pytest.raises(ValueError) as e:
            run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny14.safetensors",
                text_encoder="t5_tiny", precision="auto")
        assert "vae_tiny14.safetensors" in str(e.value) and "infinity_tiny.safetensors" in str(e.value)
        assert "does not fit" in str(e.value)
    finally:
        path.unlink()


def test_corrupt_checkpoint_is_named(run, vae_dir):
    bad = vae_dir / "truncated_vae.safetensors"
    bad.write_bytes((TINY / "vae_tiny.safetensors").read_bytes()[:5000])
    try:
        with pytest.raises(ValueError, match="truncated_vae.safetensors"):
            run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="truncated_vae.safetensors",
                text_encoder="t5_tiny", precision="auto")
    finally:
        bad.unlink()


def test_transformer_picked_as_vae_is_named(run):
    with pytest.raises(ValueError, match="infinity_tiny.safetensors"):
        run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="infinity_tiny.safetensors",
            text_encoder="t5_tiny", precision="auto")


def test_loader_preselects_the_embedded_default_model_which_loads(pack, node_classes, run, monkeypatch, tmp_path):
    """A fresh install: with default_model/ present, the loader's menus default to it and run as they are."""
    from test_comfy_paths import isolate_folders, make_default_model

    paths = pack.nodes.paths
    isolate_folders(paths, monkeypatch)
    keys = ("transformer", "vae", "text_encoder")
    loader = node_classes["InfinityModelLoader"]
    inputs = loader.GET_NODE_INFO_V1()["input"]["required"]
    assert not any("default" in inputs[k][1] for k in keys)  # none installed: the menus' first entries

    monkeypatch.setenv("SCALEKV_DEFAULT_MODEL_DIR", str(make_default_model(tmp_path / "default_model")))
    paths.register_folders()
    inputs = loader.GET_NODE_INFO_V1()["input"]["required"]
    defaults = {k: inputs[k][1]["default"] for k in keys}
    assert defaults == {"transformer": "infinity_shapes.safetensors", "vae": "infinity_shapes_vae.safetensors",
                        "text_encoder": "t5_shapes"}
    model, t5 = run("InfinityModelLoader", **defaults, precision="auto").result
    assert model.info["transformer"] == str(tmp_path / "default_model" / "infinity" / "infinity_shapes.safetensors")
    assert t5.info["text_channels"] == model.pipeline.transformer.cfg.text_channels


@pytest.mark.parametrize("field, value, words", [
    ("transformer", " infinity_tiny.safetensors", "transformer: ' infinity_tiny.safetensors' is not a name in the menu"),
    ("text_encoder", "t5_tiny ", "text_encoder: 't5_tiny ' is not a name in the menu"),
    ("vae", "ab\udc80cd", "vae: not valid text"),
    ("transformer", "no_such_model.safetensors", "transformer: Infinity transformer 'no_such_model.safetensors' not found"),
    ("transformer", "../../etc/passwd", "is not a name inside a model folder"),
    ("precision", {"a": 1}, "precision: unknown value {'a': 1}"),
    ("weight_format", "int3", "weight_format: unknown value 'int3'"),
    ("t5_weights", "int4", "t5_weights: unknown value 'int4'"),
])
def test_loader_menu_values_are_checked_before_loading(node_classes, field, value, words):
    """ComfyUI 0.3.x lets any string through a V3 combo: a name with a stray space loaded, a dict precision
    failed as "unhashable type", and a lone surrogate in a name broke ComfyUI's logging."""
    inputs = dict(transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors", text_encoder="t5_tiny",
                  precision="auto", weight_format="none", t5_weights="none")
    loader = node_classes["InfinityModelLoader"]
    assert loader.validate_inputs(**inputs) is True
    message = loader.validate_inputs(**{**inputs, field: value})
    assert isinstance(message, str) and words in message, message
    message.encode("utf-8")  # printable by any logger


@pytest.fixture
def single_file_t5():
    """A T5 encoder of the tiny transformer's width with T5's vocabulary, saved as one .safetensors file in
    models/text_encoders (as ComfyUI keeps text encoders); random weights."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    torch.manual_seed(0)
    module = T5EncoderModel(cfg).eval()
    path = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0]) / "flan_t5_tiny_single.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    yield path, module
    path.unlink()


def test_a_single_file_t5_loads_with_comfyuis_tokenizer(pack, run, single_file_t5):
    """Where the host ships T5's tokenizer (comfy/text_encoders/t5_tokenizer), a single-file T5 in
    models/text_encoders is in the menu, loads, and encodes as the same module would on that tokenizer's ids."""
    from transformers import AutoTokenizer

    path, module = single_file_t5
    paths = pack.nodes.paths
    assert paths.host_t5_tokenizer() is not None
    assert "flan_t5_tiny_single.safetensors" in paths.text_encoder_choices()
    model, t5 = run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                    text_encoder="flan_t5_tiny_single.safetensors", precision="auto").result
    cond = run("InfinityTextEncode", t5=t5, prompt="a red fox in the snow").result[0]
    tokenizer = AutoTokenizer.from_pretrained(paths.host_t5_tokenizer())
    ids = tokenizer(["a red fox in the snow"], return_tensors="pt")
    with torch.no_grad():
        want = module(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
    assert cond.lens == [int(ids.attention_mask.sum())]
    torch.testing.assert_close(cond.kv_compact.float(), want, atol=1e-4, rtol=1e-4)
    mm.unload_all_models()


def test_a_file_in_text_encoders_that_is_not_t5_is_not_offered(pack, tmp_path):
    """Other text encoders (or broken files) in the shared folder stay out of the T5 menu."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0])
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(folder / "clip_t5like.safetensors"))
    (folder / "t5_broken.safetensors").write_bytes(b"not a header")
    try:
        choices = pack.nodes.paths.text_encoder_choices()
        assert "clip_t5like.safetensors" not in choices and "t5_broken.safetensors" not in choices
    finally:
        (folder / "clip_t5like.safetensors").unlink()
        (folder / "t5_broken.safetensors").unlink()


def test_a_t5_of_another_width_is_refused_before_the_transformer_loads(pack, run, monkeypatch):
    """The T5 loads first and the transformer's text width is read from its header: a T5 that does not fit is
    refused before the transformer (16 GB for the 8B) is loaded, naming both files and what to pick."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    module = T5EncoderModel(cfg).eval()
    path = pathlib.Path(folder_paths.get_folder_paths("text_encoders")[0]) / "t5_narrow_single.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    loads = []
    monkeypatch.setattr(pack.nodes.models, "load_infinity", lambda *a, **k: loads.append(a))
    try:
        with pytest.raises(ValueError, match=r"t5_narrow_single.safetensors gives 64-channel features but the "
                                             r"transformer infinity_tiny.safetensors expects 256 .*flan-t5-xl"):
            run("InfinityModelLoader", transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors",
                text_encoder=path.name, precision="auto")
    finally:
        path.unlink()
    assert loads == []


def test_changing_one_models_settings_keeps_the_other_loaded(run, loaded, monkeypatch):
    """ComfyUI re-runs the whole loader when any input changes: the transformer of the same files and settings is
    the same object while ComfyUI holds it (switching t5_weights reloaded it: 16 GB for the 8B), T5 likewise; a
    file rewritten in place is loaded again, and nothing is kept alive once ComfyUI lets go."""
    import gc
    import os

    inputs = dict(transformer="infinity_tiny.safetensors", vae="vae_tiny.safetensors", text_encoder="t5_tiny",
                  precision="auto")
    model, t5 = loaded
    other_t5 = run("InfinityModelLoader", **inputs, t5_weights="int8").result
    assert other_t5[0] is model and other_t5[1] is not t5 and other_t5[1].encoder.weights == "int8"
    other_model = run("InfinityModelLoader", **inputs, weight_format="int8").result
    assert other_model[1] is t5 and other_model[0] is not model
    assert run("InfinityModelLoader", **inputs).result[0] is model
    # 'auto' and what it resolves to here (fp32 on the CPU) are one model: switching between them reloaded it
    assert run("InfinityModelLoader", **{**inputs, "precision": "fp32"}).result[0] is model
    vae = pathlib.Path(folder_paths.get_folder_paths("infinity")[0]) / "vae_tiny.safetensors"
    if not vae.exists():
        vae = next(pathlib.Path(d) / "vae_tiny.safetensors" for d in folder_paths.get_folder_paths("vae")
                   if (pathlib.Path(d) / "vae_tiny.safetensors").exists())
    st = vae.stat()
    try:
        os.utime(vae, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the VAE "rewritten"
        assert run("InfinityModelLoader", **inputs).result[0] is not model
    finally:
        os.utime(vae, ns=(st.st_atime_ns, st.st_mtime_ns))
    models_module = importlib.import_module(type(model).__module__)
    int8 = other_model[0]
    key = next(k for k, ref in models_module._recent.items() if ref() is int8)
    del other_model, int8
    gc.collect()
    assert models_module._recent[key]() is None  # a weak reference: ComfyUI's cache decides what stays


def test_text_encode_warns_when_t5_drops_the_end_of_a_prompt(run, loaded, caplog):
    """A prompt past T5's 512 tokens loses its end, as in the original: the console says how much, the features
    are those of the first 512 tokens, and a short prompt gets no warning."""
    import logging

    long_prompt = " ".join(["a red fox in the snow"] * 150)
    with caplog.at_level(logging.WARNING):
        cond = run("InfinityTextEncode", t5=loaded[1], prompt=long_prompt).result[0]
        run("InfinityTextEncode", t5=loaded[1], prompt="a red fox in the snow")
    warned = [r.getMessage() for r in caplog.records if "T5 tokens" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Infinity Text Encode: the prompt is ") and \
        "reads the first 512" in warned[0], warned
    assert int(cond.lens[0]) == 512
