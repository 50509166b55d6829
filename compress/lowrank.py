"""Low-rank factorisation of a trained model's Linear and Conv3d layers by truncated SVD.

    python -m compress.lowrank ARTIFACT [--params N | --energy E | --ratio R] [--epochs N] [--teacher PATH]

A Linear `W (o x i)` becomes `up (o x r) @ down (r x i)`; a Conv3d becomes a rank-r Conv3d with the
same kernel, stride and padding followed by a 1x1x1 Conv3d, from the SVD of the weight reshaped to
`o x (i*k^3)`. Singular values are split as sqrt(S) on both sides so the two factors have similar
scales (which keeps the fine-tune well conditioned). Depthwise convolutions are left alone, and a
layer is factorised only when `r*(i*k^3 + o)` saves parameters (beyond `cfg.min_saving`).

Rank rules (precedence params > ratio > energy): a global parameter budget (`200k`, or a share of
the model, `65%`) spent greedily where the least spectral energy is lost; a rank ratio; or a share
of spectral energy per layer. `--params auto` (configs/lowrank.yaml's) chooses the share on validation
(`search_share`): the smallest of `lowrank.auto_shares` whose factorised model, before any fine-tune,
keeps every region's Dice within `lowrank.auto_tolerance` of the source's on the stage's validation
cases (the chosen figure is optimistic by the choice of one share among a few).

The rank of each factorised layer goes into `model.spec.ranks`, so the model rebuilds from its spec.
The surgery is `factorise_(model, cfg, filter) -> (model, table)` (in place, hence the underscore, as torchao names its in-place transforms); the `LOWRANK` stage (run by
`engine.runner.run_stage`) adds an optional distillation fine-tune from the teacher in the artifact's
lineage. With `train.val_at_start` (on in configs/lowrank.yaml) the factorised weights compete for
the best epoch, so a fine-tune that does not help on validation is not kept
(`extra["lowrank"]["best_epoch"] == 0`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from brats.metrics import DICE_KEYS
from brats.scoring import evaluate
from common.artifact import Artifact
from common.cli import add_strict, config_from_args, data_given, main_rank, out_dir, run_main, stage_parser
from common.config import Config, ConfigError, LowRankConfig, parse_count
from engine.runner import StageContext, StageDef, exit_code, run_stage
from model.layers import LowRankConv3d, LowRankLinear
from model.refineformer3d import count_params, factorise_module, get_module, model_from_spec
from student.distill import distill_trainer

# torchao-style module filter: (module, dotted name) -> factorise it?
ModuleFilter = Callable[[nn.Module, str], bool]


class BudgetError(ConfigError):
    """A parameter budget that no factorisation can meet."""


# ----------------------------------------------------------------------------- parameter arithmetic


def lowrank_params(out_dim: int, in_dim: int, rank: int) -> int:
    """Weights of the two factors: down (rank x in_dim) + up (out_dim x rank); in_dim = i*k^3."""
    return rank * (in_dim + out_dim)


def saves_params(out_dim: int, in_dim: int, rank: int, min_saving: float = 0.0) -> bool:
    """Rank-r factors are smaller than the full weight by more than `min_saving` of it."""
    full = out_dim * in_dim
    return full - lowrank_params(out_dim, in_dim, rank) > min_saving * full


def max_saving_rank(out_dim: int, in_dim: int, min_saving: float = 0.0) -> int:
    """Largest rank that still saves parameters (0: none does)."""
    r = min(out_dim, in_dim)
    while r > 0 and not saves_params(out_dim, in_dim, r, min_saving):
        r -= 1
    return r


# ----------------------------------------------------------------------------- rank selection


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep `energy` of sum(S^2) (S sorted descending)."""
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"lowrank.energy must be in (0, 1], got {energy}")
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # Tolerance: the cumulative sum of the full spectrum may land a hair under 1.0.
    return min(int((kept < energy - 1e-12).sum()) + 1, len(s))


