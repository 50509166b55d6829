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
