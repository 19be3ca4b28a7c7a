"""Infinity's coarse-to-fine sampler: per scale, run the transformer, sample bits, and build the next scale's input.

It reproduces the original `autoregressive_infer_cfg` with bit labels and CFG on logits: same seed, same bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .graphs import ScaleGraphRunner, check_graph_mode, refusal, run_scale
from .kvcache import CacheConfig, KVCache
from .kvcache.budget import BudgetPlan
from .kvcache.cache import AttentionObserver, KeptRecorder, ScaleUsage
from .limits import LIMITS
from .model.text_encoder import TextConditioning
from .model.transformer import Infinity
from .model.vae import bits_to_codes, unpatchify_bits
from .schedules import Schedule


@dataclass
class SamplerSettings:
    """What the original's `gen_one_img` takes: per-scale cfg and tau (one value or a list), top-k/top-p, seed."""

    cfg: float | Sequence[float] = 3.0
    tau: float | Sequence[float] = 0.5
    top_k: int = 900
    top_p: float = 0.97
    seed: int | None = 0

    def per_scale(self, num_scales: int) -> tuple[list[float], list[float]]:
        """cfg and tau as one value per scale; a list of the wrong length is an error, not a silent truncation."""
        return _per_scale(self.cfg, num_scales, "cfg"), _per_scale(self.tau, num_scales, "tau")

    def validate(self) -> None:
        """Refuse NaN, wrong types and out-of-range values here, not as a failed draw deep in sampling."""
        LIMITS["top_k"].check(self.top_k)
        LIMITS["top_p"].check(self.top_p)
        if self.seed is not None:
            LIMITS["seed"].check(self.seed)
        for name in ("cfg", "tau"):
            value = getattr(self, name)
            for v in ([value] if _is_scalar(value) else list(value)):
                LIMITS[name].check(v)


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.ndim == 0)


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if _is_scalar(value):
        values = [float(LIMITS[name].check(float(value)))] * n
    else:
        values = [float(LIMITS[name].check(v, f"{name}[{i}]")) for i, v in enumerate(value)]
        if len(values) != n:
            raise ValueError(f"{name} list has {len(values)} values but the schedule has {n} scales; "
                             f"give one value or exactly {n}")
    return values


@dataclass
class SampleOutput:
    """Everything the sampler decided, per scale, plus the VAE's input."""

    bits: list[torch.Tensor]  # per scale (B, h*w, d_vae) uint8, transformer token order
    bits_vae: list[torch.Tensor]  # per scale (B, 1, H, W, d) uint8, VAE layout
    summed_codes: torch.Tensor  # (B, d, H, W) float32: the decoder's input
    logits: list[torch.Tensor] = field(default_factory=list)  # per scale (B, h*w*d_vae, 2) when kept
    plan: BudgetPlan | None = None  # how many tokens each layer kept after each scale
    usage: list[ScaleUsage] = field(default_factory=list)  # what the cache really held after each scale
    cache_config: CacheConfig | None = None
    text_len: int = 0  # longest prompt, in text tokens
    eviction_seconds: float = 0.0  # time spent scoring and evicting (measured only with time_eviction)
    logit_sums: list[torch.Tensor] = field(default_factory=list)  # per scale, on the device: one NaN or infinite
    # logit makes its scale's sum NaN or infinite (one reduction per scale, read after sampling)

    def first_nonfinite_scale(self) -> int | None:
        """The first scale whose logits held NaN or infinity, None if none did: read once after sampling (no sync
        inside it), since bits drawn from NaN are a black image that would otherwise pass for a result."""
        if not self.logit_sums:
            return None
        bad = torch.logical_not(torch.isfinite(torch.stack(self.logit_sums))).nonzero()
        return int(bad[0, 0]) if bad.numel() else None


class NonFiniteLogits(ValueError):
    """The transformer produced NaN or infinite logits: the image would be noise or black, so there is none."""