def rank_for_ratio(full_rank: int, ratio: float) -> int:
    """round(ratio x full rank), at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"lowrank.ratio must be in (0, 1], got {ratio}")
    return max(1, min(full_rank, math.floor(ratio * full_rank + 0.5)))


def energy_kept(s: torch.Tensor, rank: int) -> float:
    power = s.double() ** 2
    total = float(power.sum())
    return 1.0 if total == 0.0 else float(power[:rank].sum()) / total


@dataclass
class Candidate:
    """A factorisable layer: its weight as a matrix and that matrix's spectrum."""

    name: str
    kind: str  # linear | conv3d
    shape: list[int]  # the weight's own shape
    out_dim: int
    in_dim: int  # i * k^3 for a Conv3d
    bias: int  # bias parameters (kept as they are)
    s: torch.Tensor  # singular values, descending, float64
    min_rank: int = 1  # the lowest rank allowed (REGION_TAIL layers: one per output region)

    @property
    def full_rank(self) -> int:
        return min(self.out_dim, self.in_dim)


def budget_floor(layers: Sequence[Candidate], total_params: int, min_saving: float = 0.0) -> int:
    """The fewest parameters any budget can reach: every layer that can save at its lowest allowed rank."""
    return total_params - sum(
        c.out_dim * c.in_dim - lowrank_params(c.out_dim, c.in_dim, c.min_rank)
        for c in layers
        if max_saving_rank(c.out_dim, c.in_dim, min_saving) >= c.min_rank
    )


