"""Where a policy's sampling time goes on a GPU: wall time against kernel time and launch count, per policy.

    python scripts/profile_kv.py --model 2b --size 1M --policies full,scalekv --budget 10%

Explains the benchmark's time ratios: when the kernels' busy time is far below the wall time, sampling is bound by
Python and kernel launches, and every extra launch of an eviction policy costs wall time, however small its work.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalekv_core.bench.kv import _load  # noqa: E402
from scalekv_core.kvcache import CacheConfig  # noqa: E402
from scalekv_core.sampler import SamplerSettings, sample  # noqa: E402
from scalekv_core.schedules import get_schedule  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="2b")
    p.add_argument("--size", default="1M")
    p.add_argument("--policies", default="full,scalekv")
    p.add_argument("--budget", default="10%")
    p.add_argument("--scoring", default="improved")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--top", type=int, default=12, help="rows of the per-op table for the last policy")
    a = p.parse_args()
    args = argparse.Namespace(model=a.model, depth=0, device="cuda", dtype=a.dtype, seed=0)
    model, cond, patchify = _load(args)
    schedule = get_schedule(1.0, a.size)
    settings = SamplerSettings(cfg=3.0, tau=1.0, seed=0)
    print(f"{'policy':<16}{'wall s':>8}{'kernels s':>11}{'busy %':>8}{'launches':>10}  (wall time under the profiler)",
          flush=True)
    for policy in a.policies.split(","):
        config = CacheConfig(policy=policy, budget=None if policy == "full" else a.budget, scoring=a.scoring)
        sample(model, cond, schedule, settings, patchify, cache_config=config)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            sample(model, cond, schedule, settings, patchify, cache_config=config)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6
        print(f"{policy:<16}{wall:>8.3f}{busy:>11.3f}{100 * busy / wall:>8.1f}{len(kernels):>10}", flush=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
