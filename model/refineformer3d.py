"""RefineFormer3D: a SegFormer3D-style Mix Vision Transformer 3D encoder with two decoders.

Reads top-down: spec -> attention -> Mix-FFN -> block -> stage -> encoder -> decoders -> model.
Every width is explicit in `ModelSpec`, so a thinned, factorised or grown model rebuilds from plain
data. Shapes: B batch, C channels, N = D*H*W tokens, A attention dim (= heads * head size).

Inference-only rewrites (BatchNorm folding, decoder re-association, a channels-last CPU tail) are
named steps in `model.rewrites`; `forward` here is the one graph for training and inference alike.

Presets (see README for the measured parameter and multiply-add counts):
- `segformer3d`: the published SegFormer3D, all-MLP decoder, 4,525,251 parameters.
- `refineformer3d`: the same encoder with the refine decoder (3D-convolution fusion at 1/4
  resolution, trilinear upsampling to full resolution, then a final 3x3x3 Conv3d).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.artifact import register_builder
from common.config import ConfigError
from model.layers import LowRankConv3d, LowRankLinear
from model.resample import tracing, upsample, upsample2_conv3d


HEAD_AT = ("full", "half", "quarter")  # where the refine decoder's 3x3x3 head runs


@dataclass
class ModelSpec:
    decoder: str = "refine"  # refine | allmlp
    in_chans: int = 4
    num_classes: int = 3
    embed_dims: list[int] = field(default_factory=lambda: [32, 64, 160, 256])
    num_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    sr_ratios: list[int] = field(default_factory=lambda: [4, 2, 1, 1])
    patch_kernels: list[int] = field(default_factory=lambda: [7, 3, 3, 3])
    patch_strides: list[int] = field(default_factory=lambda: [4, 2, 2, 2])
    patch_paddings: list[int] = field(default_factory=lambda: [3, 1, 1, 1])
    # None entries are filled by `resolve()`: attention dim = embed dim, MLP hidden = 4 x embed dim,
    # attention scale = head size ** -0.5 (fixed at build time so that growing a head is exact).
    attn_dims: list[int] | None = None
    attn_scales: list[float] | None = None
    mlp_hidden: list[list[int]] | None = None
    decoder_dim: int = 256  # per-stage projection width
    fuse_dim: int = 256  # output of the fusion convolution
    refine_dim: int = 16  # refine decoder: channels feeding the 3x3x3 head
    head_at: str = "full"  # refine decoder's head: full resolution, "half" or "quarter" (logits upsampled from there)
    qkv_bias: bool = True
    ranks: dict[str, int] = field(default_factory=dict)  # low-rank layers: module name -> rank
    kind: str = "fp32"

    def resolve(self) -> "ModelSpec":
        """A copy with every derived width written out."""
        s = dataclasses.replace(self)
        s.attn_dims = list(s.attn_dims or s.embed_dims)
        s.attn_scales = list(
            s.attn_scales or [(a // h) ** -0.5 for a, h in zip(s.attn_dims, s.num_heads)]
        )
        s.mlp_hidden = [list(x) for x in s.mlp_hidden] if s.mlp_hidden else [
            [4 * c] * d for c, d in zip(s.embed_dims, s.depths)
        ]
        s.ranks = dict(s.ranks)
        self.validate(s)
        return s

    @staticmethod
    def validate(s: "ModelSpec") -> None:
        n = len(s.embed_dims)
        for name in ("num_heads", "depths", "sr_ratios", "patch_kernels", "patch_strides", "patch_paddings"):
            if len(getattr(s, name)) != n:
                raise ValueError(f"model spec: {name} has {len(getattr(s, name))} entries, embed_dims has {n}")
        for i, (a, h) in enumerate(zip(s.attn_dims, s.num_heads)):
            if a % h:
                raise ValueError(f"model spec: stage {i} attention dim {a} is not divisible by {h} heads")
        for i, (hid, d) in enumerate(zip(s.mlp_hidden, s.depths)):
            if len(hid) != d:
                raise ValueError(f"model spec: stage {i} has {d} blocks but {len(hid)} MLP hidden sizes")
        if s.decoder not in ("refine", "allmlp"):
            raise ValueError(f"model spec: unknown decoder {s.decoder!r} (refine | allmlp)")
        if s.head_at not in HEAD_AT:
            raise ValueError(f"model spec: head_at {s.head_at!r} is not one of {', '.join(HEAD_AT)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"model spec: unknown fields {sorted(unknown)}")
        return cls(**values)

    @property
    def downsample(self) -> int:
        """Total stride of the encoder: input sizes must be multiples of it (`total_stride` of a stored spec)."""
        return math.prod(self.patch_strides)


def total_stride(spec: dict) -> int:
    """`ModelSpec.downsample` of a stored spec dict (the default strides where it names none)."""
    return math.prod(int(s) for s in spec.get("patch_strides") or ModelSpec().patch_strides)


PRESETS: dict[str, dict[str, Any]] = {
    "segformer3d": dict(decoder="allmlp"),
    "refineformer3d": dict(decoder="refine"),
}


def preset_spec(name: str, width: float = 1.0, **overrides: Any) -> ModelSpec:
    """A named preset, optionally thinned: embed dims, MLP and decoder widths scale, heads stay."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    spec = ModelSpec(**PRESETS[name])
    if width != 1.0:
        spec = scale_width(spec, width)
    for key, value in overrides.items():
        if not hasattr(spec, key):
            raise ValueError(f"model override: unknown spec field {key!r}")
        setattr(spec, key, value)
    return spec.resolve()


