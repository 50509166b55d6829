"""Multiply-add counting with fvcore, plus the handlers fvcore lacks.

Convention: fvcore counts one multiply-add as one "flop"; we call the unit G multiply-adds (GMACs)
to avoid the factor-2 ambiguity (PyTorch's FlopCounter reports twice as much). fvcore has no handler
for `scaled_dot_product_attention` (it would silently count 0 for attention) nor for trilinear
upsampling; both are added here.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn


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


def count_macs(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 4, 128, 128, 128), upsample: bool = True
) -> float:
    """G multiply-adds of one forward pass at `input_shape`, fvcore convention."""
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
        total = analysis.total()
    model.train(was_training)
    return total / 1e9
