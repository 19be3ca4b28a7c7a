"""Block swap (scalekv_core/model/block_swap.py) on the CPU: the same bits as without it in every weight format,
device bytes as job_memory plans them, one copy per swapped block per scale fetched ahead of its turn, everything
put back after an exception, and the errors (engine, pipeline, command line) naming the value.

On the CPU the "device" and the "host" are both host memory, but the swap keeps them apart: the swapped blocks'
tensors live in the swap's host buffers (and in a slot only while they run), so the counts below are exact."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_tiny import FULL_KV, TINY_TRANSFORMER, TINY_TRANSFORMER_PTH, TINY_VAE, make_tiny_transformer_state
from scalekv_core import cli
from scalekv_core.job_memory import SWAP_BUFFERS, JobOptions, block_bytes, plan_job
from scalekv_core.kvcache.memory import MiB
from scalekv_core.limits import InputError
from scalekv_core.loader import load_vae
from scalekv_core.model import block_swap as bs
from scalekv_core.model.block_swap import BlockSwap, check_block_swap, swap_blocks, swapped_indices
from scalekv_core.model.config import InfinityConfig
from scalekv_core.model.quant import quantize_model
from scalekv_core.model.text_encoder import TextConditioning
from scalekv_core.model.transformer import Infinity
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.sampler import SamplerSettings, sample
from scalekv_core.schedules import get_schedule

SCHEDULE = get_schedule(1.0, "0.06M")  # 256x256, 7 scales
SCALES = SCHEDULE.num_scales
#: Depth 8 (the tiny reference has 4, which allows 2 swapped blocks only), 32 bits per token for the tiny VAE.
DEEP = InfinityConfig(depth=8, embed_dim=64, num_heads=2, block_chunks=2, ffn_hidden=256, text_channels=256,
                      text_maxlen=512, pool_heads=2, d_vae=32)
TEXT_KV = FULL_KV / "p0_apple_s0_cfg3_tau0.5" / "text_kv_compact.npy"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(fmt: str = "none", dtype: str = "fp32", cfg: InfinityConfig = DEEP) -> Infinity:
    model = Infinity(cfg)
    model.load_state_dict(make_tiny_transformer_state(cfg, 11))
    quantize_model(model, fmt)
    return model.set_block_dtype(_DTYPES[dtype]).eval().requires_grad_(False)


def _cond() -> TextConditioning:
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(9, DEEP.text_channels, generator=g) * 0.2
    return TextConditioning(kv, [9], torch.tensor([0, 9], dtype=torch.int32), 9)


def _sample(model: Infinity, **kw):
    return sample(model, _cond(), SCHEDULE, SamplerSettings(seed=7, cfg=3.0, tau=1.0), False, **kw)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits)) and len(a.bits) == len(b.bits)


def _snapshot(model: Infinity) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: Infinity, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and now[k].device == v.device and torch.equal(now[k].view(torch.uint8) if
        v.element_size() == 1 else now[k], v.view(torch.uint8) if v.element_size() == 1 else v)
        for k, v in before.items())


# ------------------------------------------------------------------------------------------------ same bits


@pytest.mark.parametrize("fmt,dtype", [("none", "fp32"), ("none", "bf16"), ("fp8_e4m3fn", "bf16"), ("int8", "fp32"),
                                       ("int4", "bf16")])
def test_same_bits_with_and_without_swap(fmt: str, dtype: str) -> None:
    model = _model(fmt, dtype)
    ref = _sample(model, keep_logits=True)
    for n in (3, DEEP.depth - SWAP_BUFFERS):
        with swap_blocks(model, n, "cpu"):
            out = _sample(model, keep_logits=True)
        assert _same_bits(ref, out), (fmt, dtype, n)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))
        assert torch.equal(ref.summed_codes, out.summed_codes)


def test_pipeline_generate_with_block_swap_gives_the_same_image() -> None:
    model = _model()
    pipe = InfinityPipeline(model, load_vae(TINY_VAE))
    ref = pipe.generate(_cond(), seed=3, schedule=SCHEDULE)
    out = pipe.generate(_cond(), seed=3, schedule=SCHEDULE, block_swap=5)
    assert np.array_equal(ref.images, out.images) and _same_bits(ref.samples, out.samples)
    assert model.block_swap is None
    default = InfinityPipeline(model, pipe.vae, block_swap=6).generate(_cond(), seed=3, schedule=SCHEDULE)
    assert np.array_equal(ref.images, default.images)


# ------------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("fmt,dtype", [("none", "fp32"), ("none", "bf16"), ("fp8_e4m3fn", "bf16"), ("int4", "bf16")])
@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_device_bytes_are_what_the_planner_plans(fmt: str, dtype: str, n: int) -> None:
    model = _model(fmt, dtype)
    total = _nbytes(_tensors(model))
    block = block_bytes(DEEP, fmt, _DTYPES[dtype])
    planned = plan_job(DEEP, 256, 256, options=JobOptions(weights=fmt, dtype=dtype, block_swap=n)).transformer_mb
    with swap_blocks(model, n, "cpu") as swap:
        host = {_storage(f) for f in swap._host.values()}
        in_host = [t for t in _tensors(model) if _storage(t) in host]
        on_device = [t for t in _tensors(model) if _storage(t) not in host]
        # every tensor of the swapped blocks, and nothing else, is in the host store
        assert {id(t) for t in in_host} == {id(t) for i in swap.swapped for t in _tensors(model.blocks[i])}
        assert _nbytes(in_host) == swap.host_bytes == n * block
        assert all(layout.nbytes == block for layout in swap._layouts.values())  # no padding in the flat buffers
        assert _nbytes(on_device) == swap.resident_bytes == total - n * block
        assert sum(s.numel() for s in swap._slots) == swap.slot_bytes == SWAP_BUFFERS * block
        assert swap.device_bytes == total - (n - SWAP_BUFFERS) * block == bs.planned_device_bytes(model, n)
        assert swap.device_bytes == round(planned * MiB)


def test_swapped_blocks_are_spread_with_the_first_and_last_resident() -> None:
    assert swapped_indices(8, 0) == []
    assert swapped_indices(8, 1) == [4]
    assert swapped_indices(8, 3) == [2, 4, 6]
    assert swapped_indices(8, 6) == [1, 2, 3, 4, 5, 6]
    for depth, n in ((32, 30), (40, 38), (40, 13), (32, 1)):
        idx = swapped_indices(depth, n)
        assert len(set(idx)) == n and 0 not in idx and depth - 1 not in idx and idx == sorted(idx)


# ------------------------------------------------------------------------------------------ order of transfers


def _trace(model: Infinity, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """('fetch', block) for every copy into a slot, ('run', block) as each block starts, in order."""
    log: list[tuple[str, int]] = []
    real = BlockSwap._fetch

    def fetch(self: BlockSwap, layer: int, avoid: int | None) -> int:
        before = self.transfers
        slot = real(self, layer, avoid)
        if self.transfers > before:
            log.append(("fetch", layer))
        return slot

    monkeypatch.setattr(BlockSwap, "_fetch", fetch)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: log.append(("run", i)))
    return log


@pytest.mark.parametrize("n", [4, 5, 6])
def test_each_swapped_block_is_copied_once_per_scale_ahead_of_its_turn(n: int, monkeypatch) -> None:
    model = _model()
    log = _trace(model, monkeypatch)
    per_scale: list[list[int]] = []
    with swap_blocks(model, n, "cpu") as swap:
        in_slot: list[bool] = []
        for i in swap.swapped:  # while it runs, a swapped block's tensors are in a slot, not in the host store
            model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: in_slot.append(
                all(_storage(t) in {_storage(s) for s in swap._slots} for t in _tensors(m))))
        _sample(model, on_scale=lambda si, num, codes: per_scale.append(list(swap.scale_fetches)))
        assert swap.transfers == n * SCALES
    assert per_scale == [list(swap.swapped)] * SCALES
    assert in_slot == [True] * (n * SCALES)
    runs = [i for i, (kind, _) in enumerate(log) if kind == "run"]
    assert len(runs) == DEEP.depth * SCALES
    for s in range(SCALES):  # scale s: its fetches and runs, in order
        start = runs[s * DEEP.depth - 1] + 1 if s else 0
        events = log[start:runs[(s + 1) * DEEP.depth - 1] + 1]
        order = [b for kind, b in events if kind == "run"]
        assert order == list(range(DEEP.depth))
        for b in swap.swapped:  # fetched before the block ahead of it started: the copy overlaps that block
            assert events.index(("fetch", b)) < events.index(("run", b - 1)), (s, b, events)


def test_few_swapped_blocks_stay_in_their_slots_across_scales() -> None:
    """Two slots hold up to two blocks: with n <= 2 nothing is copied after the first scale, with 3 one copy less."""
    model = _model()
    for n, copies in ((1, 1), (2, 2), (3, 3 + 2 * (SCALES - 1))):
        with swap_blocks(model, n, "cpu") as swap:
            _sample(model)
            assert swap.transfers == copies, n


# ------------------------------------------------------------------------------------------ undoing, safely


def test_restore_puts_every_tensor_back_and_releases_the_buffers() -> None:
    model = _model("int8", "bf16")
    before = _snapshot(model)
    params = {name: p for name, p in model.named_parameters()}
    swap = BlockSwap(model, 5, "cpu")
    assert model.block_swap is swap
    host = [f for f in swap._host.values()]
    swap.restore()
    swap.restore()  # twice is harmless
    assert model.block_swap is None and not swap.active and not swap._slots and not swap._host
    assert _unchanged(model, before)
    assert all(p is params[name] for name, p in model.named_parameters())  # the Parameter objects are kept
    ours = {_storage(f) for f in host}
    assert not any(_storage(t) in ours for t in _tensors(model))


def test_restore_forgets_rope_tables_made_on_the_swap_device(monkeypatch) -> None:
    """A model kept on the host runs on the GPU during a swap and makes its RoPE table there; restore must not leave
    that table allocated on the GPU. Here the model's position parameter is rebound to meta, as the swap rebinds it
    to the GPU (not through `.to()`), and back: the meta table is forgotten, the host table kept."""
    model = _model()
    home = model.pos_start

    def on(param: torch.nn.Parameter) -> torch.Tensor:
        model.pos_start = param
        return model.rope(SCHEDULE)

    away = torch.nn.Parameter(home.detach().to("meta"), requires_grad=False)
    host_table, meta_table = on(home), on(away)
    assert meta_table.device.type == "meta" and on(away) is meta_table  # kept while the model is there
    on(home)
    model.drop_rope_tables_elsewhere()
    assert on(home) is host_table and on(away) is not meta_table  # the meta one was dropped, the host one kept
    model.pos_start = home
    dropped = []
    monkeypatch.setattr(model, "drop_rope_tables_elsewhere", lambda: dropped.append(True))
    BlockSwap(model, 2, "cpu").restore()
    assert dropped == [True]


def test_an_exception_in_the_middle_of_a_scale_restores_everything(monkeypatch) -> None:
    model = _model()
    ref = _sample(model)
    before = _snapshot(model)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 3 * DEEP.depth + 4:  # block 4 (swapped, in a slot) of the fourth scale
            raise KeyboardInterrupt

    handles = [b.register_forward_pre_hook(boom) for b in model.blocks]
    with pytest.raises(KeyboardInterrupt):
        with swap_blocks(model, 6, "cpu"):
            _sample(model)
    for h in handles:
        h.remove()
    assert model.block_swap is None and _unchanged(model, before)
    with swap_blocks(model, 6, "cpu"):
        assert _same_bits(ref, _sample(model))


def test_an_interrupt_from_on_scale_in_generate_restores_the_model() -> None:
    model = _model()
    before = _snapshot(model)
    pipe = InfinityPipeline(model, load_vae(TINY_VAE), block_swap=4)

    def stop(si: int, n: int, codes: torch.Tensor) -> None:
        if si == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        pipe.generate(_cond(), seed=1, schedule=SCHEDULE, on_scale=stop)
    assert model.block_swap is None and _unchanged(model, before)


def test_a_failed_enable_leaves_the_model_as_it_was(monkeypatch) -> None:
    model = _model()
    before = _snapshot(model)
    real, failed = torch.empty, []

    def fail_on_slots(*args, **kwargs):
        if kwargs.get("device") is not None and not failed:  # the slots are the enable's last allocation
            failed.append(True)
            raise MemoryError("no room for the slots")
        return real(*args, **kwargs)

    monkeypatch.setattr(bs.torch, "empty", fail_on_slots)
    with pytest.raises(MemoryError):
        BlockSwap(model, 4, "cpu")
    monkeypatch.undo()
    assert model.block_swap is None and _unchanged(model, before)


def test_the_model_refuses_to_move_while_swapped_and_one_swap_at_a_time() -> None:
    model = _model()
    with swap_blocks(model, 2, "cpu"):
        with pytest.raises(RuntimeError, match="block swap active"):
            model.to(torch.float64)
        with pytest.raises(RuntimeError, match="already active"):
            BlockSwap(model, 2, "cpu")
    model.to("cpu")  # fine again


def test_inside_inference_mode_the_model_keeps_ordinary_tensors() -> None:
    """ComfyUI samples inside torch.inference_mode: the restored weights must not become inference tensors."""
    model = _model()
    ref = _sample(model)
    with torch.inference_mode():
        with swap_blocks(model, 5, "cpu"):
            out = _sample(model)
    assert _same_bits(ref, out)
    assert not any(t.is_inference() for t in _tensors(model))


def test_zero_swapped_blocks_only_places_the_model() -> None:
    model = _model()
    with swap_blocks(model, 0, "cpu") as swap:
        assert swap.swapped == () and swap.slot_bytes == 0 and swap.device_bytes == _nbytes(_tensors(model))
        _sample(model)
        assert swap.transfers == 0


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("value,words", [
    (7, ["block_swap: 7", "has 8", "at most 6"]), (40, ["block_swap: 40", "has 8", "at most 6"]),
    (-1, ["block_swap: -1 is negative", "0 to 6"]), (2.5, ["block_swap", "2.5", "0 to 6"]),
    ("3", ["block_swap", "'3'"]), (True, ["block_swap", "True"]), (None, ["block_swap", "None"]),
])
def test_bad_counts_are_named(value: object, words: list[str]) -> None:
    with pytest.raises(InputError) as e:
        check_block_swap(value, 8)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    model = _model()
    with pytest.raises(ValueError) as e2:  # the engine and the pipeline say the same, before any work
        BlockSwap(model, value, "cpu")
    assert str(e2.value) == message and model.block_swap is None
    pipe = InfinityPipeline(model, load_vae(TINY_VAE))
    if value is not None:  # generate's None means the pipeline's own setting
        with pytest.raises(ValueError) as e3:
            pipe.generate(_cond(), schedule=SCHEDULE, block_swap=value)
        assert str(e3.value) == message
    with pytest.raises(ValueError):
        InfinityPipeline(model, pipe.vae, block_swap=value)


def test_numpy_integers_are_counts() -> None:
    assert check_block_swap(np.int64(3), 8) == 3


# ------------------------------------------------------------------------------------------------ command line


def _gen(tmp: Path, *extra: str, transformer: Path = TINY_TRANSFORMER) -> list[str]:
    return ["generate", "--transformer", str(transformer), "--vae", str(TINY_VAE), "--text-kv", str(TEXT_KV),
            "--width", "256", "--height", "256", "--out", str(tmp / "img.png"), *extra]


@pytest.mark.parametrize("value,words", [
    ("3", ["--block-swap: 3", "has 4", "at most 2"]), ("99", ["--block-swap: 99", "has 4", "at most 2"]),
    ("-1", ["--block-swap", "-1"]), ("abc", ["--block-swap", "'abc'"]), ("2.5", ["--block-swap", "'2.5'"]),
])
def test_cli_refuses_a_bad_block_swap_before_loading(value: str, words: list[str], tmp_path, monkeypatch,
                                                     capsys) -> None:
    def trap(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(InfinityPipeline, "from_files", classmethod(trap))
    start = time.monotonic()
    rc = cli.main(_gen(tmp_path, "--block-swap", value))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert captured.out == "" and not (tmp_path / "img.png").exists()
    assert time.monotonic() - start < 10


def test_cli_checks_a_shard_folder_before_loading(tmp_path, monkeypatch, capsys) -> None:
    from helpers_tiny import save_sharded
    from safetensors.torch import load_file

    folder = save_sharded(load_file(str(TINY_TRANSFORMER)), tmp_path / "shards")
    monkeypatch.setattr(InfinityPipeline, "from_files", classmethod(lambda *a, **k: pytest.fail("loaded")))
    assert cli.main(_gen(tmp_path, "--block-swap", "3", transformer=folder)) == 2
    assert "at most 2" in capsys.readouterr().err


def test_cli_a_pth_checkpoint_is_checked_once_loaded(tmp_path, capsys) -> None:
    rc = cli.main(_gen(tmp_path, "--block-swap", "3", transformer=TINY_TRANSFORMER_PTH))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "3 blocks" in lines[0] and "at most 2" in lines[0], lines
    assert not (tmp_path / "img.png").exists()


def test_cli_block_swap_writes_the_same_image(tmp_path) -> None:
    assert cli.main(_gen(tmp_path / "a")) == 0
    assert cli.main(_gen(tmp_path / "b", "--block-swap", "2")) == 0
    assert (tmp_path / "a" / "img.png").read_bytes() == (tmp_path / "b" / "img.png").read_bytes()


def test_weights_loaded_in_inference_mode_come_back_as_inference_tensors() -> None:
    """ComfyUI loads and samples inside torch.inference_mode(): after a swap every weight must be of the kind it
    was, or the next plain run fails ("Inference tensors do not track version counter")."""
    with torch.inference_mode():
        model = _model()
        plain = _sample(model)
        with swap_blocks(model, 2, "cpu"):
            swapped = _sample(model)
    assert {t.is_inference() for t in _tensors(model)} == {True}
    with torch.inference_mode():
        again = _sample(model)
    assert _same_bits(plain, swapped) and _same_bits(plain, again)