def check_finite(samples: SampleOutput, dtype: torch.dtype) -> None:
    """Raise NonFiniteLogits naming the first scale whose logits were not finite, and the likely cause."""
    bad = samples.first_nonfinite_scale()
    if bad is None:
        return
    why = ("float16 overflows in this model; load the transformer in bf16 or fp32" if dtype == torch.float16 else
           "the weights may be corrupt (NaN or huge values) or the settings extreme (tau, cfg)")
    raise NonFiniteLogits(f"the transformer's logits at scale {bad + 1} of {len(samples.logit_sums)} are NaN or "
                          f"infinite in {str(dtype).replace('torch.', '')}, so no image was made: {why}")


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one class per row of (B, L, V) logits after top-k and top-p, with the original's single multinomial draw.

    torch.multinomial draws one sample per row as argmax(p / E) with E ~ Exp(1) from the generator, after checking
    the probabilities with two host reads; the same race is written out here, so the same generator gives the same
    draws (tests/test_parity.py) and the host never waits for the device.
    """
    B, L, V = logits.shape
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1].fill_(False)  # one fill; assigning a Python value makes a device scalar and copies it
        logits = logits.masked_fill(drop.scatter(order.ndim - 1, order, drop), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, race, out=race).argmax(dim=-1).view(B, L)


def _uncond_text(model: Infinity, cond: TextConditioning) -> torch.Tensor:
    """Each prompt's unconditional rows: the learned `cfg_uncond` prefix of its length, on the model's device."""
    limit = model.cfg_uncond.shape[0]
    if max(cond.lens) > limit:
        raise ValueError(f"a prompt has {max(cond.lens)} text tokens but the model's unconditional embedding "
                         f"has {limit} rows")
    return torch.cat([model.cfg_uncond[:n] for n in cond.lens], dim=0).to(cond.kv_compact.dtype)


ScaleCallback = Callable[[int, int, torch.Tensor], None]
#: bits_hook(scale_index, drawn_bits (B, h*w*d) long) -> the bits the scale keeps (same shape)
BitsHook = Callable[[int, torch.Tensor], torch.Tensor]


def make_cache(model: Infinity, schedule: Schedule, batch_rows: int, config: CacheConfig,
               record_kept: KeptRecorder | None = None, observer: AttentionObserver | None = None) -> KVCache:
    """The KV cache for one generation: policy and budget plan from `config`, buffers on the model's device."""
    cfg = model.cfg
    if observer is not None and not config.float_keys:  # the observer reads the keys: auto keeps them in float32
        config = replace(config, float_keys=True)
    policy, plan = config.build(schedule, cfg.depth, cfg.num_heads, cfg.head_dim, batch_rows, model.block_dtype)
    k_dtype, v_dtype = config.storage_dtypes(model.block_dtype)
    return KVCache(plan, policy, schedule, batch_rows, cfg.num_heads, cfg.head_dim, model.pos_start.device,
                   k_dtype=k_dtype, v_dtype=v_dtype, record_kept=record_kept, observer=observer)


