"""Self-distillation: a frozen teacher supervises a student through the one training engine.

Loss per batch (teacher on the clean crop, student on a perturbed copy, see `student.perturb`):

    supervised_weight * (Dice + BCE/CE on the moved labels)
  + kd_weight * T^2 * [KL(softmax(t/T) || softmax(s/T))          softmax schemes
                       BCE(sigmoid(s/T), sigmoid(t/T)) - H(...)  regions: a per-channel binary KL,
                                                                 the soft BCE less its constant]
  + kd_dice_weight * soft Dice(student probabilities, teacher probabilities), mean over regions
                    (the voxel-mean KD above is dominated by background; this term weighs ET like WT)
  + feature_weight * mean over stages of MSE(proj_i(student stage i), teacher stage i)

`distill.kd_region_weights: teacher` weighs both distillation terms per region (sigmoid channel) by the
teacher's validation Dice on that region (its artifact's dice_tc / dice_wt / dice_et), so a region the
teacher gets wrong (a weak ET) is taught mostly by the labels; a teacher that records none (an imported
checkpoint) or a softmax scheme gets every region 1, said in the log. `equal` (default): every region 1.
Measured with the demo recipe (20 epochs, 8 held-out cases per family, bench_chain's settings): the
student improves (lgg-rich mean Dice 0.534 -> 0.617, labels only 0.614; demo 0.929 -> 0.930), but the whole
chain with it in every stage did not (INT8 lgg-rich 0.578 -> 0.536 with one ET case emptied; demo 0.906 ->
0.908), so it is not the default.

`distill.kd_region_weights: adaptive` compares instead of trusting: the teacher is scored once per run
on the stage's validation cases (pooled Dice per region, `brats.scoring.pooled_dice`; rank 0's score
under torchrun), and each region's KD weight follows the last validation: 0 while the student's pooled
Dice on that region is at or above the teacher's (that region is then taught by the labels alone, so
a weak teacher's errors there are not taught), 1 while it is below (a strong teacher keeps teaching).
The weights are a function of the last validation (on resume too), and every epoch's training log
holds the ones in force (`kd_w_tc`, `kd_w_wt`, `kd_w_et` in history.json and TensorBoard). The rule
(pooled validation Dice per region against the teacher's) is this project's; measured in README.

`distill.kd_gate: correct` restricts both distillation terms to the voxels where the teacher's
prediction agrees with the labels (every region channel, or the class for softmax schemes;
`teacher_agrees`), so a weak teacher's errors are not taught while its soft targets are kept where
it is right (the supervised term still sees every voxel). `all` (default): every valid voxel.

The 1x1x1 feature projections (student dims -> teacher dims) live in `DistillModel`, a training
wrapper around the student: DDP, the optimiser and last.pt treat them as any parameter, and the
saved student has none of them.

`distill_student` is the `distill.py` command, one `engine.runner.run_stage` of the `STUDENT` stage:
thin (or re-initialise) the teacher to a width, fine-tune with `DistillStage` (the student wrapped in
a `DistillModel` when features are distilled), and write
`<out>/student.pt` with the teacher-vs-student Dice gap.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from brats.dataset import region_centred_crops
from brats.labels import REGIONS as CHANNEL_REGIONS, is_softmax, to_target
from brats.scoring import evaluate
from common.artifact import Artifact, ArtifactError
from common.config import Config, ConfigError, PerturbConfig
from engine.data import TrainData, stack_batches
from engine.loop import Stage, TrainingWrapper
from engine.losses import SMOOTH, segmentation_loss
from engine.runner import StageContext, StageDef, freeze, load_teacher, run_stage  # noqa: F401 (load_teacher: re-export)
from student.perturb import perturb_batch
from student.thin import accumulate_taylor_grads, scratch_student, thin_with_selection, width_plan

STAGE = "student"
INITS = ("pruned", "scratch")
DICE_KEYS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


# ----------------------------------------------------------------------------- losses


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, scheme: str, temperature: float, mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit distillation of (B, K, D, H, W) logits, times T^2, mean over (valid) voxels; 0 when s == t.
    `weights` (K,): per sigmoid channel (regions schemes only), instead of the plain mean over channels."""
    T = float(temperature)
    s, t = student.float() / T, teacher.float() / T
    if is_softmax(scheme):
        per_voxel = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1, keepdim=True)
    else:
        # BCE(sigmoid(s), p) - BCE(sigmoid(t), p), p = sigmoid(t): same gradient as the soft BCE
        p = torch.sigmoid(t)
        per_channel = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
                       - F.binary_cross_entropy_with_logits(t, p, reduction="none"))
        if weights is not None:
            per_channel = per_channel * weights.to(per_channel).view(1, -1, *[1] * (per_channel.ndim - 2))
        per_voxel = per_channel.mean(1, keepdim=True)
    if mask is not None:
        m = mask.to(per_voxel.dtype)
        return (per_voxel * m).sum() / m.sum().clamp_min(1.0) * T * T
    return per_voxel.mean() * T * T


