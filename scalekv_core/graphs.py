"""One captured transformer step per scale, replayed image after image (issue 22, item 3: CUDA graphs).

The sampler's loop stays as it is: per scale it runs the transformer step, the head, the draw and the next scale's
input. With graphs, only the transformer step (every block, the KV cache's writes, attention and eviction) is
captured; the head, sampling (the generator's draws) and all callbacks stay eager between steps.

`ScaleGraphRunner` is the persistent object a caller keeps between images. It owns what a graph points at:
- the KV cache (its buffers are allocated while capturing, inside the graphs' one memory pool);
- the static inputs: one flat buffer for every scale's input tokens, the AdaLN table (gss) and the text tokens,
  from which scale 0's graph makes each block's per-image constants (AdaLN, text keys and values);
- the model's RoPE table (a reference, so the model dropping it from its table cache cannot free it).
A set of graphs is keyed by (model and its parameters' addresses, schedule, batch rows, text lengths, cache config,
block dtype, device, attention backend). A new key releases the old set and captures again: the first image of a
key pays one eager warm-up pass and the captures, then every image replays.

How the steps are captured is pluggable (a `Capturer`):
- `CudaGraphCapturer`: torch.cuda.CUDAGraph, every scale's graph in one private pool, captured and replayed in
  order (memory a step frees during capture is reused by later steps, as in an eager run);
- `ReplayCapturer`: the CPU stand-in for tests and debugging. It records the aten ops a step dispatches and replays
  them on the very same tensors (new results are copied into the recorded ones), so like a CUDA graph it runs fixed
  kernels on fixed memory and never re-runs the Python around them. A host sync or a random op inside a step is an
  error, as it is under CUDA capture.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .kvcache import CacheConfig, KVCache
from .kvcache import attention
from .checkpoint import file_version
from .kvcache.budget import BudgetPlan, resolve_budget_file
from .kvcache.cache import ScaleUsage
from .model.transformer import ImageConstants, Infinity, TextKV
from .schedules import Schedule

#: sample(graphs=...): "off" is the exact eager path; "cuda" captures CUDA graphs; "replay" is the CPU stand-in.
GRAPH_MODES = ("off", "cuda", "replay")

#: Ops a graph cannot hold: the host reads a value or a data-dependent shape back from the device.
_HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
                            "unique_dim", "masked_select", "repeat_interleave_tensor"})
#: Bare allocations: nothing to replay (their memory stays; its content is whatever the graph writes into it).
_ALLOC_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"})


def check_graph_mode(mode: str) -> str:
    """A sample(graphs=...) mode, refused by name (and the choices) when it is none of GRAPH_MODES."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"graphs={mode!r}: expected one of {', '.join(GRAPH_MODES)}")
    return mode


class CaptureError(RuntimeError):
    """A step did something a captured graph cannot repeat (a host sync, a random draw)."""


def run_scale(model: Infinity, cache: KVCache, image: ImageConstants, rope: torch.Tensor, schedule: Schedule,
              scale: int, x: torch.Tensor) -> torch.Tensor:
    """One scale's transformer step, exactly as the eager sampler runs it: every block over x (updated in place and
    returned as the hidden state), the cache's writes, attention and eviction."""
    start = schedule.offsets[scale]
    h, w = schedule.grids[scale]
    cache.begin_scale(scale)
    hidden = model.forward_scale(x, scale, image, rope[:, start:start + h * w], cache)
    cache.end_scale()
    return hidden


class Capturer(Protocol):
    """Turns a step function into a replayable one; all of one runner's steps share the capturer's memory."""

    #: Eager passes over every scale before the first capture (CUDA: lazy library setup must not happen in capture).
    warmup_passes: int

    def warmup(self) -> contextlib.AbstractContextManager:
        """Where the warm-up passes run (CUDA: a side stream)."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record fn once (its work need not run) and return what repeats it on the same memory."""

    def release(self) -> None:
        """Drop every recorded step and the memory they hold."""


class CudaGraphCapturer:
    """CUDA graphs, one per captured step, all in one private memory pool, to be replayed in capture order."""

    warmup_passes = 1

    def __init__(self) -> None:
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.pool: Any = None

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        stream = _warmup_stream(torch.cuda.current_device())
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.graphs.append(graph)
        return graph.replay

    def release(self) -> None:
        for graph in self.graphs:
            graph.reset()
        self.graphs, self.pool = [], None


