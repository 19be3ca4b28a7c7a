"""ScaleKV Cache Config and ScaleKV Calibrate: the KV-cache settings and the budget files they can use."""
from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..scalekv_core.kvcache import CacheConfig
from ..scalekv_core.kvcache.budget import PRESETS, asi_table_path, parse_budget
from ..scalekv_core.kvcache.calibration import (calibrate, check_prompts, measurement_cache, overwrite_problem,
                                               prompt_lines)
from ..scalekv_core.kvcache.config import KV_DTYPES, POLICIES, POLICY_SETTINGS
from ..scalekv_core.kvcache.policies.scalekv import SCORINGS
from ..scalekv_core.kvcache.scoring import POOLINGS, check_window
from ..scalekv_core.limits import shown
from ..scalekv_core.model.block_swap import check_block_swap
from ..scalekv_core.safe_files import check_writable
from ..scalekv_core.schedules import Schedule, resolution_choices, resolution_label, schedule_from_label
from . import models, paths, widgets
from .io_types import (CATEGORY_SCALEKV, CacheConfigType, InfinityMemoryType, InfinityModelType, InfinityT5Type,
                       schema)
from .memory import MemorySettings

log = logging.getLogger(__name__)

BUDGET_UNITS = ["percent", "tokens", "MB"]
GENERATED = "generated"
PRESET_PREFIX = "preset:"
FILE_PREFIX = "file:"
#: Policies whose observation window is a √w x √w grid over the token map (so w must be a square).
GRID_WINDOW_POLICIES = ("scalekv",)
DEFAULT_RESOLUTION = "1024x1024 (1:1)"
#: The resolution menus' first entry and default: the loaded model's own size (256x256 for the embedded model,
#: 1024x1024 for the released 2B and 8B).
AUTO_RESOLUTION = "auto (the model's own size)"


def with_policies(inputs: list[io.Input]) -> list[io.Input]:
    """Each cache setting's input carries `scalekv_policies` in its definition (the frontend greys it out under
    the other policies: web/js/scalekv_policy_inputs.js). Set on extra_dict, which every host's inputs merge into
    their definition (0.3.75's Combo takes no extra_dict argument)."""
    for node_input in inputs:
        setting = {"budget_unit": "budget", "budget_source": "budget_file"}.get(node_input.id, node_input.id)
        if setting in POLICY_SETTINGS:
            node_input.extra_dict = {**node_input.extra_dict, "scalekv_policies": list(POLICY_SETTINGS[setting])}
    return inputs


def resolution_menu() -> list[str]:
    """The sampler's and calibration's resolution menu: auto first, then every official resolution."""
    return [AUTO_RESOLUTION, *resolution_choices()]


def schedule_for(label: str, native: tuple[str, bool] | None) -> Schedule:
    """The schedule of a menu label; auto is the model's native resolution (the released models' without one)."""
    if label == AUTO_RESOLUTION:
        label = native[0] if native else DEFAULT_RESOLUTION
    return schedule_from_label(label)
DEFAULT_CALIBRATION_PROMPTS = "\n".join([
    "a photo of a red fox standing in fresh snow, morning light",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen on a wooden table, top view, studio photo",
    "portrait of an old sailor with a white beard, dramatic lighting",
])


def budget_source_choices() -> list[str]:
    return ([GENERATED] + [PRESET_PREFIX + p for p in PRESETS]
            + [FILE_PREFIX + f for f in paths.budget_file_choices()])


def budget_spec(unit: str, budget: float) -> str | int:
    """The engine's budget string: '10%', 650 (tokens) or '900MB'."""
    if unit == "percent":
        return f"{budget:g}%"
    if unit == "tokens":
        return int(budget)
    return f"{budget:g}MB"


#: Policies that score with an observation window: a token budget below the window cannot hold it.
WINDOWED_POLICIES = ("snapkv", "pyramidkv", "scalekv")


