"""Command line: `python -m scalekv_core generate|plan|calibrate|convert ...`.

Every user error (a value out of range, a file that is missing, unreadable or of the wrong kind, an output path
that cannot be written) exits with status 2 and one line on stderr, `error: ...`, naming the flag, value or file.
Values are checked through the one table of limits (`limits.py`) while the flags are parsed, and input files and
output paths before any model is loaded, so a mistake never costs a generation. Every file written appears under
its name only once it is whole (`safe_files.atomic_output`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from .cli_args import (Parser, budget_flag, device_flag, given_flags, number_flag, numbers_flag, one_line,
                       output_file, output_folder, run_reporting_errors, text_flag)
from .limits import TEXTS, InputError, shown

#: Precomputed T5 encodings of one prompt: 512 tokens x 4096 channels x float64 is 16 MB.
MAX_TEXT_KV_BYTES = 64 * 2**20


def _decode_tile(text: str) -> int:
    """--decode-tile: 0, or a tile the VAE accepts (8 to 512 latent positions)."""
    from .model.vae import check_decode_tiling

    tile = number_flag("decode_tile", "--decode-tile")(text)
    try:
        return check_decode_tiling(tile, field="--decode-tile")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_BLOCK_KEY = re.compile(r"^(?:module\.)?block_chunks\.(\d+)\.module\.(\d+)\.")


def _checkpoint_depth(text: str) -> int | None:
    """A transformer checkpoint's block count from a .safetensors header or a shard index alone; None where that
    needs the whole file (.pth) or the file is unreadable (the loader then names what is wrong)."""
    from .checkpoint import safetensors_header, shard_index

    path = Path(text)
    try:
        keys = shard_index(path).weight_map if path.is_dir() else safetensors_header(path)
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return None
    if not isinstance(keys, dict):
        return None
    return len({m.groups() for k in keys if (m := _BLOCK_KEY.match(str(k)))}) or None


def _read_prompts(text: str) -> list[str]:
    """calibrate --prompts: a regular UTF-8 text file, one prompt per line, within the prompts limits."""
    from .safe_files import read_text

    path = Path(text)
    content = read_text(path, 4 * TEXTS["prompts"].max_chars, "prompts file (--prompts)", InputError)
    try:
        TEXTS["prompts"].check(content, f"--prompts {path}")
    except InputError as e:
        raise InputError(str(e)) from None
    from .kvcache.calibration import prompt_lines

    prompts = prompt_lines(content)
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts (one per line)")
    for i, prompt in enumerate(prompts):
        TEXTS["prompt"].check(prompt, f"--prompts {path}: prompt {i + 1}")
    return prompts


def _check_npy(path: Path) -> None:
    """--text-kv: a regular .npy file of sane size whose header describes no more data than the file holds."""
    import numpy as np

    from .safe_files import open_regular

    with open_regular(path, "text encoding file (--text-kv)", InputError) as (f, size):
        if size > MAX_TEXT_KV_BYTES:
            raise InputError(f"--text-kv {path}: {size} bytes is too large for one prompt's encodings "
                             f"(at most {MAX_TEXT_KV_BYTES})")
        try:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
        except Exception as e:  # numpy parses the header with ast/tokenize: ValueError, SyntaxError, TokenError, ...
            raise InputError(f"--text-kv {path}: not a .npy array file: {one_line(str(e))[:200]}") from None
        if dtype.hasobject:
            raise InputError(f"--text-kv {path}: holds Python objects (a pickle), not a float array")
        needed = dtype.itemsize
        for n in shape:
            needed *= n
        if needed > size - f.tell():
            raise InputError(f"--text-kv {path}: the header declares shape {shown(tuple(shape))} {dtype} but the "
                             f"file holds only {size - f.tell()} bytes of data (truncated?)")


def _load_text_kv(text: str):
    from .model.text_encoder import TextConditioning

    path = Path(text)
    _check_npy(path)
    try:
        return TextConditioning.from_numpy_file(path)
    except (ValueError, OSError, EOFError) as e:
        message = one_line(str(e))
        raise InputError(message if str(path) in message else f"--text-kv {path}: {message}") from None


def _same_file(path: Path, other: Path) -> bool:
    """Whether two paths name one file: the same path once links and '..' are resolved, or a hard link."""
    try:
        if os.path.realpath(path) == os.path.realpath(other):
            return True
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except (OSError, ValueError):
        return False


def _check_outputs_apart(written: Sequence[tuple[str, Path]], read: Sequence[tuple[str, str | None]],
                         dump: Path | None = None) -> None:
    """No file a command writes is another flag's output, one of its input files (or a file inside an input
    folder), or a file --dump writes: each would be replaced by the other (an image by JSON, a model by a report)."""
    from .pipeline import DUMP_FILES

    inputs = [(flag, Path(p)) for flag, p in read if p and os.path.exists(p)]
    for i, (flag, path) in enumerate(written):
        for other_flag, other in [w for w in written[:i] if w[0] != flag] + inputs:
            same = _same_file(path, other)
            if same or (other.is_dir() and path.exists()
                        and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(other))):
                inside = "" if same else " a file inside"
                raise InputError(f"{flag} {path}: is{inside} {other_flag} {other}; writing it would replace that "
                                 f"file; give {flag} another name")
        if dump is not None and DUMP_FILES.fullmatch(path.name) and _same_file(path.parent, dump):
            raise InputError(f"{flag} {path}: --dump {dump} writes a file of that name there; give {flag} another "
                             f"name or --dump another folder")


def _check_cache_flags(a: argparse.Namespace, schedule=None):
    """The cache config, validated, and its budget file read, before any model is loaded.

    With the schedule, a budget in % or tokens is also tried on it (the token count and the observation window
    do not depend on the model; MB and budget files do, and are checked once the model is known).
    """
    import torch

    from .kvcache.budget import BudgetError, preset_path, read_budget_json

    if a.budget_file and a.kv_policy != "scalekv":
        raise InputError(f"--budget-file {a.budget_file}: a budget file applies to --kv-policy scalekv only, "
                         f"not {a.kv_policy}")
    config = _cache_config(a)
    if config.policy == "scalekv":
        from .kvcache.scoring import check_window

        check_window(a.window, "--window")
    if a.budget_file:
        if not os.path.exists(a.budget_file) and not Path(a.budget_file).suffix:
            preset_path(a.budget_file)  # a preset name, as ScaleKV resolves it
        else:  # a regular file of at most 1 MB holding JSON; its fit to the model is checked once that is loaded
            read_budget_json(a.budget_file)
    elif schedule is not None and config.policy != "full" and not str(config.budget).lower().endswith("mb"):
        try:
            config.build(schedule, 1, 1, 1, 1, torch.float32)
        except BudgetError as e:
            raise InputError(f"--budget {a.budget}: {e}") from None
    return config


def _ignored_cache_flags_note(a: argparse.Namespace) -> str | None:
    """A note naming the cache flags given on the command line that --kv-policy does not read (POLICY_SETTINGS),
    so flags copied between plan (scalekv by default) and generate (full by default) are not silently ignored."""
    from .kvcache.config import POLICY_SETTINGS, unread_settings

    ignored = unread_settings(a.kv_policy, [name for name in POLICY_SETTINGS if name in getattr(a, "given", ())])
    if not ignored:
        return None
    flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
    why = (f"--kv-policy {a.kv_policy} does not read {'it' if len(ignored) == 1 else 'them'}"
           + (f" ({a.kv_policy} is {a.command}'s default; give --kv-policy scalekv or another policy that reads them)"
              if "kv_policy" not in a.given else ""))
    return f"note: {flags} ignored: {why}"


def _check_lists(a: argparse.Namespace, schedule) -> None:
    """Per-scale --cfg/--tau lists must have one value per scale of this resolution."""
    from .sampler import SamplerSettings

    try:
        SamplerSettings(cfg=a.cfg, tau=a.tau).per_scale(schedule.num_scales)
    except ValueError as e:
        raise InputError(f"--{str(e).split(' ', 1)[0]}: {e}") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate an image from a prompt",
                       description="Generate images with Infinity, reproducing the original sampler.")
    g.add_argument("--transformer", required=True, help="Infinity checkpoint: .safetensors, .pth, or the 8B shard folder")
    g.add_argument("--vae", required=True, help="BSQ-VAE checkpoint (.pth with {'vae': ...} or .safetensors)")
    g.add_argument("--text-encoder", help="T5: a folder (e.g. flan-t5-xl/) or one .safetensors file with "
                                          "--t5-tokenizer; not needed with --text-kv")
    _add_t5_tokenizer_flag(g)
    g.add_argument("--prompt", default="", type=text_flag("prompt", "--prompt"), help="text prompt")
    g.add_argument("--negative-prompt", default="", type=text_flag("prompt", "--negative-prompt"),
                   help="negative prompt (replaces the learned unconditional text)")
    g.add_argument("--text-kv", help="precomputed T5 encodings of one prompt, a (L, C) float .npy, instead of --prompt "
                                     "(not with it)")
    g.add_argument("--seed", type=number_flag("seed", "--seed"), default=0)
    g.add_argument("--cfg", type=numbers_flag("cfg", "--cfg"), default=3.0,
                   help="guidance scale, or one per scale: 3,3,3,...")
    g.add_argument("--tau", type=numbers_flag("tau", "--tau"), default=0.5, help="temperature, or one per scale")
    g.add_argument("--top-k", type=number_flag("top_k", "--top-k"), default=900)
    g.add_argument("--top-p", type=number_flag("top_p", "--top-p"), default=0.97)
    _add_size_flags(g)
    g.add_argument("--batch", type=number_flag("batch", "--batch"), default=1, help="images per prompt")
    g.add_argument("--device", default="cpu", type=device_flag, help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="block precision; auto = bf16 on CUDA sm80+ like the original (fp16 on older cards), bf16 on "
                        "MPS with macOS 14+, fp32 on CPU")
    _add_weights_flag(g)
    g.add_argument("--fp8-matmul", action="store_true",
                   help="with --weights fp8_e4m3fn: multiply in fp8 on GPUs with fp8 tensor cores (Ada, Hopper); "
                        "elsewhere the dequantized matmul runs and a note says why")
    g.add_argument("--out", default="out/image.png", help="output PNG (a batch writes NAME_00.png, NAME_01.png, ...)")
    g.add_argument("--dump", help="also write per-scale bits, token ids, codes and decoded arrays here")
    g.add_argument("--threads", type=number_flag("threads", "--threads"), default=0,
                   help="CPU threads (0 = torch's default)")
    _add_attention_flag(g)
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay one captured CUDA graph per scale (docs/cuda_graphs.md; opt-in until measured on a "
                        "GPU); a single image pays the capture, so this is for checks and benchmarks")
    _add_cache_flags(g, default_policy="full")
    g.add_argument("--memory-report", help="write the memory report (planned and measured, per scale and layer) here")
    g.add_argument("--no-memory-check", action="store_true",
                   help="start even if the planned peak exceeds the device's free memory (also "
                        "SCALEKV_ALLOW_OVERCOMMIT=1)")
    low = g.add_argument_group("low VRAM (docs/low_vram.md)")
    low.add_argument("--decode-tile", type=_decode_tile, default=0,
                     help="VAE decode in overlapping tiles of this many latent positions per side, so its peak "
                          "follows the tile (0: the whole latent at once, as the original)")
    low.add_argument("--offload-t5", action="store_true",
                     help="encode the prompts with T5 alone on the device, then free it before the transformer loads")
    _add_t5_weights_flag(low)
    low.add_argument("--block-swap", type=number_flag("block_swap", "--block-swap"), default=0, metavar="N",
                     help="keep N transformer blocks in CPU memory and stream each to the device when its turn "
                          "comes; the device holds the other blocks and two block slots (at most depth - 2: 30 "
                          "for the 2B, 38 for the 8B); same image; docs/block_swap.md")


def _add_size_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=number_flag("width", "--width"), default=None,
                   help="snapped to the nearest official template (default: the resolution the transformer file "
                        "declares, 1024 for the released models)")
    p.add_argument("--height", type=number_flag("height", "--height"), default=None,
                   help="default: the resolution the transformer file declares, 1024 for the released models")


def _schedule(a: argparse.Namespace):
    """(the schedule of --width/--height, a note or None): a size not given is the transformer file's native one
    (its metadata's; 1024x1024 for the released models); the note, the ComfyUI sampler's, says when the size is
    outside what the model was trained at (printed once the model has loaded, so an error stays one line)."""
    from .loader import RELEASED_RESOLUTION, native_resolution, resolution_note, schedule_for_size

    try:
        native = native_resolution(a.transformer)
    except (ValueError, OSError):  # unreadable: the loader names the problem with the file when it loads
        native = (RELEASED_RESOLUTION, True)
    schedule = schedule_for_size(native, a.width, a.height)
    if a.width is None and a.height is None:
        return schedule, None
    note = resolution_note(native, schedule, Path(a.transformer).name,
                           hint="without --width and --height it runs at {label}")
    return schedule, (f"note: {note}" if note else None)


def _add_attention_flag(p: argparse.ArgumentParser) -> None:
    from .kvcache.attention import BACKENDS, CHOICES

    p.add_argument("--attention", default="auto", choices=CHOICES, metavar="NAME",
                   help="attention backend: auto (the fastest installed here by a fixed order; today SDPA's own pick, "
                        "the engine's call before this flag existed), "
                        + "; ".join(f"{n}: {b.about}" for n, b in BACKENDS.items())
                        + "; see docs/attention.md")


def _add_t5_tokenizer_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t5-tokenizer", metavar="DIR",
                   help="with a single-file --text-encoder: a folder with T5's tokenizer (spiece.model or "
                        "tokenizer.json), e.g. ComfyUI's comfy/text_encoders/t5_tokenizer")


def _add_t5_weights_flag(p: argparse.ArgumentParser) -> None:
    from .model.quant import T5_WEIGHT_FORMATS

    p.add_argument("--t5-weights", default="none", choices=T5_WEIGHT_FORMATS,
                   help="T5's linear layers: none (fp16 on CUDA, fp32 on CPU), fp8_e4m3fn or int8 (about half; "
                        "int8 the closer)")


def _add_weights_flag(p: argparse.ArgumentParser, what: str = "the block linears' weights, as the model loads"
                      ) -> None:
    from .model.quant import WEIGHT_FORMATS

    p.add_argument("--weights", default="none", choices=WEIGHT_FORMATS,
                   help=f"{what}: none (as the checkpoint), fp8_e4m3fn or int8 (about half of bf16), int4 (about a "
                        f"quarter); see docs/quantization.md")


def _add_cache_flags(p: argparse.ArgumentParser, default_policy: str) -> None:
    from .kvcache.config import KV_DTYPES, POLICIES, CacheConfig
    from .kvcache.policies.scalekv import SCORINGS
    from .kvcache.scoring import POOLINGS

    k = p.add_argument_group("KV cache")
    k.add_argument("--kv-policy", default=default_policy, choices=sorted(POLICIES),
                   help="eviction policy (full keeps everything, as the original)")
    k.add_argument("--budget", default="10%", type=budget_flag("--budget"),
                   help="tokens kept per layer: '10%%' of the cache before the last scale, '650' tokens, or '900MB'")
    k.add_argument("--budget-file", help="scalekv: an original-format budget JSON, or a preset "
                                          "(infinity-2b-10pct, infinity-8b-10pct); --budget is then the base capacity")
    k.add_argument("--window", type=number_flag("window", "--window"), default=CacheConfig.window,
                   help="observation window (tokens, a square number)")
    k.add_argument("--kernel", type=number_flag("kernel", "--kernel"), default=5, help="score pooling kernel (odd)")
    k.add_argument("--pooling", default="maxpool", choices=POOLINGS)
    k.add_argument("--scoring", default="improved", choices=SCORINGS, help="scalekv scoring mode")
    k.add_argument("--kv-dtype", default="auto", choices=sorted(KV_DTYPES),
                   help="cache storage: auto = values in the block dtype, keys too for full, sliding_window and "
                        "streamingllm (same bits), fp32 where a policy scores them (as the original)")
    k.add_argument("--refiner-decay", type=number_flag("refiner_decay", "--refiner-decay"), default=0.0,
                   help="scalekv: refiner budget decay per scale (tokens)")


def _cache_config(a: argparse.Namespace):
    from .kvcache import CacheConfig

    config = CacheConfig(policy=a.kv_policy, budget=a.budget, window=a.window, kernel=a.kernel, pooling=a.pooling,
                         scoring=a.scoring, kv_dtype=a.kv_dtype, budget_file=a.budget_file,
                         refiner_decay=a.refiner_decay)
    config.validate()
    return config


def _dump_kept(kept: dict, folder: Path, batch: int, cfg_on: bool) -> None:
    """`scalekv_kept_sSS_lL.npy`: kept positions of batch row 0, per CFG row (cond, uncond) and head."""
    from .pipeline import save_array

    for (scale, layer), idx in sorted(kept.items()):
        rows = [0, batch] if idx.shape[0] == 2 * batch else [0]
        save_array(idx[rows].numpy(), folder / f"scalekv_kept_s{scale:02d}_l{layer}.npy")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from .model.config import KNOWN_MODELS

    p = sub.add_parser("plan", help="predict memory for a model, resolution, batch and cache policy, without running")
    p.add_argument("--model", default="2b", choices=sorted(KNOWN_MODELS))
    p.add_argument("--width", type=number_flag("width", "--width"), default=1024)
    p.add_argument("--height", type=number_flag("height", "--height"), default=1024)
    p.add_argument("--batch", type=number_flag("batch", "--batch"), default=1)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="block precision")
    _add_cache_flags(p, default_policy="scalekv")
    p.add_argument("--json", action="store_true", help="print the full plan as JSON")
    p.add_argument("--table", action="store_true",
                   help="print a Markdown table for 2B and 8B at 512/768/1024, batch 1 and 4, full vs ScaleKV")
    j = p.add_argument_group("the whole job (T5 encode, sampling, decode, weights included)")
    j.add_argument("--vram", type=number_flag("vram_gib", "--vram"),
                   help="the card's memory in GiB: does the job fit, and if not, the cheapest setting that does "
                        "(tried in this order: offloaded T5, tiled decode, ScaleKV 10%%, KV stored in bf16, "
                        "fp8 weights, block swap, 4-bit weights)")
    _add_weights_flag(j, "the transformer's block weights as they will be loaded")
    j.add_argument("--offload-t5", action="store_true", help="T5 leaves the device once the prompt is encoded")
    _add_t5_weights_flag(j)
    j.add_argument("--block-swap", type=number_flag("block_swap", "--block-swap"), default=0, metavar="N",
                   help="transformer blocks kept in host memory while sampling (two device slots stream them)")
    j.add_argument("--previews", action="store_true",
                   help="count the ComfyUI sampler's per-scale preview decode (the CLI makes none)")
    j.add_argument("--decode-tile", type=_decode_tile, default=0,
                   help="VAE decode in tiles of this many latent positions (0: the whole latent at once)")
    j.add_argument("--job-table", action="store_true",
                   help="print a Markdown table of the whole job for 2B and 8B at 1024x1024 in each weight format")
    p.add_argument("--device", type=_plan_device, default=None,
                   help="the kind of device the job will run on (cuda, mps, cpu; what it holds comes from a table, or "
                        "from a probe where this machine has one): settings it cannot hold are refused and not "
                        "proposed (on mps: int8 weights, not fp8), and T5 is sized in the dtype it loads in there")


def _plan_device(text: str) -> str:
    """A device type to plan for (cuda, mps, cpu, xpu), which need not exist here: the planner runs anywhere."""
    import torch

    try:
        return torch.device(text).type
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device: unknown device {shown(text)}; use cuda, mps, cpu or xpu") from None


def _plan(a: argparse.Namespace) -> int:
    from .job_memory import VAE_PARAMS
    from .kvcache.memory import plan_memory
    from .loader import PRECISIONS
    from .model.config import KNOWN_MODELS
    from .model.transformer import Infinity
    from .schedules import schedule_for_pixels

    import torch

    def predict(model: str, width: int, height: int, batch: int, config):
        cfg = KNOWN_MODELS[model]
        with torch.device("meta"):
            params = sum(p.numel() for p in Infinity(cfg).parameters())
        schedule = schedule_for_pixels(width, height)
        vae = VAE_PARAMS.get(cfg.d_vae, VAE_PARAMS[32])  # the released VAE's, as generation holds it
        return schedule, plan_memory(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_hidden, cfg.d_vae, schedule,
                                     batch, config, PRECISIONS[a.dtype], params=params, vae_params=vae,
                                     vae_patch=8 if cfg.d_vae == 56 else 16)

    if a.device is not None:  # a setting that device cannot hold (fp8 on mps) is refused by flag, planned or not
        from .job_memory import JobOptions, check_options_on

        check_options_on(JobOptions(weights=a.weights, dtype=a.dtype, t5_weights=a.t5_weights, kv_dtype=a.kv_dtype),
                         a.device, _PLAN_FLAGS)
    if (a.vram is not None or a.job_table or a.weights != "none" or a.offload_t5 or a.decode_tile
            or a.t5_weights != "none" or a.block_swap or a.previews):
        return _plan_job(a)
    if a.table:
        from .kvcache import CacheConfig

        _print_note(_fixed_table_note(a, "table", reads=("dtype",)))

        print("| model | image | batch | full cache: KV / total | ScaleKV 20%: KV / total | ScaleKV 10%: KV / total |")
        print("|---|---|---|---|---|---|")
        for model in ("2b", "8b"):
            for side in (512, 768, 1024):
                for batch in (1, 4):
                    cells = []
                    for policy, budget in (("full", "10%"), ("scalekv", "20%"), ("scalekv", "10%")):
                        _, pl = predict(model, side, side, batch, CacheConfig(policy=policy, budget=budget))
                        cells.append(f"{pl.analytic_mb / 1024:.1f} / {pl.total_mb / 1024:.1f} GB")
                    print(f"| Infinity-{model} | {side}x{side} | {batch} | " + " | ".join(cells) + " |")
        return 0
    schedule, plan = predict(a.model, a.width, a.height, a.batch, _check_cache_flags(a))
    _print_note(_ignored_cache_flags_note(a))
    if a.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        h, w = schedule.pixel_size
        print(f"Infinity-{a.model} {w}x{h} batch {a.batch}, {a.kv_policy} {a.budget}: weights {plan.weights_mb / 1024:.1f} GB, "
              f"KV cache {plan.analytic_mb / 1024:.2f} GB stored ({100 * plan.analytic_mb / plan.full_analytic_mb:.1f}% "
              f"of {plan.full_analytic_mb / 1024:.2f} GB), sampling peak above weights {plan.sampling_peak_mb / 1024:.2f} GB, "
              f"VAE decode {plan.decode_peak_mb / 1024:.2f} GB, total about {plan.total_mb / 1024:.1f} GB")
    return 0


#: The plan's flags by JobOptions field, so a setting --device cannot hold is named as it was given.
_PLAN_FLAGS = {"weights": "--weights", "t5_weights": "--t5-weights", "kv_dtype": "--kv-dtype", "dtype": "--dtype"}


def _fixed_table_note(a: argparse.Namespace, which: str, reads: tuple[str, ...] = ()) -> str | None:
    """A note naming the flags given beside --table or --job-table, whose rows are fixed (the README's tables);
    `reads`: the flags the table does follow (--table's blocks take --dtype)."""
    others = sorted(f for f in getattr(a, "given", ()) if f != which and f not in reads)
    if not others:
        return None
    flags = ", ".join("--" + name.replace("_", "-") for name in others)
    return (f"note: {flags} ignored: --{which.replace('_', '-')} prints fixed rows (2B and 8B at fixed sizes); "
            "leave it out to plan these settings")


def _print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)


def _plan_job(a: argparse.Namespace) -> int:
    """`plan` for the whole job: each phase's peak, weights included; with --vram, the cheapest setting that fits."""
    from .job_memory import JobOptions, cheapest_fit, plan_job, table

    if a.table and not a.job_table:  # a job flag beside --table: the whole job is planned instead
        _print_note("note: --table ignored: the job flags given (--vram, --weights, --offload-t5, ...) plan the "
                    "whole job; leave them out for the cache table")
    if a.job_table:
        _print_note(_fixed_table_note(a, "job_table"))
        rows = table()
        print("| model | setting | transformer | T5 | encode | sampling | decode | peak |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| Infinity-{r['model']} | {r['setting']} | {r['transformer_gib']:.2f} | {r['t5_gib']:.2f} | "
                  f"{r['encode_gib']:.2f} | {r['sampling_gib']:.2f} | {r['decode_gib']:.2f} | "
                  f"**{r['peak_gib']:.2f} GiB** |")
        return 0
    _check_cache_flags(a, None)
    from .model.block_swap import check_block_swap
    from .model.config import KNOWN_MODELS

    check_block_swap(a.block_swap, KNOWN_MODELS[a.model].depth, "--block-swap")
    t5 = {}
    if a.device is not None:  # T5 in the dtype the loader gives it there (fp16 on CUDA, fp32 elsewhere)
        from .loader import PRECISION_NAMES, t5_dtype

        t5["t5_dtype"] = PRECISION_NAMES[t5_dtype(a.dtype, a.device)]
    options = JobOptions(weights=a.weights, dtype=a.dtype, t5_offload=a.offload_t5, t5_weights=a.t5_weights,
                         decode_tile=a.decode_tile or None, block_swap=a.block_swap, policy=a.kv_policy,
                         kv_dtype=a.kv_dtype, budget=str(a.budget), previews=a.previews,
                         budget_file=a.budget_file, window=a.window, refiner_decay=a.refiner_decay, **t5)
    if a.vram is None:
        plan = plan_job(a.model, a.width, a.height, a.batch, options)
        _print_note(_ignored_cache_flags_note(a))
        if a.json:
            print(json.dumps(plan.to_dict(), indent=1))
        else:
            print(f"Infinity-{a.model} {plan.resolution[0]}x{plan.resolution[1]} batch {a.batch} ({plan.setting}): "
                  f"T5 encode {plan.encode_mb / 1024:.2f} GiB, sampling {plan.sampling_mb / 1024:.2f} GiB, decode "
                  f"{plan.decode_mb / 1024:.2f} GiB; peak {plan.peak_mb / 1024:.2f} GiB (transformer "
                  f"{plan.transformer_mb / 1024:.2f}, T5 {plan.t5_mb / 1024:.2f}, VAE {plan.vae_mb / 1024:.2f})")
        return 0
    answer = cheapest_fit(a.model, a.width, a.height, a.vram, a.batch, options, device=a.device)
    _print_note(_ignored_cache_flags_note(a))
    if a.json:
        print(json.dumps(answer, indent=1))
        return 0
    asked = answer["asked"]
    print(f"Infinity-{a.model} batch {a.batch} as asked ({asked['setting']}): peak {asked['peak_gib']:.2f} GiB -> "
          f"{'fits' if answer['fits_as_asked'] else 'does not fit'} {a.vram:g} GiB")
    best = answer["cheapest"]
    if not answer["fits_as_asked"]:
        if best is None:
            print(f"nothing fits {a.vram:g} GiB; the smallest tried: "
                  f"{min(t['peak_gib'] for t in answer['tried']):.2f} GiB")
        else:
            print(f"cheapest that fits: {best['setting']} -> peak {best['peak_gib']:.2f} GiB")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from .kvcache import CacheConfig

    c = sub.add_parser("calibrate", help="measure each layer's attention selectivity and write a ScaleKV budget file",
                       description="Run the full cache on a few prompts, pick the drafter layers of every scale by "
                                   "their Attention Selectivity Index, and write an original-format budget JSON.")
    c.add_argument("--transformer", required=True)
    c.add_argument("--vae", required=True)
    c.add_argument("--text-encoder", required=True, help="T5: a folder, or one .safetensors file with --t5-tokenizer")
    _add_t5_tokenizer_flag(c)
    c.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    _add_size_flags(c)
    c.add_argument("--budget", default="10%", type=budget_flag("--budget", mb=False),
                   help="'10%%' or tokens ('650'), not MB (which depends on the batch and cache storage generate "
                        "uses); also the base capacity when the file is used")
    c.add_argument("--num-drafters", type=number_flag("num_drafters", "--num-drafters"), default=None,
                   help="drafter (scale, layer) pairs in all (default: ~6.6%%)")
    c.add_argument("--refiner-decay", type=number_flag("refiner_decay", "--refiner-decay"), default=0.0)
    c.add_argument("--window", type=number_flag("window", "--window"), default=CacheConfig.window,
                   help="observation window the budgets are planned with; generate needs the same (the use line "
                        "gives it)")
    c.add_argument("--seed", type=number_flag("seed", "--seed"), default=0)
    c.add_argument("--cfg", type=numbers_flag("cfg", "--cfg"), default=3.0)
    c.add_argument("--tau", type=numbers_flag("tau", "--tau"), default=0.5)
    c.add_argument("--max-queries", type=number_flag("max_queries", "--max-queries"), default=64,
                   help="query rows sampled per scale and layer")
    c.add_argument("--topk-fraction", type=number_flag("topk_fraction", "--topk-fraction"), default=0.1,
                   help="history top-K as a fraction of the history")
    c.add_argument("--combine", default="product", choices=["product", "sum"])
    c.add_argument("--device", default="cpu", type=device_flag)
    c.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    _add_weights_flag(c)
    c.add_argument("--out", default="out/scalekv_budget.json",
                   help="the budget file (and FILE.asi.json beside it); an existing one is replaced unless another "
                        "model's")


def _calibrate(a: argparse.Namespace) -> int:
    from .kvcache.budget import BudgetError, asi_table_path, parse_budget
    from .kvcache.calibration import calibrate, check_prompts, check_settings, overwrite_problem
    from .kvcache.scoring import check_window
    from .loader import transformer_config_of
    from .pipeline import InfinityPipeline

    # Everything that can be checked without the model, before loading it.
    prompts = _read_prompts(a.prompts)
    out = output_file(a.out, "--out")
    output_file(str(asi_table_path(out)), "--out")  # the ASI table is written beside it
    check_prompts(a.seed, len(prompts), "--seed", "--prompts")
    check_window(a.window, "--window")
    schedule, note = _schedule(a)
    _check_lists(a, schedule)
    tokens = parse_budget(a.budget, schedule)
    try:
        check_settings(schedule, tokens, a.window, a.refiner_decay)
    except BudgetError as e:
        raise BudgetError(f"--budget {a.budget} (--window {a.window}): {e}") from None
    try:
        cfg = transformer_config_of(a.transformer)  # from the header: another model's file is kept before any work
    except (ValueError, OSError):
        cfg = None  # the loader names what is wrong with the file
    problem = overwrite_problem(out, cfg, "--out") if cfg is not None else None
    if problem is not None:
        raise InputError(f"--out {out}: {problem}")
    _check_device_dtypes(a)
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, a.text_encoder, device=a.device, precision=a.dtype,
                                       weights=a.weights, t5_tokenizer=a.t5_tokenizer)
    if note:
        print(note, file=sys.stderr)
    res = calibrate(pipe, prompts, schedule, tokens, a.num_drafters, a.seed, a.refiner_decay, a.window,
                    on_prompt=lambda i, n: print(f"  prompt {i}/{n}", file=sys.stderr, flush=True),
                    cfg=a.cfg, tau=a.tau, max_queries=a.max_queries, topk_fraction=a.topk_fraction,
                    combine=a.combine)
    paths = res.write(out)
    for si, ds in enumerate(res.drafters):
        if ds:
            print(f"  scale {si + 1}: drafters {ds}", file=sys.stderr)
    print(json.dumps({"budget_file": str(paths[0]), "asi": str(paths[1]), "budget_tokens": tokens,
                      "use": _use_flags(a, schedule, paths[0], tokens)}))
    return 0


def _use_flags(a: argparse.Namespace, schedule, budget_file: Path, tokens: int) -> str:
    """generate's flags for a calibrated file: the file and its budget, the window it was planned with where that is
    not generate's default (its caps are refused below the window), and the size it was calibrated at if given."""
    import shlex

    from .kvcache import CacheConfig

    flags = ["--kv-policy", "scalekv", "--budget-file", shlex.quote(str(budget_file)), "--budget", str(tokens)]
    if a.window != CacheConfig.window:
        flags += ["--window", str(a.window)]
    if a.width is not None or a.height is not None:  # else the transformer's own size, which generate defaults to
        h, w = schedule.pixel_size
        flags += ["--width", str(w), "--height", str(h)]
    return " ".join(flags)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="rewrite a .pth checkpoint (or shard folder) as .safetensors, optionally with "
                                       "its block weights quantized (--weights)")
    c.add_argument("src")
    c.add_argument("dst", help="the .safetensors (or .sft) file to write; not src, and not an existing file unless "
                               "--overwrite")
    c.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    _add_weights_flag(c, "store a transformer's block linears pre-quantized (none: the same tensors, any checkpoint)")


