"""Infinity Memory: the block swap setting, a small node wired into the sampler (as video packs' block-swap nodes)."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from . import widgets
from .io_types import CATEGORY, InfinityMemoryType, schema


@dataclass(frozen=True)
class MemorySettings:
    """INFINITY_MEMORY: how the sampler keeps the transformer's weights while it samples."""

    block_swap: int = 0


class InfinityMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="InfinityMemory",
            display_name="Infinity Memory (block swap)",
            category=CATEGORY,
            description="For cards too small for the whole transformer: keeps some of its blocks in CPU memory and "
                        "streams each to the GPU just before it runs. The image is the same; each swapped block "
                        "crosses PCIe once per scale (13 times at 1024x1024), so sampling is slower. Wire it into "
                        "the Infinity Sampler's memory input; the budget widget shows whether the job then fits.",
            inputs=[
                widgets.int_input("block_swap", default=0,
                                  tooltip="transformer blocks kept in CPU memory (0: none). Each saves one block of "
                                          "GPU memory (8B fp8: 196 MiB, 2B bf16: 128 MiB) minus two kept for "
                                          "streaming; at most the model's depth minus 2 (2B: 30, 8B: 38)"),
            ],
            outputs=[InfinityMemoryType.Output(display_name="memory")],
            search_aliases=["block swap", "offload", "low vram"],
        )

    @classmethod
    def validate_inputs(cls, block_swap=None) -> bool | str:
        """The table's range; the model's own depth is checked by the sampler, which knows the model."""
        problem = widgets.problem(widgets.number("block_swap", block_swap))
        return True if problem is None else problem

    @classmethod
    def execute(cls, block_swap: int) -> io.NodeOutput:
        problem = cls.validate_inputs(block_swap)
        if problem is not True:
            raise ValueError(problem)
        return io.NodeOutput(MemorySettings(block_swap=int(block_swap)))
