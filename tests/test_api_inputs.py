"""The Python API names the argument it refuses: an empty prompt list, drafters in a form the plan cannot read."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_tiny import T5_TINY, TINY_TRANSFORMER, TINY_VAE
from scalekv_core.kvcache import CacheConfig
from scalekv_core.pipeline import InfinityPipeline
from scalekv_core.schedules import get_schedule
from scalekv_core.training.train_default import T5_FOLDER, TRANSFORMER_FILE, VAE_FILE

SCHEDULE = get_schedule(1.0, "0.06M")  # 256x256, 7 scales


def _build(config: CacheConfig):
    return config.build(SCHEDULE, 4, 2, 8, 2, torch.float32)


@pytest.mark.parametrize("prompt", [[], ()])
def test_generate_with_no_prompts_names_the_argument(prompt) -> None:
    """An empty list reached T5 and failed with a bare IndexError."""
    pipe = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, T5_TINY)
    with pytest.raises(ValueError, match=r"^prompt: an empty list"):
        pipe.generate(prompt, schedule=SCHEDULE)


@pytest.mark.parametrize("drafters", ["0,1", 3, [0.5], [True, 1], [[0], "1"], [[0, 1.0]], {"0": 1}])
def test_drafters_in_another_form_are_refused_naming_them(drafters) -> None:
    """'0,1' failed with "invalid literal for int() with base 10: ','"; [0.5] passed and matched no layer."""
    with pytest.raises(ValueError, match=r"^drafters .*expected a list of layer indices"):
        _build(CacheConfig(policy="scalekv", budget="10%", window=4, drafters=drafters))


@pytest.mark.parametrize("drafters", [[0, 1], (0,), [[0], [1], [0, 1], [2], [3], [0], []]])
def test_drafters_as_layers_or_per_scale_lists_are_accepted(drafters) -> None:
    _, plan = _build(CacheConfig(policy="scalekv", budget="10%", window=4, drafters=drafters))
    assert plan.drafters[0] == list(drafters[0] if isinstance(drafters[0], list) else drafters)


def cli_schedule(transformer: Path, width: int) -> tuple[int, int]:
    """The (height, width) `generate --width W` draws for this transformer file."""
    import argparse

    from scalekv_core import cli

    return cli._schedule(argparse.Namespace(transformer=str(transformer), width=width, height=None))[0].pixel_size


def test_generate_without_a_size_draws_at_the_files_trained_resolution() -> None:
    """The embedded model says it was trained at 256x256: generate() with no size draws that, as the CLI does (it
    drew 1024x1024, 40 s on a CPU, with no note); a size given is kept, and a file that says nothing is 1024x1024."""
    root = Path(__file__).resolve().parents[1] / "default_model"
    pipe = InfinityPipeline.from_files(root / TRANSFORMER_FILE, root / VAE_FILE, root / T5_FOLDER)
    assert pipe.schedule_for_size().pixel_size == (256, 256)
    assert pipe.schedule_for_size(512, 512).pixel_size == (512, 512)
    # one side given: the other is the trained one's, as --width alone gives on the command line (it was 1024)
    assert pipe.schedule_for_size(width=320).pixel_size == cli_schedule(root / TRANSFORMER_FILE, 320) == (256, 320)
    out = pipe.generate("a large red circle at the top left on a blue background", seed=1)
    assert out.decoded.shape[-2:] == (256, 256)
    tiny = InfinityPipeline.from_files(TINY_TRANSFORMER, TINY_VAE, T5_TINY)  # no trained resolution in its metadata
    assert tiny.schedule_for_size().pixel_size == (1024, 1024)
