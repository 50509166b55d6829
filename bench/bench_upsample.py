"""Trilinear upsampling on CPU: F.interpolate (default and channels_last_3d layouts) vs `model.resample`'s
three 1-D matrix products, for the shapes the decoders upsample.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_upsample.py [--runs 7] [--threads N]

Per shape: the three ways interleaved (A B C A B C ...), median of --runs after one warm-up round, ms,
and the largest |difference| between the matrix products and F.interpolate. Rows: the logits of a
head at 1/4 resolution (3 channels, 32^3 -> 128^3, and 24^3 -> 96^3), a full-resolution refine tail
(16 channels), the decoder's fused stage outputs (24 and 64 channels at 4^3-16^3 -> 32^3).

Measured on this project's VM (`python bench/bench_upsample.py --runs 5`; Intel Xeon @ 2.80GHz, AVX-512
VNNI, 2 threads, while another job used the cores: absolute times high, the ratios are the point), ms:

    shape                  interpolate channels_last_3d  matrices  max|diff|
    3 x 32^3 -> 128^3             51.4            107.8       7.5  7.2e-07
    3 x 24^3 -> 96^3              33.3             61.0       4.3  7.2e-07
    16 x 32^3 -> 128^3           448.9            116.3     150.0  7.2e-07
    24 x 16^3 -> 32^3             10.3              1.3       1.3  4.8e-07
    24 x 8^3 -> 32^3              10.9              1.3       0.9  4.8e-07
    24 x 4^3 -> 32^3              10.6              1.4       0.8  7.2e-07
    64 x 16^3 -> 32^3             29.5              2.5       3.8  4.8e-07

So `model.resample.upsample` uses the matrices for the 3 logit channels only and leaves more channels
to F.interpolate, which the inference rewrites (`model.rewrites`) hand channels_last_3d tensors: the
re-associated decoder's fused stage outputs and the refine tail's 16 channels.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.timing import interleaved_medians, micro_bench_args  # noqa: E402
from model.resample import separable_trilinear  # noqa: E402

SHAPES = [(3, 32, 128), (3, 24, 96), (16, 32, 128), (24, 16, 32), (24, 8, 32), (24, 4, 32), (64, 16, 32)]


def main() -> None:
    args = micro_bench_args(__doc__)
    print(f"{'shape':<22} {'interpolate':>11} {'channels_last_3d':>16} {'matrices':>9}  max|diff|")
    torch.manual_seed(0)
    with torch.inference_mode():
        for c, n_in, n_out in SHAPES:
            x = torch.randn(1, c, n_in, n_in, n_in)
            xl = x.contiguous(memory_format=torch.channels_last_3d)
            size = (n_out,) * 3
            ms = interleaved_medians({
                "interpolate": lambda: F.interpolate(x, size=size, mode="trilinear", align_corners=False),
                "cl": lambda: F.interpolate(xl, size=size, mode="trilinear", align_corners=False),
                "matrices": lambda: separable_trilinear(x, size),
            }, args.runs)
            diff = float((separable_trilinear(x, size) - F.interpolate(x, size=size, mode="trilinear",
                                                                       align_corners=False)).abs().max())
            print(f"{f'{c} x {n_in}^3 -> {n_out}^3':<22} {ms['interpolate'] * 1e3:11.1f} {ms['cl'] * 1e3:16.1f} "
                  f"{ms['matrices'] * 1e3:9.1f}  {diff:.1e}")


if __name__ == "__main__":
    main()
