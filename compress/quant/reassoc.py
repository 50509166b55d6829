"""Re-associate the decoder's fusion: 1x1x1 conv before trilinear upsampling (exact).

SegFormer3D fuses `fuse(cat(up(p4), up(p3), up(p2), p1))` at 1/4 resolution. A 1x1x1 conv is a
per-voxel linear map, trilinear upsampling is a per-channel linear map whose weights sum to 1, so they
commute, and a conv over concatenated inputs is the sum of convs over its input-channel blocks:

    fuse(cat(up(p_i))) = sum_i up(W_i p_i) + b

`ReassociatedDecoder` computes the right-hand side: each W_i (`fuse_parts.{i}`) runs on stage i's own,
coarser grid, so most of the fusion's multiply-adds leave the 1/4-resolution grid. A factorised fuse
(LowRankConv3d) splits its `down` conv and keeps `up` (`fuse_up`) after the sum. The per-stage
Linear + LayerNorm projections stay in front (LayerNorm is not linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teacher.layers import LowRankConv3d


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
        self.kind = "refine" if hasattr(decoder, "head") else "allmlp"
        if self.kind == "refine":
            self.refine_dw, self.refine_dw_bn = decoder.refine_dw, decoder.refine_dw_bn
            self.refine_pw, self.refine_pw_bn = decoder.refine_pw, decoder.refine_pw_bn
            self.head = decoder.head
        else:
            self.pred = decoder.pred

    def fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        out = None
        for i, (proj, part, f) in enumerate(zip(self.projections, self.fuse_parts, features)):
            y = part(proj(f))  # (B, k, *grid_i): the conv runs on stage i's grid
            if i:
                y = F.interpolate(y, size=size, mode="trilinear", align_corners=False)
            out = y if out is None else out + y
        if self.fuse_bias is not None:
            out = out + self.fuse_bias.view(1, -1, 1, 1, 1)
        return F.relu(self.fuse_bn(self.fuse_up(out)))  # (B, fuse_dim, D/4, H/4, W/4)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, ...]) -> torch.Tensor:
        x = self.fused(features)
        if self.kind == "allmlp":
            return F.interpolate(self.pred(x), size=out_size, mode="trilinear", align_corners=False)
        x = F.relu(self.refine_dw_bn(self.refine_dw(x)))
        x = F.relu(self.refine_pw_bn(self.refine_pw(x)))
        x = F.interpolate(x, size=out_size, mode="trilinear", align_corners=False)
        return self.head(x)


def reassociate_decoder(model: nn.Module) -> nn.Module:
    """Replace model.decoder by its ReassociatedDecoder, in place; returns the model."""
    if not isinstance(model.decoder, ReassociatedDecoder):
        model.decoder = ReassociatedDecoder(model.decoder)
    return model


def final_layer(model: nn.Module) -> str:
    """Name of the conv that produces the logits."""
    return "decoder.head" if hasattr(model.decoder, "head") else "decoder.pred"
