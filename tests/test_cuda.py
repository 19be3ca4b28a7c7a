"""The CUDA path against the original's reference outputs (skipped without a GPU; run on a lent one).

A CUDA generator draws other random numbers than the CPU one the references were made with, so the bits cannot
be compared directly. Instead each scale is handed the original's bits (the sampler's `bits_hook`), and what the
GPU computes from them is compared: the logits at every scale, the kept positions of the original ScaleKV scoring,
the decoded image. Then what only a GPU can show: a seed repeats its image, and the planner brackets the peak
that `torch.cuda.max_memory_allocated` measures.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scalekv_core.kvcache import CacheConfig
from scalekv_core.kvcache.memory import plan_memory
from scalekv_core.kvcache.policies import scalekv as scalekv_policy
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.sampler import SamplerSettings, sample
from scalekv_core.schedules import get_schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = Path(__file__).parent / "data" / "infinity-tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())
SCHEDULE = get_schedule(1.0, MANIFEST["config"]["pn"])


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference is CPU float32
    torch.backends.cudnn.allow_tf32 = False
    return InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                       TINY / "t5_tiny", device="cuda", precision="fp32")


def _forced(ref: Path):
    """A bits_hook that replaces each scale's drawn bits by the original's."""
    def hook(si: int, drawn: torch.Tensor) -> torch.Tensor:
        bits = torch.from_numpy(np.load(ref / f"scale_{si:02d}_bits.npy")).to(drawn.device, drawn.dtype)
        return bits.reshape(drawn.shape)
    return hook


def _run(pipe: InfinityPipeline, kind: str, case: str, **kw):
    call = MANIFEST["runs"][kind][case]["autoregressive_infer_cfg_call"]
    cond = TextConditioning.from_numpy_file(TINY / "full_kv" / case / "text_kv_compact.npy")
    return pipe.generate(cond, seed=call["g_seed"], cfg=call["cfg_list"], tau=call["tau_list"], top_k=call["top_k"],
                         top_p=call["top_p"], schedule=SCHEDULE, bits_hook=_forced(TINY / kind / case), **kw)


@pytest.mark.parametrize("case", sorted(MANIFEST["runs"]["full_kv"]))
def test_cuda_logits_and_image_match_the_original_given_its_bits(pipe: InfinityPipeline, case: str) -> None:
    ref = TINY / "full_kv" / case
    r = _run(pipe, "full_kv", case, keep_logits=True)
    for si, logits in enumerate(r.samples.logits):
        diff = np.abs(logits.cpu().numpy() - np.load(ref / f"scale_{si:02d}_logits.npy")).max()
        assert diff <= 1e-3, f"scale {si}: logits differ by {diff:.3g}"
    assert np.abs(r.decoded.cpu().numpy() - np.load(ref / "decoded.npy")).max() <= 1e-3


@pytest.mark.parametrize("case", sorted(MANIFEST["runs"]["scalekv"]))
def test_cuda_original_scalekv_keeps_the_original_positions(pipe: InfinityPipeline, case: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept positions equal the original's up to the first place where pooled scores tie at the cut: CUDA's top-k
    breaks ties otherwise than the CPU's, so there both choices must carry the same scores. From then on the caches
    hold different tokens and later choices may legitimately differ."""
    skv = MANIFEST["config"]["scalekv"]
    config = CacheConfig(policy="scalekv", scoring="original", budget=skv["max_capacity"], window=skv["window_size"],
                         kernel=skv["kernel_size"], pooling=skv["pooling"], budget_file=str(TINY / skv["budget_file"]))
    last_scores: list[torch.Tensor] = []
    real_topk_keep = scalekv_policy.topk_keep

    def topk_keep(scores: torch.Tensor, keep: int, forced: torch.Tensor | None = None) -> torch.Tensor:
        last_scores[:] = [scores.cpu().clone()]
        return real_topk_keep(scores, keep, forced)

    monkeypatch.setattr(scalekv_policy, "topk_keep", topk_keep)
    kept: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    r = _run(pipe, "scalekv", case, cache=config,
             record_kept=lambda s, l, idx: kept.__setitem__((s, l), (idx.cpu().numpy().copy(), last_scores[0].numpy())))
    files = sorted((TINY / "scalekv" / case).glob("scalekv_kept_s*_l*.npy"))
    assert len(files) == 16
    for f in files:  # in sampling order: scale, then layer
        s, l = int(f.stem.split("_s")[1][:2]), int(f.stem.split("_l")[1])
        ours, scores = kept[(s, l)]
        theirs = np.load(f)
        assert ours.shape == theirs.shape, f.name
        if np.array_equal(ours, theirs):
            continue
        for b, h in zip(*np.nonzero((ours != theirs).any(-1))):
            mine, orig = np.sort(scores[b, h, ours[b, h]]), np.sort(scores[b, h, theirs[b, h]])
            np.testing.assert_array_equal(mine, orig, err_msg=f"{f.name} row {b} head {h}: not a tie")
        break
    assert np.abs(r.decoded.cpu().numpy() - np.load(TINY / "scalekv" / case / "decoded.npy")).max() <= 1e-3


