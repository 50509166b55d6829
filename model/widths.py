"""Which parameter dimensions each width of a RefineFormer3D indexes: the model's wiring, declared once.

A width group is a set of channels that must be kept, dropped or added together: the producer's
output rows (weight dim 0 and bias), the per-channel vectors that follow them (LayerNorm, BatchNorm
with its running statistics, a depthwise convolution), and the consumers' input columns (weight dim
1), each at an offset where a consumer reads several groups side by side (the key/value projection's
rows are [keys | values]; the fuse convolution reads the four stage projections concatenated,
deepest first). `width_uses(spec)` lists them:

    embed.{i}         stage i's residual stream (patch embedding, every block's norms, q/kv or sr
                      inputs, attention and MLP outputs, the stage norm, the next stage's and the
                      decoder projection's inputs)
    sr.{i}.{j}        the spatial-reduction conv's output (sr_norm, kv input) of block j, if any
    qk.{i}.{j}        query rows and key rows (head-major: heads x head size)
    v.{i}.{j}         value rows and the attention projection's input columns
    hidden.{i}.{j}    the Mix-FFN hidden width (fc1, depthwise conv, BatchNorm, fc2 input)
    decoder.{i}       stage i's decoder projection (and its block of the fuse input)
    fuse              the fusion width (fuse, fuse_bn, refine_dw + BN and refine_pw input, or pred input)
    refine            the refine width (refine_pw, its BN, the head input)

`student.thin` slices a teacher along these groups and `compress.grow` scores growth units by the
parameters they hold; `tests/test_widths.py` checks the encoder and decoder groups against Torch-Pruning's
dependency graph (the groups it prunes together), so a wiring change that is not declared here fails there.
A factorised layer (`spec.ranks`) is indexed on its `up` factor's rows and its `down` factor's columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.refineformer3d import ModelSpec, RefineFormer3D

Slices = tuple[torch.Tensor | None, ...]  # per dim of a tensor: the indices kept along it, or None (all)

NORM_FIELDS = ("weight", "bias")
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Use:
    """One dimension of one state_dict entry that a width indexes, from `offset` on."""

    key: str
    dim: int
    offset: int = 0


def _rows(name: str, ranks: dict[str, int], offset: int = 0) -> list[Use]:
    """A layer's output channels: weight rows and bias (of the `up` factor when factorised)."""
    layer = f"{name}.up" if name in ranks else name
    return [Use(f"{layer}.weight", 0, offset), Use(f"{layer}.bias", 0, offset)]


def _cols(name: str, ranks: dict[str, int], offset: int = 0) -> list[Use]:
    """A layer's input channels: weight columns (of the `down` factor when factorised)."""
    layer = f"{name}.down" if name in ranks else name
    return [Use(f"{layer}.weight", 1, offset)]


def _norm(name: str, fields: tuple[str, ...] = NORM_FIELDS) -> list[Use]:
    return [Use(f"{name}.{f}", 0) for f in fields]


def width_uses(spec: ModelSpec) -> dict[str, list[Use]]:
    """Every width group of `spec` -> the (key, dim, offset) it indexes. Keys that a model does not
    have (a bias the layer was built without) are listed anyway: callers match them to a state_dict."""
    s = spec.resolve()
    r, n = s.ranks, len(s.embed_dims)
    groups: dict[str, list[Use]] = {}
    for i in range(n):
        p = f"encoder.stages.{i}"
        embed = _rows(f"{p}.patch_embed.proj", r) + _norm(f"{p}.patch_embed.norm")
        for j in range(s.depths[i]):
            b = f"{p}.blocks.{j}"
            sr = s.sr_ratios[i] > 1
            embed += _norm(f"{b}.norm1") + _cols(f"{b}.attn.q", r)
            embed += _cols(f"{b}.attn.sr", r) if sr else _cols(f"{b}.attn.kv", r)
            embed += _rows(f"{b}.attn.proj", r) + _norm(f"{b}.norm2") + _cols(f"{b}.mlp.fc1", r) + _rows(f"{b}.mlp.fc2", r)
            if sr:
                groups[f"sr.{i}.{j}"] = _rows(f"{b}.attn.sr", r) + _norm(f"{b}.attn.sr_norm") + _cols(f"{b}.attn.kv", r)
            groups[f"qk.{i}.{j}"] = _rows(f"{b}.attn.q", r) + _rows(f"{b}.attn.kv", r)
            groups[f"v.{i}.{j}"] = _rows(f"{b}.attn.kv", r, offset=s.attn_dims[i]) + _cols(f"{b}.attn.proj", r)
            groups[f"hidden.{i}.{j}"] = (_rows(f"{b}.mlp.fc1", r) + _rows(f"{b}.mlp.dwconv", r)
                                        + _norm(f"{b}.mlp.bn", BN_FIELDS) + _cols(f"{b}.mlp.fc2", r))
        embed += _norm(f"{p}.norm") + _cols(f"decoder.projections.{i}.proj", r)
        if i + 1 < n:
            embed += _cols(f"encoder.stages.{i + 1}.patch_embed.proj", r)
        groups[f"embed.{i}"] = embed
    for i in range(n):  # the fuse input is the concatenation deepest stage first: stage i is block n-1-i
        groups[f"decoder.{i}"] = (_rows(f"decoder.projections.{i}.proj", r) + _norm(f"decoder.projections.{i}.norm")
                                  + _cols("decoder.fuse", r, offset=(n - 1 - i) * s.decoder_dim))
    fuse = _rows("decoder.fuse", r) + _norm("decoder.fuse_bn", BN_FIELDS)
    if s.decoder == "refine":
        fuse += _rows("decoder.refine_dw", r) + _norm("decoder.refine_dw_bn", BN_FIELDS) + _cols("decoder.refine_pw", r)
        groups["refine"] = (_rows("decoder.refine_pw", r) + _norm("decoder.refine_pw_bn", BN_FIELDS)
                            + _cols("decoder.head", r))
    else:
        fuse += _cols("decoder.pred", r)
    groups["fuse"] = fuse
    return groups


