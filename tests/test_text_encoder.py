"""T5 conditioning vs the original encode_prompt outputs on the tiny T5 (tests/data/infinity-tiny)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from scalekv_core.model.text_encoder import T5TextEncoder, TextConditioning

DATA = Path(__file__).parent / "data" / "infinity-tiny"
T5_DIR = DATA / "t5_tiny"
CASES = {
    "p0_apple_s0_cfg3_tau0.5": "a red apple on a wooden table",
    "p1_spaceship_s99_cfg4_tau1": "alien spaceship enterprise",
}
ATOL = 1e-4


def _ref(case: str, name: str) -> np.ndarray:
    return np.load(DATA / "full_kv" / case / f"text_{name}.npy")


@pytest.fixture(scope="module")
def encoder() -> T5TextEncoder:
    return T5TextEncoder.from_folder(T5_DIR)


def test_manifest_prompts_match_cases():
    manifest = json.loads((DATA / "manifest.json").read_text())
    for case, prompt in CASES.items():
        assert manifest["runs"]["full_kv"][case]["prompt"] == prompt


def test_encoder_basics(encoder):
    assert encoder.text_channels == 256
    assert encoder.device == torch.device("cpu")
    assert isinstance(encoder.module, torch.nn.Module)
    assert not any(p.requires_grad for p in encoder.module.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenize_matches_reference(encoder, case):
    ids, mask = encoder.tokenize([CASES[case]])
    assert ids.shape == mask.shape == (1, 512)
    np.testing.assert_array_equal(ids.numpy(), _ref(case, "input_ids"))
    np.testing.assert_array_equal(mask.numpy(), _ref(case, "attention_mask"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_matches_reference(encoder, case):
    cond = encoder.encode([CASES[case]])
    ref_kv, ref_cu = _ref(case, "kv_compact"), _ref(case, "cu_seqlens_k")
    assert cond.kv_compact.dtype == torch.float32
    assert cond.kv_compact.shape == ref_kv.shape
    diff = float(np.abs(cond.kv_compact.numpy() - ref_kv).max())
    print(f"{case}: max |kv - ref| = {diff:.3e}")
    assert diff <= ATOL
    assert cond.cu_seqlens.dtype == torch.int32
    np.testing.assert_array_equal(cond.cu_seqlens.numpy(), ref_cu)
    assert cond.lens == [int(ref_cu[1])] and cond.max_len == int(ref_cu[1]) and cond.batch_size == 1
    # lens counts the valid tokens incl. </s> (id 1) and nothing past it.
    assert int(_ref(case, "attention_mask").sum()) == cond.lens[0]
    assert int(_ref(case, "input_ids")[0, cond.lens[0] - 1]) == 1


def test_batch_is_concatenation_of_singles(encoder):
    # Both reference prompts happen to be 19 tokens; a short third prompt makes lens, order and max_len matter.
    prompts = [CASES[c] for c in sorted(CASES)] + ["cat"]
    singles = [encoder.encode([p]) for p in prompts]
    batch = encoder.encode(prompts)
    lens = [s.lens[0] for s in singles]
    assert lens[2] < lens[0]
    assert batch.lens == lens and batch.batch_size == 3
    assert batch.max_len == max(lens)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    torch.testing.assert_close(batch.kv_compact, torch.cat([s.kv_compact for s in singles]), atol=ATOL, rtol=0)
    ref = np.concatenate([_ref(c, "kv_compact") for c in sorted(CASES)])
    assert float(np.abs(batch.kv_compact[: lens[0] + lens[1]].numpy() - ref).max()) <= ATOL
    reordered = encoder.encode(prompts[::-1])  # packing follows prompt order
    torch.testing.assert_close(reordered.kv_compact[: lens[2]], singles[2].kv_compact, atol=ATOL, rtol=0)


def test_from_padded_packs_valid_prefix():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    cond = TextConditioning.from_padded(hidden, mask)
    assert cond.kv_compact.dtype == torch.float32
    torch.testing.assert_close(cond.kv_compact, torch.cat([hidden[0, :2], hidden[1, :3]]).float())
    assert cond.lens == [2, 3] and cond.max_len == 3 and cond.cu_seqlens.tolist() == [0, 2, 5]
    with pytest.raises(ValueError):
        TextConditioning.from_padded(hidden, mask[:, :3])


def test_concat_semantics():
    a = TextConditioning.from_padded(torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    b = TextConditioning.from_padded(torch.randn(1, 5, 4), torch.tensor([[1, 1, 0, 0, 0]]))
    c = a.concat(b)
    assert c.batch_size == 3 and c.lens == [3, 5, 2] and c.max_len == 5
    assert c.cu_seqlens.dtype == torch.int32 and c.cu_seqlens.tolist() == [0, 3, 8, 10]
    torch.testing.assert_close(c.kv_compact, torch.cat([a.kv_compact, b.kv_compact]))
    assert a.lens == [3, 5] and a.cu_seqlens.tolist() == [0, 3, 8]  # inputs untouched
    d = b.concat(a)
    assert d.lens == [2, 3, 5] and d.cu_seqlens.tolist() == [0, 2, 5, 10]
    torch.testing.assert_close(d.kv_compact[:2], b.kv_compact)
    with pytest.raises(ValueError, match="channels"):
        a.concat(TextConditioning.from_padded(torch.randn(1, 2, 7), torch.ones(1, 2)))


def test_repeat_each_keeps_each_prompt_together():
    a = TextConditioning.from_padded(torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    r = a.repeat_each(3)
    assert r.lens == [3, 3, 3, 5, 5, 5] and r.max_len == 5
    assert r.cu_seqlens.dtype == torch.int32 and r.cu_seqlens.tolist() == [0, 3, 6, 9, 14, 19, 24]
    p1, p2 = a.kv_compact[:3], a.kv_compact[3:]
    torch.testing.assert_close(r.kv_compact, torch.cat([p1, p1, p1, p2, p2, p2]))
    # one prompt repeated equals concatenating it with itself (the sampler's negative-prompt broadcast)
    one = TextConditioning.from_padded(torch.randn(1, 5, 4), torch.tensor([[1, 1, 0, 0, 0]]))
    c = one.concat(one).concat(one)
    r1 = one.repeat_each(3)
    assert r1.lens == c.lens and r1.cu_seqlens.tolist() == c.cu_seqlens.tolist()
    torch.testing.assert_close(r1.kv_compact, c.kv_compact)
    assert a.repeat_each(1).lens == a.lens
    with pytest.raises(ValueError, match="at least 1"):
        a.repeat_each(0)


def test_to_device_keeps_contents():
    a = TextConditioning.from_padded(torch.randn(1, 3, 4), torch.ones(1, 3))
    b = a.to("cpu")
    torch.testing.assert_close(b.kv_compact, a.kv_compact)
    assert b.lens == a.lens and b.max_len == a.max_len and b.cu_seqlens.tolist() == a.cu_seqlens.tolist()


def test_from_numpy_file_round_trip(tmp_path):
    case = "p0_apple_s0_cfg3_tau0.5"
    src = DATA / "full_kv" / case / "text_kv_compact.npy"
    cond = TextConditioning.from_numpy_file(src)
    ref = _ref(case, "kv_compact")
    np.testing.assert_array_equal(cond.kv_compact.numpy(), ref)
    assert cond.lens == [ref.shape[0]] and cond.max_len == ref.shape[0]
    np.testing.assert_array_equal(cond.cu_seqlens.numpy(), _ref(case, "cu_seqlens_k"))
    # float64 input is accepted and converted
    p64 = tmp_path / "kv64.npy"
    np.save(p64, ref.astype(np.float64))
    assert TextConditioning.from_numpy_file(p64).kv_compact.dtype == torch.float32


@pytest.mark.parametrize("arr", [np.zeros((1, 3, 4), np.float32), np.zeros((3, 4), np.int64)], ids=["3d", "int"])
def test_from_numpy_file_rejects_bad_arrays(tmp_path, arr):
    bad = tmp_path / "bad_kv.npy"
    np.save(bad, arr)
    with pytest.raises(ValueError, match="bad_kv.npy"):
        TextConditioning.from_numpy_file(bad)


def test_from_numpy_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        TextConditioning.from_numpy_file(tmp_path / "nope.npy")


def test_missing_folder_names_path(tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        T5TextEncoder.from_folder(missing)


@pytest.mark.parametrize("drop", ["config.json", "model.safetensors", "spiece.model+tokenizer.json"])
def test_incomplete_folder_names_path(tmp_path, drop):
    """A tokenizer is missing only when both spiece.model and tokenizer.json are (either one loads)."""
    folder = tmp_path / f"t5_without_{drop.replace('.', '_').replace('+', '_')}"
    shutil.copytree(T5_DIR, folder)
    for name in drop.split("+"):
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=folder.name):
        T5TextEncoder.from_folder(folder)


def test_single_file_t5_shape_comes_from_its_tensors(tmp_path):
    """A T5 encoder saved as one file (ComfyUI's layout) loads with a tokenizer from elsewhere, its config read off
    the tensor shapes (width, depth, heads, gated feed-forward), and encodes as the module it was saved from."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from scalekv_core.checkpoint import CheckpointError
    from scalekv_core.model.text_encoder import T5TextEncoder, single_file_t5_config

    cfg = T5Config(vocab_size=512, d_model=96, d_kv=16, d_ff=160, num_layers=3, num_heads=6,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    torch.manual_seed(1)
    module = T5EncoderModel(cfg).eval()
    path = tmp_path / "t5_single.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    got = single_file_t5_config(path)
    assert (got.d_model, got.num_layers, got.num_heads, got.d_kv, got.d_ff, got.vocab_size) == (96, 3, 6, 16, 160, 512)
    assert got.is_gated_act
    enc = T5TextEncoder.from_single_file(path, T5_DIR)
    cond = enc.encode(["a red fox"])
    ids = enc.tokenizer(["a red fox"], return_tensors="pt")
    with torch.no_grad():
        want = module(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
    torch.testing.assert_close(cond.kv_compact, want, atol=1e-4, rtol=1e-4)
    other = tmp_path / "not_t5.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not_t5.safetensors: not a T5 encoder file"):
        T5TextEncoder.from_single_file(other, T5_DIR)


def test_single_file_t5_in_fp16_computes_what_its_folder_computes(tmp_path):
    """The same weights as one file or as a folder, both in fp16: the same dtype per tensor (`wo` float32, as
    from_pretrained keeps it against overflow) and the same features, bit for bit."""
    from safetensors.torch import save_file

    from scalekv_core.model.text_encoder import T5TextEncoder

    state = T5TextEncoder.from_folder(T5_DIR).module.state_dict()
    path = tmp_path / "t5_single.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != "encoder.embed_tokens.weight"}, str(path))
    folder = T5TextEncoder.from_folder(T5_DIR, dtype=torch.float16)
    single = T5TextEncoder.from_single_file(path, T5_DIR, dtype=torch.float16)
    dtypes = {k: v.dtype for k, v in folder.module.state_dict().items()}
    assert {k: v.dtype for k, v in single.module.state_dict().items()} == dtypes
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
    assert dtypes["encoder.block.0.layer.0.SelfAttention.o.weight"] == torch.float16
    prompts = ["a red fox in the snow", "a lighthouse at dusk"]
    a, b = folder.encode(prompts), single.encode(prompts)
    assert a.lens == b.lens and torch.equal(a.kv_compact, b.kv_compact)


def test_a_tokenizer_larger_than_the_encoders_vocabulary_is_refused_at_load(tmp_path):
    """A single-file T5 trained with a small vocabulary, paired with the stock T5 tokenizer (32100 tokens), is
    refused when it loads, naming both; it loaded and failed with a bare IndexError at the first prompt."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from scalekv_core.checkpoint import CheckpointError
    from scalekv_core.model.text_encoder import T5TextEncoder

    tokens = len(AutoTokenizer.from_pretrained(T5_DIR, legacy=True, local_files_only=True))
    cfg = T5Config(vocab_size=tokens - 1, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    module = T5EncoderModel(cfg)
    path = tmp_path / "t5_small_vocab.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    with pytest.raises(CheckpointError, match=rf"t5_small_vocab.safetensors has {tokens - 1} token embeddings, "
                                              rf"but the tokenizer in .* has {tokens} tokens"):
        T5TextEncoder.from_single_file(path, T5_DIR)
    cfg.vocab_size = tokens  # exactly as many rows as the tokenizer has ids: loads and encodes
    module = T5EncoderModel(cfg)
    save_file({k: v.contiguous() for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    assert T5TextEncoder.from_single_file(path, T5_DIR).encode(["a fox"]).batch_size == 1