def scale_width(spec: ModelSpec, width: float) -> ModelSpec:
    """Scale every width by `width`; head counts are kept (so the head size shrinks)."""
    s = spec.resolve()

    def w(c: int, multiple: int = 1) -> int:
        return max(multiple, int(round(c * width / multiple)) * multiple)

    embed = [w(c, h) for c, h in zip(s.embed_dims, s.num_heads)]
    return dataclasses.replace(
        s,
        embed_dims=embed,
        attn_dims=[w(a, h) for a, h in zip(s.attn_dims, s.num_heads)],
        attn_scales=None,
        mlp_hidden=[[w(x) for x in hid] for hid in s.mlp_hidden],
        decoder_dim=w(s.decoder_dim),
        fuse_dim=w(s.fuse_dim),
        refine_dim=max(4, w(s.refine_dim)),
        ranks={},
    )


# ----------------------------------------------------------------------------- encoder


def tokens_to_grid(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, D, H, W), a channels_last_3d view of the same memory (no copy).

    `x.transpose(1, 2).reshape(B, C, *shape)` gives the same values and, for B > 1, the same strides; at
    B = 1 its batch stride is C instead of N * C, which ATen does not take for channels_last_3d, so a
    Conv3d copies it to the default layout first: a depthwise 3x3x3 conv (32 channels, 32^3) took 18.1
    instead of 3.1 ms on 2 threads (`bench/bench_layout.py`). `grid.flatten(2).transpose(1, 2)` of this
    view (and of a Conv3d's output on it, which keeps the layout) is a contiguous (B, N, C) view again."""
    B, _, C = x.shape
    return x.reshape(B, *shape, C).permute(0, 4, 1, 2, 3)


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced grid."""

    def __init__(self, dim: int, attn_dim: int, heads: int, sr_ratio: int, scale: float, qkv_bias: bool):
        super().__init__()
        self.heads, self.sr_ratio, self.scale = heads, sr_ratio, scale
        self.q = nn.Linear(dim, attn_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, hs)
        if self.sr_ratio > 1:
            grid = tokens_to_grid(x, shape)
            x = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))  # (B, N/sr^3, C)
        kv = self.kv(x).reshape(B, x.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, heads, M, hs)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, hs)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3x3 Conv3d + BatchNorm (positional information) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.bn = nn.BatchNorm3d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.fc1(x)
        grid = tokens_to_grid(x, shape)  # (B, hidden, D, H, W)
        x = self.bn(self.dwconv(grid)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Block(nn.Module):
    def __init__(self, dim: int, attn_dim: int, heads: int, sr_ratio: int, scale: float, hidden: int, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, attn_dim, heads, sr_ratio, scale, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, hidden)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), shape)
        return x + self.mlp(self.norm2(x), shape)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided Conv3d, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.proj(x)  # (B, C, D, H, W)
        shape = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), shape


class Stage(nn.Module):
    def __init__(self, spec: ModelSpec, i: int, in_chans: int):
        super().__init__()
        dim = spec.embed_dims[i]
        self.patch_embed = PatchEmbed(in_chans, dim, spec.patch_kernels[i], spec.patch_strides[i], spec.patch_paddings[i])
        self.blocks = nn.ModuleList(
            Block(dim, spec.attn_dims[i], spec.num_heads[i], spec.sr_ratios[i], spec.attn_scales[i], hidden, spec.qkv_bias)
            for hidden in spec.mlp_hidden[i]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = self.patch_embed(x)  # (B, N, C)
        for block in self.blocks:
            x = block(x, shape)
        x = self.norm(x)
        return tokens_to_grid(x, shape)  # (B, C, D, H, W)


class MixVisionTransformer3D(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        chans = [spec.in_chans, *spec.embed_dims[:-1]]
        self.stages = nn.ModuleList(Stage(spec, i, c) for i, c in enumerate(chans))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # strides 4, 8, 16, 32


# ----------------------------------------------------------------------------- decoders


class StageProjection(nn.Module):
    """Per-stage Linear(C_i -> decoder_dim) + LayerNorm, applied to every voxel."""

    def __init__(self, dim: int, decoder_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, decoder_dim)
        self.norm = nn.LayerNorm(decoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, *shape = x.shape
        y = self.norm(self.proj(x.flatten(2).transpose(1, 2)))  # (B, N, decoder_dim)
        return tokens_to_grid(y, shape)


class AllMLPDecoder(nn.Module):
    """SegFormer3D's head: project, upsample to 1/4, concatenate (c4, c3, c2, c1), 1x1 fuse, predict, x4."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.projections = nn.ModuleList(StageProjection(c, spec.decoder_dim) for c in spec.embed_dims)
        self.fuse = nn.Conv3d(len(spec.embed_dims) * spec.decoder_dim, spec.fuse_dim, 1, bias=False)
        self.fuse_bn = nn.BatchNorm3d(spec.fuse_dim)
        self.pred = nn.Conv3d(spec.fuse_dim, spec.num_classes, 1)
        self.scale = spec.patch_strides[0]

    def fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        parts = [
            upsample(p(f), size) if i else p(f)
            for i, (p, f) in enumerate(zip(self.projections, features))
        ]
        # Concatenated deepest first, as the reference implementation does (weights stay compatible).
        return F.relu(self.fuse_bn(self.fuse(torch.cat(parts[::-1], dim=1))))  # (B, fuse_dim, D/4, H/4, W/4)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, ...]) -> torch.Tensor:
        logits = self.pred(self.fused(features))
        return upsample(logits, out_size)


class RefineDecoder(AllMLPDecoder):
    """All-MLP fusion, then 3D-convolution refinement at 1/4 resolution and a 3x3x3 head.

    refine: depthwise 3x3x3 Conv3d + BN + ReLU (spatial fusion across the four scales), 1x1x1 Conv3d
    down to `refine_dim` + BN + ReLU; then (`head_at` "full") trilinear x4 and the head Conv3d 3x3x3
    (refine_dim -> classes) at full resolution, where only `refine_dim` channels arrive; or
    (`head_at` "quarter") the head at 1/4 resolution and the logits upsampled x4, as SegFormer3D
    predicts: 64x fewer head multiply-adds (about half of a width-0.25 student's at 128^3); or
    (`head_at` "half") trilinear x2, the head at 1/2 resolution, the logits upsampled x2: 8x fewer
    head multiply-adds than at full resolution, and the thin regions (ET rims) that a 1/4-resolution
    head loses mostly kept (the README's "What compression keeps").
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        del self.pred
        f, r = spec.fuse_dim, spec.refine_dim
        self.refine_dw = nn.Conv3d(f, f, 3, padding=1, groups=f, bias=False)
        self.refine_dw_bn = nn.BatchNorm3d(f)
        self.refine_pw = nn.Conv3d(f, r, 1, bias=False)
        self.refine_pw_bn = nn.BatchNorm3d(r)
        self.head = nn.Conv3d(r, spec.num_classes, 3, padding=1)
        self.head_at = spec.head_at

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, ...]) -> torch.Tensor:
        return refine_tail(self, self.fused(features), out_size)


def refine_tail(decoder: nn.Module, x: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
    """A refine decoder after fusion: (B, fuse_dim, D/4, H/4, W/4) -> logits (B, classes, *out_size).
    Shared by `RefineDecoder` and its exact rewrites (`model.rewrites`), which hold the same modules."""
    x = F.relu(decoder.refine_dw_bn(decoder.refine_dw(x)))
    x = F.relu(decoder.refine_pw_bn(decoder.refine_pw(x)))  # (B, refine_dim, D/4, H/4, W/4)
    if decoder.head_at == "quarter":
        return upsample(decoder.head(x), out_size)
    if decoder.head_at == "half":
        half = tuple(n // 2 for n in out_size)
        if polyphase_head_applies(decoder, x, half):  # the inference rewrite `model.rewrites.polyphase_head`
            return upsample(upsample2_conv3d(x, decoder.head.weight, decoder.head.bias), out_size)
        return upsample(decoder.head(upsample(x, half)), out_size)
    return decoder.head(upsample(x, out_size))


def polyphase_head_applies(decoder: nn.Module, x: torch.Tensor, half: tuple[int, ...]) -> bool:
    """Whether a head at 1/2 resolution runs as one polyphase conv at 1/4 (`model.resample.upsample2_conv3d`):
    set on the decoder by the inference rewrite; the head an nn.Conv3d whose forward is F.conv3d on its
    own `weight` (a float conv, or an int8-stored one computing in float on its dequantized weight; a
    fake-quant or INT8-kernel layer swapped in is no nn.Conv3d and runs itself), 3x3x3 with padding 1;
    `half` (the head's grid) exactly twice x's grid, at least 2 per side (a spec whose first stage is not
    at 1/4 of the input resizes by another factor); no graph being traced (ONNX export and fvcore's count
    see the plain upsampling and conv)."""
    head = decoder.head
    return (not tracing() and getattr(decoder, "polyphase_head", False) and isinstance(head, nn.Conv3d)
            and head.kernel_size == (3, 3, 3) and head.padding == (1, 1, 1) and head.stride == (1, 1, 1)
            and head.dilation == (1, 1, 1) and head.groups == 1 and head.padding_mode == "zeros"
            and min(x.shape[2:]) >= 2 and tuple(half) == tuple(2 * int(s) for s in x.shape[2:]))


# ----------------------------------------------------------------------------- model


class RefineFormer3D(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec.resolve()
        self.encoder = MixVisionTransformer3D(self.spec)
        decoder = RefineDecoder if self.spec.decoder == "refine" else AllMLPDecoder
        self.decoder = decoder(self.spec)
        self.apply(_init_weights)
        for name, rank in self.spec.ranks.items():
            factorise_module(self, name, rank)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        stride = self.spec.downsample
        if any(s % stride for s in x.shape[2:]):
            raise ValueError(f"input spatial size {tuple(int(s) for s in x.shape[2:])} must be divisible by {stride}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> logits (B, num_classes, D, H, W)."""
        return self.decoder(self.forward_features(x), tuple(x.shape[2:]))

    def artifact_spec(self) -> dict[str, Any]:
        """What an artifact records to rebuild this model (kind "fp32"); subclasses made by other
        stages (the QAT model) describe themselves as their own kind."""
        return self.spec.to_dict()


@register_builder("fp32")
def model_from_spec(spec: dict[str, Any] | ModelSpec) -> RefineFormer3D:
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return RefineFormer3D(spec)


def rebuilt(like: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor],
            cls: type[RefineFormer3D] | None = None) -> RefineFormer3D:
    """`cls(spec)` (default RefineFormer3D) with `state` loaded strictly, on `like`'s device and dtype and
    in its train/eval mode: what a step that changes a model's shape returns."""
    ref = next(like.parameters())
    model = (cls or RefineFormer3D)(spec)
    model.load_state_dict(state, strict=True)
    return model.to(device=ref.device, dtype=ref.dtype).train(like.training)


def build_from_config(cfg: Any) -> RefineFormer3D:
    """From a `common.config.ModelConfig`; ConfigError for a spec that does not fit together."""
    try:
        return RefineFormer3D(preset_spec(cfg.preset, cfg.width, **cfg.overrides))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model (preset {cfg.preset!r}, width {cfg.width}, overrides {cfg.overrides}): {e}") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- helpers


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm3d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv3d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"model has no module {name!r}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` (the one module-swapping helper)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factorise_module(model: nn.Module, name: str, rank: int) -> nn.Module:
    """Swap a Linear/Conv3d for its low-rank twin with the given rank (weights uninitialised)."""
    m = get_module(model, name)
    if isinstance(m, (LowRankLinear, LowRankConv3d)):
        raise ValueError(f"{name} is already factorised")
    if isinstance(m, nn.Linear):
        new = LowRankLinear(m.in_features, m.out_features, rank, bias=m.bias is not None)
    elif isinstance(m, nn.Conv3d):
        if m.groups != 1:
            raise ValueError(f"{name}: grouped/depthwise convolutions are not factorised")
        new = LowRankConv3d(
            m.in_channels, m.out_channels, rank, m.kernel_size, m.stride, m.padding, bias=m.bias is not None
        )
    else:
        raise TypeError(f"{name}: cannot factorise a {type(m).__name__}")
    set_module(model, name, new)
    return new
