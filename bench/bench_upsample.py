"""Trilinear upsampling on CPU: F.interpolate (default and channels_last_3d layouts) vs `model.resample`'s
three 1-D matrix products, for the shapes the decoders upsample.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_upsample.py [--runs 7] [--threads N]

Per shape: the ways interleaved (A B C A B C ...), median of --runs after one warm-up round, ms,
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

The head at 1/2 resolution (`head_at: half`): trilinear x2 of refine_dim channels, then the 3x3x3 conv to
the 3 logits, as served before `model.rewrites.polyphase_head` (channels_last_3d interpolate, oneDNN
conv) and in polyphase form (`model.resample.upsample2_conv3d`: one conv at 1/4 resolution to 8 x 3
channels, depth-to-space, the border shell recomputed face by face), ms, same machine, idle:

    x2 + 3x3x3 head        upsample+conv polyphase polyphase cl  max|diff|/max
    12 x 32^3 -> 3 x 64^3           28.2      19.1         18.2  8.4e-07
    16 x 32^3 -> 3 x 64^3           33.8      24.9         24.9  9.8e-07
    12 x 24^3 -> 3 x 48^3           14.6      12.6         12.7  9.4e-07

(the demo's grown student per 128^3 window, `inference_model` with the rewrite on and off, 7 interleaved
rounds: 84.5 against 105.5 ms; its INT8 model 98.3 against 115.7 ms.)

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
from model.resample import separable_trilinear, upsample2_conv3d  # noqa: E402

SHAPES = [(3, 32, 128), (3, 24, 96), (16, 32, 128), (24, 16, 32), (24, 8, 32), (24, 4, 32), (64, 16, 32)]
# the head at 1/2 resolution: (refine_dim, side at 1/4 resolution); 3 logit channels out
HEAD_SHAPES = [(12, 32), (16, 32), (12, 24)]


def onednn_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The served head (`model.rewrites.OneDNNConv3d`): oneDNN's convolution, zero padding 1."""
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, [1] * 3, [1] * 3, [1] * 3, 1)


def head_table(runs: int) -> None:
    """x2 upsampling + 3x3x3 head as served before the polyphase rewrite (channels_last_3d interpolate, oneDNN
    conv) and as `model.resample.upsample2_conv3d` computes it (input in either layout)."""
    print(f"\n{'x2 + 3x3x3 head':<22} {'upsample+conv':>13} {'polyphase':>9} {'polyphase cl':>12}  max|diff|/max")
    for c, n in HEAD_SHAPES:
        x = torch.randn(1, c, n, n, n)
        xl = x.contiguous(memory_format=torch.channels_last_3d)
        weight, bias = torch.randn(3, c, 3, 3, 3) * 0.1, torch.randn(3)

        def plain():
            return onednn_conv(F.interpolate(xl, scale_factor=2, mode="trilinear", align_corners=False), weight, bias)

        ms = interleaved_medians({"plain": plain, "poly": lambda: upsample2_conv3d(x, weight, bias),
                                  "poly_cl": lambda: upsample2_conv3d(xl, weight, bias)}, runs)
        ref = plain()
        diff = float((upsample2_conv3d(xl, weight, bias) - ref).abs().max() / ref.abs().max())
        print(f"{f'{c} x {n}^3 -> 3 x {2 * n}^3':<22} {ms['plain'] * 1e3:13.1f} {ms['poly'] * 1e3:9.1f} "
              f"{ms['poly_cl'] * 1e3:12.1f}  {diff:.1e}")


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
        head_table(args.runs)


if __name__ == "__main__":
    main()
