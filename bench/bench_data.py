"""Per-case read time: decoding the four `.nii.gz` modalities + seg vs reading the preprocessing cache.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_data.py [--shape 240 240 155] [--cases 2] [--runs 3]

Writes full-size synthetic BraTS cases to a temporary folder, prepares the cache, then times, per
case and interleaved: `brats.nifti.load_case` (gzip decode of 5 files) against materialising the
cached float16 image and uint8 label from their memory maps (what a training crop touches is even
less: a memory-mapped crop reads only its own pages). Medians over runs; the OS page cache is warm
for both, so this compares decode cost, not disk speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from brats.cache import open_cache  # noqa: E402
from brats.layout import discover_cases  # noqa: E402
from brats.nifti import load_case  # noqa: E402
from brats.phantom import write_phantom_dataset  # noqa: E402
from brats.prepare import prepare  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        t = time.perf_counter()
        write_phantom_dataset(data, cases=args.cases, val_cases=0, shape=tuple(args.shape), seed=0)
        print(f"wrote {args.cases} case(s) of {tuple(args.shape)} in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        cache = prepare(data, cache_dir, progress=False)
        print(f"prepared the cache in {time.perf_counter() - t:.1f} s ({(time.perf_counter() - t) / args.cases:.1f} s per case)")
        refs = {r.case: r for r in discover_cases(data)}
        cache = open_cache(cache_dir)
        decode, cached, crop = [], [], []
        for _ in range(args.runs):
            for case in refs:
                t = time.perf_counter()
                load_case(refs[case])
                decode.append(time.perf_counter() - t)
                t = time.perf_counter()
                np.array(cache.image(case)), np.array(cache.label(case))
                cached.append(time.perf_counter() - t)
                t = time.perf_counter()
                np.array(cache.image(case)[:, :128, :128, :128]), np.array(cache.label(case)[:128, :128, :128])
                crop.append(time.perf_counter() - t)
        d, c, k = statistics.median(decode), statistics.median(cached), statistics.median(crop)
        meta = cache.meta(cache.cases[0].case)
        print(f"cropped case shape {tuple(meta.shape)} (full {tuple(meta.full_shape)})")
        print(f"per case: .nii.gz decode {d * 1000:.0f} ms | cache read {c * 1000:.1f} ms ({d / c:.0f}x faster)"
              f" | one 128^3 crop from the cache {k * 1000:.1f} ms")


if __name__ == "__main__":
    main()