def _prequantized_format(path: str) -> str | None:
    """The weight format a converted .safetensors file declares (None for any other checkpoint), so --fp8-matmul
    can use an fp8 file without --weights and name another file's format."""
    from .checkpoint import SAFETENSORS_SUFFIXES
    from .loader import declared_format

    try:
        if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
            return None
        found = declared_format(path)
    except Exception:  # an unreadable file (or bad metadata) is reported, naming it, when it loads
        return None
    return None if found is None else found[0]


def _check_device_dtypes(a: argparse.Namespace) -> None:
    """--dtype, --weights (or a pre-quantized file's format), --t5-weights and --kv-dtype that --device cannot hold
    (fp8 on Apple's MPS; bf16 there before macOS 14) refused by flag before anything loads, not as torch's
    TypeError when the first tensor moves."""
    from .devices import check_dtype
    from .kvcache.config import check_kv_dtype_on
    from .loader import PRECISIONS
    from .model.quant import check_format_on

    if a.dtype in PRECISIONS:
        check_dtype(a.device, PRECISIONS[a.dtype], "--dtype", a.dtype, "choose fp32 or fp16 (or auto)")
    check_format_on(a.weights, a.device, "--weights")
    held = _prequantized_format(a.transformer) if a.weights == "none" else None
    if held is not None:
        check_format_on(held, a.device, f"--transformer {a.transformer}: pre-quantized as")
    check_format_on(getattr(a, "t5_weights", "none"), a.device, "--t5-weights")
    check_kv_dtype_on(getattr(a, "kv_dtype", "auto"), a.device, "--kv-dtype")


