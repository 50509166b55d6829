"""Conv3d speed on CPU at batch 1: the token -> grid view (`transpose(1, 2).reshape` against
`model.refineformer3d.tokens_to_grid`) and the kernel (ATen's choice against oneDNN, `model.rewrites.OneDNNConv3d`).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_layout.py [--runs 7] [--threads N]

The encoder keeps tokens (B, N, C) and hands Conv3d layers (depthwise Mix-FFN convs, spatial
reduction, patch embeddings, the decoder's convs) a (B, C, D, H, W) grid view of them. Both views
below hold the same values in the same memory; they differ only in the batch stride when B = 1,
which decides whether ATen runs the conv channels-last or first copies the input to the default
layout. Per conv and batch size: both interleaved (A B A B ...), median of --runs after a warm-up, ms.
A third column runs the tokens_to_grid view through `OneDNNConv3d` (the same weights): ATen sends small
batch-1 inputs of groups-1 convs with kernels up to 3 to its im2col reference kernel.

Measured on this project's VM (`python bench/bench_layout.py --runs 5`; Intel Xeon @ 2.80GHz, AVX-512
VNNI, 2 threads, while another job used the cores: absolute times high, the ratios are the point), ms
(the depthwise convs are not swapped: ATen already runs them in oneDNN, the column is noise):

    conv                                B  transpose.reshape  tokens_to_grid  + OneDNNConv3d
    depthwise 3^3, 32 ch, 32^3          1              24.94            4.45            1.88
    depthwise 3^3, 32 ch, 32^3          2               3.39            3.34            3.31
    depthwise 3^3, 64 ch, 16^3          1               2.77            0.71            0.76
    depthwise 3^3, 64 ch, 16^3          2               0.93            0.93            0.86
    patch embed 8->16 3^3/2, 32^3       1               4.24            4.01            1.20
    patch embed 8->16 3^3/2, 32^3       2               1.49            1.45            1.55
    reduction 8->8 8^3/8, 32^3          1               1.15            0.55            0.59
    reduction 8->8 8^3/8, 32^3          2               0.62            0.64            0.75
    head 16->3 3^3, 32^3                1              78.61           73.38            7.57
    head 16->3 3^3, 32^3                2              14.74           14.08           15.47

Whole model, batch 1, 128^3 (/tmp scripts, interleaved, median of 5, same machine and load):
tokens_to_grid (the model module before and after, in one process): demo low-rank student 243.9 ->
165.9 ms, demo teacher 1661.4 -> 1166.3 ms; OneDNNConv3d (`inference_graph(onednn=False)` against the
default): low-rank student 229.1 -> 178.5 ms, teacher 1311.5 -> 1276.5 ms. Outputs equal to 1.5e-5
(summation order only).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.timing import interleaved_medians, micro_bench_args  # noqa: E402
from model.refineformer3d import tokens_to_grid  # noqa: E402
from model.rewrites import onednn_convs  # noqa: E402

# (label, conv, grid size): the student's shapes at 128^3 input
CONVS = [
    ("depthwise 3^3, 32 ch, 32^3", lambda: nn.Conv3d(32, 32, 3, padding=1, groups=32), 32),
    ("depthwise 3^3, 64 ch, 16^3", lambda: nn.Conv3d(64, 64, 3, padding=1, groups=64), 16),
    ("patch embed 8->16 3^3/2, 32^3", lambda: nn.Conv3d(8, 16, 3, stride=2, padding=1), 32),
    ("reduction 8->8 8^3/8, 32^3", lambda: nn.Conv3d(8, 8, 8, stride=8), 32),
    ("head 16->3 3^3, 32^3", lambda: nn.Conv3d(16, 3, 3, padding=1), 32),
]


def main() -> None:
    args = micro_bench_args(__doc__)
    print(f"{'conv':<34} {'B':>2} {'transpose.reshape':>18} {'tokens_to_grid':>15} {'+ OneDNNConv3d':>15}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for label, make, s in CONVS:
            conv = make().eval()
            fast = onednn_convs(copy.deepcopy(conv))
            for batch in (1, 2):
                tokens = torch.randn(batch, s ** 3, conv.in_channels)
                old = tokens.transpose(1, 2).reshape(batch, -1, s, s, s)
                new = tokens_to_grid(tokens, (s, s, s))
                assert torch.equal(old, new)
                ms = interleaved_medians({"old": lambda: conv(old), "new": lambda: conv(new),
                                          "onednn": lambda: fast(new)}, args.runs)
                print(f"{label:<34} {batch:>2} {ms['old'] * 1e3:18.2f} {ms['new'] * 1e3:15.2f} {ms['onednn'] * 1e3:15.2f}")


if __name__ == "__main__":
    main()