def budget_settings_problem(policy=None, budget_unit=None, budget=None, window=None, kernel=None,
                            budget_source=None, refiner_decay=None) -> str | None:
    """Why these settings can never run, or None. Inputs that arrive through links (None here) are not checked."""
    found = widgets.problem(
        widgets.choice("policy", policy, POLICIES),
        widgets.choice("budget_unit", budget_unit, BUDGET_UNITS),
        widgets.number("budget", budget, "budget_percent" if budget_unit == "percent" else "budget"),
        widgets.number("window", window),
        widgets.number("kernel", kernel),
        widgets.number("refiner_decay", refiner_decay),
        widgets.text("budget_source", budget_source, "name"),
    )
    if found is not None:
        return found
    if budget is not None and budget_unit == "tokens" and budget != int(budget):
        return f"budget: a budget in tokens must be a whole number, got {budget:g}"
    if budget is not None and window is not None and budget_unit == "tokens" and policy in WINDOWED_POLICIES \
            and budget < window:
        return (f"budget: {budget:g} tokens cannot hold the observation window of {window} tokens that {policy} "
                f"scores with; raise the budget to at least {window} or lower the window")
    if window is not None and policy in GRID_WINDOW_POLICIES:
        try:
            check_window(window)
        except ValueError as e:
            return str(e)
    if budget_source is not None and policy in (None, "scalekv"):  # other policies set it aside (set_aside)
        if budget_source.startswith(FILE_PREFIX):
            try:
                paths.resolve_budget_file(budget_source[len(FILE_PREFIX):])
            except (FileNotFoundError, ValueError) as e:
                return f"budget_source: {e}"
        elif budget_source != GENERATED and budget_source[len(PRESET_PREFIX):] not in PRESETS:
            return (f"budget_source: unknown {shown(budget_source)}; choose generated, "
                    f"{', '.join(PRESET_PREFIX + p for p in PRESETS)} or file:<a file in models/scalekv>")
    return None


def set_aside(policy: str, budget_source: str, budget_file: str | None) -> tuple[str, str | None, str | None]:
    """(budget_source, budget_file, note) for `policy`: only scalekv reads budget files, so beside another policy a
    chosen or linked one is set aside with a note, not refused: the policy greys those inputs out, so an artist who
    switched policy could not change them (and a linked Calibrate's minutes of work were lost to the error)."""
    if policy == "scalekv" or (budget_source == GENERATED and not (budget_file or "").strip()):
        return budget_source, budget_file, None  # (a blank linked name is no file, as budget_file_for reads it)
    what = (f"the budget file {shown(budget_file)} linked to budget_file" if budget_file else
            f"budget_source {shown(budget_source)}")
    return GENERATED, None, f"{what} is not used: only the scalekv policy reads budget files (policy is {policy})"


def budget_file_for(budget_source: str, budget_file: str | None) -> str | None:
    """The CacheConfig.budget_file: a full path in models/scalekv, a preset name, or None for a generated plan."""
    if budget_file is not None and budget_file.strip():
        name = budget_file.strip()
        return paths.resolve_budget_file(name[len(FILE_PREFIX):] if name.startswith(FILE_PREFIX) else name)
    if budget_source.startswith(FILE_PREFIX):
        return paths.resolve_budget_file(budget_source[len(FILE_PREFIX):])
    if budget_source.startswith(PRESET_PREFIX):
        return budget_source[len(PRESET_PREFIX):]
    return None


class ScaleKVCacheConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ScaleKVCacheConfig",
            display_name="ScaleKV Cache Config",
            category=CATEGORY_SCALEKV,
            description="Makes the Infinity Sampler use far less memory with nearly the same picture. Infinity "
                        "paints coarse to fine over 13 scales and keeps what it has seen (its KV cache); ScaleKV "
                        "keeps that memory only in a few 'drafter' layers per scale and a small budget in the "
                        "others ('refiners'). policy and budget are what most people change; 10% keeps about a "
                        "tenth of the cache. Leave the sampler's cache_config unconnected for the full cache. The "
                        "panel below shows the memory per scale and whether the whole job fits your GPU.",
            inputs=with_policies([
                io.Combo.Input("policy", options=list(POLICIES), default="scalekv",
                               tooltip="which tokens the cache keeps. scalekv: large budgets in a few drafter "
                                       "layers, small in the refiners (the paper's method, best quality per MB). "
                                       "full: everything, as the original. The others are simpler baselines."),
                io.Combo.Input("budget_unit", options=BUDGET_UNITS, default="percent",
                               tooltip="percent of the cache before the last scale (10% = 650 tokens at 1024x1024), "
                                       "tokens per layer, or a memory target in MB"),
                widgets.float_input("budget", default=10.0, step=0.5,
                               tooltip="the budget in budget_unit; with a budget file it is also the base capacity "
                                       "(use the calibration's budget)"),
                widgets.int_input("window", default=16, **widgets.ADVANCED,
                             tooltip="advanced (scalekv, snapkv, pyramidkv): how many recent tokens vote on what to "
                                     "keep (scalekv: a square number, a grid over the map)"),
                widgets.int_input("kernel", default=5, **widgets.ADVANCED,
                                  tooltip="advanced (scalekv, snapkv, pyramidkv): neighbours pooled into each "
                                          "token's score (odd), so kept tokens come in patches"),
                io.Combo.Input("pooling", options=list(POOLINGS), default="maxpool", **widgets.ADVANCED,
                               tooltip="advanced (scalekv, snapkv, pyramidkv): how neighbours' scores combine: the "
                                       "largest (maxpool) or their mean (avgpool)"),
                io.Combo.Input("scoring", options=list(SCORINGS), default="improved", **widgets.ADVANCED,
                               tooltip="advanced (scalekv): improved scores with the real queries, pooled inside "
                                       "each token map; original: exactly as the released ScaleKV code"),
                io.Combo.Input("kv_dtype", options=list(KV_DTYPES), default="auto", **widgets.ADVANCED,
                               tooltip="advanced (every policy): how the cache stores numbers. auto: the model's "
                                       "precision (the same picture), keys fp32 where a policy scores them, as the "
                                       "original. int8 / fp8_e4m3fn: 1 byte each with a small change to the picture, "
                                       "int8 the closer"),
                io.Combo.Input("budget_source", options=budget_source_choices(), default=GENERATED,
                               tooltip="generated = the rule-based plan; preset:* = the released 10% files "
                                       "(1024x1024); file:* = a calibration in models/scalekv"),
                widgets.float_input("refiner_decay", default=0.0, step=1.0, **widgets.ADVANCED,
                               tooltip="advanced (scalekv, generated plans). 0: the released files' rule "
                                       "(refiners keep what the drafters leave, which falls fast). Above 0: the "
                                       "paper's linear schedule: refiners start at the first compressed scale's "
                                       "budget and lose this many tokens per scale, the rest going to drafters; "
                                       "small values keep refiners larger than 0 does (the paper tried up to 70)"),
                io.String.Input("budget_file", optional=True, force_input=True,
                                tooltip="a budget file name from ScaleKV Calibrate; overrides budget_source"),
            ]),
            outputs=[CacheConfigType.Output(display_name="cache_config")],
        )

    @classmethod
    def validate_inputs(cls, policy=None, budget_unit=None, budget=None, window=None, kernel=None,
                        budget_source=None, refiner_decay=None) -> bool | str:
        """Named inputs skip ComfyUI's own min/max/menu checks, so these are checked here (linked ones are None)."""
        problem = budget_settings_problem(policy, budget_unit, budget, window, kernel, budget_source, refiner_decay)
        return True if problem is None else problem

    @classmethod
    def fingerprint_inputs(cls, budget_source=None, policy=None, **_) -> str:
        """A budget file rewritten in place (a new calibration) must reach the sampler: its version is the
        fingerprint (scalekv's: other policies read none)."""
        if isinstance(budget_source, str) and budget_source.startswith(FILE_PREFIX) and policy in (None, "scalekv"):
            return paths.fingerprint(paths.resolve_budget_file, budget_source[len(FILE_PREFIX):])
        return ""

    @classmethod
    def execute(cls, policy: str, budget_unit: str, budget: float, window: int, kernel: int, pooling: str,
                scoring: str, kv_dtype: str, budget_source: str, refiner_decay: float,
                budget_file: str | None = None) -> io.NodeOutput:
        problem = budget_settings_problem(policy, budget_unit, budget, window, kernel, budget_source, refiner_decay)
        if problem is None and budget_file is not None:
            problem = widgets.problem(widgets.text("budget_file", budget_file, "name"))
        if problem is not None:
            raise ValueError(problem)
        budget_source, budget_file, note = set_aside(policy, budget_source, budget_file)
        if note is not None:
            log.warning("ScaleKV Cache Config: %s", note)
        config = CacheConfig(policy=policy, budget=budget_spec(budget_unit, budget), window=window, kernel=kernel,
                             pooling=pooling, scoring=scoring, kv_dtype=kv_dtype,
                             budget_file=budget_file_for(budget_source, budget_file), refiner_decay=refiner_decay)
        config.validate()
        return io.NodeOutput(config)


