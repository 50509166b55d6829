"""Progressive channel growth: start narrow, widen only where the gradient asks for it.

The fine-tune is an outer loop of ordinary engine fits (phases) around a pure widening step:
distil until validation Dice stops rising, score every growable unit by the gradient of the
distillation loss, widen the top-k units by `factor` (within a parameter budget and a multiply-add
budget; `grow_step`), distil again. Growth stops when Dice no longer moves. The result is a
"just-enough" width network that rebuilds from its spec.

Growth is cost-aware, because the goal is a fast CPU student: a channel's price depends on the grid
it lives on. One refine_dim channel runs at full resolution (about 189 M multiply-adds at 128^3 in
the demo student), one stage-3 MLP channel on 4^3 tokens (about 8 k). With `cost: macs` (default)
units are ranked by gradient score per multiply-add of one added channel at `reference_input`;
with `cost: params` by gradient score alone. `model.macs.spec_macs` prices a spec analytically (exactly what
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
loads a mapped state_dict strictly. Each phase is a fresh fit (new optimiser, warm-up and cosine over
the epochs left), starting from the previous phase's best epoch, widened.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from common.artifact import Artifact, build_model
from common.atomic import atomic_write_text
from common.cli import add_strict, config_from_args, data_given, main_rank, out_dir, run_main, stage_parser
from common.config import Config, ConfigError, parse_count, to_dict
from engine.data import TrainData, stack_batches
from engine.loop import LAST, LEGACY_SELECT, FitResult, Stage, best_epoch, fit
from engine.runner import StageContext, StageDef, exit_code, run_stage
from model.layers import LowRankConv3d, LowRankLinear
from model.macs import spec_macs
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params, get_module, rebuilt
from model.widths import group_keys
from student.distill import distill_trainer

STAGE = "grown"
KINDS = ("mlp_hidden", "attn_dims", "ranks", "fuse_dim", "refine_dim")
INITS = ("copy", "random")  # new channels: duplicates of existing ones (plus noise), or a random init
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
    """Parameter names whose gradients score `unit`: those of its width groups (`model.widths`), or
    a factorised layer's two factors for a rank."""
    kind, rest = _parse(unit)
    params = [n for n, _ in model.named_parameters()]
    if kind == "ranks":
        names = [n for n in params if n.startswith(f"{rest}.")]
    else:
        spec = model.spec.resolve()
        if kind == "mlp_hidden":
            groups = [f"hidden.{rest}"]
        elif kind == "attn_dims":
            groups = [f"{g}.{rest}.{j}" for j in range(spec.depths[int(rest)]) for g in ("qk", "v")]
        else:
            groups = ["fuse" if kind == "fuse_dim" else "refine"]
        names = group_keys(spec, groups, set(params))
    if not names:
        raise ValueError(f"grow: unit {unit} has no parameters in this model")
    return names


def spec_params(spec: ModelSpec) -> int:
    """Parameter count of the model a spec describes (a CPU build: faster than meta tensors here)."""
    with torch.no_grad():
        return count_params(RefineFormer3D(spec))


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
        if init not in INITS:
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
    return rebuilt(model, new_spec, w.sd)


# ----------------------------------------------------------------------------- scoring and selection


class GradientScorer:
    """Mean squared gradient per unit (sum ||grad||^2 / sum numel over its parameters), averaged
    over the recorded backward passes. `bind(model)`, then `record()` after each backward."""

    def __init__(self, units: Sequence[str]):
        self.units = list(units)
        self.history: dict[str, list[float]] = {u: [] for u in self.units}
        self.model: nn.Module | None = None
        self._params: list[tuple[torch.Tensor, list[int]]] = []  # parameter, indices of its units
        self._numel = [0] * len(self.units)

    def bind(self, model: nn.Module) -> None:
        """Attach to `model` (whose units these are)."""
        self.model = model
        members: dict[str, list[int]] = {}
        self._numel = [0] * len(self.units)
        params = dict(model.named_parameters())
        for k, unit in enumerate(self.units):
            for name in unit_parameters(model, unit):
                members.setdefault(name, []).append(k)
                self._numel[k] += params[name].numel()
        self._params = [(params[name], idx) for name, idx in members.items()]

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


