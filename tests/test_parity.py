"""Bit-for-bit parity with the ORIGINAL Infinity sampler on the tiny reference weights (float32, CPU).

Set SCALEKV_PARITY_DUMP=DIR to also write each case's decoded array there, and SCALEKV_COMPARE_WITH=DIR to
compare against the arrays another torch version wrote (scripts/test.sh does this for torch 2.13.0 vs 2.14.1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.pipeline import InfinityPipeline, bits_to_token_ids
from scalekv_core.schedules import get_schedule

DATA = Path(__file__).parent / "data" / "infinity-tiny"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
CASES = sorted(MANIFEST["runs"]["full_kv"])
FORMATS = {"safetensors": ("infinity_tiny.safetensors", "vae_tiny.safetensors"),
           "pth": ("infinity_tiny.pth", "vae_tiny.pth")}


def _call(case: str) -> dict:
    return MANIFEST["runs"]["full_kv"][case]["autoregressive_infer_cfg_call"]


def _prompt(case: str) -> str:
    return MANIFEST["runs"]["full_kv"][case]["prompt"]


@pytest.fixture(scope="module", params=sorted(FORMATS))
def pipe(request: pytest.FixtureRequest) -> InfinityPipeline:
    transformer, vae = FORMATS[request.param]
    return InfinityPipeline.from_files(DATA / transformer, DATA / vae, DATA / "t5_tiny", device="cpu", precision="fp32")


def _generate(pipe: InfinityPipeline, case: str, from_text_kv: bool):
    call = _call(case)
    cond = TextConditioning.from_numpy_file(DATA / "full_kv" / case / "text_kv_compact.npy") if from_text_kv \
        else _prompt(case)
    return pipe.generate(cond, seed=call["g_seed"], cfg=call["cfg_list"], tau=call["tau_list"], top_k=call["top_k"],
                         top_p=call["top_p"], schedule=get_schedule(1.0, MANIFEST["config"]["pn"]), keep_logits=True)


@pytest.mark.parametrize("from_text_kv", [False, True], ids=["prompt", "text_kv"])
@pytest.mark.parametrize("case", CASES)
def test_every_bit_matches_the_original(pipe: InfinityPipeline, case: str, from_text_kv: bool) -> None:
    ref = DATA / "full_kv" / case
    result = _generate(pipe, case, from_text_kv)
    assert len(result.samples.bits) == len(MANIFEST["config"]["scale_schedule"])
    for si, (bits, bits_vae) in enumerate(zip(result.samples.bits, result.samples.bits_vae)):
        np.testing.assert_array_equal(bits.numpy(), np.load(ref / f"scale_{si:02d}_bits.npy"), err_msg=f"scale {si}")
        np.testing.assert_array_equal(bits_vae.numpy(), np.load(ref / f"scale_{si:02d}_bits_vae.npy"))
        np.testing.assert_array_equal(bits_to_token_ids(bits_vae).numpy(), np.load(ref / f"scale_{si:02d}_token_ids.npy"))
        # Logits are not bit-exact (float32 op order), but must agree far inside the smallest flip margin's scale.
        np.testing.assert_allclose(result.samples.logits[si].numpy(), np.load(ref / f"scale_{si:02d}_logits.npy"),
                                   atol=2e-4, rtol=0)
    np.testing.assert_allclose(result.samples.summed_codes.numpy(), np.load(ref / "summed_codes.npy"), atol=1e-5, rtol=0)
    decoded = result.decoded.numpy()
    assert np.abs(decoded - np.load(ref / "decoded.npy")).max() <= 1e-4
    # The image is the decoded array truncated to uint8; a pixel may land one step off at a boundary.
    ref_rgb = np.load(ref / "image_bgr.npy")[..., ::-1]
    diff = np.abs(result.images[0].astype(int) - ref_rgb)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3

    dump = os.environ.get("SCALEKV_PARITY_DUMP")
    if dump and not from_text_kv:
        Path(dump).mkdir(parents=True, exist_ok=True)
        np.save(Path(dump) / f"{case}_decoded.npy", decoded)


@pytest.mark.parametrize("case", CASES)
def test_decoded_agrees_across_torch_versions(pipe: InfinityPipeline, case: str) -> None:
    other = os.environ.get("SCALEKV_COMPARE_WITH")
    if not other:
        pytest.skip("set SCALEKV_COMPARE_WITH to a dump of another torch version (scripts/test.sh does)")
    theirs = np.load(Path(other) / f"{case}_decoded.npy")
    ours = _generate(pipe, case, from_text_kv=False).decoded.numpy()
    print(f"torch {torch.__version__} vs {other}: max |decoded diff| = {np.abs(ours - theirs).max():.3g}")
    assert np.abs(ours - theirs).max() <= 1.4e-5


def test_text_encodings_match_the_original(pipe: InfinityPipeline) -> None:
    for case in CASES:
        ref = np.load(DATA / "full_kv" / case / "text_kv_compact.npy")
        got = pipe.encode([_prompt(case)])
        assert got.kv_compact.shape == ref.shape
        assert np.abs(got.kv_compact.numpy() - ref).max() <= 1e-4
        np.testing.assert_array_equal(got.cu_seqlens.numpy(), np.load(DATA / "full_kv" / case / "text_cu_seqlens_k.npy"))