KD_GATES = ("all", "correct")


def teacher_agrees(teacher: torch.Tensor, label: torch.Tensor, scheme: str) -> torch.Tensor:
    """(B, 1, D, H, W) bool: voxels where the teacher's (B, K, D, H, W) logits predict what the BraTS
    label map (B, D, H, W) says: every sigmoid region channel on the right side of 0.5, or the softmax
    argmax equal to the label's class."""
    target = to_target(label, scheme)
    if is_softmax(scheme):
        return (teacher.argmax(1) == target).unsqueeze(1)
    return ((teacher > 0) == (target > 0.5)).all(1, keepdim=True)


def kd_dice_loss(student: torch.Tensor, teacher: torch.Tensor, scheme: str,
                 mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice between student and teacher probabilities of (B, K, D, H, W) logits, averaged over
    the regions (sigmoid channels; softmax classes without the background), so a small region such as
    ET weighs as much as the background-dominated voxel mean of `kd_loss`. 0 when s == t; `mask`
    (B, 1, ...) leaves out invalid voxels; `weights` (regions,) scale each region's term."""
    if is_softmax(scheme):
        p_s, p_t = student.float().softmax(1)[:, 1:], teacher.float().softmax(1)[:, 1:]
    else:
        p_s, p_t = torch.sigmoid(student.float()), torch.sigmoid(teacher.float())
    if mask is not None:
        p_s, p_t = p_s * mask, p_t * mask
    # V-Net form (squares in the denominator, Milletari et al. 2016): exactly 0 when p_s == p_t, soft or not
    dims = (0, *range(2, p_s.ndim))
    dice = (2 * (p_s * p_t).sum(dims) + SMOOTH) / ((p_s * p_s).sum(dims) + (p_t * p_t).sum(dims) + SMOOTH)
    if weights is not None:
        return ((1 - dice) * weights.to(dice)).mean()
    return (1 - dice).mean()


KD_REGION_WEIGHTS = ("equal", "teacher", "adaptive")


def adaptive_region_weights(student: dict, teacher: dict) -> torch.Tensor:
    """(3,) float32 in channel order [TC, WT, ET]: 1 for a region whose pooled validation Dice
    (`pooled_dice_<region>` of both metric dicts, the same cases) the student has not reached, 0 where
    it is at or above the teacher's. KeyError naming the missing key."""
    return torch.tensor([0.0 if float(student[f"pooled_dice_{r}"]) >= float(teacher[f"pooled_dice_{r}"]) else 1.0
                         for r in CHANNEL_REGIONS], dtype=torch.float32)


def teacher_region_weights(metrics: dict, source: str = "the teacher") -> torch.Tensor:
    """(3,) float32: the teacher's validation Dice per region in channel order [TC, WT, ET], from its
    artifact's metrics (dice_tc, dice_wt, dice_et). ConfigError when one is missing or not in [0, 1]."""
    values = []
    for region in CHANNEL_REGIONS:
        v = metrics.get(f"dice_{region}")
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"distill.kd_region_weights=teacher: {source} records no usable dice_{region} "
                              f"(got {v!r}); use kd_region_weights=equal")
        values.append(float(v))
    return torch.tensor(values, dtype=torch.float32)


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over stages of the MSE between (projected) student features and teacher features."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