def gradient_scores(trainee: nn.Module, model: RefineFormer3D, stage: Stage, batches: Iterable[dict],
                    kinds: Sequence[str] = KINDS) -> dict[str, float]:
    """Each growable unit's mean squared gradient of the fine-tune's loss over `batches` (no step):
    `stage.loss(trainee, batch)` in training mode, where `trainee` is `model` or a training wrapper
    around it. Nothing of the model changes (BatchNorm running statistics are put back)."""
    scorer = GradientScorer(growable_units(model.spec, kinds))
    scorer.bind(model)
    was_training = trainee.training
    buffers = {name: b.detach().clone() for name, b in trainee.named_buffers()}
    trainee.train()
    for batch in batches:
        trainee.zero_grad(set_to_none=True)
        loss, _ = stage.loss(trainee, batch)
        loss.backward()
        scorer.record()
    trainee.zero_grad(set_to_none=True)
    trainee.train(was_training)
    with torch.no_grad():
        for name, b in trainee.named_buffers():
            b.copy_(buffers[name])
    return scorer.scores()


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


@dataclass
class Growth:
    """What one growth event did: the widened model and [(unit, old width, new width)]."""

    model: RefineFormer3D
    grown: list[tuple[str, int, int]]


def grow_step(model: RefineFormer3D, cfg: Any, scores: dict[str, float],
              generator: torch.Generator | None = None) -> Growth:
    """One growth event (`cfg`: common.config.GrowConfig): widen the units `select_units` picks from
    `scores` within the budgets; `model` is unchanged. `grown` is empty when nothing fits."""
    chosen = select_units(model, scores, cfg.top_k, cfg.factor, parse_count(cfg.budget, what="grow.budget"),
                          cost=cfg.cost, macs_budget=parse_count(cfg.macs_budget, what="grow.macs_budget"),
                          input_size=tuple(cfg.reference_input))
    gen = generator or torch.Generator().manual_seed(0)
    for unit, _, new in chosen:
        model = widen(model, unit, new, init=cfg.init, noise=cfg.noise, generator=gen)
    return Growth(model, chosen)


# ----------------------------------------------------------------------------- schedule (pure rules)


def dice_stalled(event_dice: Sequence[float], min_delta: float, stop_after: int) -> bool:
    """True when the last `stop_after` events did not beat the best Dice before them by `min_delta`."""
    if len(event_dice) < stop_after + 1:
        return False
    return max(event_dice[-stop_after:]) < max(event_dice[:-stop_after]) + min_delta


# ----------------------------------------------------------------------------- the fine-tune: fits around widenings


