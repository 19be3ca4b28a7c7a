"""NaN or infinite logits end a generation with an error naming the scale and the likely cause, instead of a black
image drawn from NaN bits: corrupt weights, and float16 overflowing where float32 does not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_tiny import FULL_KV, TINY_TRANSFORMER, TINY_VAE, reference_text
from scalekv_core.loader import load_transformer, load_vae
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.sampler import NonFiniteLogits
from scalekv_core.schedules import get_schedule

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = get_schedule(1.0, "0.06M")  # 256x256, 7 scales


def _pipe(dtype: torch.dtype = torch.float32) -> InfinityPipeline:
    return InfinityPipeline(load_transformer(TINY_TRANSFORMER).set_block_dtype(dtype), load_vae(TINY_VAE))


def _generate(pipe: InfinityPipeline, **kw):
    return pipe.generate(reference_text(), seed=0, cfg=3.0, tau=0.5, schedule=SCHEDULE, **kw)


def test_finite_logits_are_recorded_for_every_scale_and_pass() -> None:
    result = _generate(_pipe(), keep_logits=True)
    sums = result.samples.logit_sums
    assert len(sums) == SCHEDULE.num_scales and result.samples.first_nonfinite_scale() is None
    assert all(torch.equal(s, l.sum(dtype=torch.float32)) for s, l in zip(sums, result.samples.logits))


def test_a_nan_weight_is_an_error_naming_the_first_scale() -> None:
    pipe = _pipe()
    with torch.no_grad():
        pipe.transformer.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match=r"logits at scale 1 of 7 are NaN or infinite in float32, so no image "
                                              r"was made: the weights may be corrupt"):
        _generate(pipe)


def test_float16_overflow_is_an_error_saying_to_load_bf16_or_fp32() -> None:
    """One block's FFN output scaled past float16's range (65504): float32 draws an image, float16 is refused."""
    def boosted(dtype: torch.dtype) -> InfinityPipeline:
        pipe = _pipe(dtype)
        with torch.no_grad():
            pipe.transformer.blocks[1].ffn.fc2.weight.mul_(3e4)
        return pipe

    assert _generate(boosted(torch.float32)).images.shape == (1, 256, 256, 3)
    with pytest.raises(NonFiniteLogits, match=r"in float16, so no image was made: float16 overflows in this model; "
                                              r"load the transformer in bf16 or fp32"):
        _generate(boosted(torch.float16))


def test_cli_reports_it_in_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(TINY_TRANSFORMER))
    sd["head.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan_head.safetensors"
    save_file(sd, str(bad))
    r = subprocess.run([sys.executable, "-m", "scalekv_core", "generate", "--transformer", str(bad), "--vae",
                        str(TINY_VAE), "--text-kv", str(FULL_KV / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"),
                        "--width", "256", "--height", "256", "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not (tmp_path / "x.png").exists()
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the transformer's logits at scale 1 of 7 are NaN or infinite"), r.stderr
