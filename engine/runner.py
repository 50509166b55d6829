"""The one stage runner: every compression command is `run_stage(source, StageDef(...), cfg, out)`.

    source artifact  --load; check its kind and label scheme (before any work)-->
    process group (under torchrun, first: so rank 0 alone prepares the cache while the others wait)
    data             cache, split, crops (engine.data.make_data)
    step(model, ctx) -> model          pure surgery: thin, factorise, quantize_ (no training)
    fine-tune        through the engine when the stage has one and train.epochs > 0; `<out>/last.pt`
                     is resumable and carries the best epoch, which is what the stage keeps
    finish(model, artifact, ctx)       optional: figures measured on the result, a conversion (INT8)
    `<out>/<name>.pt`                  the stage's one artifact, written by rank 0 only

Side information a step produces (rank table, channel selection, INT8 decisions) goes into
`ctx.extra` and lands in the artifact's `extra`; figures go into `ctx.metrics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from brats.layout import DataError
from brats.metrics import REGIONS
from brats.scoring import artifact_et_rule, calibrate_et_rule, evaluate
from common.atomic import claim_folder
from common.artifact import Artifact, ArtifactError, build_model
from common.config import DATA_IDENTITY, Config, ConfigError, check_values, to_dict
from common.paths import recorded_path
from engine.data import TrainData, make_data
from engine.loop import LAST, FitResult, Stage, artifact_spec, check_sizes, fit, rank_runtime
from engine.runtime import DistInfo, init_distributed, seed_everything
from model.refineformer3d import total_stride


def freeze(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring grad (a distillation teacher); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(path: str | Path) -> nn.Module:
    """The model of an artifact, frozen (see `freeze`). ArtifactError for a missing or bad file."""
    return freeze(build_model(Artifact.load(path)))


def find_teacher(art: Artifact, explicit: str | None = None) -> str | None:
    """The teacher to distil from: `explicit`, else the nearest teacher in the lineage, else the
    artifact itself when it is a teacher, else None."""
    if explicit:
        return str(explicit)
    found = art.ancestor("teacher")
    if found:  # recorded relative by an older version, from the project folder: look there too
        return recorded_path(found)
    return str(art.path) if art.stage == "teacher" and art.path else None


def check_source(art: Artifact, cfg: Config, kinds: tuple[str, ...], what: str) -> None:
    """The source fits the stage: its model kind is one of `kinds`, its label scheme is `data.scheme`."""
    kind = art.spec.get("kind", "fp32")
    if kind not in kinds:
        raise ArtifactError(f"{art.path}: {what} needs a {' or '.join(kinds)} artifact, got kind {kind!r}")
    stored = art.config.get("data", {}).get("scheme", cfg.data.scheme)
    if stored != cfg.data.scheme:
        raise ConfigError(f"{art.path}: the model predicts scheme {stored!r}, but data.scheme is {cfg.data.scheme!r}")


@dataclass
class StageContext:
    """What a stage's functions see: the config, the checked source, data, and where to record."""

    cfg: Config
    source: Artifact
    out: Path
    data: TrainData
    dist: DistInfo
    teacher_path: str | None
    resume: bool = False
    extra: dict = field(default_factory=dict)  # side information for the artifact's extra
    metrics: dict = field(default_factory=dict)  # figures for the artifact's metrics
    source_metrics: dict = field(default_factory=dict)  # the source model scored on the same cases, this run
    fit: FitResult | None = None  # the fine-tune's result, once it ran
    teacher_scores: dict | None = None  # the teacher on the validation cases, once per run (adaptive KD)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this rank trains and scores
    _teacher: nn.Module | None = None
    _teacher_artifact: Artifact | None = None

    def teacher_artifact(self) -> Artifact:
        """The teacher's artifact (read once: its model and its metrics). ArtifactError when the lineage has none."""
        if self._teacher_artifact is None:
            if self.teacher_path is None:
                raise ArtifactError(f"{self.source.path}: no teacher in its lineage; pass --teacher PATH")
            self._teacher_artifact = Artifact.load(self.teacher_path)
            if self._teacher_artifact.stage != "teacher" and self.dist.main:  # allowed (a student can teach), said
                tqdm.write(f"note: distilling from {self.teacher_path}, a {self._teacher_artifact.stage!r} artifact, "
                           "not a teacher")
        return self._teacher_artifact

    def teacher(self) -> nn.Module:
        """The frozen teacher model (built once from `teacher_artifact`)."""
        if self._teacher is None:
            self._teacher = freeze(build_model(self.teacher_artifact()))
        return self._teacher


