"""Command-line argument types and checks, shared by the CLI and the benchmarks' entry points.

Each type names its flag and the value on a bad input; input files and output paths are checked while the flags
are parsed, before any model loads. `run_reporting_errors` turns a user error into one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from .limits import LIMITS, MAX_SCALES, TEXTS, InputError, shown

#: Longest error line printed (a path or message is cut here; values are already quoted with `shown`).
MAX_ERROR_CHARS = 2000


class UsageError(Exception):
    """A bad command line, found while parsing; main prints it as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line naming the flag and value (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "argument "
        if message.startswith(prefix) and ": " in message:
            flag, rest = message[len(prefix):].split(": ", 1)
            # our types already name the flag ("--cfg: ..."); argparse's own messages get it added
            message = rest if rest.startswith(flag.split("/")[-1]) else f"{flag}: {rest}"
        raise UsageError(message)


def flag_type(name: str, parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type whose InputError becomes argparse's error (so it names the flag and value)."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name
    return convert


def number_flag(limit: str, flag: str) -> Callable[[str], object]:
    """A flag holding one number, checked against LIMITS[limit]."""
    return flag_type(limit, lambda text: LIMITS[limit].parse(text, flag))


def numbers_flag(limit: str, flag: str) -> Callable[[str], object]:
    """'3' -> 3.0; '3,3,2.5' -> a per-scale list; every element checked against LIMITS[limit]."""
    def parse(text: str) -> float | list[float]:
        parts = text.split(",")
        if len(parts) > MAX_SCALES:
            raise InputError(f"{flag}: {len(parts)} values; give one, or one per scale (at most {MAX_SCALES})")
        if len(parts) == 1:
            return float(LIMITS[limit].parse(text.strip(), flag))
        return [float(LIMITS[limit].parse(v.strip(), f"{flag}[{i}]")) for i, v in enumerate(parts)]
    return flag_type(limit, parse)


def text_flag(limit: str, flag: str) -> Callable[[str], object]:
    return flag_type(limit, lambda text: TEXTS[limit].check(text, flag))


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the flags `argv` sets explicitly (a value equal to the default included), so a command can
    tell what the user asked for from what it defaults to: `argv` parsed again with every default suppressed."""
    def suppress(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            elif action.option_strings:
                action.default = argparse.SUPPRESS

    suppress(parser)
    return {dest for dest in vars(parser.parse_args(argv)) if dest != "command"}


_BUDGET_FORMS = "a percentage ('10%'), tokens ('650') or MB ('900MB')"
_BUDGET_FORMS_NO_MB = "a percentage ('10%') or tokens ('650')"


def check_budget_text(text: str, flag: str, mb: bool = True) -> str:
    """'10%' (checked as budget_percent), '650' / '650tokens' / '900MB' (checked as budget); kept as text.
    InputError naming `flag` otherwise, and for MB where `mb` is False (a command that has no batch or cache
    storage to turn MB into tokens with)."""
    spec = text.strip().lower().replace(" ", "")
    for suffix, limit in (("%", "budget_percent"), ("mb", "budget"), ("tokens", "budget"), ("", "budget")):
        if spec.endswith(suffix):
            number = spec[: len(spec) - len(suffix)]
            break
    try:
        float(number)
    except ValueError:
        forms = _BUDGET_FORMS if mb else _BUDGET_FORMS_NO_MB
        raise InputError(f"{flag}: expected {forms}, got {shown(text)}") from None
    if suffix == "mb" and not mb:
        raise InputError(f"{flag} {shown(text)}: give {_BUDGET_FORMS_NO_MB} here; MB becomes tokens only with the "
                         f"batch and cache storage of a generation")
    LIMITS[limit].parse(number, f"{flag} {shown(text)}")
    return text.strip()


def budget_flag(flag: str, mb: bool = True) -> Callable[[str], object]:
    """An argparse type for one budget (check_budget_text); `mb` False refuses a budget in MB."""
    return flag_type("budget", lambda text: check_budget_text(text, flag, mb))


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def device_flag(text: str) -> str:
    """A device this process can use: cpu, cuda, cuda:N (checked against the GPUs present), mps, xpu."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"--device: unknown device {shown(text)}; use cpu, cuda, cuda:N, mps or xpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"--device: {shown(text)} is not available: this torch sees no CUDA GPU "
                                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"--device: {shown(text)} does not exist; this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                                             f"cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"--device: {shown(text)} is not available on this machine; use --device cpu")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise argparse.ArgumentTypeError(f"--device: {shown(text)} is not available on this machine; use --device cpu")
    return text


# ------------------------------------------------------------------------------------- files, before any work


def one_line(text: str) -> str:
    """One line: whitespace runs become one space, terminal escapes and control characters go, long lines are cut."""
    line = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text)).split())
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + "..."


