"""What this process may still allocate in host memory: the host's MemAvailable, capped by the process's own
limits (its memory cgroup, v1 or v2, and RLIMIT_AS / RLIMIT_DATA), so a capped server refuses a run it cannot hold
instead of running out of memory in the middle of it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: A cgroup v1 limit at or above this is "no limit" (the kernel writes 2^63 rounded down to a page).
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Cap:
    """One limit on the process's memory: what sets it, its size and how much of it is still free, in bytes."""

    source: str
    limit: int
    free: int


def _read_int(path: Path) -> int | None:
    """A file holding one integer (or "max"), as the cgroup files do; None when absent, unreadable or "max"."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    """One field of a cgroup memory.stat file (0 when absent): reclaimable page cache is not a limit's use."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(root: Path, relative: str) -> list[Path]:
    """The process's cgroup folder and its ancestors up to the mount (each may carry its own limit). Inside a
    container the mount is often the process's own cgroup, so the relative path may not exist below it."""
    parts = [p for p in relative.strip().split("/") if p and p != ".."]
    dirs = [root.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [root]


def cgroup_caps(proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> list[Cap]:
    """The memory limits of the process's cgroups (v2 `memory.max`, v1 `memory.limit_in_bytes`) with what each
    has free: the limit less the usage, less the inactive page cache the kernel reclaims before it fails."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    caps = []
    for line in lines:
        _, controllers, relative = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2 (the unified hierarchy)
            for d in _cgroup_dirs(mount, relative):
                limit = _read_int(d / "memory.max")
                used = _read_int(d / "memory.current")
                if limit is None or used is None:
                    continue
                used -= _stat_value(d / "memory.stat", "inactive_file")
                caps.append(Cap(f"cgroup {d / 'memory.max'}", limit, max(limit - max(used, 0), 0)))
        elif "memory" in controllers.split(","):  # cgroup v1
            for d in _cgroup_dirs(mount / "memory", relative):
                limit = _read_int(d / "memory.limit_in_bytes")
                used = _read_int(d / "memory.usage_in_bytes")
                if limit is None or used is None or limit >= _UNLIMITED:
                    continue
                used -= _stat_value(d / "memory.stat", "total_inactive_file")
                caps.append(Cap(f"cgroup {d / 'memory.limit_in_bytes'}", limit, max(limit - max(used, 0), 0)))
    return caps


def _status_kib(key: str, status: Path = Path("/proc/self/status")) -> int | None:
    """A `VmSize:`-style line of /proc/self/status, in KiB."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rlimit_caps(status: Path = Path("/proc/self/status")) -> list[Cap]:
    """RLIMIT_AS against the address space in use (VmSize) and RLIMIT_DATA against the data in use (VmData), where
    set: every allocation counts against them, page cache does not."""
    try:
        import resource
    except ImportError:  # not on Windows
        return []
    caps = []
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        used = _status_kib(field, status)
        if soft == resource.RLIM_INFINITY or soft < 0 or used is None:
            continue
        caps.append(Cap(name, int(soft), max(int(soft) - used * 1024, 0)))
    return caps


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's available memory (Linux's MemAvailable: what the kernel can hand out without swapping), else
    psutil's figure (Windows, macOS; ComfyUI ships psutil), else the free pages; None when nothing tells it."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no figure on this platform
        pass
    try:  # os.sysconf is missing on Windows, and macOS has no SC_AVPHYS_PAGES
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def process_caps() -> list[Cap]:
    """Every limit on this process's memory that is set: its cgroups and resource limits."""
    return cgroup_caps() + rlimit_caps()


def tightest(caps: list[Cap]) -> Cap | None:
    """The cap with the least free memory, which a run meets first."""
    return min(caps, key=lambda c: c.free, default=None)


def host_free(reported: int | None = None) -> tuple[int | None, Cap | None]:
    """What a run may still take in host memory: `reported` (the host's free memory as a caller knows it, e.g.
    ComfyUI's; the available memory when not given), or less when one of the process's own limits has less free,
    with that limit (None when the host's free memory is the bound). The figure is None where neither is known."""
    free = mem_available_bytes() if reported is None else reported
    cap = tightest(process_caps())
    if cap is None or (free is not None and cap.free >= free):
        return free, None
    return cap.free, cap


def where_label(device: str, cap: Cap | None) -> str:
    """The device an admission message names, with the process limit that bounds it, if any."""
    return device if cap is None else f"{device} (this process's {cap.source} of {cap.limit / 2**30:.1f} GiB)"


def host_limit_bytes(host_total: int) -> int:
    """The host memory this process can ever hold: the machine's total, or less when its own limits are smaller."""
    limits = [c.limit for c in process_caps()]
    return min([host_total, *limits])
