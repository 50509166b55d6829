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


# ----------------------------------------------------------------------------- x2 upsampling + 3x3x3 conv
# The refine head at 1/2 resolution (`ModelSpec.head_at` "half") is conv(up2(x)): trilinear x2, then a
# 3x3x3 conv (stride 1, zero padding 1) on 8x the voxels, with only the 3 logit channels out (a poorly
# blocked convolution and an upsampled 12-16 channel tensor at 1/2 resolution; `bench/bench_upsample.py`).
# Both are linear, so each of the 8 output phases (parity of d, h, w) is a 3x3x3 conv of x itself
# (polyphase decomposition, as in sub-pixel convolution, Shi et al., CVPR 2016): one conv at x's
# resolution with 8x the output channels, then a depth-to-space shuffle. Same multiply-adds, 1.2-1.5x
# faster (`bench/bench_upsample.py`: 28.2 -> 18.2 ms for 12 channels at 32^3 on 2 threads). Exact
# everywhere: trilinear x2 with align_corners=False equals linear interpolation of x padded by
# replication, so the phases run on x replicate-padded by one voxel; that matches the conv's zero padding
# except on the output's one-voxel border shell, which is recomputed from the two coarse planes under
# each face.


@functools.lru_cache(maxsize=8)
def _phase_taps(dtype: torch.dtype, device: str) -> torch.Tensor:
    """(2, 3, 3): [output phase p, coarse tap t, fine tap k], the weight of x[j + t - 1] in fine sample
    2j + p + k - 1 of the x2 linear upsampling (read off `_matrix` away from the borders)."""
    m = _matrix(5, 10, torch.float64, "cpu")  # (n_in, n_out); coarse sample j = 2 is interior
    taps = torch.tensor([[[m[2 + t - 1, 4 + p + k - 1] for k in range(3)] for t in range(3)] for p in range(2)],
                        dtype=torch.float64)
    return taps.to(dtype=dtype, device=device)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3, 3) kernel of a conv after x2 upsampling -> (8 O, C, 3, 3, 3) kernel of its phases at
    the input's resolution, output channel o * 8 + 4 pd + 2 ph + pw (computed in float64)."""
    o, c = weight.shape[:2]
    a = _phase_taps(torch.float64, str(weight.device))
    w = torch.einsum("pak,qbl,rcm,oiklm->opqriabc", a, a, a, weight.double())
    return w.reshape(8 * o, c, 3, 3, 3).to(weight.dtype)


def onednn_input(x: torch.Tensor) -> bool:
    """Whether oneDNN's convolution may be called directly on `x`: a batched (5-D) float32 CPU tensor,
    oneDNN built in, no autocast (it would run in autocast's dtype) and no graph being traced (exporters
    and fvcore see the plain conv). Shared by `model.rewrites.OneDNNConv3d` and `_conv3d`."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu") and not tracing())


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """F.conv3d (stride 1), through oneDNN for float32 CPU inference (ATen's batch-1 choice for few
    channels is its slow reference kernel: `model.rewrites.OneDNNConv3d`)."""
    if onednn_input(x) and weight.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, [padding] * 3, [1] * 3, [1] * 3, 1)
    return F.conv3d(x, weight, bias, padding=padding)


def _upsample2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, K, P, Q) -> (B, C, K, 2P, 2Q): each of the K planes bilinearly x2 (align_corners=False), as
    two matrix products."""
    b, c, k, p, q = x.shape
    kw = dict(dtype=x.dtype, device=str(x.device))
    y = x.reshape(b * c * k, p, q) @ _matrix(q, 2 * q, **kw)  # (., P, 2Q)
    return (_matrix(p, 2 * p, **kw).t() @ y).reshape(b, c, k, 2 * p, 2 * q)


def depth_to_space3d(x: torch.Tensor) -> torch.Tensor:
    """(B, 8 O, D, H, W) -> (B, O, 2D, 2H, 2W): channel o * 8 + 4 pd + 2 ph + pw becomes voxel
    (2d + pd, 2h + ph, 2w + pw) of output channel o (3-D pixel shuffle, Shi et al., "Real-Time Single
    Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR
    2016). Reshape and transpose only (ONNX Reshape/Transpose when exported); a new contiguous tensor.
    ValueError unless x is 5-D with a multiple of 8 channels."""
    if x.ndim != 5 or x.shape[1] % 8:
        raise ValueError(f"depth_to_space3d: needs (B, 8 O, D, H, W), got {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    o = c // 8
    return x.reshape(b, o, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, o, 2 * d, 2 * h, 2 * w)


def upsample2_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv3d(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False), weight, bias,
    padding=1)` computed at x's resolution (polyphase; see above): (B, C, D, H, W) -> (B, O, 2D, 2H, 2W),
    equal to float rounding (tests/test_resample.py pins 1e-5). `weight` (O, C, 3, 3, 3). ValueError for
    another kernel size or a grid side below 2."""
    if x.ndim != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or min(x.shape[2:]) < 2:
        raise ValueError(f"upsample2_conv3d: needs (B, C, D, H, W) with every side >= 2 and a 3x3x3 kernel, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, _, d, h, w = x.shape
    o = weight.shape[0]
    phases = _conv3d(F.pad(x, (1,) * 6, mode="replicate"), phase_weights(weight),
                     None if bias is None else bias.repeat_interleave(8), 0)  # (B, 8 O, D, H, W)
    y = depth_to_space3d(phases)  # a new contiguous tensor
    for axis in range(3):  # the border shell, each face exactly: fine planes 0 and 2n - 1 of each axis
        n = x.shape[2 + axis]
        w_axis = weight.movedim(2 + axis, 2)  # (O, C, k_axis, k_p, k_q), p and q the other axes in order
        # fine planes 0, 1 are x0, 0.75 x0 + 0.25 x1; planes 2n-2, 2n-1 are 0.25 x + 0.75 x', x' (x, x' the last
        # two coarse planes). The conv's third tap there falls on its zero padding, so each face is a 2-D conv
        # over its two coarse planes upsampled in-plane, the two live taps combined into one (O, 2C, 3, 3)
        # kernel; both faces of an axis run as one grouped conv
        low = torch.stack((w_axis[:, :, 1] + 0.75 * w_axis[:, :, 2], 0.25 * w_axis[:, :, 2]), 1)
        high = torch.stack((0.25 * w_axis[:, :, 0], 0.75 * w_axis[:, :, 0] + w_axis[:, :, 1]), 1)
        pairs = torch.cat((x.narrow(2 + axis, 0, 2), x.narrow(2 + axis, n - 2, 2)), 2 + axis).movedim(2 + axis, 2)
        planes = _upsample2d(pairs)  # (B, C, 4, 2P, 2Q): low pair, high pair
        faces = F.conv2d(planes.transpose(1, 2).reshape(b, -1, *planes.shape[3:]),
                         torch.cat((low, high)).reshape(2 * o, -1, 3, 3),
                         None if bias is None else torch.cat((bias, bias)), padding=1, groups=2)  # (B, 2 O, 2P, 2Q)
        y.select(2 + axis, 0).copy_(faces[:, :o])
        y.select(2 + axis, 2 * n - 1).copy_(faces[:, o:])
    return y