def _stat(path: Path, flag: str) -> os.stat_result | None:
    """os.stat, None if nothing is there; an InputError for a name that cannot be a path."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # embedded NUL
        raise InputError(f"{flag}: {shown(str(path))} is not a usable path (it contains a NUL character)") from None
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror or e}") from None


def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    """`folder` exists as a folder we can create files in, or can be created (its nearest existing parent can)."""
    here = folder
    while True:
        st = _stat(here, flag)
        if st is not None:
            break
        if here.parent == here:
            raise InputError(f"{flag} {target}: no part of the path exists")
        here = here.parent
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{flag} {target}: {here} is a file, not a folder")
    problem = None
    if not os.access(here, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:  # os.access does not see everything (root on a read-only mount, ACLs): try it
        try:
            fd, probe = tempfile.mkstemp(prefix=".scalekv-write-check-", dir=here)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        where = "files in" if here == folder else f"the folder {folder} in"
        raise InputError(f"{flag} {target}: cannot create {where} {here} ({problem})")


def output_file(text: str, flag: str, images: int = 0) -> Path:
    """A file the command will write: not a folder or special file, in a folder that exists or can be made.

    `images`: the number of images written there: each file a batch writes (NAME_00.png, NAME_01.png, ...) is
    checked, and the format its extension names must write RGB images (tried on a 1x1 image in memory).
    """
    path = Path(text)
    if images:
        from .pipeline import image_format, image_paths

        targets = image_paths(path, images)
        for target in targets:
            _check_output_name(target, flag)
        try:
            image_format(targets[0])
        except ValueError as e:
            raise InputError(f"{flag} {e}") from None
    else:
        _check_output_name(path, flag)
    _writable_folder(path.parent, flag, path)
    return path


def _check_output_name(path: Path, flag: str) -> None:
    """Nothing at `path`, or a regular file we may replace."""
    st = _stat(path, flag)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{flag} {path}: is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            from .safe_files import kind_of

            raise InputError(f"{flag} {path}: is {kind_of(st.st_mode)}; give a regular file name")
        if not os.access(path, os.W_OK):
            raise InputError(f"{flag} {path}: exists and is not writable")


def output_folder(text: str, flag: str) -> Path:
    path = Path(text)
    st = _stat(path, flag)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{flag} {path}: exists and is not a folder")
    _writable_folder(path, flag, path)
    return path


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run `command`; a user error (ValueError, OSError, a bad flag, torch refusing a dtype on the device) comes
    out as one line on stderr, `error: ...`, with exit status 2, and Ctrl-C as `error: interrupted` with 130
    (SCALEKV_TRACEBACK=1 shows the traceback). `main` and the benchmarks' entry points (`python -m
    scalekv_core.bench ...`) all answer this way."""
    try:
        return command()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as e:
        # ValueError covers InputError, CheckpointError, BudgetError and the engine's other named refusals;
        # OSError covers missing, unreadable and unwritable files (FileNotFoundError, PermissionError, ...).
        if os.environ.get("SCALEKV_TRACEBACK"):
            raise
        print(f"error: {one_line(str(e) or type(e).__name__)}", file=sys.stderr)
        return 2
    except (TypeError, RuntimeError) as e:
        # torch's refusal to put a dtype on a device (float64 or fp8 on MPS) on a path no check covered is the
        # settings' fault, not a bug: one line naming the way out; any other TypeError stays a traceback
        from .devices import torch_dtype_message

        message = torch_dtype_message(e)
        if message is None or os.environ.get("SCALEKV_TRACEBACK"):
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2


