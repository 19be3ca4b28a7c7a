"""The command line's error table: every user error exits 2 with one line on stderr, `error: ...`, naming the
flag, value or file, with no traceback; values, input files and output paths are checked before any model loads.

Each case runs `main([...])` in-process (fast); a few run `python -m scalekv_core` end to end. Cases that must
be refused before any work replace `InfinityPipeline.from_files` with a trap that fails the test if called.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_tiny import FULL_KV, T5_TINY, TINY_TRANSFORMER, TINY_VAE
from scalekv_core import cli, cli_args
from scalekv_core.pipeline import InfinityPipeline

REPO = Path(__file__).resolve().parent.parent
TEXT_KV = FULL_KV / "p1_spaceship_s99_cfg4_tau1" / "text_kv_compact.npy"
T5_SINGLE = T5_TINY / "model.safetensors"  # the tiny folder's weights file: a single-file T5 on its own


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@dataclass
class Env:
    """Files the cases point at, made fresh in each test's tmp_path."""

    tmp: Path

    def __post_init__(self) -> None:
        t = self.tmp
        self.out = t / "img.png"
        self.fifo = t / "pipe"
        os.mkfifo(self.fifo)
        self.folder = t / "a_folder"
        self.folder.mkdir()
        self.file = t / "a_file"
        self.file.write_text("not a folder")
        self.kv512 = t / "kv_512_channels.npy"
        np.save(self.kv512, np.zeros((5, 512), np.float32))
        self.kv_objects = t / "kv_objects.npy"
        np.save(self.kv_objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        data = TEXT_KV.read_bytes()  # a version 1.0 .npy: magic, 2-byte header length, header, data
        length = int.from_bytes(data[8:10], "little")
        lying = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2000000000, 256), }"
        self.kv_lying = t / "kv_lying.npy"
        self.kv_lying.write_bytes(data[:10] + lying.ljust(length - 1) + b"\n" + data[10 + length:])
        self.kv_garbled = t / "kv_garbled.npy"
        self.kv_garbled.write_bytes(data[:10] + b"{'descr': '<f4', 'shape': (7, }".ljust(length - 1) + b"\n"
                                    + data[10 + length:])
        self.not_json = t / "budget_not_json.json"
        self.not_json.write_text("{not json")
        self.prompts_empty = t / "prompts_empty.txt"
        self.prompts_empty.write_text("\n \n")
        self.prompts_binary = t / "prompts_binary.txt"
        self.prompts_binary.write_bytes(b"a red apple\n\xff\xfe\n")
        self.prompts = t / "prompts.txt"
        self.prompts.write_text("a red apple\n")
        self.corrupt = t / "corrupt_model.safetensors"
        self.corrupt.write_bytes(TINY_TRANSFORMER.read_bytes()[:1000])
        self.marker = t / "code_ran"
        self._readonly: Path | None | bool = False

    @property
    def t5_evil(self) -> Path:
        folder = self.tmp / "t5_evil"
        if not folder.exists():
            shutil.copytree(T5_TINY, folder)
            (folder / "model.safetensors").unlink()
            sd: dict = dict(load_file(str(T5_TINY / "model.safetensors")))
            sd["evil"] = _RunsCode(self.marker)
            torch.save(sd, folder / "pytorch_model.bin")
        return folder

    @property
    def readonly(self) -> Path:
        """A folder this process cannot create files in: chmod 555, or (as root) a sysfs folder."""
        if self._readonly is False:
            ro = self.tmp / "read_only"
            ro.mkdir()
            ro.chmod(0o555)
            self._readonly = ro if not _can_create_in(ro) else next(
                (Path(p) for p in ("/sys/kernel", "/sys") if os.path.isdir(p) and not _can_create_in(Path(p))), None)
        if self._readonly is None:
            pytest.skip("no folder here is read-only for this user")
        return self._readonly  # type: ignore[return-value]


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def _gen(e: Env, *extra: str, kv: str | Path | None = TEXT_KV) -> list[str]:
    args = ["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--width", "256",
            "--height", "256", "--out", str(e.out)]
    if kv is not None:
        args += ["--text-kv", str(kv)]
    return args + [str(x) for x in extra]


def _t5(e: Env, *extra: str) -> list[str]:
    return _gen(e, "--text-encoder", T5_TINY, "--prompt", "a red apple", *extra, kv=None)