class _StageTaps:
    """Forward hooks that keep the outputs of `encoder.stages.*`."""

    def __init__(self, model: nn.Module):
        try:
            stages = model.encoder.stages
        except AttributeError:
            raise TypeError(f"feature distillation needs a model with encoder.stages, got {type(model).__name__}") from None
        self.outputs: list[torch.Tensor] = []
        self.handles = [s.register_forward_hook(lambda m, i, o: self.outputs.append(o)) for s in stages]

    def __enter__(self) -> "_StageTaps":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def stage_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of `model(x)` and the outputs of its encoder stages, (B, C_i, ...) each."""
    with _StageTaps(model) as taps:
        logits = model(x)
    return logits, list(taps.outputs)


# ----------------------------------------------------------------------------- the trained model


class DistillModel(TrainingWrapper):
    """A student with the 1x1x1 projections of feature distillation (student stage i dims ->
    teacher stage i dims), seeded. `forward(x)` is the student's logits; `forward(x, features=True)`
    also returns the projected stage outputs, inside the one call DDP synchronises."""

    def __init__(self, student: nn.Module, teacher_dims: Sequence[int], seed: int = 0):
        super().__init__(student)
        s_dims = student.spec.embed_dims
        if len(s_dims) != len(teacher_dims):
            raise ValueError(f"feature distillation: student has {len(s_dims)} stages, teacher {len(teacher_dims)}")
        gen = torch.Generator().manual_seed(seed)
        self.projections = nn.ModuleList(nn.Conv3d(s, t, 1) for s, t in zip(s_dims, teacher_dims))
        for p in self.projections:  # seeded init, independent of the global RNG
            bound = 1 / math.sqrt(p.in_channels)
            with torch.no_grad():
                p.weight.copy_(torch.rand(p.weight.shape, generator=gen) * 2 * bound - bound)
                p.bias.zero_()
        ref = next(student.parameters())
        self.projections.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor, features: bool = False):
        if not features:
            return self.product(x)
        logits, feats = stage_features(self.product, x)
        return logits, [p(f) for p, f in zip(self.projections, feats)]


# ----------------------------------------------------------------------------- the stage


class DistillStage(Stage):
    """Supervised + logit KD (+ feature KD, for a `DistillModel`) against a frozen teacher, for `engine.loop.fit`."""

    name = "distill"

    def __init__(self, teacher: nn.Module, cfg: Config, perturb: bool = True,
                 region_weights: torch.Tensor | None = None, reference: dict | None = None, main: bool = True):
        self.teacher = freeze(teacher)
        self.cfg, self.d = cfg, cfg.distill
        self.region_weights = region_weights  # (3,) per sigmoid channel of both KD terms, or None: all 1
        # adaptive KD: the teacher's validation metrics (pooled_dice_<region>); the weights follow each validation
        self.reference, self.main = reference, main
        if reference is not None and region_weights is None:
            self.region_weights = torch.ones(len(CHANNEL_REGIONS))
        self.scheme = cfg.data.scheme
        self.perturb = perturb
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 7919)
        self.epoch: int | None = None
        check_distill(cfg)

    # -- engine hooks

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # for the perturbation warm-up

    def on_validation(self, metrics: dict[str, float], log: bool = True) -> None:
        """Adaptive KD (`reference` given): each region's KD weight from this validation against the teacher's."""
        if self.reference is None:
            return
        new = adaptive_region_weights(metrics, self.reference)
        if self.main and log:
            for i, region in enumerate(CHANNEL_REGIONS):
                if new[i] != self.region_weights[i]:
                    s_d, t_d = metrics[f"pooled_dice_{region}"], self.reference[f"pooled_dice_{region}"]
                    tqdm.write(f"distill: {region.upper()} pooled Dice {s_d:.3f} "
                               + (f">= the teacher's {t_d:.3f}: taught by the labels alone" if new[i] == 0
                                  else f"< the teacher's {t_d:.3f}: distilled again")
                               + " from the next epoch (adaptive KD)")
        self.region_weights = new

    def perturb_config(self) -> PerturbConfig:
        """`distill.perturb` with its probability ramped up over `warmup_epochs` (epoch 1: clean)."""
        cfg, epoch = self.d.perturb, self.epoch
        if not cfg.warmup_epochs or epoch is None or epoch >= cfg.warmup_epochs:
            return cfg
        return dataclasses.replace(cfg, prob=cfg.prob * epoch / cfg.warmup_epochs)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x, label = batch["image"], batch["label"]
        use_feat = self.d.feature_weight > 0
        self.teacher.eval()
        with torch.no_grad():
            t_logits, t_feats = stage_features(self.teacher, x) if use_feat else (self.teacher(x), None)
        if self.perturb:
            p = perturb_batch(x, t_logits.float(), label, self.perturb_config(), self.generator,
                              features=[f.float() for f in t_feats] if t_feats else None)
            x_s, target, label_s, mask, t_feats = p.image, p.target, p.label, p.mask, p.features
        else:
            x_s, target, label_s, mask = x, t_logits, label, None
        if use_feat:
            s_logits, s_feats = model(x_s, features=True)
        else:
            s_logits = model(x_s)
        sup, logs = segmentation_loss(s_logits, label_s, self.scheme, self.cfg.train.dice_weight,
                                      self.cfg.train.ce_weight)
        if self.d.kd_gate == "correct":
            agrees = teacher_agrees(target, label_s, self.scheme)
            mask = agrees if mask is None else mask.bool() & agrees
        kd = kd_loss(s_logits, target, self.scheme, self.d.temperature, mask, self.region_weights)
        total = self.d.supervised_weight * sup + self.d.kd_weight * kd
        out = {"sup": logs["loss"], "sup_dice": logs["dice"], "sup_ce": logs["ce"], "kd": float(kd.detach())}
        if self.d.kd_dice_weight > 0:
            kd_dice = kd_dice_loss(s_logits, target, self.scheme, mask, self.region_weights)
            total = total + self.d.kd_dice_weight * kd_dice
            out["kd_dice"] = float(kd_dice.detach())
        if use_feat:
            feat = feature_loss(s_feats, t_feats)
            total = total + self.d.feature_weight * feat
            out["feat"] = float(feat.detach())
        if self.reference is not None:  # the adaptive weights in force, per epoch in history.json
            out.update({f"kd_w_{r}": float(w) for r, w in zip(CHANNEL_REGIONS, self.region_weights.tolist())})
        out["loss"] = float(total.detach())
        return total, out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def distill_setup(model: nn.Module, teacher: nn.Module, cfg: Config, perturb: bool = True,
                  region_weights: torch.Tensor | None = None, reference: dict | None = None,
                  main: bool = True) -> tuple[nn.Module, DistillStage]:
    """What a distillation fine-tune trains and with which stage: the student (wrapped in a
    `DistillModel` when `distill.feature_weight` > 0) and a `DistillStage` against `teacher`."""
    stage = DistillStage(teacher, cfg, perturb=perturb, region_weights=region_weights, reference=reference, main=main)
    if cfg.distill.feature_weight > 0:
        return DistillModel(model, teacher.spec.embed_dims, seed=cfg.train.seed), stage
    return model, stage


def distill_record(cfg: Config, perturb: bool) -> dict:
    """The distillation recipe as plain data, for the artifact's extra["distill"]."""
    d = cfg.distill
    return {"temperature": d.temperature, "supervised_weight": d.supervised_weight, "kd_weight": d.kd_weight,
            "kd_dice_weight": d.kd_dice_weight, "kd_gate": d.kd_gate, "kd_region_weights": d.kd_region_weights,
            "feature_weight": d.feature_weight, "perturb": perturb,
            "perturb_config": dataclasses.asdict(d.perturb) if perturb else None}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def dice_gap(teacher_metrics: dict, student_metrics: dict) -> dict[str, float]:
    """teacher_dice_* and dice_gap_* (teacher minus student, in Dice units) for the artifact's metrics."""
    out = {}
    for k in DICE_KEYS:
        region = k.split("_", 1)[1]
        out[f"teacher_dice_{region}"] = float(teacher_metrics[k])
        out[f"dice_gap_{region}"] = float(teacher_metrics[k]) - float(student_metrics.get(k, math.nan))
    return out


