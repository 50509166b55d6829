"""Fold eval-mode BatchNorm into the convolution before it (exact in eval mode).

Pairs in RefineFormer3D: every MixFFN `mlp.dwconv` + `mlp.bn`, and in the decoder `fuse` + `fuse_bn`,
`refine_dw` + `refine_dw_bn`, `refine_pw` + `refine_pw_bn`. A factorised (LowRankConv3d) conv folds
into its last 1x1x1 `up` conv. The BatchNorm becomes nn.Identity, the conv gains a bias.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers import LowRankConv3d
from model.refineformer3d import get_module, set_module

DECODER_PAIRS = [("fuse", "fuse_bn"), ("refine_dw", "refine_dw_bn"), ("refine_pw", "refine_pw_bn")]


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs present in the model and not folded yet."""
    names = dict(model.named_modules())
    pairs = [(n[: -len(".bn")] + ".dwconv", n) for n in names if n.endswith("mlp.bn")]
    pairs += [(f"decoder.{c}", f"decoder.{b}") for c, b in DECODER_PAIRS if f"decoder.{b}" in names]
    return [(c, b) for c, b in pairs if isinstance(names[b], nn.BatchNorm3d)]


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """A new Conv3d equal to bn(conv(x)) with bn's running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
    new.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
    new.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return new


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm3d of the model into its conv, in place; returns the model."""
    for conv_name, bn_name in bn_pairs(model):
        conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        if isinstance(conv, LowRankConv3d):
            conv.up = fold_conv_bn(conv.up, bn)
        elif type(conv) is nn.Conv3d:
            set_module(model, conv_name, fold_conv_bn(conv, bn))
        else:
            raise TypeError(f"{conv_name}: cannot fold BatchNorm into a {type(conv).__name__}")
        set_module(model, bn_name, nn.Identity())
    return model
