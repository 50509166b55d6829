"""Inference rewrites of a RefineFormer3D: exact graph changes for eval-mode CPU inference.

Each rewrite is one verb `step(model) -> model` that changes the model in place and is idempotent:

    fold_bn               every eval-mode BatchNorm3d folded into the conv before it
    reassociate_decoder   the decoder's 1x1x1 fusion conv moved in front of the trilinear upsampling
    channels_last_tail    the refine decoder's tail (upsample + head, at full or 1/2 resolution) in channels_last_3d
    polyphase_head        a head at 1/2 resolution runs, with the x2 upsampling before it, as one conv at 1/4
    onednn_convs          Conv3d layers with kernels > 1 call oneDNN directly (ATen's batch-1 choice is slow)

`inference_graph(model)` applies them, in that order, to a copy. The model's own `forward` never
switches layouts or kernels by mode or device: an inference rewrite is always one of these named steps,
applied where the model is served (pipeline.predict, the report's timing and scoring, the INT8 builders).

The rewrites change rounding, not the function: outputs match the plain model's to float32 precision.
Parameter and multiply-add counts are the plain model's business: count before rewriting.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import LowRankConv3d
from model.resample import onednn_input, upsample
from model.refineformer3d import get_module, refine_tail, set_module


# ----------------------------------------------------------------------------- BatchNorm folding
# Pairs in RefineFormer3D: every MixFFN `mlp.dwconv` + `mlp.bn`, and in the decoder `fuse` + `fuse_bn`,
# `refine_dw` + `refine_dw_bn`, `refine_pw` + `refine_pw_bn`. A factorised (LowRankConv3d) conv folds
# into its last 1x1x1 `up` conv. The BatchNorm becomes nn.Identity, the conv gains a bias.

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
    """Fold every BatchNorm3d of the model into its conv, in place; returns the model (exact in eval mode)."""
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


# ----------------------------------------------------------------------------- decoder re-association
# SegFormer3D fuses `fuse(cat(up(p4), up(p3), up(p2), p1))` at 1/4 resolution. A 1x1x1 conv is a
# per-voxel linear map, trilinear upsampling is a per-channel linear map whose weights sum to 1, so they
# commute, and a conv over concatenated inputs is the sum of convs over its input-channel blocks:
#
#     fuse(cat(up(p_i))) = sum_i up(W_i p_i) + b
#
# `ReassociatedDecoder` computes the right-hand side: each W_i (`fuse_parts.{i}`) runs on stage i's own,
# coarser grid, so most of the fusion's multiply-adds leave the 1/4-resolution grid. A factorised fuse
# (LowRankConv3d) splits its `down` conv and keeps `up` (`fuse_up`) after the sum. The per-stage
# Linear + LayerNorm projections stay in front (LayerNorm is not linear).


def decoder_kind(decoder: nn.Module) -> str:
    return "refine" if hasattr(decoder, "head") else "allmlp"


def final_layer(model: nn.Module) -> str:
    """Name of the conv that produces the logits."""
    return "decoder.head" if hasattr(model.decoder, "head") else "decoder.pred"


class ReassociatedDecoder(nn.Module):
    """Drop-in replacement for AllMLPDecoder / RefineDecoder with the fusion re-associated."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.projections = decoder.projections
        fuse = decoder.fuse
        first = fuse.down if isinstance(fuse, LowRankConv3d) else fuse
        if type(first) is not nn.Conv3d or first.kernel_size != (1, 1, 1):
            raise TypeError(f"decoder.fuse: expected a 1x1x1 Conv3d, got {type(first).__name__}")
        self.fuse_up = fuse.up if isinstance(fuse, LowRankConv3d) else nn.Identity()
        k = first.out_channels
        n = len(self.projections)
        dd = first.in_channels // n
        # Input-channel blocks of the fused conv are deepest stage first: block j is stage n-1-j.
        self.fuse_parts = nn.ModuleList()
        with torch.no_grad():
            for i in range(n):
                part = nn.Conv3d(dd, k, 1, bias=False)
                j = n - 1 - i
                part.weight.copy_(first.weight[:, j * dd:(j + 1) * dd])
                self.fuse_parts.append(part)
        self.fuse_bias = nn.Parameter(first.bias.detach().clone()) if first.bias is not None else None
        self.fuse_bn = decoder.fuse_bn
        self.kind = decoder_kind(decoder)
        if self.kind == "refine":
            self.refine_dw, self.refine_dw_bn = decoder.refine_dw, decoder.refine_dw_bn
            self.refine_pw, self.refine_pw_bn = decoder.refine_pw, decoder.refine_pw_bn
            self.head, self.head_at = decoder.head, decoder.head_at
        else:
            self.pred = decoder.pred

    def fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        out = None
        for i, (proj, part, f) in enumerate(zip(self.projections, self.fuse_parts, features)):
            y = part(proj(f))  # (B, k, *grid_i): the conv runs on stage i's grid
            if i:  # channels_last_3d: ATen's trilinear kernel is 4-12x faster so for 24-64 channels
                y = upsample(to_channels_last(y), size)
            out = y if out is None else out + y
        if self.fuse_bias is not None:
            out = out + self.fuse_bias.view(1, -1, 1, 1, 1)
        return F.relu(self.fuse_bn(self.fuse_up(out)))  # (B, fuse_dim, D/4, H/4, W/4)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, ...]) -> torch.Tensor:
        x = self.fused(features)
        if self.kind == "allmlp":
            return upsample(self.pred(x), out_size)
        return refine_tail(self, x, out_size)


