"""Progressive channel growth: start narrow, widen only where the gradient asks for it.

During a distillation fine-tune, every time the training loss plateaus while validation Dice has
risen since the last growth event, the top-k growable units are widened by `factor` (within a
parameter budget and a multiply-add budget). Growth stops when Dice no longer moves. The result is a
"just-enough" width network that rebuilds from its spec.

Growth is cost-aware, because the goal is a fast CPU student: a channel's price depends on the grid
it lives on. One refine_dim channel runs at full resolution (about 189 M multiply-adds at 128^3 in
the demo student), one stage-3 MLP channel on 4^3 tokens (about 8 k). With `cost: macs` (default)
units are ranked by gradient score per multiply-add of one added channel at `reference_input`;
with `cost: params` by gradient score alone. `spec_macs` prices a spec analytically (exactly what
`model.macs.count_macs` counts, in microseconds instead of seconds), so every candidate widening
is checked against `macs_budget` exactly.

Growable units (named after the `ModelSpec` field they change):

    mlp_hidden.{i}.{j}  MLP hidden size of block j in stage i (fc1 rows, dwconv + bn channels, fc2 cols)
    attn_dims.{i}       attention head size of every block in stage i (q/k/v dims per head, proj cols);
                        `attn_scales` stays fixed, so attention scores are unchanged
    ranks.{module}      rank of a factorised layer (LowRankLinear / LowRankConv3d: down rows, up cols)
    fuse_dim            decoder fusion width (fuse rows, fuse_bn; pred or refine_dw/bn + refine_pw cols)
    refine_dim          refine decoder width (refine_pw rows, refine_pw_bn, head input cols)

Every widening is function-preserving (Net2Net style): new channels get copies of existing ones
(plus a little noise) or a small random init on the incoming side, and zeros on the outgoing side;
for attention, the new key dims are zero so that q.k per head is unchanged. BatchNorm entries of new
channels are copies (with running stats) or identity (weight 1, bias 0, mean 0, var 1), so the output
is unchanged in train and eval mode.

Not growable: widths that feed a LayerNorm (embed_dims, decoder_dim). A LayerNorm normalises over
all channels of a token, so adding a channel changes the mean and variance seen by the old ones;
no choice of new weights keeps the output unchanged in general.

Widening goes through the spec: `widen(model, unit, width)` builds `RefineFormer3D(new_spec)` and
loads a mapped state_dict strictly. At a growth event the engine's `trainer.replace_model` rebuilds
the optimizer at the same schedule position; Adam moments carry over for parameters whose shape is
unchanged, widened parameters start with fresh moments (simpler than mapping them, and harmless:
their old slices are re-estimated within a few steps).
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from common.artifact import Artifact
from common.cli import config_from_args, data_given, out_dir, run_main, stage_parser
from common.config import Config, ConfigError, parse_count
from engine.loop import Stage
from engine.runner import StageContext, StageDef, exit_code, run_stage
from model.layers import LowRankConv3d, LowRankLinear
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params, get_module
from student.distill import distill_trainer

STAGE = "grown"
KINDS = ("mlp_hidden", "attn_dims", "ranks", "fuse_dim", "refine_dim")
LowRank = (LowRankLinear, LowRankConv3d)


# ----------------------------------------------------------------------------- units


def growable_units(spec: ModelSpec, kinds: Sequence[str] = KINDS) -> list[str]:
    """Names of every growable unit of a (resolved) spec, restricted to `kinds`."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"grow: unknown unit kinds {sorted(unknown)} (known: {', '.join(KINDS)})")
    spec = spec.resolve()
    units: list[str] = []
    if "mlp_hidden" in kinds:
        units += [f"mlp_hidden.{i}.{j}" for i, hid in enumerate(spec.mlp_hidden) for j in range(len(hid))]
    if "attn_dims" in kinds:
        units += [f"attn_dims.{i}" for i in range(len(spec.attn_dims))]
    if "ranks" in kinds:
        units += [f"ranks.{name}" for name in sorted(spec.ranks)]
    if "fuse_dim" in kinds:
        units.append("fuse_dim")
    if "refine_dim" in kinds and spec.decoder == "refine":
        units.append("refine_dim")
    return units


def _parse(unit: str) -> tuple[str, str]:
    kind, _, rest = unit.partition(".")
    if kind not in KINDS:
        raise ValueError(f"grow: unknown unit {unit!r} (kinds: {', '.join(KINDS)})")
    return kind, rest