def test_cuda_sampler_takes_text_from_the_cpu(pipe: InfinityPipeline) -> None:
    """The sampler moves CPU text (and the learned unconditional rows) to the model's GPU itself."""
    cond = TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")
    settings = SamplerSettings(cfg=3.0, tau=1.0, seed=0)
    on_cpu = sample(pipe.transformer, cond, SCHEDULE, settings, pipe.vae_patchify)
    on_gpu = sample(pipe.transformer, cond.to("cuda"), SCHEDULE, settings, pipe.vae_patchify)
    for x, y in zip(on_cpu.bits, on_gpu.bits):
        assert x.is_cuda and torch.equal(x, y)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_seed_repeats_its_image(precision: str) -> None:
    p = InfinityPipeline.from_files(TINY / "infinity_tiny.safetensors", TINY / "vae_tiny.safetensors",
                                    TINY / "t5_tiny", device="cuda", precision=precision)
    config = CacheConfig(policy="scalekv", budget="10%", window=4)
    a = p.generate("a red apple", seed=7, schedule=SCHEDULE, cache=config)
    b = p.generate("a red apple", seed=7, schedule=SCHEDULE, cache=config)
    for x, y in zip(a.samples.bits, b.samples.bits):
        assert torch.equal(x, y)
    assert np.array_equal(a.images[0], b.images[0])


def test_cuda_planner_brackets_the_measured_peak(pipe: InfinityPipeline) -> None:
    cfg = pipe.transformer.cfg
    cond = TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")
    for policy in ("full", "scalekv"):
        config = CacheConfig(policy=policy, budget="10%", window=4)
        r = pipe.generate(cond, seed=0, schedule=SCHEDULE, cache=config, memory_report=True)
        assert r.memory.measurement.startswith("torch.cuda.max_memory_allocated"), r.memory.measurement
        plan = plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, SCHEDULE, 1, config,
                           torch.float32, text_tokens=cond.max_len)
        assert plan.analytic_mb == pytest.approx(r.memory.analytic_mb)
        assert 0.6 * r.memory.measured_peak_mb <= plan.sampling_peak_mb <= 1.6 * r.memory.measured_peak_mb