# ----------------------------------------------------------------------------- the command


def _calibration_batches(data: TrainData, cfg: Config, device: torch.device):
    """Batches of crops centred on WT, TC and ET of up to `distill.calib_cases` training cases
    (`brats.dataset.region_centred_crops`), so every region's loss reaches the channel ranking."""
    if cfg.distill.calib_cases < 1:
        raise ConfigError(f"distill.calib_cases must be >= 1, got {cfg.distill.calib_cases}")
    items = region_centred_crops(data.cache, data.train_ids[: cfg.distill.calib_cases], cfg.data.crop,
                                 seed=cfg.train.seed)
    yield from stack_batches(items, cfg.train.batch_size, device)


def make_student(teacher: nn.Module, cfg: Config, data: TrainData | None = None) -> nn.Module:
    """Thinned (pruned init) or re-initialised (scratch) student at `cfg.distill.width`."""
    d = cfg.distill
    if d.init not in INITS:
        raise ConfigError(f"distill.init={d.init!r}: expected one of {', '.join(INITS)}")
    if d.init == "scratch":
        return scratch_student(teacher.spec, d.width, seed=cfg.train.seed, floors=d.floors)
    if d.importance == "taylor":
        if data is None:
            raise ConfigError("distill.importance=taylor needs training data for its gradients")
        teacher.requires_grad_(True)
        device = next(teacher.parameters()).device
        accumulate_taylor_grads(
            teacher, _calibration_batches(data, cfg, device),
            lambda logits, label: segmentation_loss(logits, label, cfg.data.scheme)[0],
        )
    student, _ = thin_with_selection(teacher, d.width, importance=d.importance, keep_attn_scale=d.keep_attn_scale,
                                     floors=d.floors)
    teacher.zero_grad(set_to_none=True)
    freeze(teacher)
    return student.train()