def unit_width(spec: ModelSpec, unit: str) -> int:
    kind, rest = _parse(unit)
    if kind == "mlp_hidden":
        i, j = map(int, rest.split("."))
        return spec.mlp_hidden[i][j]
    if kind == "attn_dims":
        return spec.attn_dims[int(rest)]
    if kind == "ranks":
        if rest not in spec.ranks:
            raise ValueError(f"grow: {rest!r} is not a factorised layer (spec.ranks: {sorted(spec.ranks)})")
        return spec.ranks[rest]
    return getattr(spec, kind)


def with_width(spec: ModelSpec, unit: str, width: int) -> ModelSpec:
    """A copy of the (resolved) spec with one unit's width replaced; attention scales stay as they are."""
    s = spec.resolve()
    kind, rest = _parse(unit)
    if kind == "mlp_hidden":
        i, j = map(int, rest.split("."))
        s.mlp_hidden[i][j] = width
    elif kind == "attn_dims":
        i = int(rest)
        if width % s.num_heads[i]:
            raise ValueError(f"grow: attn_dims.{i} = {width} is not divisible by {s.num_heads[i]} heads")
        s.attn_dims = [width if k == i else a for k, a in enumerate(s.attn_dims)]
    elif kind == "ranks":
        s.ranks[rest] = width
    else:
        setattr(s, kind, width)
    return s.resolve()


def max_width(model: nn.Module, unit: str) -> int | None:
    """The largest useful width: full rank for factorised layers, unbounded (None) otherwise."""
    kind, rest = _parse(unit)
    if kind != "ranks":
        return None
    m = get_module(model, rest)
    if isinstance(m, LowRankLinear):
        return min(m.in_features, m.out_features)
    if isinstance(m, LowRankConv3d):
        return min(m.down.weight[0].numel(), m.out_channels)
    raise TypeError(f"grow: {rest} is a {type(m).__name__}, not a low-rank layer")


def grown_width(model: RefineFormer3D, unit: str, factor: float) -> int | None:
    """The width `unit` would have after growing by `factor`; None when it cannot grow."""
    spec = model.spec
    old = unit_width(spec, unit)
    kind, rest = _parse(unit)
    if kind == "attn_dims":
        heads = spec.num_heads[int(rest)]
        hs = old // heads
        return heads * max(hs + 1, int(round(hs * factor)))
    new = max(old + 1, int(round(old * factor)))
    cap = max_width(model, unit)
    if cap is not None:
        new = min(new, cap)
    return new if new > old else None


def unit_parameters(model: nn.Module, unit: str) -> list[str]:
    """Parameter names whose gradients score `unit`."""
    kind, rest = _parse(unit)
    if kind == "mlp_hidden":
        i, j = rest.split(".")
        prefixes = [f"encoder.stages.{i}.blocks.{j}.mlp."]
    elif kind == "attn_dims":
        blocks = len(get_module(model, f"encoder.stages.{rest}.blocks"))
        prefixes = [f"encoder.stages.{rest}.blocks.{j}.attn.{p}." for j in range(blocks) for p in ("q", "kv", "proj")]
    elif kind == "ranks":
        prefixes = [f"{rest}."]
    elif kind == "fuse_dim":
        prefixes = ["decoder.fuse.", "decoder.fuse_bn."]
    else:
        prefixes = ["decoder.refine_pw.", "decoder.refine_pw_bn."]
    names = [n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))]
    if not names:
        raise ValueError(f"grow: unit {unit} has no parameters in this model")
    return names


def spec_params(spec: ModelSpec) -> int:
    """Parameter count of the model a spec describes (a CPU build: faster than meta tensors here)."""
    with torch.no_grad():
        return count_params(RefineFormer3D(spec))


# ----------------------------------------------------------------------------- compute cost


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
        macs += 8 * r * volume + layer("decoder.head", r, classes, volume, 27)
    else:
        macs += layer("decoder.pred", f, classes, n0) + 8 * classes * volume
    return macs


def width_step(spec: ModelSpec, unit: str) -> int:
    """The smallest widening of `unit`: one channel, or one dim per head for attention."""
    kind, rest = _parse(unit)
    return spec.num_heads[int(rest)] if kind == "attn_dims" else 1


def unit_macs(spec: ModelSpec, unit: str, input_size: Sequence[int]) -> float:
    """Multiply-adds one added channel of `unit` costs at `input_size` (exact: costs are linear in a width)."""
    spec = spec.resolve()
    step = width_step(spec, unit)
    wider = with_width(spec, unit, unit_width(spec, unit) + step)
    return (spec_macs(wider, input_size) - spec_macs(spec, input_size)) / step