@dataclass
class StageDef:
    """A compression stage: its name, its pure step, and how it is fine-tuned and finished."""

    name: str  # artifact stage and file name: <out>/<name>.pt
    step: Callable[[nn.Module, StageContext], nn.Module]
    # what the fine-tune trains (the model, or a TrainingWrapper around it) and its engine Stage; None: no fine-tune.
    # Its attribute `check(cfg)`, when it has one, is run before any work (e.g. student.distill.check_distill).
    finetune: Callable[[nn.Module, StageContext], tuple[nn.Module, Stage]] | None = None
    # the whole fine-tune when it is more than one engine fit (growth: fits around widenings); default `fit_once`
    finish: Callable[[nn.Module, Artifact, StageContext], Artifact] | None = None
    kinds: tuple[str, ...] = ("fp32",)  # source kinds the step accepts
    needs_teacher: bool = False  # the fine-tune distils: a teacher must be found before any work
    checkpoint_dir: str = ""  # sub-folder of out for the fine-tune's last.pt ("": out itself)
    check: Callable[[Artifact, Config], None] | None = None  # more checks of config x source, before any work
    train: Callable[[nn.Module, StageContext, "StageDef", Path], FitResult] | None = None
    resume_file: str = LAST  # under the checkpoint folder: what --resume needs to find


def fit_once(model: nn.Module, ctx: StageContext, stage: StageDef, ckpt_dir: Path) -> FitResult:
    """The usual fine-tune: one engine `fit` of `stage.finetune(model, ctx)` in `ckpt_dir`, keeping
    the best epoch in last.pt (`best_name=None`)."""
    trainee, engine_stage = stage.finetune(model, ctx)
    return fit(trainee, engine_stage, ctx.cfg, ckpt_dir, stage_name=stage.name, lineage=ctx.source.child_lineage(),
               extra=ctx.extra, data=ctx.data, resume=ctx.resume, best_name=None)


RULE_KEYS = ("grid", "dice_et", "et_missed")  # an ET rule record's per-threshold lists (brats.scoring.calibrate_et_rule)


def as_served(metrics: dict, rule: dict | None) -> tuple[dict, int] | None:
    """(`metrics` with the ET figures of the rule calibrated for the same model in the same run on the same
    cases, that threshold): ET Dice and ET cases missed at `rule["et_min_voxels"]` (`et_rule`'s record).
    None when the record is unusable (a key or a threshold missing, lists of another length, another
    number of cases). WT and TC do not change with the rule (ET becomes NCR/NET)."""
    if not isinstance(rule, dict) or not all(isinstance(rule.get(k), list) for k in RULE_KEYS):
        return None
    grid, k = rule["grid"], rule.get("et_min_voxels")
    if k not in grid or any(len(rule[key]) != len(grid) for key in RULE_KEYS) \
            or rule.get("cases") != metrics.get("val_cases", rule.get("cases")):
        return None
    i = grid.index(k)
    return {**metrics, "dice_et": rule["dice_et"][i], "et_missed_cases": rule["et_missed"][i]}, int(k)


def source_as_served(metrics: dict) -> dict:
    """The source's metrics with ET at the rule it is served with, scored in this run (`score_cases`'s
    `served_rule` figures); `metrics` as they are when it was scored without them."""
    if "dice_et_served" not in metrics:
        return metrics
    return {**metrics, "dice_et": metrics["dice_et_served"],
            "et_missed_cases": metrics.get("et_missed_served_cases", metrics.get("et_missed_cases"))}


def guard(metrics: dict, source_metrics: dict, source_stage: str, cfg: Config,
          rules: tuple[int, int] | None = None) -> dict:
    """Per-region Dice drop of a stage's result below its source, both scored in this run on the same
    cases, each as served when `rules` = (source's, result's) ET rule thresholds is given (ET at its own
    rule: `source_as_served`, `as_served`), else both as validated; regions dropping more than
    `guard.max_region_drop` are violations. Plain data for extra.
    Compared rule off, a model whose calibrated rule removes a small false ET on a case without ET showed
    an ET "drop" of 0.25 on the demo's 4 validation cases that its served output does not have."""
    limit = cfg.guard.max_region_drop
    source_dice = {r: float(source_metrics.get(f"dice_{r}", math.nan)) for r in REGIONS}
    drops = {r: source_dice[r] - float(metrics.get(f"dice_{r}", math.nan)) for r in REGIONS}
    return {
        "source": source_stage, "limit": limit, "strict": cfg.guard.strict, "drops": drops,
        "source_dice": source_dice, "et_rules": None if rules is None else {"source": rules[0], "result": rules[1]},
        "et_missed_cases": metrics.get("et_missed_cases"), "source_et_missed_cases": source_metrics.get("et_missed_cases"),
        "violations": [r for r, d in drops.items() if d > limit],
    }


