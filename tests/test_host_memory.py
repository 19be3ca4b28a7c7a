"""The admission check counts the process's own memory limits (cgroup v1/v2, RLIMIT_AS), not only the host's free
memory: a capped server or CLI refuses a run it cannot hold, naming the limit, instead of dying in the middle."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_tiny import T5_TINY, TINY_TRANSFORMER, TINY_VAE
from scalekv_core import host_memory
from scalekv_core.host_memory import Cap, cgroup_caps, host_free, rlimit_caps, tightest

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_less_usage_less_reclaimable_cache(tmp_path: Path) -> None:
    """v2: memory.max - (memory.current - inactive_file) at the process's cgroup and each ancestor with a limit;
    "max" is no limit."""
    mount = tmp_path / "cgroup"
    _write(mount, memory_max="max", memory_current="999999999")  # the root: no limit
    _write(mount / "user.slice", memory_max="4000000000", memory_current="3500000000",
           memory_stat="anon 1\ninactive_file 1000000000\nactive_file 5\n")
    _write(mount / "user.slice" / "comfy.scope", memory_max="max", memory_current="10")
    proc = tmp_path / "cgroup_of_self"
    proc.write_text("0::/user.slice/comfy.scope\n")
    caps = cgroup_caps(proc, mount)
    assert [(c.limit, c.free) for c in caps] == [(4_000_000_000, 1_500_000_000)]
    assert caps[0].source.endswith("user.slice/memory.max")


def test_cgroup_v1_memory_controller_and_its_no_limit_value(tmp_path: Path) -> None:
    """v1: the memory controller's line; 2^63 rounded to a page is no limit; total_inactive_file is reclaimable;
    an ancestor's smaller limit binds."""
    mount = tmp_path / "cgroup"
    _write(mount / "memory", memory_limit_in_bytes=str(9223372036854771712), memory_usage_in_bytes="5")
    _write(mount / "memory" / "docker", memory_limit_in_bytes="2000000000", memory_usage_in_bytes="1200000000",
           memory_stat="cache 7\ntotal_inactive_file 200000000\n")
    _write(mount / "memory" / "docker" / "abc", memory_limit_in_bytes="3000000000", memory_usage_in_bytes="1000")
    proc = tmp_path / "cgroup_of_self"
    proc.write_text("9:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n")
    caps = cgroup_caps(proc, mount)
    assert sorted((c.limit, c.free) for c in caps) == [(2_000_000_000, 1_000_000_000), (3_000_000_000, 2_999_999_000)]
    assert tightest(caps).limit == 2_000_000_000


def test_cgroup_inside_a_container_reads_the_mount_itself(tmp_path: Path) -> None:
    """In a container the host's cgroup path does not exist below the mount: the mount is the process's cgroup."""
    mount = tmp_path / "cgroup"
    _write(mount, memory_max="1073741824", memory_current="73741824")
    proc = tmp_path / "cgroup_of_self"
    proc.write_text("0::/kubepods/pod1234/container\n")
    assert [(c.limit, c.free) for c in cgroup_caps(proc, mount)] == [(1 << 30, 1_000_000_000)]


def test_no_cgroup_files_means_no_caps(tmp_path: Path) -> None:
    assert cgroup_caps(tmp_path / "absent", tmp_path) == []
    proc = tmp_path / "cgroup_of_self"
    proc.write_text("0::/\n")
    assert cgroup_caps(proc, tmp_path / "no-mount") == []


def test_host_free_is_the_tightest_of_host_and_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "process_caps", lambda: [Cap("a", 10 << 30, 3 << 30), Cap("b", 8 << 30, 1 << 30)])
    assert host_free(2 << 30) == (1 << 30, Cap("b", 8 << 30, 1 << 30))
    assert host_free(512 * MiB) == (512 * MiB, None)  # the host has less: no cap named
    assert host_memory.host_limit_bytes(64 << 30) == 8 << 30
    monkeypatch.setattr(host_memory, "process_caps", lambda: [])
    assert host_free(5) == (5, None) and host_memory.host_limit_bytes(64 << 30) == 64 << 30