def _cal(e: Env, *extra: str, prompts: Path | str | None = None) -> list[str]:
    return ["calibrate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--text-encoder",
            str(T5_TINY), "--prompts", str(prompts or e.prompts), "--width", "256", "--height", "256",
            "--budget", "48", "--window", "4", "--out", str(e.tmp / "budget.json"), *map(str, extra)]


@dataclass
class Case:
    argv: Callable[[Env], list[str]]
    names: Callable[[Env], list[str]]  # what the one line must contain (the flag, the value, the file)
    loads: bool = False  # the error can only be found once the model is loaded
    fifo: bool = False  # run under a deadline; a blocked reader is released through env.fifo
    needs_no_cuda: bool = False
    extra: dict = field(default_factory=dict)


CASES: dict[str, Case] = {
    # numbers, through LIMITS while parsing
    "cfg_nan": Case(lambda e: _gen(e, "--cfg", "nan"), lambda e: ["--cfg", "nan"]),
    "cfg_list_with_nan": Case(lambda e: _gen(e, "--cfg", "3,3,nan"), lambda e: ["--cfg[2]", "nan"]),
    "cfg_list_empty_element": Case(lambda e: _gen(e, "--cfg", "3,,3"), lambda e: ["--cfg[1]", "''"]),
    "cfg_negative": Case(lambda e: _gen(e, "--cfg", "-3"), lambda e: ["--cfg", "-3"]),
    "cfg_list_wrong_length": Case(lambda e: _gen(e, "--cfg", "3,3"), lambda e: ["--cfg", "2 values", "7 scales"]),
    "cfg_list_huge": Case(lambda e: _gen(e, "--cfg", ",".join(["3"] * 100_000)), lambda e: ["--cfg", "100000 values"]),
    "tau_zero": Case(lambda e: _gen(e, "--tau", "0"), lambda e: ["--tau", "0"]),
    "tau_list_inf": Case(lambda e: _gen(e, "--tau", "1,1,1,1,1,1,inf"), lambda e: ["--tau[6]", "inf"]),
    "top_k_negative": Case(lambda e: _gen(e, "--top-k", "-1"), lambda e: ["--top-k", "-1"]),
    "top_p_2": Case(lambda e: _gen(e, "--top-p", "2"), lambda e: ["--top-p", "2"]),
    "seed_below_int64": Case(lambda e: _gen(e, "--seed", str(-(2**63) - 1)), lambda e: ["--seed", str(-(2**63) - 1)]),
    "seed_2_64": Case(lambda e: _gen(e, "--seed", str(2**64)), lambda e: ["--seed", str(2**64)]),  # past uint64
    "seed_text": Case(lambda e: _gen(e, "--seed", "lucky"), lambda e: ["--seed", "lucky"]),
    "width_huge": Case(lambda e: _gen(e, "--width", "100000"), lambda e: ["--width", "100000"]),
    "width_float": Case(lambda e: _gen(e, "--width", "256.5"), lambda e: ["--width", "256.5"]),
    "resolution_aspect": Case(lambda e: _gen(e, "--width", "64", "--height", "8000"), lambda e: ["64x8000"]),
    "batch_100000": Case(lambda e: _gen(e, "--batch", "100000"), lambda e: ["--batch", "100000"]),
    "batch_0": Case(lambda e: _gen(e, "--batch", "0"), lambda e: ["--batch", "0"]),
    "threads_negative": Case(lambda e: _gen(e, "--threads", "-1"), lambda e: ["--threads", "-1"]),
    "kernel_1001": Case(lambda e: _gen(e, "--kernel", "1001"), lambda e: ["--kernel", "1001"]),
    "kernel_even": Case(lambda e: _gen(e, "--kernel", "4"), lambda e: ["--kernel", "4", "odd"]),
    "window_0": Case(lambda e: _gen(e, "--window", "0"), lambda e: ["--window", "0"]),
    "refiner_decay_negative": Case(lambda e: _gen(e, "--refiner-decay", "-5"), lambda e: ["--refiner-decay", "-5"]),
    # budgets
    "budget_inf": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget", "inf"), lambda e: ["--budget", "inf"]),
    "budget_nan_percent": Case(lambda e: _gen(e, "--budget", "nan%"), lambda e: ["--budget", "nan%"]),
    "budget_101_percent": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget", "101%"),
                               lambda e: ["--budget", "101%"]),
    "budget_0_percent": Case(lambda e: _gen(e, "--budget", "0%"), lambda e: ["--budget", "0%"]),
    "budget_negative_mb": Case(lambda e: _gen(e, "--budget=-5MB"), lambda e: ["--budget", "-5MB"]),
    "budget_words": Case(lambda e: _gen(e, "--budget", "lots"), lambda e: ["--budget", "lots"]),
    "budget_below_window": Case(lambda e: _gen(e, "--kv-policy", "snapkv", "--budget", "5"),
                                lambda e: ["--budget 5", "window"]),
    "budget_file_folder": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", e.folder),
                               lambda e: [str(e.folder), "folder"]),
    "budget_file_dev_zero": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", "/dev/zero"),
                                 lambda e: ["/dev/zero", "character device"]),
    "budget_file_fifo": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", e.fifo),
                             lambda e: [str(e.fifo), "FIFO"], fifo=True),
    "budget_file_missing": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", e.tmp / "gone.json"),
                                lambda e: ["gone.json", "not found"]),
    "budget_file_not_json": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", e.not_json),
                                 lambda e: [str(e.not_json), "malformed JSON"]),
    "budget_file_unknown_preset": Case(lambda e: _gen(e, "--kv-policy", "scalekv", "--budget-file", "nopreset"),
                                       lambda e: ["nopreset"]),
    "budget_file_with_snapkv": Case(lambda e: _gen(e, "--kv-policy", "snapkv", "--budget-file", "x.json"),
                                    lambda e: ["--budget-file", "x.json", "snapkv"]),
    "kv_policy_unknown": Case(lambda e: _gen(e, "--kv-policy", "h2o"), lambda e: ["--kv-policy", "h2o"]),
    # devices
    "device_cuda_without_gpu": Case(lambda e: _gen(e, "--device", "cuda"), lambda e: ["--device", "'cuda'"],
                                    needs_no_cuda=True),
    "device_cuda_99": Case(lambda e: _gen(e, "--device", "cuda:99"), lambda e: ["--device", "'cuda:99'"]),
    "device_bogus": Case(lambda e: _gen(e, "--device", "bogus"), lambda e: ["--device", "'bogus'"]),
    "device_meta": Case(lambda e: _gen(e, "--device", "meta"), lambda e: ["--device", "'meta'"]),
    # texts
    "prompt_lone_surrogate": Case(lambda e: _t5(e, "--prompt", "a red \ud800 apple"),
                                  lambda e: ["--prompt", "surrogate", "\\ud800"]),
    "prompt_too_long": Case(lambda e: _t5(e, "--prompt", "z" * 60_000), lambda e: ["--prompt", "60000"]),
    "prompt_empty": Case(lambda e: _t5(e, "--prompt", "  "), lambda e: ["--prompt", "empty"]),
    "negative_prompt_nul": Case(lambda e: _t5(e, "--negative-prompt", "no\x00pe"),
                                lambda e: ["--negative-prompt", "NUL"]),
    "prompt_with_text_kv": Case(lambda e: _gen(e, "--prompt", "a red apple"),
                                lambda e: ["--prompt", "--text-kv", str(TEXT_KV), "one of them"]),
    "prompt_with_text_kv_and_t5": Case(lambda e: _gen(e, "--prompt", "a red apple", "--text-encoder", T5_TINY),
                                       lambda e: ["--prompt", "--text-kv", "one of them"]),
    "no_text_source": Case(lambda e: _gen(e, "--prompt", "x", kv=None), lambda e: ["--text-encoder", "--text-kv"]),
    "missing_required_flag": Case(lambda e: ["generate", "--transformer", "x"], lambda e: ["--vae"]),
    "unknown_flag": Case(lambda e: _gen(e, "--colour", "red"), lambda e: ["--colour"]),
    # output paths, before any work
    "out_under_a_file": Case(lambda e: _gen(e, "--out", e.file / "x.png"), lambda e: [str(e.file / "x.png")]),
    "out_etc_hostname": Case(lambda e: _gen(e, "--out", "/etc/hostname/x.png"), lambda e: ["/etc/hostname/x.png"],
                             extra={"needs": "/etc/hostname"}),
    "out_is_a_folder": Case(lambda e: _gen(e, "--out", e.folder), lambda e: ["--out", str(e.folder), "folder"]),
    "out_is_a_fifo": Case(lambda e: _gen(e, "--out", e.fifo), lambda e: ["--out", str(e.fifo), "FIFO"]),
    "out_unknown_image_type": Case(lambda e: _gen(e, "--out", e.tmp / "img.xyz"), lambda e: ["img.xyz", ".xyz"]),
    "out_read_only_folder": Case(lambda e: _gen(e, "--out", e.readonly / "sub" / "x.png"),
                                 lambda e: ["--out", str(e.readonly / "sub" / "x.png")]),
    "dump_read_only_folder": Case(lambda e: _gen(e, "--dump", e.readonly / "dump"),
                                  lambda e: ["--dump", str(e.readonly / "dump")]),
    "dump_is_a_file": Case(lambda e: _gen(e, "--dump", e.file), lambda e: ["--dump", str(e.file)]),
    "memory_report_read_only_folder": Case(lambda e: _gen(e, "--memory-report", e.readonly / "mem.json"),
                                           lambda e: ["--memory-report", str(e.readonly / "mem.json")]),
    "memory_report_under_a_file": Case(lambda e: _gen(e, "--memory-report", e.file / "mem.json"),
                                       lambda e: ["--memory-report", str(e.file)]),
    # input files
    "text_kv_wrong_width": Case(lambda e: _gen(e, kv=e.kv512), lambda e: ["--text-kv", str(e.kv512), "512", "256"],
                                loads=True),
    "text_kv_dev_zero": Case(lambda e: _gen(e, kv="/dev/zero"), lambda e: ["/dev/zero", "--text-kv"]),
    "text_kv_fifo": Case(lambda e: _gen(e, kv=e.fifo), lambda e: [str(e.fifo), "FIFO"], fifo=True),
    "text_kv_folder": Case(lambda e: _gen(e, kv=e.folder), lambda e: [str(e.folder), "folder"]),
    "text_kv_missing": Case(lambda e: _gen(e, kv=e.tmp / "gone.npy"), lambda e: ["gone.npy"]),
    "text_kv_pickled_objects": Case(lambda e: _gen(e, kv=e.kv_objects), lambda e: [str(e.kv_objects), "objects"]),
    "text_kv_header_lies": Case(lambda e: _gen(e, kv=e.kv_lying), lambda e: [str(e.kv_lying), "2000000000"]),
    "text_kv_garbled_header": Case(lambda e: _gen(e, kv=e.kv_garbled), lambda e: ["--text-kv", str(e.kv_garbled)]),
    "text_kv_not_npy": Case(lambda e: _gen(e, kv=e.file), lambda e: ["--text-kv", str(e.file)]),
    "t5_bin_carries_code": Case(lambda e: _gen(e, "--text-encoder", e.t5_evil, "--prompt", "x", kv=None),
                                lambda e: [str(e.t5_evil / "pytorch_model.bin"), "pickled code"], loads=True),
    "t5_tokenizer_dev_zero": Case(lambda e: _gen(e, "--text-encoder", T5_SINGLE, "--t5-tokenizer", "/dev/zero",
                                                 "--prompt", "x", kv=None),
                                  lambda e: ["model.safetensors", "/dev/zero", "not a folder"], loads=True),
    "t5_tokenizer_fifo": Case(lambda e: _gen(e, "--text-encoder", T5_SINGLE, "--t5-tokenizer", e.fifo, "--prompt",
                                             "x", kv=None),
                              lambda e: [str(e.fifo), "not a folder"], loads=True, fifo=True),
    "t5_tokenizer_is_a_file": Case(lambda e: _gen(e, "--text-encoder", T5_SINGLE, "--t5-tokenizer", e.file,
                                                  "--prompt", "x", kv=None),
                                   lambda e: [str(e.file), "not a folder"], loads=True),
    "t5_tokenizer_empty_folder": Case(lambda e: _gen(e, "--text-encoder", T5_SINGLE, "--t5-tokenizer", e.folder,
                                                     "--prompt", "x", kv=None),
                                      lambda e: [str(e.folder), "no tokenizer", "spiece.model"], loads=True),
    "t5_tokenizer_path_too_long": Case(lambda e: _gen(e, "--text-encoder", T5_SINGLE, "--t5-tokenizer",
                                                      "/tmp/" + "t" * 20_000, "--prompt", "x", kv=None),
                                       lambda e: ["tokenizer folder", "model.safetensors", "too long"], loads=True),
    "t5_folder_missing": Case(lambda e: _gen(e, "--text-encoder", e.tmp / "no_t5", "--prompt", "x", kv=None),
                              lambda e: ["no_t5"], loads=True),
    "transformer_fifo": Case(lambda e: _gen(e, "--transformer", e.fifo), lambda e: [str(e.fifo), "FIFO"],
                             loads=True, fifo=True),
    "transformer_corrupt": Case(lambda e: _gen(e, "--transformer", e.corrupt), lambda e: [str(e.corrupt)], loads=True),
    "transformer_missing": Case(lambda e: _gen(e, "--transformer", e.tmp / "gone.pth"), lambda e: ["gone.pth"],
                                loads=True),
    "vae_dev_zero": Case(lambda e: _gen(e, "--vae", "/dev/zero"), lambda e: ["/dev/zero"], loads=True),
    # plan
    "plan_batch_0": Case(lambda e: ["plan", "--batch", "0"], lambda e: ["--batch", "0"]),
    "plan_width_nan": Case(lambda e: ["plan", "--width", "nan"], lambda e: ["--width", "nan"]),
    "plan_budget_inf": Case(lambda e: ["plan", "--budget", "inf"], lambda e: ["--budget", "inf"]),
    "plan_budget_file_dev_zero": Case(lambda e: ["plan", "--budget-file", "/dev/zero"], lambda e: ["/dev/zero"]),
    # calibrate
    "calibrate_prompts_folder": Case(lambda e: _cal(e, prompts=e.folder), lambda e: [str(e.folder), "folder"]),
    "calibrate_prompts_dev_zero": Case(lambda e: _cal(e, prompts="/dev/zero"), lambda e: ["/dev/zero", "--prompts"]),
    "calibrate_prompts_fifo": Case(lambda e: _cal(e, prompts=e.fifo), lambda e: [str(e.fifo), "FIFO"], fifo=True),
    "calibrate_prompts_missing": Case(lambda e: _cal(e, prompts=e.tmp / "gone.txt"), lambda e: ["gone.txt"]),
    "calibrate_prompts_empty": Case(lambda e: _cal(e, prompts=e.prompts_empty),
                                    lambda e: [str(e.prompts_empty), "no prompts"]),
    "calibrate_prompts_not_utf8": Case(lambda e: _cal(e, prompts=e.prompts_binary),
                                       lambda e: [str(e.prompts_binary), "UTF-8"]),
    "calibrate_out_read_only": Case(lambda e: _cal(e, "--out", e.readonly / "b.json"),
                                    lambda e: ["--out", str(e.readonly / "b.json")]),
    "calibrate_budget_never_compresses": Case(lambda e: _cal(e, "--budget", "100%"),
                                              lambda e: ["--budget 100%", "never compresses"]),
    "calibrate_budget_mb": Case(lambda e: _cal(e, "--budget", "1MB"),
                                lambda e: ["--budget", "'1MB'", "'10%'", "tokens"]),
    "calibrate_budget_words": Case(lambda e: _cal(e, "--budget", "lots"),
                                   lambda e: ["--budget", "'lots'", "tokens ('650')"]),
    "calibrate_num_drafters_negative": Case(lambda e: _cal(e, "--num-drafters", "-1"),
                                            lambda e: ["--num-drafters", "-1"]),
    "calibrate_topk_fraction_0": Case(lambda e: _cal(e, "--topk-fraction", "0"), lambda e: ["--topk-fraction", "0"]),
    "calibrate_max_queries_0": Case(lambda e: _cal(e, "--max-queries", "0"), lambda e: ["--max-queries", "0"]),
    # convert
    "convert_dst_under_a_file": Case(lambda e: ["convert", str(TINY_TRANSFORMER), str(e.file / "x.safetensors")],
                                     lambda e: [str(e.file / "x.safetensors")]),
    "convert_src_fifo": Case(lambda e: ["convert", str(e.fifo), str(e.tmp / "x.safetensors")],
                             lambda e: [str(e.fifo), "FIFO"], fifo=True),
    "convert_src_pickle_with_code": Case(lambda e: ["convert", str(_evil_pth(e)), str(e.tmp / "x.safetensors")],
                                         lambda e: ["evil.pth", "pickled code"]),
}