def thin_step(teacher: nn.Module, ctx: StageContext) -> nn.Module:
    """Step of the student stage: the teacher (the source artifact's model) -> a student at
    `distill.width`, pruned or re-initialised (`make_student`); its choices go into ctx.extra."""
    d = ctx.cfg.distill
    if not hasattr(teacher, "spec"):
        raise ArtifactError(f"{ctx.source.path}: a {ctx.source.spec.get('kind')!r} model cannot be thinned")
    ctx.extra.update(width=d.width, init=d.init, importance=d.importance, keep_attn_scale=d.keep_attn_scale,
                     teacher=str(ctx.teacher_path), widths=width_plan(teacher.spec, d.width, d.floors))
    return make_student(freeze(teacher), ctx.cfg, ctx.data)


def check_distill(cfg: Config) -> None:
    """ConfigError for a `distill` section the fine-tune cannot use (every distilling stage runs this
    before any work: `distill_trainer.check`, called by `engine.runner.run_stage`)."""
    d = cfg.distill
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}")
    if d.kd_gate not in KD_GATES:
        raise ConfigError(f"distill.kd_gate must be one of {', '.join(KD_GATES)}, got {d.kd_gate!r}")
    if d.kd_region_weights not in KD_REGION_WEIGHTS:
        raise ConfigError(f"distill.kd_region_weights must be one of {', '.join(KD_REGION_WEIGHTS)}, "
                          f"got {d.kd_region_weights!r}")
    negative = [k for k in ("supervised_weight", "kd_weight", "kd_dice_weight", "feature_weight") if getattr(d, k) < 0]
    if negative:
        raise ConfigError(f"distill.{negative[0]} must be >= 0, got {getattr(d, negative[0])}")