def _generate(a: argparse.Namespace) -> int:
    import torch

    from .kvcache.memory import ALLOW_OVERCOMMIT_ENV, overcommit_allowed
    from .pipeline import InfinityPipeline, check_text_width, load_text_encoder
    from .safe_files import write_text

    # Everything that can be checked without the model, before loading it: a mistake never costs a generation.
    if a.text_kv is None and a.text_encoder is None:
        raise InputError("give --text-encoder (a T5 folder) or --text-kv (precomputed encodings)")
    if a.text_kv is not None and a.prompt:
        raise InputError(f"--prompt and --text-kv {a.text_kv} both give the prompt (--text-kv holds its encodings, "
                         "so --prompt would be ignored); give one of them")
    if a.text_kv is None and not a.prompt.strip():
        raise InputError("--prompt is empty")
    if a.text_kv and a.negative_prompt and not a.text_encoder:
        raise InputError("--negative-prompt needs --text-encoder to encode it (--text-kv covers the prompt only)")
    out = output_file(a.out, "--out", images=a.batch)
    dump = output_folder(a.dump, "--dump") if a.dump else None
    report = output_file(a.memory_report, "--memory-report") if a.memory_report else None
    from .pipeline import image_paths

    _check_outputs_apart([("--out", p) for p in image_paths(out, a.batch)]
                         + ([("--memory-report", report)] if report else []),
                         [("--transformer", a.transformer), ("--vae", a.vae), ("--text-encoder", a.text_encoder),
                          ("--t5-tokenizer", a.t5_tokenizer), ("--text-kv", a.text_kv),
                          ("--budget-file", a.budget_file)], dump)
    schedule, note = _schedule(a)
    _check_lists(a, schedule)
    cache = _check_cache_flags(a, schedule)
    _check_device_dtypes(a)
    text_kv = _load_text_kv(a.text_kv) if a.text_kv else None
    if a.fp8_matmul and a.weights != "fp8_e4m3fn":
        held = _prequantized_format(a.transformer)
        if held != "fp8_e4m3fn":
            now = f"{a.transformer} holds {held} weights" if held else f"--weights is {a.weights}"
            raise InputError(f"--fp8-matmul needs --weights fp8_e4m3fn (or a file converted to it); {now}")
    if a.block_swap:
        from .model.block_swap import check_block_swap

        depth = _checkpoint_depth(a.transformer)
        if depth is not None:  # a .pth is checked once loaded (its keys are inside the pickle)
            check_block_swap(a.block_swap, depth, "--block-swap")

    if a.attention != "auto":  # refused by name before the model loads (auto always runs)
        from .kvcache.attention import resolve as resolve_attention
        from .loader import resolve_precision

        try:
            resolve_attention(a.attention, a.device, resolve_precision(a.dtype, a.device))
        except ValueError as e:
            raise InputError(f"--attention: {e}") from None

    if a.cuda_graphs:  # refused by name before the model loads
        if torch.device(a.device).type != "cuda":
            raise InputError(f"--cuda-graphs needs a CUDA device; --device is {a.device}")
        for flag, on in (("--block-swap", a.block_swap), ("--dump", a.dump)):
            if on:
                raise InputError(f"--cuda-graphs with {flag}: graphs run no per-step Python (block copies, "
                                 "kept-token records); use one or the other")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    need_t5 = not a.text_kv or bool(a.negative_prompt)
    negative = a.negative_prompt or None
    t5 = None
    if need_t5 and a.offload_t5:  # T5 encodes alone on the device and is gone before the transformer arrives
        t5 = load_text_encoder(a.text_encoder, a.device, a.dtype, a.t5_weights, a.t5_tokenizer)
        text_kv = t5.encode([a.prompt]) if text_kv is None else text_kv
        negative = t5.encode([negative]) if negative else None
        t5.to("cpu")
    pipe = InfinityPipeline.from_files(a.transformer, a.vae, a.text_encoder if need_t5 and t5 is None else None,
                                       device=a.device, precision=a.dtype, weights=a.weights,
                                       t5_weights=a.t5_weights, block_swap=a.block_swap,
                                       t5_tokenizer=a.t5_tokenizer)
    if a.fp8_matmul:
        from .model.quant import enable_fp8_matmul

        fp8_note = enable_fp8_matmul(pipe.transformer, a.device)  # not `note`: that is the resolution's, printed below
        if fp8_note:
            print(f"note: {fp8_note}", file=sys.stderr)
    encoder = t5 if t5 is not None else pipe.text_encoder
    t5_notes = [f"note: {flag}: {n}" for flag, text in (("--prompt", None if a.text_kv else a.prompt),
                                                         ("--negative-prompt", a.negative_prompt))
                if text and encoder is not None for n in encoder.truncation_notes([text])]
    del encoder  # no reference kept: an offloaded T5 is freed below
    if t5 is not None:
        check_text_width(pipe.transformer.cfg.text_channels, t5.text_channels, a.transformer, a.text_encoder)
        del t5
    if text_kv is not None and text_kv.text_channels != pipe.transformer.cfg.text_channels:
        raise InputError(f"--text-kv {a.text_kv}: {text_kv.text_channels} channels per token, but the transformer "
                         f"{a.transformer} expects {pipe.transformer.cfg.text_channels} (T5 features of its width)")
    if not a.no_memory_check and not overcommit_allowed():
        cfgs = a.cfg if isinstance(a.cfg, list) else [a.cfg]
        problem = pipe.admission_problem(schedule, a.batch, cache, cfg=any(c != 1 for c in cfgs),
                                         override=f"pass --no-memory-check (or set {ALLOW_OVERCOMMIT_ENV}=1)",
                                         decode_tile=a.decode_tile, tile_field="--decode-tile")
        if problem is not None:
            raise InputError(problem)
    for line in (note, _ignored_cache_flags_note(a), *t5_notes):
        if line:
            print(line, file=sys.stderr)
    for plan_note in pipe.plan_memory(schedule, a.batch, cache).notes:
        print(f"note: {plan_note}", file=sys.stderr)
    print(f"loaded {pipe.transformer.cfg.describe()} in {time.perf_counter() - t0:.1f}s; "
          f"{schedule.pixel_size[1]}x{schedule.pixel_size[0]} (template {schedule.template}, {schedule.size}, "
          f"{schedule.num_scales} scales)", file=sys.stderr)
    prompt = text_kv if text_kv is not None else a.prompt
    t1 = time.perf_counter()

    def progress(si: int, n: int, _codes: torch.Tensor) -> None:
        print(f"  scale {si + 1}/{n} {schedule.grids[si][0]}x{schedule.grids[si][1]} "
              f"({time.perf_counter() - t1:.1f}s)", file=sys.stderr)

    kept: dict[tuple[int, int], torch.Tensor] = {}
    record = (lambda s, l, idx: kept.__setitem__((s, l), idx.cpu())) if dump and a.kv_policy != "full" else None
    result = pipe.generate(prompt, negative, seed=a.seed, cfg=a.cfg, tau=a.tau, top_k=a.top_k, top_p=a.top_p,
                           schedule=schedule, batch=a.batch, on_scale=progress, cache=cache,
                           record_kept=record, memory_report=report is not None, decode_tile=a.decode_tile,
                           attention=a.attention, graphs="cuda" if a.cuda_graphs else "off")
    paths = result.save_images(out)
    if dump:
        result.dump(dump)
        _dump_kept(kept, dump, result.images.shape[0], cfg_on=result.samples.usage is not None)
    if report:
        write_text(report, json.dumps(result.memory.to_dict(), indent=1))
        m = result.memory
        peak = (f"measured peak {m.measured_peak_mb:.1f} MB above the weights ({m.measurement})"
                if m.measured_peak_mb is not None else f"peak {m.measurement or 'not measured'}")
        print(f"KV cache: {m.analytic_mb:.1f} MB stored ({100 * m.stored_ratio:.1f}% of full), {peak}; "
              f"report: {a.memory_report}", file=sys.stderr)
    print(json.dumps({"images": [str(p) for p in paths], "seconds": round(time.perf_counter() - t1, 3),
                      "dump": a.dump, "attention": result.info["attention"]}), flush=True)
    return 0


