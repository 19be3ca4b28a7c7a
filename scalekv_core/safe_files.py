"""Reading user-named files without surprises: regular files only, never more than a stated number of bytes.

A path a user (or a downloaded folder) names can be a FIFO (opening it blocks until a writer appears), a device
such as /dev/zero (reading it never ends), a folder, or a symlink to any of these. Everything here checks the
file type with `stat` before opening, opens non-blocking and checks again on the open descriptor, and caps what
is read, so such a path is an error that names it instead of a hang or an exhausted memory.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

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
