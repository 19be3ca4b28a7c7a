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
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
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


# ------------------------------------------------------------------------------ names of files inside a folder


def relative_name_problem(name: str) -> str | None:
    """Why `name` cannot be a name inside a folder under any OS's rules, or None: one rule for the node menus' names
    and a shard index's entries, so a name that stays inside on Linux cannot leave the folder on Windows."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    # a drive ('D:evil' is relative to D:'s current folder), a UNC share, or a root: Python 3.13's ntpath.isabs
    # no longer calls '\\x' absolute, and posixpath never calls 'C:\\x' absolute, so neither host rule is enough
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() \
            or any(PureWindowsPath(part).drive for part in [name, *parts]):  # './C:/x' normalizes to 'C:\\x'
        return "is an absolute path"
    if ".." in parts:
        return "leaves the folder ('..')"
    if any(part not in ("", ".") and not part.rstrip(". ") for part in parts):  # Windows trims '.. ' to '..'
        return "has a part of only dots and spaces, which Windows reads as '..' or the folder itself"
    return None


def is_apple_double(name: str) -> bool:
    """Whether `name` is a macOS AppleDouble file (`._NAME`, metadata macOS writes beside every file it copies to
    an exFAT, FAT or SMB drive): never a model, index or budget file, though it matches their patterns."""
    return name.startswith("._")


#: Characters Windows refuses in a file name (besides the control characters 0-31).
WINDOWS_BAD_CHARACTERS = '<>:"|?*'
#: Device names Windows reserves, with any extension and in any case ('con.json', 'Aux.tar.gz').
WINDOWS_RESERVED_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                                    *(f"{d}{i}" for d in ("COM", "LPT") for i in (*"123456789", "¹", "²", "³"))})


def portable_name_problem(name: str, prefix: bool = False) -> str | None:
    """Why Windows could not create the relative path `name` (checked on every OS, so a name that works here works
    in a workflow shared with a Windows user), or None. `prefix`: more text follows the last part, so its end and
    device name are not final."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    for i, part in enumerate(parts):
        bad = next((c for c in part if c in WINDOWS_BAD_CHARACTERS or ord(c) < 32), None)
        if bad is not None:
            return (f"contains {shown(bad)}, a character Windows does not allow in file names "
                    f"({WINDOWS_BAD_CHARACTERS} and control characters)")
        if prefix and i == len(parts) - 1:
            continue
        if part.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED_NAMES:
            return f"uses {shown(part)}, a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
        if part[-1] in ". " and part not in (".", ".."):
            return (f"has {shown(part)} ending in {'a dot' if part[-1] == '.' else 'a space'}, which Windows removes "
                    f"from file names")
    return None


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


def check_writable(path: str | os.PathLike, doing: str = "cannot write") -> None:
    """Create and remove a temporary file beside `path` as long as the longest name atomic_path makes for it, so a
    folder or name the OS refuses (read-only, Windows' characters or device names, a name or path too long) is an
    OSError naming `path` (after `doing`) before the minutes of work whose result goes there, not after them."""
    path = Path(path)
    with contextlib.suppress(OSError):  # a name the OS refuses is named by the probe below
        if path.is_symlink():  # atomic_path writes beside the link's target: probe there
            path = Path(os.path.realpath(path))
    tail = len(".00000000.partial")
    width = max(len(path.name), len(path.name[:_PARTIAL_NAME_CHARS]) + tail)  # the final name, the temporary one
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f"{path.name[:width - tail]}.{secrets.token_hex(4)}.partial")
        os.close(os.open(probe, flags, 0o666))
        os.unlink(probe)
    except OSError as e:
        raise named_os_error(e, path, doing) from e
    except ValueError:  # "embedded null byte"
        raise ValueError(f"{shown(str(path))}: not a usable file name (it contains a NUL character)") from None


#: Windows: seconds between the tries of os.replace while another program holds the target open (an antivirus or
#: search indexer scanning it, a viewer, ComfyUI's own route reading the budget file): about 3 s in all.
REPLACE_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


class ReplaceBlockedError(PermissionError):
    """Windows would not let a finished temporary file replace its output (another program holds the output open);
    the temporary file is kept, at `partial`, rather than losing a finished result."""

    def __init__(self, message: str, partial: Path, errno: int | None = None) -> None:
        super().__init__(message)
        self.partial = partial
        self.errno = errno


def _on_windows() -> bool:
    """os.name == "nt", asked here so tests can say Windows without changing os.name (pathlib reads it)."""
    return os.name == "nt"


def _replace(tmp: Path, path: Path) -> None:
    """os.replace, tried again on Windows while the target is held open (WinError 5 or 32 is a PermissionError)."""
    for wait in (*REPLACE_WAITS, None):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if not _on_windows() or wait is None:
                raise
            time.sleep(wait)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A new temporary `NAME.XXXXXXXX.partial` beside `path` for a writer that takes a file name (one per call, so
    concurrent writers of one output do not mix their bytes); renamed to `path` when the block ends (os.replace),
    removed on any exception (Ctrl-C included), so `path` is the old file or one writer's whole new one; OS errors
    name `path`. On Windows a target held open by another program is tried again for a few seconds, then the
    finished temporary file is kept and a ReplaceBlockedError names both."""
    path = Path(path)
    if path.is_symlink():  # write through the link, as open() would: the link stays, its target is replaced
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_partial(path)
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        try:
            _replace(tmp, path)
        except PermissionError as e:
            if _on_windows():  # the writer finished: its result outlives a rename that another program blocks
                message = (f"cannot replace {path}: {e.strerror or e} (another program, such as an antivirus or a "
                           f"viewer, may hold it open); the finished file is kept as {tmp}: close that program and "
                           f"rename it to {path.name}")
                raise ReplaceBlockedError(message, tmp, e.errno) from e
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except ReplaceBlockedError:
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