def _convert(a: argparse.Namespace) -> int:
    from .checkpoint import SAFETENSORS_SUFFIXES, convert_to_safetensors

    dst = output_file(a.dst, "dst")
    if dst.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise InputError(f"dst {dst}: convert writes safetensors; name it .safetensors")
    if dst.exists():
        if Path(a.src).exists() and _same_file(dst, Path(a.src)):
            raise InputError(f"dst {dst}: is src itself; write the converted file under another name")
        if not a.overwrite:
            raise InputError(f"dst {dst}: exists; give another name, or --overwrite to replace it")
    import zipfile

    from .checkpoint import safetensors_header, tensor_shapes
    from .loader import declared_format, format_to_load

    # what can be refused from the headers is, before the first progress line: an error stays one line (a legacy
    # .pth has no header apart from its whole pickle: not read twice)
    src = Path(a.src)
    if src.is_dir() or safetensors_header(src) is not None or zipfile.is_zipfile(src):
        tensor_shapes(src)
    declared = declared_format(a.src)
    format_to_load(None if declared is None else declared[0], a.weights, str(a.src))
    t0 = time.perf_counter()
    if a.weights == "none":
        print(f"copying {a.src} into {dst} ...", file=sys.stderr, flush=True)
        out = convert_to_safetensors(a.src, dst)
    else:  # quantized from the file's own values (fp32 elsewhere), on the CPU
        from .loader import load_transformer
        from .model.quant import save_quantized

        print(f"loading {a.src} and quantizing its blocks to {a.weights} ...", file=sys.stderr, flush=True)
        model = load_transformer(a.src, "cpu", "fp32", weights=a.weights)
        print(f"writing {dst} ({time.perf_counter() - t0:.0f}s so far) ...", file=sys.stderr, flush=True)
        out = save_quantized(model, dst)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m scalekv_core")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    _add_calibrate(sub)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors in the input come out as one line on stderr and exit status 2, not a traceback.

    Set SCALEKV_TRACEBACK=1 to see the traceback of such an error.
    """
    commands = {"generate": _generate, "plan": _plan, "calibrate": _calibrate, "convert": _convert}

    def command() -> int:
        args = sys.argv[1:] if argv is None else list(argv)
        a = build_parser().parse_args(args)
        a.given = given_flags(build_parser(), args)  # what the user set, for notes on flags that go unused
        return commands[a.command](a)

    return run_reporting_errors(command)