def _evil_pth(e: Env) -> Path:
    path = e.tmp / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _RunsCode(e.marker)}, path)
    return path


def _run_main(argv: list[str], fifo: Path | None) -> int:
    if fifo is None:
        return cli.main(argv)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(rc=cli.main(argv)), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader, then fail
        thread.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return out["rc"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_error_is_one_line_naming_the_value(tmp_path, monkeypatch, capsys, case) -> None:
    spec = CASES[case]
    if spec.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    if "needs" in spec.extra and not os.path.isfile(spec.extra["needs"]):
        pytest.skip(f"{spec.extra['needs']} is not a file here")
    env = Env(tmp_path)
    argv = spec.argv(env)
    if not spec.loads:
        def trap(*args, **kwargs):
            raise AssertionError("the model was loaded before the bad input was refused")
        monkeypatch.setattr(InfinityPipeline, "from_files", classmethod(trap))
    start = time.monotonic()
    rc = _run_main(argv, env.fifo if spec.fifo else None)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, (rc, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err
    for name in spec.names(env):
        assert name in lines[0], (name, lines[0])
    assert len(lines[0]) <= cli_args.MAX_ERROR_CHARS + 20  # a 20 MB value is never echoed in full
    assert captured.out == ""
    assert not env.out.exists() and not env.marker.exists()
    if not spec.loads:
        assert time.monotonic() - start < 10


def _subprocess(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "scalekv_core", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    return r, time.monotonic() - start


@pytest.mark.parametrize("case", ["cfg_list_with_nan", "out_under_a_file", "t5_bin_carries_code",
                                  "budget_file_dev_zero"])
def test_cli_error_end_to_end_has_no_traceback(tmp_path, case) -> None:
    env = Env(tmp_path)
    spec = CASES[case]
    r, seconds = _subprocess(*spec.argv(env))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for name in spec.names(env):
        assert name in lines[0]
    assert r.stdout == "" and not env.out.exists() and not env.marker.exists()


def test_a_good_run_still_works_and_checks_leave_no_trace(tmp_path) -> None:
    """Control: the same flags with good values generate; the write checks leave no probe files behind."""
    out = tmp_path / "deep" / "er" / "img.png"
    rc = cli.main(_gen(Env(tmp_path), "--out", out, "--dump", tmp_path / "dump", "--memory-report",
                       tmp_path / "mem" / "m.json", "--cfg", "4,4,4,4,4,4,4", "--kv-policy", "scalekv", "--budget",
                       "50", "--window", "4"))
    assert rc == 0 and out.exists() and (tmp_path / "dump" / "image.png").exists()
    assert (tmp_path / "mem" / "m.json").exists()
    assert not list(tmp_path.rglob(".scalekv-write-check-*"))


def test_generate_refuses_a_run_larger_than_free_memory(monkeypatch, capsys, tmp_path) -> None:
    """The admission check: the planned peak against the device's free memory, before sampling; an override."""
    from scalekv_core import pipeline
    from scalekv_core.cli import main

    monkeypatch.setattr(pipeline, "free_memory", lambda device: (1 << 20, str(device)))  # 1 MiB free
    args = ["generate", "--transformer", str(TINY_TRANSFORMER), "--vae", str(TINY_VAE), "--text-encoder", str(T5_TINY),
            "--prompt", "a red fox", "--width", "256", "--height", "256", "--batch", "2",
            "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: this run is planned to need") and "now 2" in err[0]
    assert "--no-memory-check" in err[0] and not (tmp_path / "x_00.png").exists()
    assert main(args + ["--no-memory-check"]) == 0
    assert (tmp_path / "x_00.png").exists()


def test_calibrate_help_says_the_budget_forms_it_takes() -> None:
    """The help said MB works while calibrate refused every MB budget."""
    calibrate = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["calibrate"]
    budget = next(a for a in calibrate._actions if a.dest == "budget")
    assert "not MB" in budget.help and "tokens" in budget.help
