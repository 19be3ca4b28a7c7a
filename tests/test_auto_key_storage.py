"""kv_dtype auto stores keys in the block dtype where nothing but attention reads them (full, sliding_window,
streamingllm), and queries are made in it wherever nothing scores with them: attention casts both to the block
dtype anyway, so every logit stays what float32 keys and queries give, with a third fewer cache bytes. Scoring
policies and calibration's observer keep float32 keys, and a policy's scoring steps float32 queries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.cache import KVCache
from scalekv_core.kvcache.calibration import measurement_cache
from scalekv_core.kvcache.config import POLICIES
from scalekv_core.kvcache.memory import plan_memory
from scalekv_core.kvcache.policies.base import EvictionPolicy
from scalekv_core.model import transformer
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.sampler import SamplerSettings, sample
from scalekv_core.schedules import get_schedule

TINY = Path(__file__).parent / "data" / "infinity-tiny"
SCHEDULE = get_schedule(1.0, "0.06M")
UNSCORED = ("full", "sliding_window", "streamingllm")
SCORED = ("snapkv", "pyramidkv", "scalekv")
ROWS = 2  # CFG: two rows per image


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    p = InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors")
    p.transformer.set_block_dtype(torch.bfloat16)  # as on a GPU: attention runs in bf16 and casts keys to it
    return p


def _cond() -> TextConditioning:
    return TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")


@dataclass
class Seen:
    """What the live caches held and passed: key storage dtypes, queries at attend and at the policy's select."""

    k_dtypes: set = field(default_factory=set)
    attend_q: set = field(default_factory=set)
    select_q: set = field(default_factory=set)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    record = Seen()
    attend, select = KVCache.attend, KVCache._select

    def attending(self: KVCache, layer: int, q: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        record.k_dtypes.add(self.k_dtype)
        record.attend_q.add(q.dtype)
        return attend(self, layer, q, *args, **kwargs)

    def selecting(self: KVCache, layer: int, q: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        record.select_q.add(q.dtype)
        return select(self, layer, q, *args, **kwargs)

    monkeypatch.setattr(KVCache, "attend", attending)
    monkeypatch.setattr(KVCache, "_select", selecting)
    return record


def test_auto_key_dtype_by_policy() -> None:
    assert set(UNSCORED) | set(SCORED) == set(POLICIES)
    bf16, f32 = torch.bfloat16, torch.float32
    for name in UNSCORED:
        assert CacheConfig(policy=name).storage_dtypes(bf16) == (bf16, bf16), name
        assert CacheConfig(policy=name, float_keys=True).storage_dtypes(bf16) == (f32, bf16), name
        assert CacheConfig(policy=name).storage_dtypes(f32) == (f32, f32), name
    for name in SCORED:
        assert CacheConfig(policy=name).storage_dtypes(bf16) == (f32, bf16), name
    # A named format is what it says, whatever the policy.
    assert CacheConfig(policy="full", kv_dtype="fp32").storage_dtypes(bf16) == (f32, f32)
    assert CacheConfig(policy="scalekv", kv_dtype="bf16").storage_dtypes(bf16) == (bf16, bf16)
    # A policy that does not say it leaves keys alone is assumed to score them.
    assert EvictionPolicy.scores_keys and not any(POLICIES[name].scores_keys for name in UNSCORED)


def test_budget_in_mb_buys_tokens_at_the_stored_key_width() -> None:
    heads, c, depth = 4, 32, 4
    per = {name: CacheConfig(policy=name).token_bytes(heads, c, ROWS, torch.bfloat16) for name in POLICIES}
    for name in UNSCORED:
        assert per[name] == ROWS * heads * c * (2 + 2)  # bf16 keys and values, counted by hand
    for name in SCORED:
        assert per[name] == ROWS * heads * c * (4 + 2)  # float32 keys
    prefix = sum(SCHEDULE.tokens_per_scale[:-1])
    for float_keys, key_bytes in ((False, 2), (True, 4)):
        cfg = CacheConfig(policy="sliding_window", budget="0.1MB", float_keys=float_keys)
        assert cfg.budget_tokens(SCHEDULE, depth, heads, c, ROWS, torch.bfloat16) == min(
            prefix, int(0.1 * 2**20 // (depth * ROWS * heads * c * (key_bytes + 2))))


@pytest.mark.parametrize("policy", UNSCORED)
def test_block_dtype_keys_draw_the_bits_float32_keys_draw(pipe: InfinityPipeline, policy: str, seen: Seen) -> None:
    cfg = pipe.transformer.cfg
    runs = {}
    for kv_dtype in ("auto", "fp32"):  # fp32: float32 keys, values stored exactly as bf16 gave them
        config = CacheConfig(policy=policy, budget="30%", kv_dtype=kv_dtype)
        runs[kv_dtype] = pipe.generate(_cond(), seed=0, schedule=SCHEDULE, cache=config, memory_report=True)
        assert seen.k_dtypes == {torch.bfloat16 if kv_dtype == "auto" else torch.float32}  # the live cache's
        seen.k_dtypes.clear()
    auto, f32 = runs["auto"], runs["fp32"]
    assert auto.memory.bytes_per_token_layer == ROWS * cfg.num_heads * cfg.head_dim * (2 + 2)
    assert f32.memory.bytes_per_token_layer == ROWS * cfg.num_heads * cfg.head_dim * (4 + 4)
    for si, (a, b) in enumerate(zip(auto.samples.bits, f32.samples.bits)):
        assert torch.equal(a, b), f"scale {si}"
    assert (auto.images == f32.images).all()


def _logits(pipe: InfinityPipeline, config: CacheConfig, observer=None) -> list[torch.Tensor]:  # noqa: ANN001
    return sample(pipe.transformer, _cond(), SCHEDULE, SamplerSettings(seed=0), pipe.vae_patchify,
                  cache_config=config, observer=observer, keep_logits=True).logits


@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("policy", UNSCORED + SCORED)
def test_queries_rounded_as_made_give_the_logits_of_float32_queries(pipe: InfinityPipeline, policy: str,
                                                                    chunk: int | None, seen: Seen,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries are rounded to bf16 by the op that makes them at every step where nothing scores with them (every
    step of full, sliding_window and streamingllm; the non-evicting steps of the scoring policies), and the
    policy's select only ever sees float32 ones; with an observer (which keeps queries and keys float32
    everywhere, as before) every scale's logits are the same to the bit. chunk 40: the sliced projection of large
    scales, forced from scale 4 (64 tokens) on."""
    if chunk is not None:
        monkeypatch.setattr(transformer, "QKV_CHUNK", chunk)
    config = CacheConfig(policy=policy, budget="30%")
    rounded = _logits(pipe, config)
    if policy in UNSCORED:
        assert seen.attend_q == {torch.bfloat16}
    else:
        assert seen.attend_q == {torch.bfloat16, torch.float32} and seen.select_q == {torch.float32}
    observed: list[tuple[torch.dtype, torch.dtype]] = []
    as_before = _logits(pipe, config, observer=lambda scale, layer, q, keys, stored: observed.append(
        (q.dtype, keys.dtype)))
    assert observed and set(observed) == {(torch.float32, torch.float32)}
    for si, (a, b) in enumerate(zip(rounded, as_before)):
        assert torch.equal(a, b), f"scale {si}"


def test_calibration_runs_and_plans_float32_keys(pipe: InfinityPipeline, seen: Seen) -> None:
    """The measurement's cache (float32 keys for the observer) is the one a calibration is planned with."""
    config = measurement_cache()
    cfg = pipe.transformer.cfg
    _logits(pipe, config, observer=lambda *args: None)
    assert seen.k_dtypes == {torch.float32}
    planned = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, SCHEDULE, 1, config,
                          torch.bfloat16)
    plain = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, SCHEDULE, 1,
                        CacheConfig(policy="full"), torch.bfloat16)
    assert planned.analytic_mb == pytest.approx(plain.analytic_mb * (4 + 2) / (2 + 2))