def group_keys(spec: ModelSpec, names: list[str], present: set[str] | None = None) -> list[str]:
    """The state_dict keys the width groups `names` index (those in `present`, when given), in order."""
    uses = width_uses(spec)
    unknown = [g for g in names if g not in uses]
    if unknown:
        raise KeyError(f"no width group {unknown} in this spec (groups: {', '.join(uses)})")
    keys = dict.fromkeys(u.key for g in names for u in uses[g])
    return [k for k in keys if present is None or k in present]


def group_slices(spec: ModelSpec, kept: dict[str, torch.Tensor]) -> dict[str, Slices]:
    """For every state_dict entry of a model of `spec`: the indices kept along each dim when the width
    groups in `kept` keep those channels (sorted indices into the group) and every other width is kept
    whole. Where a consumer reads several groups side by side, their indices are joined by offset."""
    s = spec.resolve()
    with torch.device("meta"):
        dims = {k: v.ndim for k, v in RefineFormer3D(s).state_dict().items()}
    uses = width_uses(s)
    unknown = [g for g in kept if g not in uses]
    if unknown:
        raise KeyError(f"no width group {unknown} in this spec (groups: {', '.join(uses)})")
    pieces: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = {}
    for group, idx in kept.items():
        for u in uses[group]:
            if u.key in dims:
                pieces.setdefault((u.key, u.dim), []).append((u.offset, idx))
    return {key: tuple(torch.cat([off + idx for off, idx in sorted(pieces[key, d], key=lambda p: p[0])])
                       if (key, d) in pieces else None for d in range(ndim))
            for key, ndim in dims.items()}


def slice_state(state: dict[str, torch.Tensor], slices: dict[str, Slices]) -> dict[str, torch.Tensor]:
    """Every tensor of `state` restricted to `slices` (copies). KeyError naming what `state` lacks."""
    missing = sorted(set(slices) - set(state))
    if missing:
        raise KeyError(f"state_dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    out = {}
    for key, dims in slices.items():
        x = state[key]
        for dim, idx in enumerate(dims):
            if idx is not None:
                x = x.index_select(dim, idx.to(x.device))
        out[key] = x.clone()
    return out


def group_magnitude(model: nn.Module, group: str) -> torch.Tensor:
    """L2 norm per channel of a width group over every weight and bias it indexes (the group
    magnitude Torch-Pruning ranks by, over the whole coupled group): (channels,)."""
    state = model.state_dict()
    parts = []  # per use: squared norms of its slices from the use's offset on
    for u in width_uses(model.spec)[group]:
        if u.key in state and u.key.endswith((".weight", ".bias")):
            w = state[u.key].detach().float().transpose(0, u.dim)
            parts.append((w.flatten(1).pow(2).sum(1) if w.ndim > 1 else w.pow(2))[u.offset:])
    if not parts:
        raise KeyError(f"width group {group} indexes no weight of this model")
    width = min(len(p) for p in parts)  # the producer's rows; a consumer reading several groups has more after it
    return torch.stack([p[:width] for p in parts]).sum(0).sqrt()
