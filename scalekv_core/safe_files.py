"""Reading user-named files without surprises (regular files only, never more than a stated number of bytes), and
writing outputs whole (a reader sees the old file or the complete new one, never half of one).

A path a user (or a downloaded folder) names can be a FIFO (opening it blocks until a writer appears), a device
such as /dev/zero (reading it never ends), a folder, or a symlink to any of these. Everything here checks the
file type with `stat` before opening, opens non-blocking and checks again on the open descriptor, and caps what
is read, so such a path is an error that names it instead of a hang or an exhausted memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from .limits import shown

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """'a folder', 'a FIFO (named pipe)', ... for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_mode(path: Path, mode: int, what: str, error: type[Exception]) -> None:
    if not stat.S_ISREG(mode):
        raise error(f"{path}: expected a {what}, found {kind_of(mode)}; only regular files are read")


def regular_file(path: str | os.PathLike, what: str = "file", error: type[Exception] = ValueError) -> os.stat_result:
    """stat() of `path` (links followed) if it is a regular file.

    FileNotFoundError ("<what> not found: <path>") if it is missing; `error` naming the path for a folder, FIFO,
    device or socket, and for a path that cannot be a file name at all (a NUL character).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except ValueError:  # "embedded null byte"
        raise error(f"{shown(str(path))}: not a usable file name (it contains a NUL character)") from None
    except OSError as e:  # permission on a parent, a symlink loop, a name too long
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    _check_mode(path, st.st_mode, what, error)
    return st


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str = "file",
                 error: type[Exception] = ValueError) -> Iterator[tuple[BinaryIO, int]]:
    """Open a regular file for binary reading; yields (file, size in bytes).

    Checked before opening, opened non-blocking (a FIFO swapped in after the check cannot hang the open), and
    checked again on the open descriptor.
    """
    path = Path(path)
    regular_file(path, what, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_mode(path, st.st_mode, what, error)
        yield f, st.st_size


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "file",
               error: type[Exception] = ValueError) -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes; `error` naming the file otherwise."""
    path = Path(path)
    with open_regular(path, what, error) as (f, size):
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a {what} (at most {max_bytes})")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise error(f"{path}: more than {max_bytes} bytes is too large for a {what}")
    return data


def read_text(path: str | os.PathLike, max_bytes: int, what: str = "file",
              error: type[Exception] = ValueError) -> str:
    """A regular file of at most `max_bytes` bytes as UTF-8 text (a BOM is dropped); `error` naming the file."""
    data = read_bytes(path, max_bytes, what, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{Path(path)}: the {what} is not UTF-8 text (invalid byte at offset {e.start})") from None


#: How the temporary files of atomic_path end: `NAME.XXXXXXXX.partial` (8 hex digits; plain `NAME.partial` is what
#: earlier versions left), for code that clears a folder of its own stale files (pipeline.DUMP_FILES).
PARTIAL_SUFFIX = r"(\.[0-9a-f]{8})?\.partial"
#: Longest part of the final name kept in a temporary name, so the temporary name still fits NAME_MAX (255).
_PARTIAL_NAME_CHARS = 200


def _new_partial(path: Path) -> Path:
    """A new empty `NAME.XXXXXXXX.partial` beside `path`, created exclusively, so two writers of one output never
    share a temporary file; mode 0666 less the umask, as open() gives the final file (mkstemp's would be 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f"{path.name[:_PARTIAL_NAME_CHARS]}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # one chance in 4 billion per writer: draw again
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A new temporary `NAME.XXXXXXXX.partial` beside `path` for a writer that takes a file name (one per call, so
    concurrent writers of one output do not mix their bytes); renamed to `path` when the block ends (os.replace),
    removed on any exception (Ctrl-C included), so `path` is the old file or one writer's whole new one; OS errors
    name `path`."""
    path = Path(path)
    if path.is_symlink():  # write through the link, as open() would: the link stays, its target is replaced
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_partial(path)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as e:
        raise named_os_error(e, path) from e


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """atomic_path opened for writing, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` holding `text` (UTF-8), written whole or not at all (atomic_output)."""
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def named_os_error(e: OSError, path: Path, doing: str = "cannot write") -> OSError:
    """`e` again, its message naming `path` (the final name, not a temporary one), errno kept."""
    message = f"{doing} {path}: {e.strerror or e}"
    try:
        named = type(e)(message)
    except TypeError:  # a subclass with other constructor arguments
        named = OSError(message)
    named.errno = e.errno
    return named


# ------------------------------------------------------------------------------ numbers in files we read

#: Most digits an integer in a JSON file read here may have. Counts and sizes need at most 20 (2^64); Python's int()
#: refuses strings over 4300 digits with a bare ValueError and takes quadratic time below that.
MAX_JSON_DIGITS = 100
_DECIMAL = re.compile(r"[0-9]+")


def is_decimal(text: object) -> bool:
    """Whether `text` is one or more ASCII digits 0-9 (str.isdigit also accepts '²' and '٣', which int() refuses)."""
    return isinstance(text, str) and _DECIMAL.fullmatch(text) is not None


def whole_number(text: object, most: int) -> int | None:
    """`text` as an int if it `is_decimal` with a value from 0 to `most`; None otherwise. int() never sees more
    digits than `most` has, so a 5000-digit string is None, not Python's int-string-limit ValueError."""
    if not is_decimal(text):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(most)):
        return None
    value = int(digits)
    return value if value <= most else None


class JSONNumberError(ValueError):
    """An integer in a JSON file with more than MAX_JSON_DIGITS digits; the message names its key."""


class _LongNumber(str):
    """Stands in for an integer literal too long to convert, until its key is found."""


def _json_key(parts: Sequence[object]) -> str:
    """A key path as an error names it: 'Scale 9.Max', 'metadata.total_size', 'shapes[2]'."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            quoted = shown(part)
            text += ("." if text else "") + (quoted[1:-1] if quoted[-1:] in "'\"" else quoted)
    return f"'{text}'" if text else "the top-level value"


def _find_long_number(data: object) -> tuple[list[object], str] | None:
    """The key path and text of the first long number in `data` (None if a duplicate key replaced it)."""
    stack: list[tuple[object, list[object]]] = [(data, [])]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, _LongNumber):
            return where, obj
        if isinstance(obj, dict):
            stack.extend((v, where + [k]) for k, v in reversed(list(obj.items())))
        elif isinstance(obj, list):
            stack.extend((v, where + [i]) for i, v in reversed(list(enumerate(obj))))
    return None


def _digits(literal: str) -> int:
    return len(literal) - literal.startswith("-")


def parse_json(text: str | bytes) -> object:
    """json.loads, except that an integer of more than MAX_JSON_DIGITS digits is a JSONNumberError naming its key
    (json.loads would raise Python's bare 'Exceeds the limit (4300 digits)' ValueError, naming nothing).

    Other failures are json.loads' own (JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError).
    """
    long: list[str] = []  # each long number, in file order

    def parse_int(literal: str) -> int | str:
        if _digits(literal) > MAX_JSON_DIGITS:
            long.append(literal)
            return _LongNumber(literal)
        return int(literal)

    data = json.loads(text, parse_int=parse_int)
    if long:
        found = _find_long_number(data)
        where, literal = found if found is not None else (None, long[0])
        raise JSONNumberError(f"{_json_key(where) if where is not None else 'a value'} is a number of "
                              f"{_digits(literal)} digits; numbers here have at most {MAX_JSON_DIGITS}")
    return data