@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "none"), (torch.bfloat16, "fp8_e4m3fn")])
def test_cuda_block_swap_same_bits_and_n_minus_2_blocks_less_memory(dtype: torch.dtype, fmt: str) -> None:
    """Block swap on a GPU: the same bits; the sampling peak lower by (N - 2) blocks (max_memory_allocated), the
    swapped blocks in pinned memory, nothing left allocated after restore; also from a model kept on the CPU."""
    from helpers_tiny import make_tiny_transformer_state
    from scalekv_core.job_memory import block_bytes
    from scalekv_core.model.block_swap import swap_blocks
    from scalekv_core.model.config import InfinityConfig
    from scalekv_core.model.quant import quantize_model
    from scalekv_core.model.transformer import Infinity

    cfg = InfinityConfig(depth=12, embed_dim=512, num_heads=8, block_chunks=4, ffn_hidden=2048, text_channels=256,
                         text_maxlen=512, pool_heads=2, d_vae=32)
    model = Infinity(cfg)
    model.load_state_dict(make_tiny_transformer_state(cfg, 21))
    model = quantize_model(model, fmt).set_block_dtype(dtype).eval().requires_grad_(False).to("cuda")
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(9, cfg.text_channels, generator=g) * 0.2
    cond = TextConditioning(kv, [9], torch.tensor([0, 9], dtype=torch.int32), 9).to("cuda")
    settings = SamplerSettings(cfg=3.0, tau=1.0, seed=5)
    n, block = 10, block_bytes(cfg, fmt, dtype)

    def run() -> tuple[list[torch.Tensor], int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = sample(model, cond, SCHEDULE, settings, False)
        torch.cuda.synchronize()
        return [b.cpu() for b in out.bits], torch.cuda.max_memory_allocated()

    ref, peak_plain = run()
    before = torch.cuda.memory_allocated()
    with swap_blocks(model, n, "cuda") as swap:
        assert all(flat.is_pinned() for flat in swap._host.values())
        bits, peak_swap = run()
        assert swap.transfers == n * SCHEDULE.num_scales
    assert torch.cuda.memory_allocated() == before and model.block_swap is None
    assert all(torch.equal(a, b) for a, b in zip(ref, bits))
    saved = peak_plain - peak_swap
    assert abs(saved - (n - 2) * block) <= 0.02 * (n - 2) * block + 2**20, (saved, (n - 2) * block)

    model.to("cpu")  # kept on the host: the swap places the rest on the GPU for the call and takes it back
    empty = torch.cuda.memory_allocated()
    with swap_blocks(model, n, "cuda"):
        bits_from_host, peak_from_host = run()
    assert all(torch.equal(a, b) for a, b in zip(ref, bits_from_host))
    assert abs(peak_from_host - peak_swap) <= 2**20
    assert torch.cuda.memory_allocated() == empty and model.pos_start.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_cuda_fp8_matmul_runs_on_fp8_tensor_cores_or_says_why():
    """On an 8.9+ GPU (H100, H200, Ada) the scaled fp8 matmul is turned on and a generation runs; on an older one
    the dequantized matmul stays and the note names the GPU's compute capability."""
    from scalekv_core.loader import load_transformer, load_vae
    from scalekv_core.model import quant

    model = load_transformer(TINY / "infinity_tiny.safetensors", device="cuda", precision="bf16",
                             weights="fp8_e4m3fn")
    note = quant.enable_fp8_matmul(model, "cuda")
    if torch.cuda.get_device_capability() >= (8, 9):
        assert note is None and any(m.fp8_matmul for m in model.modules() if isinstance(m, quant.QuantLinear))
    else:
        assert note and "compute capability" in note
    pipe = InfinityPipeline(model, load_vae(TINY / "vae_tiny.safetensors", device="cuda"))
    cond = TextConditioning.from_numpy_file(TINY / "full_kv" / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy")
    result = pipe.generate(cond, seed=0, width=256, height=256)
    assert result.images.shape == (1, 256, 256, 3) and result.images.std() > 0


# ---------------------------------------------------------------- per-scale CUDA graphs (scalekv_core/graphs.py)

def _graphs_model():
    """A narrow bf16 model on the GPU (random weights) and the 0.60M schedule (QKV and FFN slices at its last scales),
    for the graph runner's checks."""
    from helpers_tiny import make_tiny_transformer_state
    from scalekv_core.model.config import InfinityConfig
    from scalekv_core.model.transformer import Infinity

    cfg = InfinityConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=2, ffn_hidden=256, text_channels=64,
                         text_maxlen=64, pool_heads=2, d_vae=32)
    model = Infinity(cfg)
    model.load_state_dict(make_tiny_transformer_state(cfg, seed=5))
    return model.set_block_dtype(torch.bfloat16).eval().requires_grad_(False).to("cuda"), get_schedule(1.0, "0.60M")


def _graph_images():
    from helpers_tiny import random_text
    return [(random_text(9, 64, seed=10 * i).to("cuda"), SamplerSettings(seed=100 + i, cfg=3.0 + i)) for i in range(2)]


def _same_sample(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and torch.equal(a.summed_codes, b.summed_codes)


@pytest.mark.parametrize("config", [CacheConfig(policy="full"), CacheConfig(policy="scalekv", budget="10%"),
                                    CacheConfig(policy="scalekv", scoring="original", budget="10%")],
                         ids=["full", "scalekv", "scalekv_original"])
def test_cuda_graphs_give_the_eager_bits_for_two_images_in_a_row(config: CacheConfig) -> None:
    """CUDA graphs per scale, one runner, two prompts and seeds: every bit equals the eager run's, one capture;
    the second image replays under sync debug mode 'error' (no host sync in replay or between graphs)."""
    from scalekv_core.graphs import ScaleGraphRunner

    model, schedule = _graphs_model()
    runner = ScaleGraphRunner("cuda")
    for i, (cond, settings) in enumerate(_graph_images()):
        eager = sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config)
        torch.cuda.synchronize()
        if i:
            torch.cuda.set_sync_debug_mode("error")
        try:
            graphed = sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config,
                             graphs="cuda", runner=runner)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert _same_sample(eager, graphed), f"image {i}"
    assert runner.captures == 1
    runner.release()


