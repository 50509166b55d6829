"""Wall-clock timing shared by the INT8 per-layer decisions and the report."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    """Median wall time (s) of `runs` calls of `fn`, after `warmup` untimed calls."""
    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
