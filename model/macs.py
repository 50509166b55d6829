"""Multiply-add counting: fvcore on a built model (`count_macs`, plus the handlers fvcore lacks), and
its analytic twin on a spec (`spec_macs`, for pricing many candidate widths; tested equal).

Convention: fvcore counts one multiply-add as one "flop"; we call the unit G multiply-adds (GMACs)
to avoid the factor-2 ambiguity (PyTorch's FlopCounter reports twice as much). fvcore has no handler
for `scaled_dot_product_attention` (it would silently count 0 for attention) nor for trilinear
upsampling; both are added here.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from model.refineformer3d import ModelSpec


def _shape(v: Any) -> list[int]:
    return list(v.type().sizes())


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # q (..., N, E), k (..., M, E), v (..., M, Ev): scores N*M*E, weighted sum N*M*Ev
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    n, e = q[-2], q[-1]
    m, ev = k[-2], v[-1]
    return batch * n * m * (e + ev)


def _trilinear_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # 8 neighbours blended per output voxel: 7 lerps, counted as 8 multiply-adds per element.
    return 8 * math.prod(_shape(outputs[0]))


HANDLERS = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::upsample_trilinear3d": _trilinear_macs,
}


def fvcore_count(model: nn.Module, input_shape: tuple[int, ...], read: Callable[[Any], Any],
                 upsample: bool = True) -> Any:
    """`read(analysis)` of fvcore's FlopCountAnalysis of one eval-mode forward at `input_shape` on a zero
    input, with this module's handlers (`upsample=False`: trilinear upsampling counts 0), fvcore's
    warnings silenced; the model's mode is restored. `read` runs inside, where fvcore traces lazily."""
    from fvcore.nn import FlopCountAnalysis

    handlers = dict(HANDLERS)
    if not upsample:
        handlers["aten::upsample_trilinear3d"] = lambda i, o: 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(input_shape, device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x).set_op_handle(**handlers)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        out = read(analysis)
    model.train(was_training)
    return out


def count_macs(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 4, 128, 128, 128), upsample: bool = True
) -> float:
    """G multiply-adds of one forward pass at `input_shape`, fvcore convention."""
    return fvcore_count(model, input_shape, lambda analysis: analysis.total(), upsample) / 1e9


def _conv_out(size: Sequence[int], kernel: int, stride: int, padding: int) -> list[int]:
    return [(n + 2 * padding - kernel) // stride + 1 for n in size]


def spec_macs(spec: ModelSpec, input_size: Sequence[int]) -> int:
    """Multiply-adds of one forward pass (batch 1) at spatial `input_size`, from the spec alone.

    Counts what `model.macs.count_macs` counts (fvcore convention, in eval mode): Linear/Conv3d
    weights (low-rank layers as down + up), scaled dot-product attention, LayerNorm 5 and BatchNorm
    2 per element, trilinear upsampling 8 per output element; activations, adds and biases are free.
    Pure arithmetic, so every candidate widening is priced in microseconds.
    """
    s = spec.resolve()
    macs = 0

    def layer(name: str, c_in: int, c_out: int, voxels: int, kvol: int = 1) -> int:
        # a dense layer costs c_in * kvol * c_out per output voxel; its low-rank twin goes through rank r
        r = s.ranks.get(name)
        return voxels * (c_in * kvol * c_out if r is None else c_in * kvol * r + r * c_out)

    size, c_in, grids = list(input_size), s.in_chans, []
    for i, c in enumerate(s.embed_dims):
        stage = f"encoder.stages.{i}"
        k = s.patch_kernels[i]
        size = _conv_out(size, k, s.patch_strides[i], s.patch_paddings[i])
        n, a, sr = math.prod(size), s.attn_dims[i], s.sr_ratios[i]
        m = math.prod(x // sr for x in size) if sr > 1 else n  # tokens of the reduced key/value grid
        macs += layer(f"{stage}.patch_embed.proj", c_in, c, n, k ** 3) + 5 * n * c
        for j, hidden in enumerate(s.mlp_hidden[i]):
            block = f"{stage}.blocks.{j}"
            macs += 5 * n * c + layer(f"{block}.attn.q", c, a, n)
            if sr > 1:
                macs += layer(f"{block}.attn.sr", c, c, m, sr ** 3) + 5 * m * c
            macs += layer(f"{block}.attn.kv", c, 2 * a, m) + n * m * 2 * a + layer(f"{block}.attn.proj", a, c, n)
            macs += 5 * n * c + layer(f"{block}.mlp.fc1", c, hidden, n) + 27 * n * hidden + 2 * n * hidden
            macs += layer(f"{block}.mlp.fc2", hidden, c, n)
        macs += 5 * n * c  # stage norm
        grids.append(n)
        c_in = c
    n0, d, f = grids[0], s.decoder_dim, s.fuse_dim
    for i, (c, n) in enumerate(zip(s.embed_dims, grids)):
        macs += layer(f"decoder.projections.{i}.proj", c, d, n) + 5 * n * d + (8 * d * n0 if i else 0)
    macs += layer("decoder.fuse", len(grids) * d, f, n0) + 2 * n0 * f
    volume, classes = math.prod(input_size), s.num_classes
    if s.decoder == "refine":
        r = s.refine_dim
        macs += 27 * n0 * f + 2 * n0 * f + layer("decoder.refine_pw", f, r, n0) + 2 * n0 * r
        if s.head_at == "quarter":  # head at 1/4, the logits upsampled
            macs += layer("decoder.head", r, classes, n0, 27) + 8 * classes * volume
        elif s.head_at == "half":  # features upsampled to 1/2, the head there, the logits upsampled
            half = math.prod(x // 2 for x in input_size)
            macs += 8 * r * half + layer("decoder.head", r, classes, half, 27) + 8 * classes * volume
        else:
            macs += 8 * r * volume + layer("decoder.head", r, classes, volume, 27)
    else:
        macs += layer("decoder.pred", f, classes, n0) + 8 * classes * volume
    return macs