def reassociate_decoder(model: nn.Module) -> nn.Module:
    """Replace model.decoder by its ReassociatedDecoder, in place; returns the model."""
    if not isinstance(model.decoder, ReassociatedDecoder):
        model.decoder = ReassociatedDecoder(model.decoder)
    return model


# ----------------------------------------------------------------------------- channels-last tail
# For PyTorch eager on CPU: the refine decoder's tail (the full-resolution x4 trilinear upsample and the
# 3x3x3 head) runs on channels_last_3d tensors, whose CPU kernels are about 2x faster than on the default
# layout for refine_dim 16 (whole model 1.3-1.7x on 2 threads; no gain, no loss at refine_dim 4).
# With the head at 1/2 resolution (x2 upsample of refine_dim channels, head, logits x2) the tail is the
# same two operators on 1/8 of the voxels: measured a tie (demo student slimmed with the head at 1/2, 128^3,
# 2 threads, 9 interleaved runs: refine_dim 16 139 vs 151 ms, 12 150 vs 146 ms), so the rule is kept.
# Only strides change, never values.


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in the channels_last_3d layout (C fastest in memory), values unchanged; under `torch.onnx`
    export x itself: ONNX has no memory formats (and the TorchScript exporter rejects channels_last_3d)."""
    if torch.onnx.is_in_onnx_export():
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


class ChannelsLast3d(nn.Module):
    """`to_channels_last` as a parameter-free module (a slot in the decoder's tail)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(x)


# decoder kind -> the folded (nn.Identity) BatchNorm slot from which on the tail runs channels_last_3d.
# refine: refine_pw_bn, right before the x4 trilinear upsample, so the upsample and the 3x3x3 head always
# get channels_last_3d inputs (a conv's output layout depends on its size and thread count; this does not).
# allmlp: no slot; its upsample carries only the 3 logit channels, and channels_last_3d before `pred` or
# after it measured 0.85x (slower) on 2 threads. Channels_last_3d patch-embedding inputs measured no faster.
CHANNELS_LAST_SLOTS = {"refine": "refine_pw_bn"}
# Upsample + head, 96x96x64, 2 threads: refine_dim 2 0.96x, 4 1.08x, 8 1.78x, 16 1.90x, 32 2.04x.
MIN_TAIL_CHANNELS = 4


def _default_layout(decoder: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Decoder forward hook: logits back in the default (contiguous) layout whatever the head returned."""
    return logits.contiguous()


def tail_channels(decoder: nn.Module) -> int:
    """The head's input channels (refine_dim): those upsampled before the head unless `head_at` is "quarter"."""
    head = decoder.head
    return head.in_channels if hasattr(head, "in_channels") else head.down.in_channels  # plain or LowRankConv3d


def channels_last_tail(model: nn.Module) -> nn.Module:
    """Run the decoder tail in channels_last_3d, in place; returns the model (exact: only strides change).

    The slot's folded BatchNorm (an nn.Identity after `fold_bn`) becomes a parameter-free ChannelsLast3d,
    so module names and state_dict keys stay the same and later Conv3d swaps (LSQ, INT8) keep it; a
    decoder forward hook returns the logits in the default layout (about 1% of the time saved).
    A decoder without a slot (allmlp), with its head at 1/4 resolution, or with fewer than
    MIN_TAIL_CHANNELS upsampled channels (where it measured no faster) is left as it is. Builders re-apply it (nothing of it is stored).
    """
    decoder = model.decoder
    slot = CHANNELS_LAST_SLOTS.get(decoder_kind(decoder))
    if slot is None or has_channels_last_tail(model) or tail_channels(decoder) < MIN_TAIL_CHANNELS:
        return model
    if decoder.head_at == "quarter":  # the upsample carries the 3 logit channels, as in allmlp: no gain
        return model
    current = getattr(decoder, slot)
    if type(current) is not nn.Identity:
        raise TypeError(f"decoder.{slot}: expected a folded BatchNorm (nn.Identity), got {type(current).__name__}; "
                        f"run fold_bn first")
    setattr(decoder, slot, ChannelsLast3d())
    decoder.register_forward_hook(_default_layout)
    return model


def has_channels_last_tail(model: nn.Module) -> bool:
    return any(isinstance(m, ChannelsLast3d) for m in model.decoder.modules())


# ----------------------------------------------------------------------------- oneDNN convolutions
# ATen runs a float32 CPU Conv3d in oneDNN unless the input is small: with groups 1, a kernel of at most
# 3 and batch 1, it takes its reference im2col kernel (`slow_conv3d`) whenever batch x channels x D x H
# is at most 20480 (aten/src/ATen/native/Convolution.cpp, `use_mkldnn`), which every batch-1 window of a
# slim student hits: its 3x3x3 head (16 -> 3 channels, 32^3) took 73.4 ms there and 7.6 ms in oneDNN
# (`python bench/bench_layout.py`: the table in its docstring). Batches of 2 and more already get oneDNN.


class OneDNNConv3d(nn.Conv3d):
    """An nn.Conv3d (same parameters, same state_dict) whose float32 CPU forward on a batched input is
    oneDNN's convolution whatever the batch size, when its kernel is larger than 1 and groups is 1 (the
    convs ATen may send to its reference kernel); equal to nn.Conv3d to float rounding. Traced graphs
    (ONNX export, fvcore counts), autocast, unbatched inputs, 1x1x1 or grouped kernels and other
    devices, dtypes or padding modes get nn.Conv3d's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_input(x) and onednn_pays(self) and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


def onednn_pays(conv: nn.Conv3d) -> bool:
    """A conv ATen may send to its reference kernel: a kernel larger than 1 and groups 1 (1x1x1 and
    depthwise convs are left to ATen, which already picks well for them)."""
    return conv.kernel_size != (1, 1, 1) and conv.groups == 1


def onednn_convs(model: nn.Module) -> nn.Module:
    """Make every plain Conv3d that `onednn_pays` for an OneDNNConv3d, in place (the module's class
    changes; parameters, names and state_dict do not); returns the model."""
    for m in model.modules():
        if type(m) is nn.Conv3d and onednn_pays(m):
            m.__class__ = OneDNNConv3d
    return model


# ----------------------------------------------------------------------------- polyphase head at 1/2
# With `head_at: half` the tail is up2 -> 3x3x3 head -> logits up2. `model.resample.upsample2_conv3d`
# computes the first two as one conv at 1/4 resolution with 8x the output channels (one per parity of
# the output voxel) and a depth-to-space shuffle, plus the one-voxel border shell recomputed: the same
# values to float rounding, without the 12-channel upsampled tensor at 1/2 resolution nor a 3-output
# conv over it (`bench/bench_upsample.py`: the demo's grown student 105.5 -> 84.5 ms per 128^3 window).


def polyphase_head(model: nn.Module) -> nn.Module:
    """Let a refine head at 1/2 resolution run in polyphase form, in place; returns the model (exact).

    Sets the decoder's `polyphase_head` flag; `model.refineformer3d.refine_tail` checks at every call
    that the head is still a plain float 3x3x3 Conv3d (a fake-quant or INT8 layer swapped in later runs
    as it is) and that no graph is traced. Other decoders and heads are left as they are."""
    decoder = model.decoder
    if decoder_kind(decoder) == "refine" and decoder.head_at == "half":
        decoder.polyphase_head = True
    return model


# ----------------------------------------------------------------------------- all of them


def inference_graph(model: nn.Module, *, reassoc: bool = True, channels_last: bool = True,
                    onednn: bool = True, polyphase: bool = True) -> nn.Module:
    """A copy of `model` in eval mode with the exact inference rewrites applied; `model` is unchanged.

    reassoc: re-associate the decoder's fusion (fewer multiply-adds at 1/4 resolution).
    channels_last: run the refine decoder's tail in channels_last_3d (PyTorch eager on CPU: 1.3-1.9x
    faster there; exporters see an identity). onednn: `onednn_convs` (exporters see nn.Conv3d).
    polyphase: `polyphase_head` (a head at 1/2 resolution; exporters see the plain upsampling and conv).
    Idempotent: a rewritten model comes back rewritten once.
    """
    model = fold_bn(copy.deepcopy(model).eval())
    if reassoc:
        reassociate_decoder(model)
    if channels_last:
        channels_last_tail(model)
    if onednn:
        onednn_convs(model)
    if polyphase:
        polyphase_head(model)
    return model