def guard_lines(info: dict, stage: str) -> list[str]:
    """The log lines of a guard record: one summary, and a loud warning per violating region."""
    drops = ", ".join(f"{r} {info['source_dice'][r]:.3f} -> {info['source_dice'][r] - d:.3f} ({-d:+.3f})"
                      for r, d in info["drops"].items())
    rules = info.get("et_rules")
    served = "" if not rules else " (each with its ET rule: " + ", ".join(
        f"{who} {'off' if k == 0 else f'< {k} voxels'}" for who, k in (("source", rules["source"]), (stage, rules["result"]))) + ")"
    lines = [f"{stage} vs its source ({info['source']}), same cases{served}: {drops}; ET predicted empty on "
             f"{info['et_missed_cases']:.0f} case(s) with ET (source: {info['source_et_missed_cases']:.0f})"]
    for r in info["violations"]:
        lines.append(f"WARNING: {stage}: {r.upper()} Dice dropped {info['drops'][r]:.3f} below the source "
                     f"({info['source']}), more than guard.max_region_drop={info['limit']:.2f}"
                     + (" -- failing (--strict)" if info["strict"] else ""))
    return lines


def et_rule(product: Artifact, data: TrainData, cfg: Config) -> dict:
    """The BraTS ET rule's threshold for this artifact, calibrated on the validation cases
    (`brats.scoring.calibrate_et_rule`); predict.py and report.py apply it unless told otherwise."""
    served = build_model(product).eval()
    device = next(iter(served.parameters()), torch.empty(0)).device

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return served(x.to(device)).float()

    return calibrate_et_rule(predict, data.cache, data.val_ids, cfg)


def changed_cases(art: Artifact, val_ids: list[str]) -> str | None:
    """A warning when the source artifact recorded other validation cases than the data gives today
    (the data folder was regenerated or edited since): its figures and this run's are not comparable."""
    recorded = art.extra.get("val_cases")
    if recorded is None or sorted(recorded) == sorted(val_ids):
        return None
    common = len(set(recorded) & set(val_ids))
    return (f"WARNING: {art.path} was validated on {len(recorded)} case(s), {common} of them among today's "
            f"{len(val_ids)}: the data changed since it was made; its recorded scores and this run's are not "
            "comparable (the comparison below scores both models on today's cases)")


def exit_code(art: Artifact) -> int:
    """3 when the artifact's guard record has violations and was made with guard.strict, else 0."""
    g = art.extra.get("guard") or {}
    return 3 if g.get("strict") and g.get("violations") else 0


def inherit_data(art: Artifact, cfg: Config, given: bool) -> str:
    """Make the stage use the data set and split its source was trained and validated on (lineage),
    unless the user named other data (`given`); returns the plan line's data part. A named data set
    that differs from the source's is allowed, with a warning: the gap to the source is then
    measured on other cases."""
    stored = art.config.get("data") or {}
    what = lambda d: d.get("dir") or f"synthetic cases (seed {d.get('synthetic_seed')})"  # noqa: E731
    if not stored:
        return f"data: {what(vars(cfg.data))} (the source records none)"
    if given:
        synthetic = stored.get("dir") is None and cfg.data.dir is None  # synthetic_* matter only then
        keys = [k for k in DATA_IDENTITY if k != "max_val_cases" and (synthetic or not k.startswith("synthetic"))]
        differs = [k for k in keys if k in stored and stored[k] != getattr(cfg.data, k)]
        if differs:
            shown = "; ".join(f"{k} {getattr(cfg.data, k)} instead of {stored[k]}" for k in differs)
            return (f"WARNING: data differs from the source's ({', '.join(differs)}): {shown}; the comparison with "
                    "the source uses the cases given here")
        return f"data: {what(vars(cfg.data))} (as the source's)"
    for key in DATA_IDENTITY:
        if key in stored and not (key == "cache" and cfg.data.cache is not None):  # a cache set here stays
            setattr(cfg.data, key, stored[key])
    for key in ("dir", "cache"):  # artifacts written before paths were recorded absolute: relative to the project
        value = getattr(cfg.data, key, None)
        if value:
            setattr(cfg.data, key, recorded_path(value))
    if cfg.data.dir and not Path(cfg.data.dir).exists():
        raise DataError(f"data folder {cfg.data.dir}, recorded in {art.path} (the data its source was trained on), "
                        "does not exist: pass --data DIR where that data set is now")
    return f"data: {what(vars(cfg.data))}, fold {cfg.data.fold}, from the source artifact {art.path} (lineage)"


