"""Trilinear upsampling of a few channels as three 1-D matrix products (PyTorch eager on CPU).

Trilinear interpolation is separable: along each axis, an output sample is a fixed weighted sum of two
input samples, i.e. one (n_out x n_in) matrix applied along that axis. `separable_trilinear` applies the
three matrices as matrix products, which equals `F.interpolate(x, size, mode="trilinear",
align_corners=False)` up to float rounding (max |difference| 4.8e-7 on unit-variance logits, 32^3 -> 128^3;
tests/test_resample.py pins 1e-5), and runs on BLAS instead of ATen's per-voxel CPU kernel.

Measured (`python bench/bench_upsample.py`, the table in its docstring): on the 3 logit channels of a
head at 1/4 resolution (32^3 -> 128^3, 2 threads) it is several times faster than `F.interpolate` in
either memory layout; on many channels at low resolution (the decoder's fused parts, 24-64 channels)
channels_last_3d `F.interpolate` is faster (the re-associated decoder of `model.rewrites` feeds it that
layout), so `upsample` uses the matrices only up to `SEPARABLE_MAX_CHANNELS` channels. Traced graphs see the one trilinear operator: under ONNX export a
plain Resize (what ONNX Runtime and OpenVINO optimise), and under fvcore's trace (`model.macs`) the
operation's 8 multiply-adds per output voxel, not the dense matrices' products, so multiply-add counts
do not depend on how the upsampling is computed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

SEPARABLE_MAX_CHANNELS = 3  # the logits (3 regions); more channels: F.interpolate (see the module docstring)


@functools.lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(n_in, n_out): column j holds the weights of output sample j (linear, align_corners=False),
    built by interpolating the identity, so it follows `F.interpolate`'s own index arithmetic. Built
    outside inference mode: a cached inference tensor could not be saved for a later backward pass."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64)[None]  # (1, n_in, n_in): n_in unit signals
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].to(dtype=dtype, device=device)


def separable_trilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, *size), trilinear with align_corners=False, as three matrix products.

    W first (the smallest output), then H, then D, each a batched product whose result is already
    contiguous: (..., W) @ (W, W'), then (H', H) @ (B*C*D, H, W'), then (D', D) @ (B*C, D, H'*W').
    Returns a contiguous tensor of x's dtype, whatever x's layout (logits are read per channel: a
    channels_last_3d copy of 3 channels costs more than the products). ValueError unless x is 5-D and
    `size` has 3 entries."""
    if x.ndim != 5 or len(size) != 3:
        raise ValueError(f"separable_trilinear: needs (B, C, D, H, W) and 3 sizes, got {tuple(x.shape)} and {tuple(size)}")
    b, c, d, h, w = x.shape
    d2, h2, w2 = (int(n) for n in size)
    kw = dict(dtype=x.dtype, device=str(x.device))
    y = x.contiguous()
    if w2 != w:
        y = y @ _matrix(w, w2, **kw)  # (B, C, D, H, W')
    if h2 != h:
        y = (_matrix(h, h2, **kw).t() @ y.reshape(b * c * d, h, w2)).reshape(b, c, d, h2, w2)
    if d2 != d:
        y = (_matrix(d, d2, **kw).t() @ y.reshape(b * c, d, h2 * w2)).reshape(b, c, d2, h2, w2)
    return y


def tracing() -> bool:
    """True while a graph is traced (TorchScript tracing: fvcore's counts; ONNX export): rewrites then
    leave the plain operator in the graph."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling (align_corners=False) to `size`, by whichever way is faster here: the
    separable matrix products for at most SEPARABLE_MAX_CHANNELS channels (the logits), otherwise
    `F.interpolate` (in the input's layout: the inference rewrites hand it channels_last_3d tensors,
    `model.rewrites`); when traced (ONNX export, fvcore) always `F.interpolate`: one operator in the
    graph; under autocast too (matrix products would run in its lower precision)."""
    if tracing() or torch.is_autocast_enabled(x.device.type):
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    size = tuple(int(s) for s in size)
    if x.shape[1] <= SEPARABLE_MAX_CHANNELS and tuple(x.shape[2:]) != size:
        return separable_trilinear(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)