def budget_ranks(
    layers: Sequence[Candidate], total_params: int, budget: int, min_saving: float = 0.0
) -> dict[str, int]:
    """Ranks that bring the model to <= `budget` parameters, chosen greedily.

    Each step makes the move with the least energy lost (as a share of that layer's spectral
    energy) per parameter saved, over every layer and every lower rank it could go to (the first
    move on a layer may only pick ranks that save parameters). The move that crosses the budget
    stops at the largest rank that meets it. Raises `BudgetError` when even rank 1 everywhere
    leaves the model above budget.
    """
    floor = budget_floor(layers, total_params, min_saving)
    if floor > budget:
        raise BudgetError(
            f"parameter budget {budget:,} is unreachable: the lowest rank in all {len(layers)} factorisable layers "
            f"still leaves {floor:,} parameters (the model has {total_params:,}); raise --params or use "
            "--energy/--ratio"
        )
    kept = []  # kept[k][r - 1]: share of layer k's energy kept at rank r
    for c in layers:
        power = c.s.double() ** 2
        kept.append(torch.cumsum(power, 0) / power.sum() if float(power.sum()) > 0 else torch.ones_like(power))
    ranks: dict[str, int] = {}

    def layer_params(c: Candidate) -> int:
        r = ranks.get(c.name)
        return c.out_dim * c.in_dim if r is None else lowrank_params(c.out_dim, c.in_dim, r)

    def best_move(k: int) -> tuple[float, int] | None:
        """(energy lost per parameter saved, target rank) of layer k's cheapest move."""
        c = layers[k]
        old = ranks.get(c.name)
        top = max_saving_rank(c.out_dim, c.in_dim, min_saving) if old is None else old - 1
        if top < c.min_rank:
            return None
        r = torch.arange(c.min_rank, top + 1)
        saved = layer_params(c) - r * (c.in_dim + c.out_dim)
        lost = (1.0 if old is None else float(kept[k][old - 1])) - kept[k][c.min_rank - 1:top]
        cost = lost.clamp(min=0) / saved
        # Ties go to the larger rank (the smaller step).
        i = len(r) - 1 - int(torch.argmin(cost.flip(0)))
        return float(cost[i]), int(r[i])

    moves = {k: best_move(k) for k in range(len(layers))}
    params = total_params
    while params > budget:
        # Non-empty: the floor check above guarantees a move while params > budget.
        (_, target), k = min((m, k) for k, m in moves.items() if m is not None)
        c = layers[k]
        old = ranks.get(c.name)
        cap = max_saving_rank(c.out_dim, c.in_dim, min_saving) if old is None else old - 1
        before = layer_params(c)
        need = before - (params - budget)  # this layer's size that meets the budget exactly
        ranks[c.name] = max(target, min(cap, need // (c.in_dim + c.out_dim)))
        params -= before - layer_params(c)
        moves[k] = best_move(k)
    return ranks


# ----------------------------------------------------------------------------- surgery


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """Linear (o, i) as is; Conv3d (o, i, kd, kh, kw) -> (o, i*kd*kh*kw)."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _factorisable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv3d):
        # LowRankConv3d keeps kernel, stride and padding only; depthwise/grouped convs stay as they are.
        return (
            module.groups == 1 and module.dilation == (1, 1, 1) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


# Layers after the fusion that feed the logits: a rank below the number of output regions would
# force at least two regions to share a direction, and the one with the least energy (ET, a small
# region, issue 13) is what truncation drops. They keep rank >= num_classes, so the logits layer
# itself (num_classes rows: no rank below that saves anything) is never factorised.
REGION_TAIL = ("decoder.refine_pw", "decoder.head", "decoder.pred")


def candidates(model: nn.Module, filter: ModuleFilter | None = None) -> list[Candidate]:
    """Every Linear/Conv3d the surgery may factorise (not depthwise, not already low-rank), with
    spectra; REGION_TAIL layers with `min_rank` = the number of output regions, the others 1."""
    lowrank = [n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv3d))]
    spec = getattr(model, "spec", None)
    regions = spec.num_classes if spec is not None else 1
    found = []
    for name, m in model.named_modules():
        if not name or not _factorisable(m) or any(name.startswith(p + ".") for p in lowrank):
            continue
        if filter is not None and not filter(m, name):
            continue
        w = weight_matrix(m)
        found.append(Candidate(
            name=name,
            kind="linear" if isinstance(m, nn.Linear) else "conv3d",
            shape=list(m.weight.shape),
            out_dim=w.shape[0],
            in_dim=w.shape[1],
            bias=0 if m.bias is None else m.bias.numel(),
            s=torch.linalg.svdvals(w.double()),
            min_rank=regions if name in REGION_TAIL else 1,
        ))
    return found


def factorise_layer(model: nn.Module, name: str, rank: int) -> nn.Module:
    """Swap layer `name` for its rank-`rank` SVD factors (sqrt(S) on each side); record the rank in the spec.

    At full rank the new layer computes the same function as the old one (up to rounding).
    """
    old = get_module(model, name)
    w = weight_matrix(old)
    full = min(w.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"{name}: rank {rank} outside 1..{full}")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)  # (o, f), (f,), (f, i*k^3)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(old.weight.dtype)  # (o, r)
    down = (root[:, None] * vh[:rank]).to(old.weight.dtype)  # (r, i*k^3)
    new = factorise_module(model, name, rank)
    with torch.no_grad():
        new.down.weight.copy_(down.reshape(new.down.weight.shape))
        new.up.weight.copy_(up.reshape(new.up.weight.shape))
        if old.bias is not None:
            new.up.bias.copy_(old.bias.detach())
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    spec = getattr(model, "spec", None)
    if spec is not None and hasattr(spec, "ranks"):
        spec.ranks[name] = rank
    return new


def choose_ranks(found: Sequence[Candidate], cfg: LowRankConfig, total_params: int) -> dict[str, int]:
    """Proposed rank per layer name under the rule in force (see `selection`); `params: auto` has no
    ranks of its own (ValueError): `search_share` tries each share as a budget."""
    rule = selection(cfg, total_params)
    if rule["mode"] == "auto":
        raise ValueError("lowrank.params=auto is a search over shares (search_share), not a rank rule")
    if rule["mode"] == "params":
        return budget_ranks(found, total_params, rule["params"], cfg.min_saving)
    if rule["mode"] == "ratio":
        return {c.name: max(c.min_rank, rank_for_ratio(c.full_rank, cfg.ratio)) for c in found}
    return {c.name: max(c.min_rank, rank_for_energy(c.s, cfg.energy)) for c in found}


def factorise_(
    model: nn.Module, cfg: LowRankConfig, filter: ModuleFilter | None = None
) -> tuple[nn.Module, list[dict]]:
    """Factorise `model` in place by truncated SVD; returns it and one table row per candidate layer.

    `filter(module, name)` restricts the candidates (None: every Linear and non-depthwise Conv3d).
    Rows: layer, kind, shape, rank (None when left whole), full_rank, energy_kept, params_before,
    params_after (weights plus bias), factorised.
    """
    found = candidates(model, filter)
    ranks = choose_ranks(found, cfg, count_params(model))
    table = []
    for c in found:
        rank = ranks.get(c.name)
        keep = rank is not None and saves_params(c.out_dim, c.in_dim, rank, cfg.min_saving)
        if keep:
            factorise_layer(model, c.name, rank)
        before = c.out_dim * c.in_dim + c.bias
        table.append({
            "layer": c.name,
            "kind": c.kind,
            "shape": c.shape,
            "rank": rank if keep else None,
            "full_rank": c.full_rank,
            "energy_kept": energy_kept(c.s, rank) if keep else 1.0,
            "params_before": before,
            "params_after": lowrank_params(c.out_dim, c.in_dim, rank) + c.bias if keep else before,
            "factorised": keep,
        })
    return model, table


def format_table(table: Sequence[dict]) -> str:
    """Aligned per-layer table with a total line."""
    head = ["layer", "kind", "shape", "rank", "full", "energy", "params", "-> params", "saved"]
    rows = []
    for r in table:
        saved = 1.0 - r["params_after"] / r["params_before"] if r["params_before"] else 0.0
        rows.append([
            r["layer"], r["kind"], "x".join(map(str, r["shape"])),
            str(r["rank"]) if r["factorised"] else "-", str(r["full_rank"]),
            f"{r['energy_kept']:.3f}", f"{r['params_before']:,}", f"{r['params_after']:,}",
            f"{100 * saved:.1f}%" if r["factorised"] else "kept",
        ])
    before = sum(r["params_before"] for r in table)
    after = sum(r["params_after"] for r in table)
    n = sum(r["factorised"] for r in table)
    rows.append([
        f"total ({n}/{len(table)} factorised)", "", "", "", "", "", f"{before:,}", f"{after:,}",
        f"{100 * (1 - after / before):.1f}%" if before else "",
    ])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    left = {0, 1, 2}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def selection(cfg: LowRankConfig, total_params: int | None = None) -> dict:
    """The rank rule in force (precedence params > ratio > energy), as plain data.

    A budget given as a share ('65%') is resolved against `total_params` and also kept as
    `params_share`; without `total_params` it is only checked.
    """
    if not 0.0 <= cfg.min_saving < 1.0:
        raise ConfigError(f"lowrank.min_saving must be in [0, 1), got {cfg.min_saving}")
    if str(cfg.params).strip().lower() == AUTO:
        return {"mode": AUTO, "shares": sorted({float(v) for v in cfg.auto_shares}), "tolerance": cfg.auto_tolerance}
    if cfg.params is not None:
        if str(cfg.params).strip().endswith("%"):
            try:  # checks the text and the range
                share = parse_count(cfg.params, 10_000, "lowrank.params") / 10_000
            except ConfigError as e:
                raise ConfigError(f"{e} (or auto: chosen on validation)") from None
            budget = None if total_params is None else parse_count(cfg.params, total_params, "lowrank.params")
            if budget is not None and budget <= 0:
                raise ConfigError(f"lowrank.params={cfg.params!r} leaves no parameter of {total_params:,}")
            return {"mode": "params", "params": budget, "params_share": share}
        budget = parse_count(cfg.params, what="lowrank.params")
        if budget <= 0:
            raise ConfigError(f"lowrank.params must be a positive parameter count, got {cfg.params!r}")
        return {"mode": "params", "params": budget}
    if cfg.ratio is not None:
        return {"mode": "ratio", "ratio": cfg.ratio}
    if cfg.energy is not None:
        return {"mode": "energy", "energy": cfg.energy}
    raise ConfigError("lowrank: set one of energy, ratio or params")


# ----------------------------------------------------------------------------- a budget chosen on validation

AUTO = "auto"


def region_drop(metrics: dict, reference: dict) -> float:
    """The largest drop of any region's Dice (dice_wt/tc/et) from `reference` to `metrics` (negative: all rose)."""
    return max(float(reference[k]) - float(metrics[k]) for k in DICE_KEYS)


def search_share(model: nn.Module, cfg: LowRankConfig, score: Callable[[nn.Module], dict],
                 reference: dict) -> tuple[nn.Module, list[dict], int]:
    """`lowrank.params: auto`: factorise a copy of `model` at each share of `cfg.auto_shares` (smallest
    first) and keep the first whose `score` (validation metrics, dice_wt/tc/et) drops no region by more
    than `cfg.auto_tolerance` below `reference` (the source's metrics on the same cases). If none does,
    nothing is factorised: the chosen index is -1 and the model returned is `model` itself (a budget
    that costs more Dice than the tolerance is not what "auto" asked for; `--params 65%` forces one).
    A share below the floor that no factorisation can reach is skipped. `model` is unchanged.

    The Dice compared is each region's per-case mean (the BraTS figure), so a few false ET voxels on a
    case without ET cost that case's whole ET score: strict where ET is concerned. The stage scores each
    copy on its training device (`StageContext.device`); under torchrun rank 0 searches and the other
    ranks factorise at the count it chose.

    Returns (the factorised copy, or `model`; one row per share tried: {"share", "params", "params_after",
    "metrics", "drop", "within", "table"}; the index of the chosen row, -1 for none). Why: parameters cost little Dice
    in some layers and much in others, and how much a whole budget costs is measured, not guessed (the
    spectral energy a budget keeps says nothing about the regions; the README's "What compression keeps").
    """
    rule = selection(cfg)
    total = count_params(model)
    reachable, floor = reachable_shares(model, cfg)
    rows: list[dict] = []
    if not reachable:
        raise BudgetError(unreachable_message(rule["shares"], model, floor))
    for share in reachable:
        trial = dataclasses.replace(cfg, params=str(round(share * total)))  # a count: no percent text to parse
        candidate, table = factorise_(copy.deepcopy(model), trial)
        metrics = score(candidate)
        drop = region_drop(metrics, reference)
        rows.append({"share": share, "params": round(share * total), "params_after": count_params(candidate),
                     "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                     "drop": drop, "within": drop <= rule["tolerance"], "table": table})
        if rows[-1]["within"]:
            return candidate, rows, len(rows) - 1
        del candidate
    return model, rows, -1


def reachable_shares(model: nn.Module, cfg: LowRankConfig) -> tuple[list[float], float]:
    """(the shares of `cfg.auto_shares` a factorisation of `model` can reach, in order; the smallest share
    any budget reaches: `budget_floor` over the model's parameters)."""
    total = count_params(model)
    floor = budget_floor(candidates(model), total, cfg.min_saving) / total
    return [s for s in selection(cfg)["shares"] if round(s * total) >= floor * total], floor


def unreachable_message(shares: Sequence[float], model: nn.Module, floor: float) -> str:
    """Why no share of `shares` can be tried: `floor` (`reachable_shares`) is the lowest any budget reaches."""
    return (f"lowrank.auto_shares {[float(s) for s in shares]}: none is reachable for this model "
            f"({count_params(model):,} parameters; the lowest rank everywhere leaves {floor:.1%}): add shares of "
            f"at least {floor:.1%}")


def format_search(rows: Sequence[dict], chosen: int, tolerance: float, unreachable: Sequence[float] = (),
                  reference: dict | None = None) -> str:
    """The search's lines: the source's Dice, then per share tried its parameters, Dice per region and the
    largest drop, the chosen one marked; shares below what factorisation reaches named."""
    lines = [f"lowrank.params=auto: the smallest share keeping every region within {tolerance:.3f} Dice of the "
             "source (validation cases, ET rule off, before fine-tune)"]
    if reference is not None:
        lines.append(f"     source                   WT {reference['dice_wt']:.3f} TC {reference['dice_tc']:.3f} "
                     f"ET {reference['dice_et']:.3f}")
    for i, r in enumerate(rows):
        m = r["metrics"]
        lines.append(f"  {'->' if i == chosen else '  '} {100 * r['share']:4g}%  {r['params_after']:>9,} params  "
                     f"WT {m['dice_wt']:.3f} TC {m['dice_tc']:.3f} ET {m['dice_et']:.3f}  "
                     f"largest drop {signed(r['drop'])}{'' if r['within'] else '  (over)'}")
    if unreachable:
        lines.append(f"  ({', '.join(f'{100 * v:g}%' for v in unreachable)}: below what factorisation can reach, "
                     "not tried)")
    elif chosen == 0:
        lines.append("  (the smallest share offered was within: lowrank.auto_shares may go lower)")
    if chosen < 0:
        lines.append("  none within: the model is left unfactorised (--params 65% forces a budget)")
    return "\n".join(lines)


def signed(value: float) -> str:
    """+0.012 / -0.004, and +0.000 for a drop that rounds to zero from either side."""
    return f"{round(value, 3) + 0.0:+.3f}"


# ----------------------------------------------------------------------------- the command

STAGE = "lowrank"


def factorise_step(model: nn.Module, ctx: StageContext) -> nn.Module:
    """Step of the low-rank stage: truncated-SVD factorisation by `lowrank`'s rule; the rank table
    goes into ctx.extra["lowrank"]. With a fine-tune that does not score its start itself
    (train.val_at_start off), the factorised model is scored here, before it trains."""
    cfg = ctx.cfg
    model.eval()
    params_before = count_params(model)
    rule = selection(cfg.lowrank, params_before)
    searched = None
    if rule["mode"] == AUTO:
        if ctx.dist.main:
            found = search_share(
                model, cfg.lowrank,
                lambda m: evaluate(m.to(ctx.device), ctx.data.cache, ctx.data.val_ids, cfg, desc="low-rank share"),
                ctx.source_metrics)
        if ctx.dist.enabled:  # rank 0 searches; the others factorise at its count (the surgery is deterministic)
            shared = [found[1:] if ctx.dist.main else None]
            dist.broadcast_object_list(shared, src=0)
            if not ctx.dist.main:
                rows, chosen = shared[0]
                found = (factorise_(model, dataclasses.replace(cfg.lowrank, params=str(rows[chosen]["params"])))[0]
                         if chosen >= 0 else model, rows, chosen)
        model, rows, chosen = found
        unreachable = [v for v in rule["shares"] if v < rows[0]["share"]]  # the search starts at the first reachable
        reference = {k: float(ctx.source_metrics[k]) for k in DICE_KEYS}
        if chosen >= 0:
            table, searched = rows[chosen]["table"], rows[chosen]["metrics"]
        else:  # no share within the tolerance: every candidate kept whole
            table, searched = [{**r, "rank": None, "energy_kept": 1.0, "params_after": r["params_before"],
                                "factorised": False} for r in rows[0]["table"]], None
        rule = {**rule, "params": rows[chosen]["params"] if chosen >= 0 else None,
                "params_share": rows[chosen]["share"] if chosen >= 0 else None,
                "search": [{k: v for k, v in r.items() if k != "table"} for r in rows],
                "unreachable": unreachable, "cases": len(ctx.data.val_ids), "reference": reference}
        if ctx.dist.main:
            print(format_search(rows, chosen, rule["tolerance"], unreachable, reference))
            if chosen < 0:
                print(f"WARNING: lowrank: no share kept every region within {rule['tolerance']:.3f} Dice of the "
                      f"source (least drop {signed(min(r['drop'] for r in rows))}); the model is left unfactorised")
    else:
        model, table = factorise_(model, cfg.lowrank)
    params_after = count_params(model)
    if ctx.dist.main:
        print(format_table(table))
        print(f"parameters: {params_before:,} -> {params_after:,} "
              f"({100 * (1 - params_after / params_before):.1f}% fewer)")
    fine_tune = cfg.train.epochs > 0
    ctx.extra["lowrank"] = {**rule, "min_saving": cfg.lowrank.min_saving, "params_before": params_before,
                            "params_after": params_after, "teacher": ctx.teacher_path if fine_tune else None,
                            "table": table}
    ctx.metrics.update(params_before=params_before, params_after=params_after)
    if fine_tune and not cfg.train.val_at_start:
        ctx.extra["before"] = searched or evaluate(model, ctx.data.cache, ctx.data.val_ids, cfg,
                                                   desc="factorised, before fine-tune")
    return model


def record_before(model: nn.Module, art: Artifact, ctx: StageContext) -> Artifact:
    """Finish of the low-rank stage: the Dice before the fine-tune (its start, scored once) and the
    epoch kept (0: no fine-tune epoch beat the factorised weights on validation)."""
    if ctx.fit is None:
        before, best_epoch = dict(art.metrics), 0
    else:
        start = next((e["val"] for e in ctx.fit.history if e.get("start")), None)
        before, best_epoch = start or art.extra.pop("before"), int(art.extra.get("epoch", -1))
    art.extra.pop("before", None)
    if ctx.dist.main:
        print(f"dice before fine-tune: wt {before['dice_wt']:.3f} tc {before['dice_tc']:.3f} "
              f"et {before['dice_et']:.3f} mean {before['dice_mean']:.3f}")
    summary = dict(art.extra["lowrank"])
    summary.update(dice_mean_before_finetune=before["dice_mean"], best_epoch=best_epoch,
                   metrics_before_finetune={k: float(v) for k, v in before.items()})
    # kept: the "still rising" record (engine.loop.ended_rising) and the validation cases (engine.runner.changed_cases)
    art.extra = {"lowrank": summary, "runtime": art.extra.get("runtime"),
                 **{k: art.extra[k] for k in ("rising", "val_cases") if k in art.extra}}
    art.metrics = {**art.metrics, "dice_mean_before_finetune": before["dice_mean"]}
    return art


def _check(art: Artifact, cfg: Config) -> None:
    """Before any work: a bad rule, and a parameter budget the source model already meets."""
    rule = selection(cfg.lowrank)
    lr = cfg.lowrank
    if lr.params is not None and (lr.energy is not None or lr.ratio is not None):
        print(f"note: lowrank.params={lr.params} wins over lowrank.energy={lr.energy} / lowrank.ratio={lr.ratio}; "
              "set lowrank.params=null (or use --energy / --ratio) for those rules", flush=True)
    if rule["mode"] == AUTO:
        model = model_from_spec(art.spec)
        reachable, floor = reachable_shares(model, cfg.lowrank)
        if not reachable:
            raise ConfigError(f"{art.path}: {unreachable_message(rule['shares'], model, floor)}")
    if rule["mode"] == "params" and rule["params"] is not None:  # a count (a share always leaves work)
        total = count_params(model_from_spec(art.spec))
        if rule["params"] >= total:
            raise ConfigError(f"{art.path}: the model has {total:,} parameters, within lowrank.params="
                              f"{cfg.lowrank.params}: nothing to do (a smaller budget, or a share such as 65%)")


LOWRANK = StageDef(STAGE, step=factorise_step, finetune=distill_trainer, finish=record_before,
                   needs_teacher=True, check=_check)


def lowrank_stage(artifact: str | Path, cfg: Config, folder: str | Path, data_given: bool = True) -> Artifact:
    """Artifact -> factorised model -> optional distillation fine-tune -> `<folder>/lowrank.pt`."""
    return run_stage(artifact, LOWRANK, cfg, folder, teacher=cfg.lowrank.teacher, data_given=data_given)


def main(argv: Sequence[str] | None = None) -> int:
    p = stage_parser(
        "python -m compress.lowrank",
        "Factorise a model's Linear/Conv3d layers by truncated SVD, then distil-fine-tune briefly.\n"
        "Rank rule: --params auto (the default: the smallest of lowrank.auto_shares whose factorised model keeps\n"
        "every region's validation Dice within lowrank.auto_tolerance) | --params N (a budget: 200k, or a share: 65%)\n"
        "| --energy E | --ratio R.",
        default_config="configs/lowrank.yaml", default_out="runs/lowrank",
    )
    p.add_argument("artifact", help="model artifact (.pt) to factorise, e.g. runs/student/student.pt")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=float, help="rank rule: keep this share of each layer's spectral energy, "
                      "e.g. 0.9 (default: the config's rule, lowrank.params=auto unless set)")
    rule.add_argument("--ratio", type=float, help="rank rule: rank = ratio x full rank in every layer, e.g. 0.5 "
                      "(default: the config's rule)")
    rule.add_argument("--params", help="rank rule: parameter budget for the whole model: 200k, 1.2M, a share of "
                      "it: 65%%, or auto (chosen on validation) (default: the config's rule)")
    p.add_argument("--epochs", type=int, default=None,
                   help="distillation fine-tune epochs (0: no fine-tune) (default: train.epochs)")
    p.add_argument("--teacher", default=None, help="teacher artifact (default: the teacher in the lineage)")
    add_strict(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    lr = cfg.lowrank
    if args.energy is not None:
        lr.energy, lr.ratio, lr.params = args.energy, None, None
    elif args.ratio is not None:
        lr.energy, lr.ratio, lr.params = None, args.ratio, None
    elif args.params is not None:
        lr.energy, lr.ratio, lr.params = None, None, args.params
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.teacher:
        lr.teacher = args.teacher
    art = lowrank_stage(args.artifact, cfg, out_dir(args), data_given=data_given(args))
    m = art.metrics
    if main_rank():  # under torchrun, once
        print(f"wrote {art.path}: {m['params_before']:,} -> {m['params_after']:,} parameters, "
              f"dice_mean {m['dice_mean_before_finetune']:.3f} before fine-tune, {m.get('dice_mean', math.nan):.3f} after")
    return exit_code(art)


def cli() -> None:
    """The `rf3d-lowrank` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