def distill_trainer(model: nn.Module, ctx: StageContext) -> tuple[nn.Module, DistillStage]:
    """The fine-tune of every distillation stage: against the frozen teacher of the lineage (the
    recipe goes into the artifact's extra["distill"])."""
    perturb = ctx.cfg.distill.perturb_input
    ctx.extra["distill"] = distill_record(ctx.cfg, perturb)
    teacher, weights, reference = ctx.teacher(), None, None
    mode = ctx.cfg.distill.kd_region_weights
    if mode != "equal" and is_softmax(ctx.cfg.data.scheme):
        if ctx.dist.main:
            tqdm.write(f"distill: every class's KD weighted alike (data.scheme {ctx.cfg.data.scheme!r} has no "
                       "sigmoid region channels to weigh)")
    elif mode == "adaptive":
        reference = teacher_reference(teacher, ctx)
        ctx.extra["distill"]["teacher_pooled_dice"] = {r: reference[f"pooled_dice_{r}"] for r in CHANNEL_REGIONS}
    elif mode == "teacher":
        try:
            weights = teacher_region_weights(ctx.teacher_artifact().metrics, str(ctx.teacher_path))
        except ConfigError as e:
            if ctx.dist.main:
                tqdm.write(f"distill: every region's KD weighted alike: {e}")
        else:
            ctx.extra["distill"]["region_weights"] = dict(zip(CHANNEL_REGIONS, weights.tolist()))
            if ctx.dist.main:
                tqdm.write("distill: KD per region weighted by the teacher's validation Dice: "
                           + ", ".join(f"{r.upper()} {w:.3f}" for r, w in zip(CHANNEL_REGIONS, weights.tolist())))
    return distill_setup(model, teacher, ctx.cfg, perturb=perturb, region_weights=weights, reference=reference,
                         main=ctx.dist.main)


def teacher_reference(teacher: nn.Module, ctx: StageContext) -> dict[str, float]:
    """The teacher's metrics on this stage's validation cases, scored as the engine validates: the
    source's own score of this run when the teacher is the source (the student stage), else one pass
    of the teacher over the cases (on the training device), once per run (growth's phases reuse it, and
    the plan line is said once). Under torchrun every rank takes rank 0's, so all ranks decide the same weights."""
    if ctx.teacher_scores is None:
        if ctx.teacher_path and ctx.source.path and \
                Path(ctx.teacher_path).resolve() == Path(ctx.source.path).resolve():
            reference = ctx.source_metrics
        else:
            reference = evaluate(teacher.to(ctx.device), ctx.data.cache, ctx.data.val_ids, ctx.cfg,
                                 desc="teacher (adaptive KD)")
        if ctx.dist.enabled:
            shared = [reference]
            dist.broadcast_object_list(shared, src=0)
            reference = shared[0]
        ctx.teacher_scores = reference
        if ctx.dist.main:
            tqdm.write("distill: adaptive KD: a region is distilled while the student's pooled validation Dice is "
                       "below the teacher's (" + ", ".join(f"{r.upper()} {reference[f'pooled_dice_{r}']:.3f}"
                                                           for r in CHANNEL_REGIONS)
                       + "), by the labels alone where it is at or above")
    return ctx.teacher_scores


distill_trainer.check = check_distill  # the fine-tune's own settings, checked by run_stage before any work


def add_teacher_gap(model: nn.Module, art: Artifact, ctx: StageContext) -> Artifact:
    """Finish of the student stage: the Dice gap to the teacher (the source), scored on the same cases."""
    gap = dice_gap(ctx.source_metrics, art.metrics)
    if ctx.dist.main:
        tqdm.write("teacher vs student Dice: " + ", ".join(
            f"{r} {gap[f'teacher_dice_{r}']:.3f} -> {gap[f'teacher_dice_{r}'] - gap[f'dice_gap_{r}']:.3f} "
            f"(gap {gap[f'dice_gap_{r}']:+.3f})" for r in ("wt", "tc", "et", "mean")))
    art.metrics = {**art.metrics, **gap}
    return art


def _check_student(art: Artifact, cfg: Config) -> None:
    d = cfg.distill
    if not 0.0 < d.width <= 1.0:
        raise ConfigError(f"distill.width={d.width}: must be in (0, 1] (0.25 keeps a quarter of every width)")
    if d.init not in INITS:
        raise ConfigError(f"distill.init={d.init!r}: expected one of {', '.join(INITS)}")


STUDENT = StageDef(STAGE, step=thin_step, finetune=distill_trainer, finish=add_teacher_gap, check=_check_student)


def distill_student(cfg: Config, out_dir: str | Path, resume: bool = False, data_given: bool = True) -> Artifact:
    """Teacher artifact (`distill.teacher`) -> thinned student, distilled -> <out_dir>/student.pt."""
    if not cfg.distill.teacher:
        raise ConfigError("no teacher artifact: pass --teacher PATH (or set distill.teacher)")
    return run_stage(cfg.distill.teacher, STUDENT, cfg, out_dir, teacher=cfg.distill.teacher, resume=resume,
                     data_given=data_given)
