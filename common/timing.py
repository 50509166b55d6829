"""Wall-clock timing shared by the INT8 per-layer decisions, the report and the benches."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time (s) of `runs` calls of `fn`, after `warmup` untimed calls."""
    return interleaved_medians({"fn": fn}, runs, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each of `fns` over `runs` rounds that call every one in turn (A B A B ...),
    so that a machine getting slower or faster hits all alike; `warmup` untimed rounds first."""
    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def micro_bench_args(doc: str, runs: int = 7):
    """The shared command line of the operator micro-benchmarks (`bench/bench_layout.py`,
    `bench/bench_upsample.py`): --runs and --threads parsed, torch's threads set, and the conditions
    printed (threads, OMP_WAIT_POLICY, rounds). Returns the parsed arguments."""
    import argparse
    import os

    import torch

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=runs, help=f"timed rounds (default {runs})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"interleaved, median of {args.runs} after a warm-up round")
    return args
