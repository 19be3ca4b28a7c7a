"""8-bit K/V storage (kv_dtype fp8_e4m3fn / int8): every policy runs on it, bytes are counted as held, quantization
error stays within what the format allows, eviction keeps codes and scales together, images stay close to auto."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.budget import BudgetPlan, kv_bytes_per_token, uniform_plan
from scalekv_core.kvcache.cache import KVCache, dequantize, quantize
from scalekv_core.kvcache.config import KV_DTYPES
from scalekv_core.kvcache.memory import plan_memory
from scalekv_core.kvcache.policies.base import EvictionPolicy, StepContext
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import Schedule, get_schedule

DATA = Path(__file__).parent / "data"
TINY = DATA / "infinity-tiny"
TINY_SCHEDULE = get_schedule(1.0, "0.06M")
POLICIES = ["full", "sliding_window", "streamingllm", "snapkv", "pyramidkv", "scalekv"]
SCALED = ["fp8_e4m3fn", "int8"]
ROWS = 2  # the tiny runs use CFG: two rows per image


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors")


def _cond() -> TextConditioning:
    return TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")


def _expected_token_bytes(heads: int, head_dim: int, rows: int) -> int:
    """One byte per key and value element plus one float32 scale each per token and head, counted by hand."""
    return rows * heads * (2 * head_dim * 1 + 2 * 4)


def test_names_are_in_the_one_table_and_unknown_names_are_clear() -> None:
    assert KV_DTYPES["fp8_e4m3fn"] == torch.float8_e4m3fn and KV_DTYPES["int8"] == torch.int8
    assert CacheConfig(kv_dtype="int8").storage_dtypes(torch.bfloat16) == (torch.int8, torch.int8)
    for bad in ("int4", "fp8", 8):
        with pytest.raises(ValueError, match=f"unknown kv dtype.*{bad}"):
            CacheConfig(kv_dtype=bad).validate()  # type: ignore[arg-type]
    plan = uniform_plan(TINY_SCHEDULE, 1, 10)
    with pytest.raises(ValueError, match="both or neither"):
        KVCache(plan, EvictionPolicy(), TINY_SCHEDULE, 1, 2, 4, k_dtype=torch.int8, v_dtype=torch.float32)


# ------------------------------------------------------------------------------------------ round trip


def _data() -> torch.Tensor:
    """Tokens with very different magnitudes (1e-3 .. 1e3), one all zero, and unit-norm keys like the model's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 16, generator=g) * torch.logspace(-3, 3, 64).view(1, 1, 64, 1)
    x[0, 0, 5] = 0
    keys = torch.nn.functional.normalize(torch.randn(2, 3, 64, 16, generator=g), dim=-1)
    return torch.cat([x, keys], dim=2)