def test_cuda_graphs_release_returns_the_memory() -> None:
    """The runner's pool, cache and static inputs hold memory while kept, and none of it after release(). A first
    runner is made and released before the baseline: cuBLAS keeps a workspace for each stream it has run on (the
    warm-up and capture streams), once per process."""
    import gc

    from scalekv_core.graphs import ScaleGraphRunner

    model, schedule = _graphs_model()
    config = CacheConfig(policy="scalekv", budget="10%")
    (cond, settings), _ = _graph_images()
    sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config)  # RoPE and ScaleKV tables
    sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config, graphs="cuda")  # own runner
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    runner = ScaleGraphRunner("cuda")
    out = sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config, graphs="cuda",
                 runner=runner)
    del out
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() > before  # kept between images: workspace, static inputs
    runner.release()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_cuda_every_available_attention_backend_matches_math_on_a_2b_shape() -> None:
    """Each backend that runs here (kvcache/attention.py) gives SDPA math's attention within bf16 rounding on the
    2B's shape (2 rows x 16 heads of 128, scale 9's 1,024 queries over the 2,521 keys so far), its sdpa_lse the same
    output and log-sum-exp, and a masked call (padded text) plain SDPA's; sage (8-bit q.k) within its own bound."""
    import torch.nn.functional as F

    from scalekv_core.kvcache import attention as A

    dev, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows, heads, c, n, m = 2, 16, 128, 1024, 2521
    q = (F.normalize(torch.randn(rows, heads, n, c, generator=g, device=dev), dim=-1) * 8).to(dtype)
    k = F.normalize(torch.randn(rows, heads, m, c, generator=g, device=dev), dim=-1).to(dtype)
    v = torch.randn(rows, heads, m, c, generator=g, device=dev).to(dtype)
    ref, ref_lse = A.BACKENDS["math"].attend_lse(q.float(), k.float(), v.float(), 1.0)
    mask = torch.ones(rows, 1, 1, m, dtype=torch.bool, device=dev)
    mask[1, ..., 700:] = False
    masked_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    problems = A.available(dev, dtype)
    ran = [name for name, why in problems.items() if why is None]
    assert {"sdpa", "math", "flash"} <= set(ran), problems  # every GPU torch supports runs these in bf16
    for name in ran:
        tol = 1e-1 if name == "sage" else 2e-2
        with A.use_backend(name, dev, dtype):
            out = A.sdpa(q, k, v, dtype)
            lse_out, lse = A.sdpa_lse(q, k, v, dtype)
            masked = A.attention(q, k, v, 1.0, mask)
        assert out.shape == q.shape and out.dtype == dtype, name
        assert (out.float() - ref).abs().max().item() < tol, name
        assert (out.float() - ref).abs().mean().item() < tol / 10, name
        assert (lse_out.float() - ref).abs().max().item() < 2e-2, name
        assert lse.shape == (rows, heads, n) and (lse - ref_lse).abs().max().item() < 1e-2, name
        if not A.BACKENDS[name].masks:
            assert torch.equal(masked, masked_ref), name  # no mask support: plain SDPA ran it
        else:
            assert (masked.float() - masked_ref.float()).abs().max().item() < 2e-2, name
    print("attention backends run:", ran, "refused:", {k: v for k, v in problems.items() if v})


@pytest.mark.parametrize("policy", ["full", "sliding_window", "scalekv"])
def test_cuda_queries_and_keys_made_in_bf16_give_the_logits_of_float32_ones(policy: str) -> None:
    """auto stores full's keys in bf16 and makes queries in bf16 where nothing scores them (rounded by the RoPE
    add's write, which CUDA computes in float32): every logit equals the float32 path's, which an observer forces.
    The 0.60M schedule takes the sliced projection at its large scales too."""
    model, schedule = _graphs_model()
    cond, settings = _graph_images()[0]
    config = CacheConfig(policy=policy, budget="20%")
    rounded = sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config, keep_logits=True)
    as_before = sample(model, cond, schedule, settings, vae_patchify=False, cache_config=config, keep_logits=True,
                       observer=lambda *args: None)
    for si, (a, b) in enumerate(zip(rounded.logits, as_before.logits)):
        assert torch.equal(a, b), f"scale {si}"
    assert _same_sample(rounded, as_before)