def _on_device(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Make the model's GPU current: CUDA graphs capture, pool and replay on the current device, which need not be
    the one the model is on (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every runner's warm-up: cuBLAS keeps a workspace per stream it has run on, so a
    new stream per runner would leave a new workspace allocated each time."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


@dataclass
class _Op:
    """One recorded aten call and, for results in new memory, the recorded tensors that replays copy into."""

    func: Any
    args: tuple
    kwargs: dict
    fresh: list[tuple[int, torch.Tensor]]  # (index among the op's tensor results, recorded result) of results
    # in new memory (not aliasing an input): a replay copies its new result at that index into the recorded one


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.allocated: list[torch.Tensor] = []  # bare allocations, kept alive as a graph's pool keeps them

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _HOST_SYNC_OPS:
            raise CaptureError(f"aten.{name} reads a device value back to the host: a graph cannot hold it")
        if kwargs.get("generator") is not None or name in ("exponential_", "uniform_", "normal_", "bernoulli_",
                                                           "random_", "multinomial", "randperm"):
            raise CaptureError(f"aten.{name} draws random numbers: sampling stays outside the graphs")
        out = func(*args, **kwargs)
        if name in _ALLOC_OPS:
            self.allocated.append(out)
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        fresh = [(i, t) for i, t in enumerate(results) if t.numel() and t.untyped_storage().data_ptr() not in inputs]
        self.ops.append(_Op(func, args, kwargs, fresh))
        return out


class ReplayCapturer:
    """CPU stand-in for CUDA graphs: records a step's aten ops and replays them on the same tensors, so a replay
    reads exactly the memory a CUDA graph would (static inputs, cache buffers, constants made at capture)."""

    warmup_passes = 0

    def __init__(self) -> None:
        self.steps: list[_Recorder] = []

    def warmup(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        recorder = _Recorder()
        with recorder:
            fn()  # runs once for real, as a CUDA capture would not; the replay that follows overwrites its results
        self.steps.append(recorder)
        return lambda: _replay(recorder)

    def release(self) -> None:
        self.steps = []


def _replay(recorder: _Recorder) -> None:
    for op in recorder.ops:
        out = op.func(*op.args, **op.kwargs)  # in-place and out= ops write the recorded memory themselves
        if op.fresh:
            results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            for i, recorded in op.fresh:
                recorded.copy_(results[i])


def make_capturer(mode: str) -> Capturer:
    """The capturer of a sample(graphs=...) mode."""
    if check_graph_mode(mode) == "off":
        raise ValueError("graphs='off' runs eagerly: it has no capturer")
    return CudaGraphCapturer() if mode == "cuda" else ReplayCapturer()


def refusal(model: Infinity, device: torch.device, mode: str, **callbacks: object) -> str | None:
    """Why this generation cannot run from graphs, or None: Python work inside a step cannot be captured."""
    if mode == "cuda" and device.type != "cuda":
        return f"graphs='cuda' needs the model on a CUDA device, not {device.type}"
    if model.block_swap is not None:
        return "block swap copies blocks from the host inside each step; use graphs='off' with block swap"
    if torch.is_grad_enabled():
        return "graphs run under torch.no_grad only"
    for name, value in callbacks.items():
        if value:
            return (f"{name} runs Python inside each layer's step (or times it with synchronize), which a graph "
                    f"cannot hold; use graphs='off' with it")
    return None


def _file_version(budget_file: str | None) -> tuple | None:
    """A budget file's version: graphs captured with its plan are stale once it is rewritten in place, as a
    calibration run does."""
    if not budget_file:
        return None
    try:
        return file_version(resolve_budget_file(budget_file))
    except (OSError, ValueError):  # missing or unknown: building the plan names the problem
        return str(budget_file), None


class ScaleGraphRunner:
    """Owns the KV cache, the static inputs and one captured transformer step per scale; keep it between images so
    later images only copy their inputs in and replay."""

    def __init__(self, mode: str = "cuda", capturer: Capturer | None = None) -> None:
        if mode not in GRAPH_MODES or mode == "off":
            raise ValueError(f"a graph runner's mode is 'cuda' or 'replay', not {mode!r}")
        self.mode = mode
        self.capturer = capturer if capturer is not None else make_capturer(mode)
        self.key: tuple | None = None
        self.captures = 0  # how many times a set of graphs was captured (a test and the report read it)
        self.usage: list[ScaleUsage] = []
        self._clear()

    def _clear(self) -> None:
        self._steps: list[Callable[[], None]] = []
        self._cache: KVCache | None = None
        self._image: ImageConstants | None = None
        self._rope: torch.Tensor | None = None
        self._x: list[torch.Tensor] = []
        self._gss: torch.Tensor | None = None
        self._text: torch.Tensor | None = None
        self._device: torch.device | None = None

    @staticmethod
    def key_for(model: Infinity, schedule: Schedule, lens: list[int], config: CacheConfig) -> tuple:
        """What a captured set depends on: any change here needs new graphs (the attention backend is read when a
        step runs, so a graph holds the one selected at capture)."""
        params = tuple(p.data_ptr() for p in model.parameters()) + tuple(b.data_ptr() for b in model.buffers())
        config_key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        return (id(model), params, schedule.grids, schedule.full_grids[-1], tuple(lens), config_key,
                _file_version(config.budget_file), model.block_dtype, str(model.pos_start.device), attention.current())

    def bind(self, model: Infinity, schedule: Schedule, lens: list[int], config: CacheConfig, gss: torch.Tensor,
             text: TextKV, make_cache: Callable[[], KVCache]) -> None:
        """Copy this image's inputs into the static buffers, capturing first if the key changed."""
        key = self.key_for(model, schedule, lens, config)
        if key != self.key:
            self.release()
            try:
                with _on_device(model.pos_start.device):  # capture stream, pool and warm-up on the model's GPU
                    self._capture(model, schedule, lens, gss, text, make_cache)
            except BaseException:
                self.release()
                raise
            self.key = key
            self._device = model.pos_start.device
        self._gss.copy_(gss)
        self._text.copy_(text.tokens)

    def _capture(self, model: Infinity, schedule: Schedule, lens: list[int], gss: torch.Tensor, text: TextKV,
                 make_cache: Callable[[], KVCache]) -> None:
        bs, C = len(lens), model.cfg.embed_dim
        device = model.pos_start.device
        flat = torch.zeros(bs * max(schedule.tokens_per_scale) * C, dtype=torch.float32, device=device)
        self._x = [flat[:bs * h * w * C].view(bs, h * w, C) for h, w in schedule.grids]
        self._gss, self._text = gss.clone(), text.tokens.clone()
        self._rope = model.rope(schedule)
        static_text = TextKV(self._text, list(lens))
        for _ in range(self.capturer.warmup_passes):
            with self.capturer.warmup():
                cache = make_cache()
                try:
                    image = model.image_constants(self._gss, static_text)
                    for si in range(schedule.num_scales):
                        run_scale(model, cache, image, self._rope, schedule, si, self._x[si])
                finally:
                    cache.release()
                del image
        self._cache = make_cache()
        self._image = model.image_constants(self._gss, static_text)
        for si in range(schedule.num_scales):
            self._steps.append(self.capturer.capture(self._step_fn(model, schedule, si)))
        self.usage = list(self._cache.usage)
        self.captures += 1

    def _step_fn(self, model: Infinity, schedule: Schedule, si: int) -> Callable[[], None]:
        def step() -> None:
            hidden = run_scale(model, self._cache, self._image, self._rope, schedule, si, self._x[si])
            if hidden.data_ptr() != self._x[si].data_ptr():
                raise CaptureError("the transformer step did not update its static input in place")
        return step

    @property
    def plan(self) -> BudgetPlan | None:
        """The budget plan of the bound cache (None before the first bind)."""
        return None if self._cache is None else self._cache.plan

    def step(self, scale: int, x: torch.Tensor) -> torch.Tensor:
        """The transformer's hidden state for one scale: x copied into the static input, then the scale's replay."""
        if not self._steps:
            raise RuntimeError("the graph runner holds no graphs: bind() it to an image first")
        static = self._x[scale]
        static.copy_(x)
        with _on_device(self._device):
            self._steps[scale]()
        return static

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors the graphs read as inputs (tests check they keep their memory from image to image)."""
        return [*self._x, *(t for t in (self._gss, self._text) if t is not None)]

    def cache_buffers(self) -> list[torch.Tensor]:
        """The KV cache's buffers that live on between images (tests check they are not reallocated)."""
        if self._cache is None:
            return []
        return [t for t in (*self._cache.rows, self._cache._ws_raw) if t is not None]

    def release(self) -> None:
        """Drop the graphs, their pool, the cache and the static inputs (safe to call at any time, also twice)."""
        self.capturer.release()
        if self._cache is not None:
            self._cache.release()
        self._clear()
        self.key = None
        self.usage = []