def test_int8_round_trip_is_within_half_a_step_of_absmax_over_127() -> None:
    x = _data()
    codes, scales = quantize(x, torch.int8)
    assert codes.dtype == torch.int8 and scales.shape == (*x.shape[:-1], 1) and scales.dtype == torch.float32
    err = (dequantize(codes, scales) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127  # symmetric int8: 127 levels each side of zero
    assert (err <= step / 2 * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(dequantize(codes, scales)[0, 0, 5], torch.zeros(16))


def test_fp8_round_trip_is_within_half_a_mantissa_step() -> None:
    x = _data()
    codes, scales = quantize(x, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn
    err = (dequantize(codes, scales) - x).abs()
    # e4m3: 3 mantissa bits, so a normal value rounds by at most 2^-4 of itself; below the smallest normal (2^-6,
    # in units of the scale that maps the token's absmax to 448) the step is the subnormal one, 2^-9.
    unit = x.abs().amax(-1, keepdim=True) / 448
    bound = torch.maximum(x.abs() * 2**-4, unit * 2**-10)
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(dequantize(codes, scales)[0, 0, 5], torch.zeros(16))


# ------------------------------------------------------------------------------------------ eviction alignment


@dataclass
class RandomKeep(EvictionPolicy):
    """Keeps random tokens (any order of survivors), and checks the keys it is shown against the expected ones."""

    budget: int = 9
    expected_keys: torch.Tensor | None = None
    name = "random_keep"

    def plan(self, schedule: Schedule, num_layers: int) -> BudgetPlan:
        return uniform_plan(schedule, num_layers, self.budget)

    def select(self, ctx: StepContext, keys: torch.Tensor, keep: int) -> torch.Tensor:
        assert self.expected_keys is not None and torch.equal(keys, self.expected_keys)
        B, H, total, _ = keys.shape
        g = torch.Generator().manual_seed(ctx.scale * 31 + ctx.layer)
        return torch.stack([torch.randperm(total, generator=g)[:keep].sort().values for _ in range(B * H)]).view(B, H, keep)


@pytest.mark.parametrize("kv_dtype", SCALED)
def test_eviction_moves_codes_and_scales_together(kv_dtype: str) -> None:
    dtype = KV_DTYPES[kv_dtype]
    sched, layers, B, H, c = TINY_SCHEDULE, 2, 1, 2, 8
    policy = RandomKeep(budget=9)
    kept: dict[tuple[int, int], torch.Tensor] = {}
    cache = KVCache(policy.plan(sched, layers), policy, sched, B, H, c, k_dtype=dtype, v_dtype=dtype,
                    record_kept=lambda s, l, idx: kept.__setitem__((s, l), idx))
    ref_k: list[torch.Tensor] = [torch.empty(B, H, 0, c)] * layers
    ref_v: list[torch.Tensor] = [torch.empty(B, H, 0, c)] * layers
    g = torch.Generator().manual_seed(1)
    last = sched.num_scales - 1
    for si, n in enumerate(sched.tokens_per_scale):
        cache.begin_scale(si)
        for layer in range(layers):
            new_k = torch.randn(B, H, n, c, generator=g) * torch.rand(B, H, n, 1, generator=g) * 10
            new_v = torch.randn(B, H, n, c, generator=g) * torch.rand(B, H, n, 1, generator=g) * 10
            k, v = cache.new_slots(layer, n)
            k.copy_(new_k)
            v.copy_(new_v)
            # Scoring sees the stored tokens dequantized and this scale's tokens as projected.
            policy.expected_keys = torch.cat([dequantize(*quantize(ref_k[layer], dtype)), new_k], dim=2)
            cache.attend(layer, torch.randn(B, H, n, c, generator=g), torch.float32)
            if si == last:
                continue
            all_k, all_v = torch.cat([ref_k[layer], new_k], 2), torch.cat([ref_v[layer], new_v], 2)
            idx = kept.get((si, layer))
            if idx is None:
                ref_k[layer], ref_v[layer] = all_k, all_v
            else:
                gi = idx.unsqueeze(-1).expand(-1, -1, -1, c)
                ref_k[layer], ref_v[layer] = all_k.gather(2, gi), all_v.gather(2, gi)
            got_k, got_v = cache.stored(layer)
            assert torch.equal(got_k, dequantize(*quantize(ref_k[layer], dtype))), (si, layer)
            assert torch.equal(got_v, dequantize(*quantize(ref_v[layer], dtype))), (si, layer)
        cache.end_scale()
    assert any(idx.shape[-1] < sched.tokens_per_scale[s] + 9 for (s, _), idx in kept.items())


# ------------------------------------------------------------------------------------------ generation and bytes


@pytest.mark.parametrize("kv_dtype", SCALED)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_on_8bit_storage_and_counts_its_bytes(pipe: InfinityPipeline, policy: str,
                                                                kv_dtype: str) -> None:
    cfg = pipe.transformer.cfg
    config = CacheConfig(policy=policy, budget="20%", window=4, kv_dtype=kv_dtype)
    r = pipe.generate(_cond(), seed=0, schedule=TINY_SCHEDULE, cache=config, memory_report=True)
    assert r.images.shape[0] == 1 and len(r.samples.bits) == TINY_SCHEDULE.num_scales
    tb = _expected_token_bytes(cfg.num_heads, cfg.head_dim, ROWS)
    assert r.memory.bytes_per_token_layer == tb
    plan, usage = r.samples.plan, r.samples.usage
    for si in range(len(plan.kept)):
        assert usage[si].tokens == plan.kept[si], f"scale {si}"
        assert usage[si].stored_bytes == [t * tb for t in plan.kept[si]]
    planned = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, TINY_SCHEDULE, 1,
                          config, torch.float32, text_tokens=19)
    assert planned.analytic_mb == pytest.approx(r.memory.analytic_mb)
    assert planned.analytic_mb == pytest.approx(plan.peak_stored_tokens() * tb / 2**20)
    allocated = [sum(u.allocated_bytes) + u.workspace_bytes for u in usage]
    assert max(allocated) / 2**20 <= planned.cache_peak_mb * 1.0001
    json.dumps(r.memory.to_dict())


def test_stored_bytes_against_auto_and_budgets_in_mb(pipe: InfinityPipeline) -> None:
    cfg = pipe.transformer.cfg
    heads, c = cfg.num_heads, cfg.head_dim
    auto = CacheConfig(kv_dtype="auto").token_bytes(heads, c, ROWS, torch.float32)
    assert auto == ROWS * heads * c * 8  # fp32 keys and values on fp32 blocks
    for name in SCALED:
        tb = CacheConfig(kv_dtype=name).token_bytes(heads, c, ROWS, torch.float32)
        assert tb == _expected_token_bytes(heads, c, ROWS) == kv_bytes_per_token(heads, c, 1, 1, ROWS)
        # A budget in MB buys as many tokens as the stored bytes allow: the same MB as auto holds ~8x the tokens.
        mb = "0.5MB"
        tokens = CacheConfig(policy="sliding_window", budget=mb, kv_dtype=name).budget_tokens(
            TINY_SCHEDULE, cfg.depth, heads, c, ROWS, torch.float32)
        prefix = sum(TINY_SCHEDULE.tokens_per_scale[:-1])
        assert tokens == min(prefix, int(0.5 * 2**20 // (cfg.depth * tb)))
    # The cache's own figure agrees with the config's.
    plan = uniform_plan(TINY_SCHEDULE, 1, 10)
    cache = KVCache(plan, EvictionPolicy(), TINY_SCHEDULE, ROWS, heads, c, k_dtype=torch.int8, v_dtype=torch.int8)
    assert cache.token_bytes == _expected_token_bytes(heads, c, ROWS)


@pytest.mark.parametrize("kv_dtype", SCALED)
def test_8bit_storage_stays_close_to_auto_on_the_tiny_model(pipe: InfinityPipeline, kv_dtype: str) -> None:
    from scalekv_core.bench.metrics import bits_agreement

    for policy in ("full", "scalekv"):
        ref = pipe.generate(_cond(), seed=0, schedule=TINY_SCHEDULE,
                            cache=CacheConfig(policy=policy, budget="20%", window=4))
        got = pipe.generate(_cond(), seed=0, schedule=TINY_SCHEDULE,
                            cache=CacheConfig(policy=policy, budget="20%", window=4, kv_dtype=kv_dtype))
        assert bits_agreement(got.samples.bits, ref.samples.bits) >= 0.9, policy


# ------------------------------------------------------------------------------------------ embedded model


@pytest.mark.parametrize("kv_dtype", SCALED)
def test_8bit_storage_keeps_the_embedded_models_images(kv_dtype: str) -> None:
    """The committed default model: most sampled bits equal the auto run's (docs/kv_storage.md has 20 pairs)."""
    from scalekv_core.bench.fidelity import load_pairs
    from scalekv_core.bench.metrics import bits_agreement
    from scalekv_core.training.prompt_following import load_default

    model = load_default(Path(__file__).resolve().parents[1] / "default_model")
    for caption, seed in load_pairs(None, 2, 0):
        cond = model.text_encoder.encode([caption])
        for policy in ("full", "scalekv"):
            ref = model.generate(cond, seed=seed, width=256, height=256,
                                 cache=CacheConfig(policy=policy, budget="10%", window=4))
            got = model.generate(cond, seed=seed, width=256, height=256,
                                 cache=CacheConfig(policy=policy, budget="10%", window=4, kv_dtype=kv_dtype))
            assert bits_agreement(got.samples.bits, ref.samples.bits) >= 0.9, (caption, policy)
