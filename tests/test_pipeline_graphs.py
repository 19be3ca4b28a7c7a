"""InfinityPipeline.generate(graphs=...): the pipeline keeps one graph runner between images and gives the eager
images; the CPU replay stand-in plays the CUDA graphs' part (tests/test_graphs.py covers the runner itself)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_tiny import FULL_KV, TINY_TRANSFORMER, TINY_VAE, random_text
from scalekv_core import cli
from scalekv_core.kvcache import CacheConfig
from scalekv_core.loader import load_transformer, load_vae
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule

SCHEDULE = get_schedule(1.0, "0.06M")  # 7 scales


@pytest.fixture(scope="module")
def pipe() -> InfinityPipeline:
    return InfinityPipeline(load_transformer(TINY_TRANSFORMER), load_vae(TINY_VAE))


@pytest.mark.parametrize("policy", ["full", "scalekv"])
def test_graphed_generations_equal_eager_ones_and_reuse_one_runner(pipe: InfinityPipeline, policy: str) -> None:
    cache = CacheConfig(policy=policy, budget="10%")
    channels = pipe.transformer.cfg.text_channels
    conds = [random_text(9, channels, seed=i) for i in range(2)]  # other prompt and seed, same text length
    eager = [pipe.generate(c, seed=40 + i, schedule=SCHEDULE, cache=cache) for i, c in enumerate(conds)]
    runners = []
    for i, cond in enumerate(conds):  # one capture, then a replay
        graphed = pipe.generate(cond, seed=40 + i, schedule=SCHEDULE, cache=cache, graphs="replay")
        assert np.array_equal(eager[i].images, graphed.images)
        assert all(torch.equal(a, b) for a, b in zip(eager[i].samples.bits, graphed.samples.bits))
        runners.append(pipe._graph_runner)
    assert runners[0] is not None and runners[0] is runners[1] and runners[0].captures == 1
    eager = eager[1]
    assert not np.array_equal(eager.images, pipe.generate(random_text(9, channels, seed=0), seed=40,
                                                          schedule=SCHEDULE, cache=cache).images)
    pipe.release_graphs()
    assert pipe._graph_runner is None


def test_a_budget_file_rewritten_in_place_is_captured_again(pipe: InfinityPipeline, tmp_path) -> None:
    """Graphs hold the plan of the budget file they were captured with: the same path rewritten (a calibration run
    again) gives the new file's image, not a replay of the old plan, which the graph key (the path) had allowed."""
    import json
    import os

    from scalekv_core.kvcache.budget import plan_to_original_json, scalekv_plan

    depth = pipe.transformer.cfg.depth
    path = tmp_path / "budget.json"
    cond = random_text(9, pipe.transformer.cfg.text_channels, seed=3)
    cache = CacheConfig(policy="scalekv", budget=48, window=4, budget_file=str(path))
    versions = [[0], [depth - 1]]

    def write(i: int) -> None:
        drafters = versions[i % 2]
        path.write_text(json.dumps(plan_to_original_json(scalekv_plan(SCHEDULE, depth, 48, drafters, window=4))))
        os.utime(path, ns=(i * 10**9, i * 10**9))  # a coarse clock could give two writes one time: set here

    eager = []
    for i in range(2):
        write(i)
        eager.append(pipe.generate(cond, seed=5, schedule=SCHEDULE, cache=cache))
    assert not np.array_equal(eager[0].images, eager[1].images)
    for i in range(2):  # one runner kept between the two images (an eager image would release it)
        write(i + 2)
        graphed = pipe.generate(cond, seed=5, schedule=SCHEDULE, cache=cache, graphs="replay")
        assert np.array_equal(eager[i].images, graphed.images)
        assert graphed.samples.plan.drafters == eager[i].samples.plan.drafters
    assert pipe._graph_runner.captures == 2
    pipe.release_graphs()


def test_an_eager_image_releases_the_runner_and_cuda_is_refused_off_cuda(pipe: InfinityPipeline) -> None:
    cond = random_text(9, pipe.transformer.cfg.text_channels, seed=3)
    pipe.generate(cond, seed=1, schedule=SCHEDULE, graphs="replay")
    kept = pipe._graph_runner
    assert kept is not None and kept.cache_buffers()
    pipe.generate(cond, seed=1, schedule=SCHEDULE)  # eager: the graphs' memory must not sit beside its own
    assert pipe._graph_runner is None and not kept.cache_buffers() and not kept.static_tensors()
    with pytest.raises(ValueError, match="CUDA"):
        pipe.generate(cond, seed=1, schedule=SCHEDULE, graphs="cuda")  # this CPU pipeline cannot capture CUDA
    pipe.release_graphs()


@pytest.mark.parametrize("kwargs, words", [
    ({"graphs": "sometimes"}, ["'sometimes'", "off", "cuda"]),
    ({"graphs": "replay", "block_swap": 2}, ["block_swap=2", "graphs"]),
])
def test_bad_graph_settings_are_refused_by_name_before_any_work(pipe: InfinityPipeline, kwargs: dict,
                                                                 words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        pipe.generate("a prompt T5 would need", seed=1, schedule=SCHEDULE, **kwargs)  # no T5: reached only if late
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_cuda_graphs_is_refused_off_cuda(capsys, tmp_path) -> None:
    text_kv = FULL_KV / "p1_spaceship_s99_cfg4_tau1" / "text_kv_compact.npy"
    rc = cli.main(["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--width", "256",
                   "--height", "256", "--out", str(tmp_path / "x.png"), "--text-kv", str(text_kv), "--cuda-graphs"])
    err = capsys.readouterr().err
    assert rc == 2 and "--cuda-graphs" in err and "cpu" in err, err
    assert not (tmp_path / "x.png").exists()