# ----------------------------------------------------------------------------- function-preserving widening


@dataclass
class _Plan:
    """Where old channels go in the widened axis, and what each new channel copies (None: random)."""

    old_pos: torch.Tensor  # (old,) positions of the old channels in the new axis
    new_pos: torch.Tensor  # (new - old,) positions of the added channels
    src: torch.Tensor | None  # (new - old,) old channel each added one copies
    size: int


def _append_plan(old: int, new: int, copy: bool, gen: torch.Generator) -> _Plan:
    src = torch.randint(old, (new - old,), generator=gen) if copy else None
    return _Plan(torch.arange(old), torch.arange(old, new), src, new)


def _head_plan(heads: int, hs: int, hs_new: int, copy: bool, gen: torch.Generator) -> _Plan:
    """Heads are contiguous blocks of the head size: head h's block grows from hs to hs_new."""
    base_new = torch.arange(heads)[:, None] * hs_new
    old_pos = (base_new + torch.arange(hs)).flatten()
    new_pos = (base_new + torch.arange(hs, hs_new)).flatten()
    src = None
    if copy:  # each new dim of head h copies a dim of the same head
        src = (torch.arange(heads)[:, None] * hs + torch.randint(hs, (heads, hs_new - hs), generator=gen)).flatten()
    return _Plan(old_pos, new_pos, src, heads * hs_new)