def run_stage(source: str | Path, stage: StageDef, cfg: Config, out: str | Path, *, teacher: str | None = None,
              resume: bool = False, data_given: bool = True) -> Artifact:
    """Apply `stage` to the artifact at `source`; return the artifact written to `<out>/<stage.name>.pt`.

    Errors found before any work (ArtifactError, ConfigError): a missing or unreadable source, a
    kind or label scheme the stage cannot take, no teacher where the fine-tune needs one, nothing
    to resume. `data_given` False: the data set and split are the source's (`inherit_data`).
    """
    art = Artifact.load(source)
    data_line = inherit_data(art, cfg, data_given)
    check_source(art, cfg, stage.kinds, stage.name)
    check_sizes(cfg, total_stride(art.spec))  # fp32: checked above
    check_values(cfg)  # the CLIs' configs passed it at load; a Config built in code, or the inherited data, here
    if stage.check is not None:
        stage.check(art, cfg)
    if getattr(stage.finetune, "check", None) is not None:  # the fine-tune's settings, even with 0 epochs
        stage.finetune.check(cfg)
    finetune = stage.finetune is not None and cfg.train.epochs > 0
    teacher_path = find_teacher(art, teacher)
    for what, path in (("source", art.path), ("teacher", teacher_path)):
        if path is not None and Path(out).resolve() == Path(path).resolve().parent:
            raise ConfigError(f"--out {out}: the folder of the {what} artifact {path}; this stage's files "
                              "(last.pt, history.json, its artifact) would mix with or replace its own: choose "
                              "another folder")
    if finetune and stage.needs_teacher and teacher_path is None:
        raise ArtifactError(f"{art.path}: no teacher in its lineage to distil from; pass --teacher PATH "
                            "(or --epochs 0 for no fine-tune)")
    out = Path(out)
    ckpt_dir = out / stage.checkpoint_dir if stage.checkpoint_dir else out
    if resume and not (ckpt_dir / stage.resume_file).is_file():
        raise ArtifactError(f"{ckpt_dir / stage.resume_file}: nothing to resume (no {stage.resume_file} in {ckpt_dir})")

    info = init_distributed(cfg.train.device)  # before the data, so rank 0 alone prepares the cache
    if info.main:
        claim_folder(out)  # rank 0 writes <out>: a second run into it fails here, before any work
        tqdm.write(f"{stage.name}: {data_line}")
    try:
        # train.threads (and the device) apply from here: the source's score and the step's own timings
        # (quantize.py times each layer on this many threads) run as the fine-tune will
        rt = rank_runtime(cfg, info)
        seed_everything(cfg.train.seed)
        data = make_data(cfg)
        if info.main and (warning := changed_cases(art, data.val_ids)):
            tqdm.write(warning)
        ctx = StageContext(cfg, art, out, data, info, teacher_path, resume, device=rt.device)
        source = build_model(art)  # fp32 (check_source): scored where this stage trains, handed to the step on the CPU
        source_rule = artifact_et_rule(art)  # ET as predict.py serves the source too, from the same pass (the guard)
        ctx.source_metrics = evaluate(source.to(rt.device), data.cache, data.val_ids, cfg, desc=f"source ({art.stage})",
                                      served_rule=source_rule)
        model = stage.step(source.cpu(), ctx)
        del source  # a step that works on a copy (lowrank's search) would keep it alive through the fine-tune
        if finetune:
            ctx.fit = (stage.train or fit_once)(model, ctx, stage, ckpt_dir)
            best = ctx.fit.best
            if best is None:
                raise RuntimeError(f"{stage.name}: the fine-tune validated no epoch")
            model = build_model(best)
            product = Artifact(stage=stage.name, spec=best.spec, state_dict=best.state_dict, config=to_dict(cfg),
                               metrics={**best.metrics, **ctx.metrics}, lineage=art.child_lineage(),
                               extra={k: v for k, v in best.extra.items() if k != "train_state"})
        else:
            if info.main:
                tqdm.write(rt.line(stage.name))
            model.to(rt.device)
            metrics = evaluate(model, data.cache, data.val_ids, cfg, desc=f"{stage.name} validation")
            product = Artifact(stage=stage.name, spec=artifact_spec(model), state_dict=model.state_dict(),
                               config=to_dict(cfg), metrics={**metrics, **ctx.metrics},
                               lineage=art.child_lineage(),
                               extra={**ctx.extra, "runtime": rt.to_dict(), "val_cases": list(data.val_ids)})
        if stage.finish is not None:
            product = stage.finish(model, product, ctx)
        product.extra["et_rule"] = et_rule(product, data, cfg)
        served = as_served(product.metrics, product.extra["et_rule"])
        if served is not None:  # its record was usable: both as served
            product.extra["guard"] = guard(served[0], source_as_served(ctx.source_metrics), art.stage, cfg,
                                           (source_rule, served[1]))
        else:  # both at train.et_min_voxels, as validated (the rules are not compared then)
            product.extra["guard"] = guard(product.metrics, ctx.source_metrics, art.stage, cfg)
        if info.main:
            for line in guard_lines(product.extra["guard"], stage.name):
                tqdm.write(line)
        path = out / f"{stage.name}.pt"
        if info.main:
            product.save(path)
        else:
            product.path = path
        if info.enabled:
            dist.barrier()
        return product
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()