# ---------------------------------------------------------------------------------------------- calibration

#: The budget file this process wrote for each (filename_prefix, resolution, budget): a cached Calibrate result
#: whose file has since gone must re-run (its fingerprint takes the next generation number).
_written: dict[tuple, str] = {}
_generation: dict[tuple, int] = {}


def calibration_file_name(filename_prefix: str, schedule: Schedule, budget: float) -> str:
    """Where a calibration writes: the prefix, then the resolution and budget it was made for."""
    h, w = schedule.pixel_size
    return paths.new_file_name(f"{filename_prefix.strip()}_{w}x{h}_{budget:g}pct.json")


class ScaleKVCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="ScaleKVCalibrate",
            display_name="ScaleKV Calibrate",
            category=CATEGORY_SCALEKV,
            description="Tunes ScaleKV to your model: generates a few prompts with the full cache, measures which "
                        "layers look widely (drafters) and which look locally (refiners), and writes a budget file "
                        "into models/scalekv. Link its output to ScaleKV Cache Config's budget_file (or pick it as "
                        "budget_source file:<name>) at the same resolution and budget. The node shows the drafters "
                        "it chose per scale and the file it wrote. Takes one generation per prompt.",
            inputs=[
                InfinityModelType.Input("model", tooltip="the model to calibrate, from Infinity Model Loader"),
                InfinityT5Type.Input("t5", tooltip="the text encoder, from Infinity Model Loader"),
                io.String.Input("prompts", multiline=True, default=DEFAULT_CALIBRATION_PROMPTS,
                                tooltip="one prompt per line, like the pictures you will make (5-10 are enough)"),
                io.Combo.Input("resolution", options=resolution_menu(), default=AUTO_RESOLUTION,
                               tooltip="the resolution the budget file is for; use the sampler's (auto: the "
                                       "model's own size)"),
                widgets.float_input("budget", "calibration_budget", default=10.0, step=0.5,
                                    tooltip="percent of the cache before the last scale"),
                widgets.int_input("num_drafters", default=0,
                             tooltip="drafter (scale, layer) pairs in all; 0 = the default (~6.6%)"),
                widgets.int_input("seed", default=0, tooltip="prompt i uses seed + i"),
                io.String.Input("filename_prefix", default="scalekv_budget",
                                tooltip="file name start; resolution and budget are appended"),
                InfinityMemoryType.Input("memory", optional=True,
                                         tooltip="from Infinity Memory (block swap), as on the sampler: some "
                                                 "transformer blocks wait in CPU memory while calibrating"),
            ],
            outputs=[io.String.Output(display_name="budget_file")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, budget=None, filename_prefix=None, prompts=None) -> bool | str:
        """The budget's range, a file name that can be written, and prompts that are text and not too many (before
        any work; the seed is checked at the start of execute, as ComfyUI repeats this answer once per argument)."""
        problem = widgets.problem(widgets.number("budget", budget, "calibration_budget"),
                                  widgets.text("filename_prefix", filename_prefix),
                                  widgets.text("prompts", prompts))
        if problem is None and filename_prefix is not None:
            try:  # a name Windows can create too: refused here, not when the file is written after the work
                paths.new_file_name(filename_prefix, prefix=True)
            except ValueError as e:
                problem = f"filename_prefix: {e}"
        if problem is None and prompts is not None and not prompts.strip():
            problem = "prompts: ScaleKV Calibrate needs at least one prompt (one per line)"
        if problem is None and prompts is not None:
            try:  # before any prompt is encoded
                check_prompts(0, len(prompt_lines(prompts)))
            except ValueError as e:
                problem = str(e)
        return True if problem is None else problem

    @classmethod
    def fingerprint_inputs(cls, filename_prefix=None, resolution=None, budget=None, **_) -> int:
        """Unchanged while the file this node wrote for these inputs exists; a deleted file makes the next run
        calibrate again (with resolution auto too, whose file name depends on the linked model)."""
        key = (filename_prefix, resolution, budget)
        path = _written.get(key)
        if path is not None and not os.path.isfile(path):
            del _written[key]
            _generation[key] = _generation.get(key, 0) + 1
        return _generation.get(key, 0)

    @classmethod
    def execute(cls, model: models.InfinityModel, t5: models.InfinityT5, prompts: str, resolution: str,
                budget: float, num_drafters: int, seed: int, filename_prefix: str,
                memory: MemorySettings | None = None) -> io.NodeOutput:
        problem = cls.validate_inputs(budget, filename_prefix, prompts)  # linked inputs arrive unchecked
        if problem is not True:
            raise ValueError(problem)
        lines = prompt_lines(prompts)
        check_prompts(seed, len(lines))  # prompt i uses seed + i: refused before any prompt is encoded
        schedule = schedule_for(resolution, model.info.get("native_resolution"))
        tokens = parse_budget(f"{budget:g}%", schedule)
        name = calibration_file_name(filename_prefix, schedule, budget)
        path = paths.budget_output_path(name)  # before the calibration runs: a bad name fails in seconds, not after
        for output in (path, asi_table_path(path)):  # both files, created and removed: what the OS refuses, now
            check_writable(output, f"filename_prefix {shown(filename_prefix)}: cannot write the budget file")
        problem = overwrite_problem(path, model.pipeline.transformer.cfg)
        if problem is not None:  # the 2B's calibration is not replaced by the 8B's of the same prefix
            raise ValueError(f"filename_prefix: {problem}")
        conds = []
        for p in lines:  # T5 on each prompt: a Cancel is honoured between them, not after all of them
            mm.throw_exception_if_processing_interrupted()
            conds.append(t5.encode([p]))
        # as the sampler: block swap from the Memory node (or --novram's), and refused before any generation if
        # the full-cache measurement cannot fit
        depth = model.pipeline.transformer.cfg.depth
        swap = model.block_swap_for(0 if memory is None else check_block_swap(memory.block_swap, depth))
        model.load(model.memory_required(schedule, 1, measurement_cache()), swap)
        model.admit(schedule, 1, measurement_cache(), block_swap=swap)
        pbar = comfy.utils.ProgressBar(len(lines))

        def on_prompt(done: int, total: int) -> None:
            pbar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        result = calibrate(model.pipeline, conds, schedule, tokens, num_drafters or None, seed, on_prompt=on_prompt,
                           block_swap=swap)
        result.write(path)
        _written[(filename_prefix, resolution, budget)] = path
        summary = {"budget_file": name, "path": path, "resolution": resolution_label(schedule),
                   "budget_percent": budget, "budget_tokens": tokens, "prompts": len(lines),
                   "drafters": result.drafters}
        return io.NodeOutput(name, ui={"scalekv_calibration": [summary]})