def _grow_tensor(t: torch.Tensor, dim: int, plan: _Plan, fill: str, gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Widen `t` along `dim`; fill: zero | one | copy | random (normal with the std of `t`)."""
    shape = list(t.shape)
    shape[dim] = len(plan.new_pos)
    if fill == "copy" and plan.src is None:
        fill = "random"
    if fill == "zero":
        vals = torch.zeros(shape, dtype=t.dtype)
    elif fill == "one":
        vals = torch.ones(shape, dtype=t.dtype)
    elif fill == "copy":
        vals = t.index_select(dim, plan.src).clone()
        if noise:
            vals += noise * _std(t) * torch.randn(shape, generator=gen, dtype=t.dtype)
    elif fill == "random":
        vals = _std(t) * torch.randn(shape, generator=gen, dtype=t.dtype)
    else:
        raise ValueError(f"grow: unknown fill {fill!r}")
    out_shape = list(t.shape)
    out_shape[dim] = plan.size
    out = torch.empty(out_shape, dtype=t.dtype)
    out.index_copy_(dim, plan.old_pos, t)
    out.index_copy_(dim, plan.new_pos, vals)
    return out


def _std(t: torch.Tensor) -> float:
    s = float(t.float().std()) if t.numel() > 1 else 0.0
    return s if s > 0 and math.isfinite(s) else 0.02


class _Widener:
    """Edits a CPU copy of a state_dict, layer by layer, for one unit."""

    def __init__(self, model: nn.Module, init: str, noise: float, gen: torch.Generator):
        if init not in ("copy", "random"):
            raise ValueError(f"grow: init must be copy | random, got {init!r}")
        self.model, self.copy, self.noise, self.gen = model, init == "copy", noise, gen
        self.sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _grow(self, key: str, dim: int, plan: _Plan, fill: str, noise: float = 0.0) -> None:
        self.sd[key] = _grow_tensor(self.sd[key], dim, plan, fill, self.gen, noise)

    def _out_keys(self, name: str) -> tuple[str, str | None]:
        m = get_module(self.model, name)
        prefix = f"{name}.up" if isinstance(m, LowRank) else name
        bias = f"{prefix}.bias" if f"{prefix}.bias" in self.sd else None
        return f"{prefix}.weight", bias

    def out_side(self, name: str, plan: _Plan, zero: bool = False) -> None:
        """New output channels of a Linear/Conv3d (or the `up` of its low-rank twin)."""
        weight, bias = self._out_keys(name)
        self._grow(weight, 0, plan, "zero" if zero else "copy", self.noise)
        if bias:
            self._grow(bias, 0, plan, "zero" if zero or not self.copy else "copy")

    def kv_side(self, name: str, plan: _Plan) -> None:
        """kv rows are [k (A) | v (A)]: new k dims zero (scores unchanged), new v dims as out_side."""
        for key in self._out_keys(name):
            if key is None:
                continue
            k, v = self.sd[key].chunk(2, dim=0)
            v_fill = "copy" if key.endswith("weight") or self.copy else "zero"
            k = _grow_tensor(k, 0, plan, "zero", self.gen)
            v = _grow_tensor(v, 0, plan, v_fill, self.gen, self.noise if key.endswith("weight") else 0.0)
            self.sd[key] = torch.cat([k, v], dim=0)

    def in_side(self, name: str, plan: _Plan) -> None:
        """New input channels of the consumer are zero, so it ignores them at first."""
        m = get_module(self.model, name)
        self._grow(f"{name}.down.weight" if isinstance(m, LowRank) else f"{name}.weight", 1, plan, "zero")

    def depthwise(self, name: str, plan: _Plan) -> None:
        self._grow(f"{name}.weight", 0, plan, "copy")
        if f"{name}.bias" in self.sd:
            self._grow(f"{name}.bias", 0, plan, "copy" if self.copy else "zero")

    def batchnorm(self, name: str, plan: _Plan) -> None:
        """Copies of the source channels (running stats too), or an identity-ish BN."""
        for part, identity in (("weight", "one"), ("bias", "zero"), ("running_mean", "zero"), ("running_var", "one")):
            self._grow(f"{name}.{part}", 0, plan, "copy" if self.copy else identity)


def widen(
    model: RefineFormer3D, unit: str, width: int, *, init: str = "copy", noise: float = 0.01,
    generator: torch.Generator | None = None,
) -> RefineFormer3D:
    """A new model with `unit` widened to `width` and the same output (function-preserving).

    init "copy": new channels duplicate random existing ones (noise * std added to the incoming
    weights to break symmetry); "random": normal init with the layer's weight std.
    """
    gen = generator or torch.Generator().manual_seed(0)
    spec = model.spec
    old = unit_width(spec, unit)
    if width <= old:
        raise ValueError(f"grow: {unit} is {old} wide; cannot widen to {width}")
    new_spec = with_width(spec, unit, width)
    w = _Widener(model, init, noise, gen)
    kind, rest = _parse(unit)
    if kind == "mlp_hidden":
        i, j = rest.split(".")
        mlp = f"encoder.stages.{i}.blocks.{j}.mlp"
        plan = _append_plan(old, width, w.copy, gen)
        w.out_side(f"{mlp}.fc1", plan)
        w.depthwise(f"{mlp}.dwconv", plan)
        w.batchnorm(f"{mlp}.bn", plan)
        w.in_side(f"{mlp}.fc2", plan)
    elif kind == "attn_dims":
        i = int(rest)
        heads = spec.num_heads[i]
        plan = _head_plan(heads, old // heads, width // heads, w.copy, gen)
        for j in range(len(spec.mlp_hidden[i])):
            attn = f"encoder.stages.{i}.blocks.{j}.attn"
            w.out_side(f"{attn}.q", plan)
            w.kv_side(f"{attn}.kv", plan)
            w.in_side(f"{attn}.proj", plan)
    elif kind == "ranks":
        cap = max_width(model, unit)
        if width > cap:
            raise ValueError(f"grow: {unit} rank {width} exceeds the full rank {cap}")
        plan = _append_plan(old, width, w.copy, gen)
        w._grow(f"{rest}.down.weight", 0, plan, "copy", w.noise)
        w.in_side(f"{rest}.up", plan)
    elif kind == "fuse_dim":
        plan = _append_plan(old, width, w.copy, gen)
        w.out_side("decoder.fuse", plan)
        w.batchnorm("decoder.fuse_bn", plan)
        if spec.decoder == "refine":
            w.depthwise("decoder.refine_dw", plan)
            w.batchnorm("decoder.refine_dw_bn", plan)
            w.in_side("decoder.refine_pw", plan)
        else:
            w.in_side("decoder.pred", plan)
    else:  # refine_dim
        if spec.decoder != "refine":
            raise ValueError("grow: refine_dim is only growable with the refine decoder")
        plan = _append_plan(old, width, w.copy, gen)
        w.out_side("decoder.refine_pw", plan)
        w.batchnorm("decoder.refine_pw_bn", plan)
        w.in_side("decoder.head", plan)
    ref = next(model.parameters())
    new = RefineFormer3D(new_spec)
    new.load_state_dict(w.sd, strict=True)
    return new.to(device=ref.device, dtype=ref.dtype).train(model.training)


# ----------------------------------------------------------------------------- scoring and selection


class GradientScorer:
    """Mean squared gradient per unit (sum ||grad||^2 / sum numel over its parameters), averaged
    over the last `window` steps. Call `record()` after each backward (the engine's
    `after_backward` hook: gradients unscaled and clipped; clipping scales every unit alike).
    """

    def __init__(self, units: Sequence[str], window: int):
        if window < 1:
            raise ValueError(f"grow: scorer window must be >= 1, got {window}")
        self.units, self.window = list(units), window
        self.history: dict[str, deque] = {u: deque(maxlen=window) for u in self.units}
        self.model: nn.Module | None = None
        self._params: list[tuple[torch.Tensor, list[int]]] = []  # parameter, indices of its units
        self._numel = [0] * len(self.units)

    def bind(self, model: nn.Module, restart: bool = True) -> None:
        """Attach to a (new) model; the window restarts unless `restart` is False (a resumed run's
        rebuilt model: same units, same scores so far)."""
        self.model = model
        members: dict[str, list[int]] = {}
        self._numel = [0] * len(self.units)
        params = dict(model.named_parameters())
        for k, unit in enumerate(self.units):
            for name in unit_parameters(model, unit):
                members.setdefault(name, []).append(k)
                self._numel[k] += params[name].numel()
        self._params = [(params[name], idx) for name, idx in members.items()]
        if restart:
            for h in self.history.values():
                h.clear()

    def record(self) -> None:
        """Read the bound model's current `.grad`s as one step (one device sync)."""
        if self.model is None:
            raise RuntimeError("GradientScorer.record before bind")
        live = [(p.grad, idx) for p, idx in self._params if p.grad is not None]
        if not live:
            return
        sq = torch.stack([g.detach().float().pow(2).sum() for g, _ in live]).tolist()
        sums = [0.0] * len(self.units)
        for s, (_, idx) in zip(sq, live):
            for k in idx:
                sums[k] += s
        for k, unit in enumerate(self.units):
            self.history[unit].append(sums[k] / max(1, self._numel[k]))

    def scores(self) -> dict[str, float]:
        return {u: (sum(h) / len(h) if h else 0.0) for u, h in self.history.items()}

    def state_dict(self) -> dict[str, list[float]]:
        return {u: list(h) for u, h in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.history = {u: deque(state.get(u, ()), maxlen=self.window) for u in self.units}


COSTS = ("params", "macs")


def rank_units(
    spec: ModelSpec, scores: dict[str, float], cost: str = "macs", input_size: Sequence[int] = (128, 128, 128)
) -> list[tuple[str, float]]:
    """Units, best first, with their ranking key: the gradient score (cost "params"), or the score
    per multiply-add one added channel costs at `input_size` (cost "macs")."""
    if cost not in COSTS:
        raise ValueError(f"grow: cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if cost == "params":
        keys = dict(scores)
    else:
        keys = {u: s / max(unit_macs(spec, u, input_size), 1.0) for u, s in scores.items()}
    return sorted(keys.items(), key=lambda kv: (-kv[1], kv[0]))


def select_units(
    model: RefineFormer3D, scores: dict[str, float], top_k: int, factor: float, budget: int | None = None,
    *, cost: str = "macs", macs_budget: int | None = None, input_size: Sequence[int] = (128, 128, 128),
) -> list[tuple[str, int, int]]:
    """Greedy over `rank_units`: up to `top_k` units whose growth keeps the model within the
    parameter `budget` and the multiply-add budget `macs_budget` (at `input_size`; None: no limit).

    Units with no gradient signal (score <= 0) never grow. Returns [(unit, old width, new width)];
    empty when nothing fits (or nothing can grow).
    """
    spec = model.spec
    chosen: list[tuple[str, int, int]] = []
    for unit, key in rank_units(spec, scores, cost, input_size):
        if len(chosen) >= top_k or key <= 0:
            break
        new = grown_width(model, unit, factor)
        if new is None:
            continue
        trial = with_width(spec, unit, new)
        if macs_budget is not None and spec_macs(trial, input_size) > macs_budget:
            continue
        if budget is not None and spec_params(trial) > budget:
            continue
        spec = trial
        chosen.append((unit, unit_width(model.spec, unit), new))
    return chosen


def grow_step(
    model: RefineFormer3D, scores: dict[str, float], top_k: int, factor: float, budget: int | None = None,
    *, cost: str = "macs", macs_budget: int | None = None, input_size: Sequence[int] = (128, 128, 128),
    init: str = "copy", noise: float = 0.01, generator: torch.Generator | None = None,
) -> tuple[RefineFormer3D, list[tuple[str, int, int]]]:
    """One growth event: widen the selected units; returns the new model and what grew."""
    chosen = select_units(model, scores, top_k, factor, budget, cost=cost, macs_budget=macs_budget,
                          input_size=input_size)
    gen = generator or torch.Generator().manual_seed(0)
    for unit, _, new in chosen:
        model = widen(model, unit, new, init=init, noise=noise, generator=gen)
    return model, chosen


# ----------------------------------------------------------------------------- schedule (pure rules)


def is_plateau(losses: Sequence[float], patience: int, min_rel_change: float) -> bool:
    """True when none of the last `patience` losses improved on the one before them by
    `min_rel_change` (relative). Needs `patience + 1` losses."""
    if len(losses) < patience + 1:
        return False
    base = losses[-patience - 1]
    best = min(losses[-patience:])
    return (base - best) / max(abs(base), 1e-12) < min_rel_change


def dice_stalled(event_dice: Sequence[float], min_delta: float, stop_after: int) -> bool:
    """True when the last `stop_after` events did not beat the best Dice before them by `min_delta`."""
    if len(event_dice) < stop_after + 1:
        return False
    return max(event_dice[-stop_after:]) < max(event_dice[:-stop_after]) + min_delta


@dataclass
class GrowthSchedule:
    """When to grow and when to stop, from one (train loss, val Dice) pair per validated epoch.

    An event is a loss plateau. At an event: stop if Dice stalled over the last `stop_after`
    events or `max_events` growths already happened; grow if Dice rose by `min_delta` since the
    previous event (the first event always may); otherwise hold and keep training.
    """

    patience: int = 2
    min_rel_change: float = 0.01
    min_delta: float = 0.002
    stop_after: int = 2
    max_events: int = 4
    losses: list[float] = field(default_factory=list)  # since the last event
    event_dice: list[float] = field(default_factory=list)
    growths: int = 0

    def step(self, loss: float, dice: float) -> tuple[str, str]:
        """-> (action, reason); action is train | grow | hold | stop."""
        self.losses.append(float(loss))
        if not is_plateau(self.losses, self.patience, self.min_rel_change):
            return "train", ""
        self.losses = [float(loss)]
        previous = self.event_dice[-1] if self.event_dice else None
        self.event_dice.append(float(dice))
        if dice_stalled(self.event_dice, self.min_delta, self.stop_after):
            return "stop", f"Dice did not improve by {self.min_delta} over {self.stop_after} events"
        if self.growths >= self.max_events:
            return "stop", f"{self.max_events} growth events done"
        if previous is None or dice >= previous + self.min_delta:
            self.growths += 1
            return "grow", "loss plateau, Dice rose"
        return "hold", "loss plateau, Dice did not rise"

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------- engine stage


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def check_config(cfg: Any, spec: ModelSpec | None = None) -> None:
    """Fail before training on a bad `grow` section (cfg: common.config.GrowConfig); with a spec,
    also check that the reference input fits the model's downsampling."""
    if cfg.cost not in COSTS:
        raise ConfigError(f"grow.cost must be one of {', '.join(COSTS)}, got {cfg.cost!r}")
    for key in ("budget", "macs_budget"):
        parse_count(getattr(cfg, key), what=f"grow.{key}")
    size = list(cfg.reference_input)
    if len(size) != 3 or any(n < 1 for n in size):
        raise ConfigError(f"grow.reference_input must be three positive sizes (D, H, W), got {size}")
    if spec is not None and any(n % spec.downsample for n in size):
        raise ConfigError(f"grow.reference_input {size} must be multiples of the model's stride {spec.downsample}")


class GrowStage(Stage):
    """Wraps a training Stage (normally `student.distill.DistillStage`) and grows the model at
    loss plateaus through `trainer.replace_model`. Growth history goes to `artifact_extra()["growth"]`.

    The engine's `replace_model` carries Adam moments over for parameters whose shape did not change;
    widened parameters start with fresh moments. The state (schedule, history, score window, loss
    since the last validation, growth noise generator) goes into last.pt, and `rebuild_on_resume`
    asks the engine to rebuild the model from last.pt's (grown) spec, so a run resumes exactly.
    """

    name = STAGE
    rebuild_on_resume = True

    def __init__(self, inner: Stage, cfg: Any, seed: int = 0):
        check_config(cfg)
        self.inner, self.cfg = inner, cfg  # cfg: common.config.GrowConfig
        self.budget = parse_count(cfg.budget, what="grow.budget")
        self.macs_budget = parse_count(cfg.macs_budget, what="grow.macs_budget")
        self.input_size = tuple(cfg.reference_input)
        self.schedule = GrowthSchedule(cfg.patience, cfg.min_rel_change, cfg.min_delta, cfg.stop_after, cfg.max_events)
        self.history: list[dict] = []
        self.scorer: GradientScorer | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self._losses: list[float] = []
        self._restored_scores: dict | None = None  # from load_state_dict before any scorer exists

    def _bind(self, model: nn.Module, restart: bool = False) -> None:
        """Score `model`'s units; `restart` empties the score window (after a growth event)."""
        model = _unwrap(model)
        if self.scorer is not None and self.scorer.model is model:
            return
        units = growable_units(model.spec, self.cfg.kinds)
        if self.scorer is None or self.scorer.units != units:
            self.scorer = GradientScorer(units, self.cfg.window)
        self.scorer.bind(model, restart=restart)
        if self._restored_scores is not None:
            self.scorer.load_state_dict(self._restored_scores)
            self._restored_scores = None

    def gmacs(self, model: nn.Module) -> float:
        """G multiply-adds at the reference input."""
        return spec_macs(_unwrap(model).spec, self.input_size) / 1e9

    def setup(self, trainer: Any) -> None:
        self.inner.setup(trainer)
        self._bind(trainer.model)

    def parameters(self) -> list[nn.Parameter]:
        return self.inner.parameters()

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return self.inner.no_weight_decay(name, param)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, logs = self.inner.loss(model, batch)
        self._losses.append(float(loss.detach()))
        return loss, logs

    def after_backward(self, trainer: Any) -> None:
        self.inner.after_backward(trainer)
        self._bind(trainer.model)
        self.scorer.record()

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.predict(model, x)

    def on_epoch_end(self, trainer: Any, epoch: int, val_metrics: dict | None) -> bool:
        stop = bool(self.inner.on_epoch_end(trainer, epoch, val_metrics))
        if not val_metrics or "dice_mean" not in val_metrics or not self._losses:
            return stop  # decisions only on validated epochs
        loss, dice = sum(self._losses) / len(self._losses), float(val_metrics["dice_mean"])
        self._losses = []
        action, reason = self.schedule.step(loss, dice)
        if action == "train":
            return stop
        model = _unwrap(trainer.model)
        entry = {"event": len(self.history), "epoch": epoch, "action": action, "reason": reason,
                 "dice": dice, "loss": loss, "params": count_params(model), "gmacs": self.gmacs(model), "grown": []}
        if action == "grow":
            self._bind(model)
            scores = self.scorer.scores()
            c = self.cfg
            new, chosen = grow_step(model, scores, c.top_k, c.factor, self.budget, cost=c.cost,
                                    macs_budget=self.macs_budget, input_size=self.input_size,
                                    init=c.init, noise=c.noise, generator=self.gen)
            if not chosen:
                entry.update(action="stop", reason="no unit can grow within the parameter and MACs budgets")
                self.history.append(entry)
                return True
            entry["grown"] = [{"unit": u, "old": o, "new": n, "score": scores.get(u, 0.0),
                               "macs_per_channel": unit_macs(model.spec, u, self.input_size)} for u, o, n in chosen]
            entry["scores"] = dict(scores)
            entry["params_after"] = count_params(new)
            entry["gmacs_after"] = self.gmacs(new)
            trainer.replace_model(new)
            self._bind(trainer.model, restart=True)
        self.history.append(entry)
        return stop or action == "stop"

    def artifact_spec(self, model: nn.Module) -> dict:
        return _unwrap(model).spec.to_dict()

    def artifact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.inner.artifact_state(model)

    def artifact_extra(self) -> dict:
        return {**self.inner.artifact_extra(), "growth": list(self.history)}

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "schedule": self.schedule.state_dict(),
                "history": list(self.history), "losses": list(self._losses),
                "scores": self.scorer.state_dict() if self.scorer is not None else self._restored_scores,
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.history = list(state.get("history", []))
        self._losses = list(state.get("losses", []))
        if state.get("generator") is not None:
            self.gen.set_state(state["generator"])
        scores = state.get("scores")
        if scores is not None and self.scorer is not None:
            self.scorer.load_state_dict(scores)
        else:
            self._restored_scores = scores


# ----------------------------------------------------------------------------- command


def _check_grow(art: Artifact, cfg: Config) -> None:
    spec = ModelSpec.from_dict(art.spec)
    check_config(cfg.grow, spec)  # a bad budget or reference input fails before training
    growable_units(spec, cfg.grow.kinds)


def record_start(model: nn.Module, ctx: StageContext) -> nn.Module:
    """Step of the growth stage: none (growth happens during the fine-tune); records the start size."""
    ctx.metrics.update(params_before=count_params(model),
                       gmacs_before=spec_macs(model.spec, ctx.cfg.grow.reference_input) / 1e9)
    return model


def grow_trainer(model: nn.Module, ctx: StageContext) -> "GrowStage":
    """Distillation from the lineage's teacher, growing the model where its gradients ask for width."""
    return GrowStage(distill_trainer(model, ctx), ctx.cfg.grow, seed=ctx.cfg.train.seed)


def record_growth(model: nn.Module, art: Artifact, ctx: StageContext) -> Artifact:
    """Finish of the growth stage: sizes after, every growth event, the epoch kept."""
    art.metrics = {**art.metrics, "params_after": count_params(model),
                   "gmacs_after": spec_macs(ModelSpec.from_dict(art.spec), ctx.cfg.grow.reference_input) / 1e9}
    art.extra = {"growth": ctx.engine_stage.history, "teacher": str(ctx.teacher_path),
                 "best_epoch": art.extra.get("epoch"), "reference_input": list(ctx.cfg.grow.reference_input),
                 "runtime": art.extra.get("runtime")}
    return art


GROWN = StageDef(STAGE, step=record_start, finetune=grow_trainer, finish=record_growth, needs_teacher=True,
                 check=_check_grow)


def grow_stage(artifact: str | Path, cfg: Config, out: str | Path, teacher: str | None = None,
               resume: bool = False, data_given: bool = True) -> Artifact:
    """Artifact -> distillation fine-tune that grows the model -> `<out>/grown.pt`.

    The grown model is the best epoch (best validation Dice over the run, so possibly from before
    the last growth event); extra["growth"] holds every event of the run. `resume` continues an
    interrupted run from `<out>/last.pt` (grown architecture, schedule, history, best epoch).
    """
    return run_stage(artifact, GROWN, cfg, out, teacher=teacher or cfg.grow.teacher, resume=resume,
                     data_given=data_given)


def format_history(history: Sequence[dict]) -> str:
    lines = []
    for e in history:
        units = ", ".join(f"{g['unit']} {g['old']}->{g['new']}" for g in e["grown"]) or "-"
        gmacs = f" {e['gmacs']:.3f} GMACs" if "gmacs" in e else ""  # (absent in runs from before costs)
        lines.append(f"  event {e['event']} (epoch {e['epoch'] + 1}): {e['action']} - {e['reason']}; "
                     f"dice {e['dice']:.4f} loss {e['loss']:.4f} params {e['params']:,}{gmacs}; grown: {units}")
    return "\n".join(lines) or "  no growth event (the loss never plateaued)"


def main(argv: Sequence[str] | None = None) -> int:
    p = stage_parser("python -m compress.grow", "Grow a (low-rank) student where its gradients ask for width.",
                     "configs/grow.yaml", default_out="runs/grow")
    p.add_argument("artifact", help="input artifact (e.g. runs/lowrank/lowrank.pt)")
    p.add_argument("--teacher", default=None, help="teacher artifact (default: grow.teacher, then the lineage's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>/last.pt")
    p.add_argument("--strict", action="store_true",
                   help="exit 3 when a region's Dice falls more than guard.max_region_drop below the source's")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    cfg.guard.strict = cfg.guard.strict or args.strict
    art = grow_stage(args.artifact, cfg, out_dir(args), teacher=args.teacher, resume=args.resume,
                     data_given=data_given(args))
    m = art.metrics
    size = "x".join(map(str, cfg.grow.reference_input))
    print(format_history(art.extra["growth"]))
    print(f"wrote {art.path}: {m['params_before']:,} -> {m['params_after']:,} parameters, "
          f"{m['gmacs_before']:.3f} -> {m['gmacs_after']:.3f} GMACs at {size}, "
          f"dice_mean {m.get('dice_mean', float('nan')):.4f} (best epoch {art.extra['best_epoch']})")
    return exit_code(art)


def cli() -> None:
    """The `rf3d-grow` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
