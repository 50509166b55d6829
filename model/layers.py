"""Layer types a model spec can name besides the standard torch ones.

Low-rank layers live here (not in `compress/`) because a factorised model must rebuild from its
spec alone; `compress.lowrank` only does the SVD surgery that fills them.
"""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """W (out x in) ~= up (out x rank) @ down (rank x in); the bias stays on `up`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LowRankConv3d(nn.Module):
    """A rank-r Conv3d with the original kernel, then a 1x1x1 Conv3d back to `out_channels`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.down = nn.Conv3d(in_channels, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.up = nn.Conv3d(rank, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