@torch.no_grad()
def sample(model: Infinity, cond: TextConditioning, schedule: Schedule, settings: SamplerSettings,
           vae_patchify: bool, negative: TextConditioning | None = None, keep_logits: bool = False,
           on_scale: ScaleCallback | None = None, cache_config: CacheConfig | None = None,
           record_kept: KeptRecorder | None = None, observer: AttentionObserver | None = None,
           time_eviction: bool = False, bits_hook: BitsHook | None = None, graphs: str = "off",
           runner: ScaleGraphRunner | None = None) -> SampleOutput:
    """Generate the bits of every scale for a batch of prompts, as the original sampler does.

    `on_scale(scale_index, num_scales, summed_codes)` runs after every scale (progress, previews, interrupts);
    an exception it raises stops sampling and frees the cache. `bits_hook` may replace a scale's drawn bits
    before they are used (diagnostics: hand the first scales the ground truth and sample the rest).

    `graphs` runs each scale's transformer step from a captured graph (docs/cuda_graphs.md): "off" (the exact
    eager path), "cuda" (CUDA graphs), "replay" (their CPU stand-in, for tests). Keep `runner` between images to
    capture once and replay after; without one, a runner is made and released within this call. With graphs, the
    runner keeps its cache and graphs after an exception (release() frees them); record_kept, observer,
    time_eviction and block swap are refused (ValueError), since they run Python inside a step.
    """
    settings.validate()
    if check_graph_mode(graphs) != "off":
        why = refusal(model, model.pos_start.device, graphs, record_kept=record_kept, observer=observer,
                      time_eviction=time_eviction)
        if why is not None:
            raise ValueError(why)
        if runner is not None and runner.mode != graphs:
            raise ValueError(f"graphs={graphs!r} with a runner made for {runner.mode!r}")
    n = schedule.num_scales
    if n > model.cfg.num_levels:  # each scale adds its row of lvl_embed: an index error mid-sampling otherwise
        h, w = schedule.pixel_size
        raise ValueError(f"the transformer has {model.cfg.num_levels} scale embeddings ('lvl_embed.weight' rows) "
                         f"but {w}x{h} takes {n} scales; choose a smaller resolution (or a complete checkpoint: "
                         f"the released models have 15)")
    cfgs, taus = settings.per_scale(n)
    device = model.pos_start.device
    B = cond.batch_size
    d_vae = model.cfg.d_vae
    d_bits = d_vae // 4 if vae_patchify else d_vae
    use_cfg = any(c != 1 for c in cfgs)

    text, lens = cond.kv_compact.to(device), list(cond.lens)
    if use_cfg:
        if negative is None:
            uncond = _uncond_text(model, cond)
        else:
            if negative.batch_size == 1 and B > 1:
                negative = negative.repeat_each(B)
            if negative.batch_size != B:
                raise ValueError(f"{negative.batch_size} negative prompts for a batch of {B}")
            uncond, lens_un = negative.kv_compact.to(device), list(negative.lens)
        text = torch.cat((text, uncond), dim=0)
        lens = lens + (list(cond.lens) if negative is None else lens_un)
    bs = len(lens)

    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(settings.seed))

    cond_vec, gss, ca = model.condition(text, lens)
    head_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the head's AdaLN table per row count
    config = cache_config or CacheConfig(policy="full")

    def new_cache() -> KVCache:
        return make_cache(model, schedule, bs, config, record_kept, observer)

    cache: KVCache | None = None
    own_runner = graphs != "off" and runner is None
    if graphs == "off":
        image = model.image_constants(gss, ca)  # what every scale reuses, made once per image
        rope = model.rope(schedule)  # on the device, copied from the host once per schedule
        cache = new_cache()
        cache.time_eviction = time_eviction
        plan = cache.plan

        def transformer(si: int, x: torch.Tensor) -> torch.Tensor:
            return run_scale(model, cache, image, rope, schedule, si, x)  # updates x in place
    else:
        runner = ScaleGraphRunner(graphs) if runner is None else runner
        try:
            runner.bind(model, schedule, lens, config, gss, ca, new_cache)  # captures on a new key
        except BaseException:
            if own_runner:
                runner.release()
            raise
        plan = runner.plan
        transformer = runner.step
    vae_grids = schedule.vae_grids(vae_patchify)
    final_hw = (1, *vae_grids[-1])
    out = SampleOutput(bits=[], bits_vae=[], summed_codes=torch.empty(0), plan=plan,
                       cache_config=cache_config, text_len=max(lens))
    summed: torch.Tensor | None = None
    x = model.start_tokens(cond_vec)
    try:
        for si, (h, w) in enumerate(schedule.grids):
            hidden = None  # the previous scale's hidden state must not live on through this larger one
            hidden = transformer(si, x)
            rows = bs if use_cfg and cfgs[si] != 1 else B
            if rows not in head_tables:
                head_tables[rows] = model.head_nm.table(cond_vec[:rows])
            logits = model.logits(hidden[:rows], cond_vec[:rows], head_tables[rows]).mul(1 / taus[si])
            if rows != B:
                logits = cfgs[si] * logits[:B] + (1 - cfgs[si]) * logits[B:]
            logits = logits.reshape(B, -1, 2)
            if keep_logits:
                out.logits.append(logits.clone())
            out.logit_sums.append(logits.sum(dtype=torch.float32))
            bits = sample_bits(logits, settings.top_k, settings.top_p, generator)
            if bits_hook is not None:
                bits = bits_hook(si, bits)
            bits = bits.reshape(B, h * w, d_vae)
            out.bits.append(bits.to(torch.uint8))
            grid = bits.reshape(B, h, w, d_vae)
            if vae_patchify:
                grid = unpatchify_bits(grid)
            grid = grid.unsqueeze(1)  # (B, 1, H, W, d)
            out.bits_vae.append(grid.to(torch.uint8))
            codes = bits_to_codes(grid)  # (B, d, 1, H, W)
            if si == n - 1:
                summed = codes if summed is None else summed + codes
            else:
                up = F.interpolate(codes, size=final_hw, mode="trilinear")
                summed = up if summed is None else summed + up
                nxt = F.interpolate(summed, size=(1, *vae_grids[si + 1]), mode="trilinear").squeeze(-3)
                if vae_patchify:
                    nxt = F.pixel_unshuffle(nxt, 2)
                nxt = nxt.reshape(B, d_vae, -1).permute(0, 2, 1)  # (B, h'w', d_vae)
                x = model.embed_codes(nxt).repeat(bs // B, 1, 1)
            if on_scale is not None:
                on_scale(si, n, summed.squeeze(-3))
    finally:
        if cache is not None:
            out.usage = cache.usage
            out.eviction_seconds = cache.eviction_seconds
            cache.release()
        else:
            out.usage = list(runner.usage)
            if own_runner:
                runner.release()
    assert summed is not None and d_bits == summed.shape[1]
    out.summed_codes = summed.squeeze(-3)
    return out