CAPPED = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    import torch
    from scalekv_core import cli
    from scalekv_core.host_memory import rlimit_caps
    size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.RLIM_INFINITY))
    [cap] = [c for c in rlimit_caps() if c.source == "RLIMIT_AS"]
    print("cap", cap.limit - size, cap.free, flush=True)
    sys.exit(cli.main(sys.argv[1:]))
""")


def _capped_generate(tmp_path: Path, headroom: int, batch: int) -> subprocess.CompletedProcess:
    args = ["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--text-encoder",
            str(T5_TINY), "--prompt", "a red fox", "--width", "256", "--height", "256", "--batch", str(batch),
            "--out", str(tmp_path / f"b{batch}.png")]
    return subprocess.run([sys.executable, "-c", CAPPED.format(repo=str(REPO), headroom=headroom), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_generate_under_rlimit_as_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    """A process capped at its size + 1.5 GiB: batch 1 at 256x256 (64 MB planned) draws; batch 32 (a 2 GiB decode
    planned) is refused before sampling, naming the limit, where it used to run into MemoryError midway."""
    headroom = 1536 * MiB
    ok = _capped_generate(tmp_path, headroom, 1)
    assert ok.returncode == 0, ok.stderr[-2000:]
    cap_line = next(line for line in ok.stdout.splitlines() if line.startswith("cap "))
    _, limit_over_size, free = cap_line.split()
    assert int(limit_over_size) == headroom and 0 <= headroom - int(free) < 64 * MiB  # read right after setting it
    assert (tmp_path / "b1.png").exists()
    big = _capped_generate(tmp_path, headroom, 32)
    assert big.returncode == 2, (big.stdout[-1000:], big.stderr[-2000:])
    [err] = big.stderr.strip().splitlines()
    assert err.startswith("error: this run is planned to need 2.0 GiB") and "now 32" in err, err
    # what is free under the cap once the models are loaded (they take address space too)
    assert re.search(r"but cpu \(this process's RLIMIT_AS of \d+\.\d GiB\) has only 1\.[0-4] GiB free", err), err
    assert not list(tmp_path.glob("b32*.png"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_rlimit_caps_are_none_when_unlimited() -> None:
    """This test process sets no limit: nothing to report (the CI's own limits would show here if any)."""
    import resource

    soft_as, _ = resource.getrlimit(resource.RLIMIT_AS)
    soft_data, _ = resource.getrlimit(resource.RLIMIT_DATA)
    expected = (soft_as != resource.RLIM_INFINITY) + (soft_data != resource.RLIM_INFINITY)
    assert len(rlimit_caps()) == expected


def test_available_memory_off_linux(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Windows has no os.sysconf and macOS no SC_AVPHYS_PAGES: psutil's figure is used, else none (no crash)."""
    import sys
    import types

    missing = tmp_path / "no-meminfo"
    monkeypatch.delattr(host_memory.os, "sysconf", raising=False)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    assert host_memory.mem_available_bytes(missing) is None
    fake = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=3 << 30))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert host_memory.mem_available_bytes(missing) == 3 << 30
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(host_memory, "mem_available_bytes", lambda: None)
    monkeypatch.setattr(host_memory, "process_caps", lambda: [])
    assert host_free() == (None, None)
    monkeypatch.setattr(host_memory, "process_caps", lambda: [Cap("c", 4 << 30, 1 << 30)])
    assert host_free() == (1 << 30, Cap("c", 4 << 30, 1 << 30))


def test_admission_without_a_free_figure_checks_nothing() -> None:
    from scalekv_core.kvcache.memory import admission_problem

    assert admission_problem(1e9, 1e9, None, "cpu", 1) is None
    assert "only" in admission_problem(1e9, 1e9, 1 << 20, "cpu", 1)