def check_config(cfg: Any, spec: ModelSpec | None = None) -> None:
    """Fail before training on a bad `grow` section (cfg: common.config.GrowConfig); with a spec,
    also check that the reference input fits the model's downsampling."""
    if cfg.cost not in COSTS:
        raise ConfigError(f"grow.cost must be one of {', '.join(COSTS)}, got {cfg.cost!r}")
    for key in ("budget", "macs_budget"):
        parse_count(getattr(cfg, key), what=f"grow.{key}")
    for key in ("window", "patience", "stop_after", "top_k"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"grow.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_events < 0 or cfg.noise < 0:
        raise ConfigError(f"grow.max_events and grow.noise must be >= 0, got {cfg.max_events}, {cfg.noise}")
    if cfg.factor <= 1:
        raise ConfigError(f"grow.factor must be > 1 (a widening multiplies a width by it), got {cfg.factor}")
    if cfg.init not in INITS:
        raise ConfigError(f"grow.init must be one of {', '.join(INITS)}, got {cfg.init!r}")
    if not cfg.kinds or set(cfg.kinds) - set(KINDS):
        raise ConfigError(f"grow.kinds={list(cfg.kinds)}: one or more of {', '.join(KINDS)}")
    size = list(cfg.reference_input)
    if len(size) != 3 or any(n < 1 for n in size):
        raise ConfigError(f"grow.reference_input must be three positive sizes (D, H, W), got {size}")
    if spec is not None and any(n % spec.downsample for n in size):
        raise ConfigError(f"grow.reference_input {size} must be multiples of the model's stride {spec.downsample}")


PROGRESS, START = "growth.json", "start.pt"


def score_batches(data: TrainData, cfg: Config, phase: int,
                  device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """`grow.window` batches of training crops (image, label) for the gradient scores after `phase`
    (the same on every rank)."""
    data.train_set.set_epoch(10_000 + phase)
    n, b = cfg.grow.window, cfg.train.batch_size
    return stack_batches([data.train_set[i % len(data.train_set)] for i in range(n * b)], b, device)


def _agreed(scores: dict[str, float], ctx: StageContext) -> dict[str, float]:
    """Rank 0's scores on every rank, so all ranks grow the same units."""
    if not ctx.dist.enabled:
        return scores
    box = [scores]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def phase_line(k: int, events: Sequence[dict], model: RefineFormer3D, epochs_left: int) -> str:
    """The line that opens growth phase `k`: what the last event widened (phase 0: the source as it
    is), the model's size, and the epochs the phase may use."""
    what = "the source as it is" if k == 0 or not events or not events[-1].get("grown") else \
        "widened " + ", ".join(f"{u['unit']} {u['old']}->{u['new']}" for u in events[-1]["grown"])
    return (f"growth phase {k}: {what}; {count_params(model):,} parameters; fine-tune of up to {epochs_left} "
            f"epoch(s)")


def _phase_config(cfg: Config, epochs: int) -> Config:
    phase = copy.deepcopy(cfg)
    phase.train.epochs, phase.train.patience = epochs, cfg.grow.patience
    return phase


def phase_decision(events: Sequence[dict], entry: dict, g: Any, epochs_left: int) -> tuple[str, str]:
    """After a phase: (grow | stop, reason), from the phases' best Dice so far."""
    dice = [e["dice"] for e in events] + [entry["dice"]]
    if dice_stalled(dice, g.min_delta, g.stop_after):
        return "stop", f"Dice did not improve by {g.min_delta} over {g.stop_after} phase(s)"
    if sum(1 for e in events if e["grown"]) >= g.max_events:
        return "stop", f"{g.max_events} growth event(s) done"
    if epochs_left < 1:
        return "stop", "train.epochs used up"
    return "grow", f"validation Dice stopped rising (grow.patience={g.patience})"


def _phase_result(pdir: Path) -> FitResult:
    """A finished phase's result, from its last.pt (the best epoch rides in it)."""
    last = Artifact.load(pdir / LAST)
    best = best_epoch(last)
    state = last.extra["train_state"]
    return FitResult(None, pdir / LAST, dict(state["best_metrics"]), list(state["history"]), None, best)


def best_phase(results: Sequence[FitResult], select: str, min_delta: float) -> int:
    """Index of the phase whose best epoch the growth fine-tune keeps, by `select` (the engine's
    `train.select`): a later phase (a grown model, more parameters and multiply-adds) replaces an earlier
    one only when it is better by at least `min_delta` (`grow.min_delta`, the gain the stop rule asks of
    growth), and strictly better in any case. With the plain maximum, a 4-case demo validation kept a model
    grown by 0.19 G multiply-adds for +0.0005 pooled Dice, 0.8 point below the un-grown one on the
    report's held-out cases."""
    kept = 0
    for i, r in enumerate(results[1:], 1):
        gain = r.best_metrics.get(select, -math.inf) - results[kept].best_metrics.get(select, -math.inf)
        if gain > 0 and gain >= min_delta:  # ties keep the smaller model
            kept = i
    return kept


def best_of(results: Sequence[FitResult], kept: int) -> FitResult:
    """One result for the whole growth fine-tune: phase `kept`'s best epoch (`best_phase`), every phase's history."""
    best = results[kept]
    history = [{**h, "phase": i} for i, r in enumerate(results) for h in r.history]
    return FitResult(None, results[-1].last_path, dict(best.best_metrics), history, results[-1].model, best.best)


def grow_fits(model: RefineFormer3D, ctx: StageContext, stage: StageDef, ckpt_dir: Path) -> FitResult:
    """The growth fine-tune: ordinary engine fits (phases, `<ckpt_dir>/phase<k>/`) around pure widenings.

    A phase is a distillation fit (`stage.finetune`) over the epochs left of `train.epochs`, ended
    early when validation Dice did not improve in `grow.patience` validations. After it: stop when
    the last `grow.stop_after` phases did not beat the best before them by `grow.min_delta`, when
    `grow.max_events` growths are done, or when no epoch is left; otherwise gradient scores on
    `grow.window` training batches pick the units to widen (`grow_step`), from the phase's best
    epoch. The result is the best epoch over all phases (`best_phase`: a grown phase must beat the
    earlier ones by `grow.min_delta`). Each phase's decision goes into `<ckpt_dir>/growth.json`;
    `ctx.resume` continues the last phase begun (a widened model waits in its `start.pt`).
    """
    g, total = ctx.cfg.grow, ctx.cfg.train.epochs
    progress = ckpt_dir / PROGRESS
    if not ctx.resume and ctx.dist.main:  # a new run (--overwrite): no phase of an earlier one may be resumed later
        for stale in ckpt_dir.glob("phase[0-9]*"):
            shutil.rmtree(stale)
        progress.unlink(missing_ok=True)
    if ctx.dist.enabled:
        dist.barrier()
    events: list[dict] = []
    if ctx.resume and progress.is_file():
        events = json.loads(progress.read_text())["events"]
        run_select = events[0].get("select", LEGACY_SELECT) if events else ctx.cfg.train.select
        if run_select != ctx.cfg.train.select:  # phases are compared by one figure for the whole run
            if ctx.dist.main:
                print(f"warning: {progress} compared its phases by {run_select}; the resumed run goes on doing "
                      f"so (train.select={ctx.cfg.train.select} ignored)", flush=True)
            ctx.cfg.train.select = run_select
    k = 0
    if ctx.resume:  # the last phase begun
        k = max([i for i in range(len(events) + 1) if (ckpt_dir / f"phase{i}").is_dir()], default=0)
        events = events[:k]
        start = ckpt_dir / f"phase{k}" / (LAST if (ckpt_dir / f"phase{k}" / LAST).is_file() else START)
        if k > 0 or start.name == LAST:
            model = build_model(Artifact.load(start))
    results: list[FitResult] = [_phase_result(ckpt_dir / f"phase{i}") for i in range(k)]
    ctx.extra["growth"] = events
    announced = False  # the device line: once per run, resumed or not
    while True:
        pdir = ckpt_dir / f"phase{k}"
        used = sum(e["epochs"] for e in events)
        resume = ctx.resume and (pdir / LAST).is_file()
        if k > 0 and not resume and ctx.dist.main and not (pdir / START).is_file():
            pdir.mkdir(parents=True, exist_ok=True)
            Artifact(stage=f"{stage.name}-start", spec=model.artifact_spec(), state_dict=model.state_dict(),
                     config=to_dict(ctx.cfg), lineage=ctx.source.child_lineage()).save(pdir / START)
        if ctx.dist.main:
            print(phase_line(k, events, model, total - used), flush=True)
        trainee, engine_stage = stage.finetune(model, ctx)
        res = fit(trainee, engine_stage, _phase_config(ctx.cfg, total - used), pdir, stage_name=stage.name,
                  lineage=ctx.source.child_lineage(), extra={k_: v for k_, v in ctx.extra.items() if k_ != "growth"},
                  data=ctx.data, resume=resume, best_name=None, note_rising=False,  # a phase: its epochs are what is left
                  announce=not announced)
        announced = True
        results.append(res)
        epochs = sum(1 for h in res.history if not h.get("start"))
        device = next(res.model.parameters()).device  # the training device
        best = (build_model(res.best) if res.best is not None else model).to(device)
        dice = float(res.best_metrics.get(ctx.cfg.train.select, math.nan))  # what chose the phase's best epoch
        entry = {"event": k, "epoch": used + epochs - 1, "epochs": epochs, "dice": dice,
                 "select": ctx.cfg.train.select,
                 "loss": next((h["train"].get("loss", math.nan) for h in reversed(res.history) if h["train"]), math.nan),
                 "params": count_params(best), "gmacs": spec_macs(best.spec, g.reference_input) / 1e9, "grown": []}
        action, reason = phase_decision(events, entry, g, total - used - epochs)
        if action == "grow":
            trainee, engine_stage = stage.finetune(best, ctx)
            if res.best_metrics:  # an adaptive-KD stage scores with the weights the kept epoch's Dice gives
                engine_stage.on_validation(res.best_metrics, log=False)
            engine_stage.to(device)
            batches = score_batches(ctx.data, ctx.cfg, k, device)
            scores = _agreed(gradient_scores(trainee, best, engine_stage, batches, g.kinds), ctx)
            grown = grow_step(best, g, scores, torch.Generator().manual_seed(ctx.cfg.train.seed + k))
            if grown.grown:
                entry["grown"] = [{"unit": u, "old": o, "new": n, "score": scores.get(u, 0.0),
                                   "macs_per_channel": unit_macs(best.spec, u, g.reference_input)}
                                  for u, o, n in grown.grown]
                entry.update(scores=dict(scores), params_after=count_params(grown.model),
                             gmacs_after=spec_macs(grown.model.spec, g.reference_input) / 1e9)
                model = grown.model
            else:
                action, reason = "stop", "no unit can grow within the parameter and MACs budgets"
        entry.update(action=action, reason=reason)
        events.append(entry)
        if ctx.dist.main:
            atomic_write_text(progress, json.dumps({"events": events}, indent=1) + "\n")
        if action == "stop":
            break
        k += 1
    kept = best_phase(results, ctx.cfg.train.select, g.min_delta)
    for i, e in enumerate(events):
        e["kept"] = i == kept  # the phase whose best epoch is the product (report.md marks it)
    score = [r.best_metrics.get(ctx.cfg.train.select, -math.inf) for r in results]
    top = best_phase(results, ctx.cfg.train.select, 0.0)  # the plain maximum (ties: the earlier phase)
    if top != kept and ctx.dist.main:
        print(f"growth: kept phase {kept} ({ctx.cfg.train.select} {score[kept]:.4f}, "
              f"{events[kept]['params']:,} parameters); phase {top} scored {score[top]:.4f}, better by less than "
              f"grow.min_delta={g.min_delta}, not worth its {events[top]['params'] - events[kept]['params']:+,} "
              f"parameters and {events[top]['gmacs'] - events[kept]['gmacs']:+.3f} G multiply-adds", flush=True)
    return best_of(results, kept)


# ----------------------------------------------------------------------------- command


def _check_grow(art: Artifact, cfg: Config) -> None:
    """Before any work: the `grow` section, its units on this model, budgets the model is not already over."""
    spec = ModelSpec.from_dict(art.spec)
    g = cfg.grow
    check_config(g, spec)
    if not growable_units(spec, g.kinds):
        raise ConfigError(f"{art.path}: no unit of grow.kinds={list(g.kinds)} in this model")
    budget, macs_budget = parse_count(g.budget, what="grow.budget"), parse_count(g.macs_budget, what="grow.macs_budget")
    params, macs = spec_params(spec), spec_macs(spec, g.reference_input)
    if budget is not None and budget <= params:
        raise ConfigError(f"grow.budget {budget:,} is not above the model's {params:,} parameters: nothing can grow")
    if macs_budget is not None and macs_budget <= macs:
        raise ConfigError(f"grow.macs_budget {macs_budget / 1e9:.3f} G is not above the model's {macs / 1e9:.3f} G "
                          f"multiply-adds at {g.reference_input}: nothing can grow")


def record_start(model: nn.Module, ctx: StageContext) -> nn.Module:
    """Step of the growth stage: none (growth happens between the fine-tune's fits); records the start size."""
    ctx.metrics.update(params_before=count_params(model),
                       gmacs_before=spec_macs(model.spec, ctx.cfg.grow.reference_input) / 1e9)
    return model


def record_growth(model: nn.Module, art: Artifact, ctx: StageContext) -> Artifact:
    """Finish of the growth stage: sizes after, every growth event, the epoch kept."""
    art.metrics = {**art.metrics, "params_after": count_params(model),
                   "gmacs_after": spec_macs(ModelSpec.from_dict(art.spec), ctx.cfg.grow.reference_input) / 1e9}
    art.extra = {**{k: v for k, v in art.extra.items() if k != "epoch"}, "growth": ctx.extra["growth"],
                 "teacher": str(ctx.teacher_path), "best_epoch": art.extra.get("epoch"),
                 "reference_input": list(ctx.cfg.grow.reference_input)}
    return art


GROWN = StageDef(STAGE, step=record_start, finetune=distill_trainer, train=grow_fits, finish=record_growth,
                 needs_teacher=True, check=_check_grow, resume_file=f"phase0/{LAST}")


def grow_stage(artifact: str | Path, cfg: Config, out: str | Path, teacher: str | None = None,
               resume: bool = False, data_given: bool = True) -> Artifact:
    """Artifact -> distillation fine-tune that grows the model -> `<out>/grown.pt`.

    The grown model is the best epoch (best validation Dice over all phases, so possibly from
    before the last growth event); extra["growth"] holds every phase's decision. `resume` continues
    an interrupted run (`grow_fits`).
    """
    return run_stage(artifact, GROWN, cfg, out, teacher=teacher or cfg.grow.teacher, resume=resume,
                     data_given=data_given)


def format_history(history: Sequence[dict]) -> str:
    lines = []
    for e in history:
        units = ", ".join(f"{g['unit']} {g['old']}->{g['new']}" for g in e["grown"]) or "-"
        gmacs = f" {e['gmacs']:.3f} GMACs" if "gmacs" in e else ""  # (absent in runs from before costs)
        lines.append(f"  phase {e['event']} (to epoch {e['epoch'] + 1}): {e['action']} - {e['reason']}; "
                     f"dice {e['dice']:.4f} loss {e['loss']:.4f} params {e['params']:,}{gmacs}; grown: {units}")
    return "\n".join(lines) or "  no phase recorded"


def main(argv: Sequence[str] | None = None) -> int:
    p = stage_parser("python -m compress.grow", "Grow a (low-rank) student where its gradients ask for width.",
                     "configs/grow.yaml", default_out="runs/grow")
    p.add_argument("artifact", help="input artifact (e.g. runs/lowrank/lowrank.pt)")
    p.add_argument("--teacher", default=None, help="teacher artifact (default: grow.teacher, then the lineage's)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: the last phase begun (<out>/phase<k>/), grown model included")
    add_strict(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    art = grow_stage(args.artifact, cfg, out_dir(args), teacher=args.teacher, resume=args.resume,
                     data_given=data_given(args))
    m = art.metrics
    size = "x".join(map(str, cfg.grow.reference_input))
    if main_rank():  # under torchrun, once
        print(format_history(art.extra["growth"]))
        print(f"wrote {art.path}: {m['params_before']:,} -> {m['params_after']:,} parameters, "
              f"{m['gmacs_before']:.3f} -> {m['gmacs_after']:.3f} GMACs at {size}, "
              f"{_selection_line(art, cfg.train.select)}")
    return exit_code(art)


def _selection_line(art: Artifact, select: str) -> str:
    """What the product is: the kept phase, its best epoch (counted within the phase), the figure that chose
    it and the per-case mean Dice, e.g. "phase 0, its epoch 7: pooled_dice_mean 0.8921, dice_mean 0.9143"."""
    m, events = art.metrics, art.extra.get("growth") or []
    kept = next((i for i, e in enumerate(events) if e.get("kept")), None)
    epoch = art.extra.get("best_epoch")
    if epoch == 0:
        epoch = "0 (its start, before fine-tuning)"
    where = "no fine-tune" if epoch is None else f"phase {kept}, its epoch {epoch}" if kept is not None else f"epoch {epoch}"
    figures = [f"{k} {m[k]:.4f}" for k in dict.fromkeys((select, "dice_mean")) if isinstance(m.get(k), float)]
    return f"{where}: {', '.join(figures)}"


def cli() -> None:
    """The `rf3d-grow` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
