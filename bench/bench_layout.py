"""Token -> grid views and Conv3d speed on CPU: `transpose(1, 2).reshape` against `model.refineformer3d.tokens_to_grid`.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_layout.py [--runs 7] [--threads N]

The encoder keeps tokens (B, N, C) and hands Conv3d layers (depthwise Mix-FFN convs, spatial
reduction, patch embeddings, the decoder's convs) a (B, C, D, H, W) grid view of them. Both views
below hold the same values in the same memory; they differ only in the batch stride when B = 1,
which decides whether ATen runs the conv channels-last or first copies the input to the default
layout. Per conv and batch size: both interleaved (A B A B ...), median of --runs after a warm-up, ms.

Measured on this project's VM (`python bench/bench_layout.py --runs 5`; Intel Xeon @ 2.80GHz, AVX-512
VNNI, 2 threads, while another job used the cores: absolute times high, the ratios are the point), ms:

    conv                                B  transpose.reshape  tokens_to_grid
    depthwise 3^3, 32 ch, 32^3          1              18.10            3.11
    depthwise 3^3, 32 ch, 32^3          2               2.36            2.28
    depthwise 3^3, 64 ch, 16^3          1               1.63            0.62
    depthwise 3^3, 64 ch, 16^3          2               0.55            0.63
    patch embed 8->16 3^3/2, 32^3       1               4.13            4.63
    patch embed 8->16 3^3/2, 32^3       2               0.99            0.94
    reduction 8->8 8^3/8, 32^3          1               0.78            0.40
    reduction 8->8 8^3/8, 32^3          2               0.53            0.55

Whole model, batch 1, 128^3 (/tmp script importing the model module before and after the change in one
process, interleaved, median of 5, same machine and load): demo low-rank student 243.9 -> 165.9 ms,
demo teacher 1661.4 -> 1166.3 ms; outputs equal to 1.3e-5 (summation order only).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.timing import interleaved_medians, micro_bench_args  # noqa: E402
from model.refineformer3d import tokens_to_grid  # noqa: E402

# (label, conv, grid size): the student's shapes at 128^3 input
CONVS = [
    ("depthwise 3^3, 32 ch, 32^3", lambda: nn.Conv3d(32, 32, 3, padding=1, groups=32), 32),
    ("depthwise 3^3, 64 ch, 16^3", lambda: nn.Conv3d(64, 64, 3, padding=1, groups=64), 16),
    ("patch embed 8->16 3^3/2, 32^3", lambda: nn.Conv3d(8, 16, 3, stride=2, padding=1), 32),
    ("reduction 8->8 8^3/8, 32^3", lambda: nn.Conv3d(8, 8, 8, stride=8), 32),
]


def main() -> None:
    args = micro_bench_args(__doc__)
    print(f"{'conv':<34} {'B':>2} {'transpose.reshape':>18} {'tokens_to_grid':>15}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for label, make, s in CONVS:
            conv = make().eval()
            for batch in (1, 2):
                tokens = torch.randn(batch, s ** 3, conv.in_channels)
                old = tokens.transpose(1, 2).reshape(batch, -1, s, s, s)
                new = tokens_to_grid(tokens, (s, s, s))
                assert torch.equal(old, new)
                ms = interleaved_medians({"old": lambda: conv(old), "new": lambda: conv(new)}, args.runs)
                print(f"{label:<34} {batch:>2} {ms['old'] * 1e3:18.2f} {ms['new'] * 1e3:15.2f}")


if __name__ == "__main__":
    main()
