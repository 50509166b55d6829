"""The one training engine: loop, mixed precision, DDP, checkpoints, validation, TensorBoard, progress.

A `Stage` supplies the loss; the model describes itself (`artifact_spec()`, optionally
`no_weight_decay()`), or a `TrainingWrapper` around it carries what training adds; `fit` does
everything else:

    fit(model, SupervisedStage("regions"), cfg, "runs/teacher", stage_name="teacher")

Per epoch: random crops -> AdamW steps (linear warm-up, then cosine to `min_lr`, per step; gradient
clipping; the training precision `engine.runtime` resolves: fp32, bf16 autocast or fp16 + GradScaler)
-> every `val_every` epochs (and after the last) fp32 sliding-window validation on whole held-out
cases, scored per region -> `best.pt` (highest `train.select`: by default
the pooled Dice over all cases' voxels, `brats.scoring.pooled_dice`) and `last.pt` (with the full training state, so `resume=True` continues bit-for-bit).
With `train.val_at_start` the initial weights are validated first and compete for `best.pt`, so a
fine-tune never returns something worse on validation than what it started from.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the model is wrapped in
DistributedDataParallel, training crops and validation cases are shared among ranks, metrics are
gathered so every rank sees the same means, and only rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from brats.overlay import axial_slice, contour_overlay
from brats.scoring import mean_rows, score_cases
from common.artifact import Artifact, ArtifactError
from common.atomic import atomic_write_text, claim_folder
from common.config import Config, ConfigError, to_dict
from common.machine import usable_cpus
from common.progress import bar_off
from engine.data import TrainData, make_data
from engine.losses import segmentation_loss
from engine.runtime import (DistInfo, Runtime, init_distributed, resolve_runtime, rng_state, seed_everything,
                            set_rng_state)

BEST, LAST = "best.pt", "last.pt"
SELECT_CHOICES = ("pooled_dice_mean", "dice_mean")  # train.select: the figure that picks the best epoch
LEGACY_SELECT = "dice_mean"  # what runs written before train.select existed chose by
SCHEDULE_KEYS = ("epochs", "lr", "min_lr", "warmup_epochs", "steps_per_epoch", "batch_size")
LOG_IMAGE_CASES = 2  # validation cases per epoch drawn into TensorBoard


# ----------------------------------------------------------------------------- stages


class Stage:
    """What a training stage supplies: the loss (required) and, where it has any, frozen helpers and
    random state of its own. Everything else is the model's business (see `TrainingWrapper`).

    `model` in `loss` is what to call for the forward pass: under torchrun it is the
    DistributedDataParallel wrapper, and only its `model(x)` call synchronises gradients, so every
    trained module (distillation projections included) must run inside that call.
    """

    name: str = "stage"

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Move frozen helpers (a distillation teacher) to the training device; called once."""

    def set_epoch(self, epoch: int) -> None:
        """Called before training epoch `epoch` (0-based), e.g. for a perturbation warm-up."""

    def on_validation(self, metrics: dict[str, float], log: bool = True) -> None:
        """Called with every validation's means (the start's too), on every rank, after the epoch's log
        line, and on resume with the last validation's (`log` False: the run said it already): a stage
        may adapt its loss to how the model scores (`student.distill`'s adaptive KD), as a function of
        the last validation (no state of its own)."""

    def state_dict(self) -> dict:
        """The stage's own state (a random generator) for an exact resume; plain data or tensors."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainingWrapper(nn.Module):
    """A model trained around a product: `product` is what artifacts hold (its `artifact_spec()` and
    weights); the wrapper's other modules (distillation projections, say) are trained, synchronised
    by DDP, and checkpointed in last.pt like any parameter, but never shipped. `forward(x)` returns
    the product's logits (validation calls it); subclasses add what their loss needs."""

    def __init__(self, product: nn.Module):
        super().__init__()
        self.product = product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


def product_of(model: nn.Module) -> nn.Module:
    """The model an artifact holds: `model` itself, or a `TrainingWrapper`'s product."""
    return model.product if isinstance(model, TrainingWrapper) else model


def artifact_spec(model: nn.Module) -> dict:
    """The spec an artifact of `model` records: the product's `artifact_spec()` (every model kind
    the engine trains describes itself; see `model.refineformer3d.RefineFormer3D.artifact_spec`)."""
    product = product_of(model)
    describe = getattr(type(product), "artifact_spec", None)
    if describe is None:
        raise TypeError(f"{type(product).__name__} cannot be saved as an artifact: it has no artifact_spec()")
    return describe(product)


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters trained without weight decay: those the product names in its
    `no_weight_decay()` (the timm convention: a set of parameter names), e.g. LSQ step sizes."""
    product = product_of(model)
    names = product.no_weight_decay() if hasattr(type(product), "no_weight_decay") else set()
    return {id(p) for n, p in product.named_parameters() if n in names}


class SupervisedStage(Stage):
    """Plain supervised segmentation: Dice + (B)CE against the crop's labels."""

    name = "supervised"

    def __init__(self, scheme: str = "regions", dice_weight: float = 1.0, ce_weight: float = 1.0):
        self.scheme, self.dice_weight, self.ce_weight = scheme, dice_weight, ce_weight

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["image"])
        return segmentation_loss(logits, batch["label"], self.scheme, self.dice_weight, self.ce_weight)


# ----------------------------------------------------------------------------- small pieces


@dataclass
class FitResult:
    best_path: Path | None  # None when fit kept the best epoch in memory (`best_name=None`)
    last_path: Path
    best_metrics: dict
    history: list[dict]  # one entry per epoch ({"epoch": 0, "start": True, ...} first with val_at_start)
    model: nn.Module | None = None  # the product as trained last (not the best epoch)
    best: Artifact | None = None  # the best epoch's artifact (what best.pt holds, or would hold)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr before optimiser step `step` (0-based).

    Linear warm-up (step + 1) / warmup_steps, then cosine from 1 down to `min_ratio` at total_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- trainer


def rank_runtime(cfg: Config, dist: DistInfo) -> Runtime:
    """`resolve_runtime` for this process's rank: its local GPU, and the CPU threads shared among the
    ranks of this machine (LOCAL_WORLD_SIZE under torchrun) unless train.threads says how many."""
    t = cfg.train
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    return resolve_runtime(t.device, t.amp, t.threads, local_rank=dist.local_rank, local_world=local_world)


class Trainer:
    """State of one `fit` call."""

    def __init__(self, model: nn.Module, stage: Stage, cfg: Config, out_dir: str | Path, *, stage_name: str,
                 lineage: Sequence[dict] = (), extra: dict | None = None, data: TrainData | None = None,
                 dist_info: DistInfo | None = None, best_name: str | None = BEST, note_rising: bool = True,
                 announce: bool = True):
        self.cfg, self.stage, self.stage_name = cfg, stage, stage_name
        self.note_rising = note_rising  # `fit`'s: note and record a run that ended still rising
        self.out_dir = Path(out_dir)
        self.best_name = best_name  # None: the best epoch stays in memory (and in last.pt), no best file
        self.lineage, self.extra = [dict(x) for x in lineage], dict(extra or {})
        self.dist = dist_info or DistInfo()
        t = cfg.train
        if t.epochs < 1 or t.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be >= 1 (got {t.epochs}, {t.batch_size})")
        if t.select not in SELECT_CHOICES:
            raise ConfigError(f"train.select={t.select!r}: choose one of {', '.join(SELECT_CHOICES)}")
        self.runtime: Runtime = rank_runtime(cfg, self.dist)
        if self.dist.main and announce:  # the device line; a stage of several fits (growth's phases) says it once
            tqdm.write(self.runtime.line(stage_name))
        self.device = torch.device(self.runtime.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels
        self.amp_dtype = self.runtime.autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda") if self.runtime.grad_scaler else None
        seed_everything(t.seed)
        deepest_voxels = _check_crop(cfg, model)
        self.data = data if data is not None else make_data(cfg)

        self.sampler = DistributedSampler(
            self.data.train_set, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=t.seed
        )
        if self.dist.main:
            warn_large_crop(cfg.data.crop, [self.data.cache.meta(c).shape for c in self.data.train_ids])
        workers = loader_workers(cfg.data.num_workers, self.dist.main)
        self.loader = DataLoader(
            self.data.train_set, batch_size=t.batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=deepest_voxels == 1,  # a lone crop of one deepest voxel would break BatchNorm
        )
        if len(self.loader) == 0:
            raise ConfigError("the training set is empty")
        self.steps_per_epoch = t.steps_per_epoch or len(self.loader)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.warmup_steps = t.warmup_epochs * self.steps_per_epoch

        self.model = model
        self.ddp_model: nn.Module = model
        self._attach_model(model)
        self.stage.to(self.device)
        self.optimizer = torch.optim.AdamW(self.make_param_groups(model), lr=t.lr)
        self.scheduler = self._make_scheduler(self.optimizer)

        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.select = t.select  # may become a resumed run's own (load_last)
        self.best_score = -math.inf
        self.best_metrics: dict = {}
        self.best: Artifact | None = None
        self.last_metrics: dict = {}
        self.history: list[dict] = []
        self.stale = 0  # validations since the best one (early stopping with train.patience)
        self.run_steps = 0  # optimiser steps taken by this process (not restored on resume)
        self.stopped = False
        self._writer = None

    # -- model, optimiser, schedule

    def _attach_model(self, model: nn.Module) -> None:
        model.to(self.device)
        self.model = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.ddp_model = model

    def make_param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups, empty ones left out: "model" (train.weight_decay) and "model_no_decay" (the
        parameters the product names in `no_weight_decay()`; 0)."""
        wd = self.cfg.train.weight_decay
        exempt = no_decay_parameters(model)
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if id(p) in exempt else decay).append(p)
        groups = [{"name": "model", "params": decay, "weight_decay": wd},
                  {"name": "model_no_decay", "params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"stage {self.stage.name!r}: nothing to train (no parameter requires grad)")
        return groups

    def _make_scheduler(self, optimizer: torch.optim.Optimizer, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up + cosine on every group, positioned before optimiser step `step`."""
        t = self.cfg.train
        warmup, total, min_ratio = self.warmup_steps, self.total_steps, t.min_lr / t.lr if t.lr else 0.0

        def factor(step: int) -> float:  # a closure, so LambdaLR stores no state for it
            return lr_factor(step, warmup, total, min_ratio)

        for group in optimizer.param_groups:
            group["initial_lr"] = t.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimiser updates (a training wrapper's modules included)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- checkpoints

    @property
    def best_path(self) -> Path | None:
        return self.out_dir / self.best_name if self.best_name else None

    @property
    def last_path(self) -> Path:
        return self.out_dir / LAST

    def _artifact(self, metrics: dict, extra: dict) -> Artifact:
        return Artifact(
            stage=self.stage_name,
            spec=artifact_spec(self.model),
            state_dict=product_of(self.model).state_dict(),
            config=to_dict(self.cfg),
            metrics=dict(metrics),
            lineage=list(self.lineage),
            extra={**self.extra, "runtime": self.runtime.to_dict(), "val_cases": list(self.data.val_ids), **extra},
        )

    def _train_state(self) -> dict:
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "select": self.select,
            "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics,
            "history": self.history,
            "stopped": self.stopped,
            "stale": self.stale,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "stage": self.stage.state_dict(),
            "rng": rng_state(),
        }
        if isinstance(self.model, TrainingWrapper):  # the artifact holds the product only: keep the rest
            state["model"] = self.model.state_dict()
        if self.best_name is None and self.best is not None:  # no best file: the best epoch travels here
            b = self.best
            state["best_artifact"] = {"spec": b.spec, "state_dict": b.state_dict, "metrics": b.metrics,
                                      "extra": b.extra}
        return state

    def save_best(self, metrics: dict, epoch: int) -> None:
        """Keep the current weights as the best epoch: in memory, and in best.pt unless `best_name` is None."""
        best = self._artifact(metrics, {"epoch": epoch + 1, "global_step": self.global_step})
        best.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in best.state_dict.items()}  # a snapshot
        self.best = best
        if self.dist.main and self.best_path is not None:
            best.save(self.best_path)

    def save_last(self) -> None:
        if self.dist.main:
            extra = {"epoch": self.epoch, "global_step": self.global_step, "train_state": self._train_state()}
            self._artifact(self.last_metrics, extra).save(self.last_path)
            atomic_write_text(self.out_dir / "history.json", json.dumps(self.history, indent=1) + "\n")

    def load_last(self) -> None:
        """Restore everything from out_dir/last.pt; errors say what does not fit."""
        path = self.last_path
        if not path.is_file():
            raise ArtifactError(f"{path}: nothing to resume (no last.pt in {self.out_dir})")
        art = Artifact.load(path)
        state = art.extra.get("train_state")
        if not isinstance(state, dict):
            raise ArtifactError(f"{path}: holds no training state (not a last.pt written by the engine)")
        if art.stage != self.stage_name:
            raise ArtifactError(f"{path}: written by stage {art.stage!r}, cannot resume stage {self.stage_name!r}")
        if art.lineage and self.lineage and _source_identity(art.lineage) != _source_identity(self.lineage):
            was, now = art.lineage[-1], self.lineage[-1]
            raise ArtifactError(f"{path}: this run was started from {was.get('stage')} {was.get('path')}, not from "
                                f"{now.get('stage')} {now.get('path')} (another artifact: its recorded metrics "
                                "differ); resume with the source it started from, or start a new --out folder")
        spec = artifact_spec(self.model)
        if art.spec != spec:
            diff = sorted(k for k in set(spec) | set(art.spec) if spec.get(k) != art.spec.get(k))
            raise ArtifactError(
                f"{path}: saved model has another architecture (spec fields differ: {', '.join(diff)}); "
                "resume with the same model config or start a new --out folder"
            )
        wrapped = isinstance(self.model, TrainingWrapper)
        if wrapped and "model" not in state:
            raise ArtifactError(f"{path}: holds no training wrapper state (written by another kind of run)")
        try:
            self.model.load_state_dict(state["model"] if wrapped else art.state_dict)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: training state does not fit this model: {e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        old = art.config.get("train", {})
        changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != getattr(self.cfg.train, k)]
        if changed and self.dist.main:
            tqdm.write(f"warning: resuming with changed train.{', train.'.join(changed)}; the lr schedule follows the new values")
        self.stage.load_state_dict(state["stage"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.best_score, self.best_metrics = float(state["best_score"]), dict(state["best_metrics"])
        saved = state.get("select", LEGACY_SELECT)
        if saved != self.select:
            if self.select in self.best_metrics or not self.best_metrics:  # the best so far, by the new figure
                self.best_score = float(self.best_metrics.get(self.select, -math.inf))
                if self.dist.main:
                    tqdm.write(f"warning: resuming with train.select={self.select} (the run chose by {saved} "
                               f"so far); its best epoch so far now scores {self.best_score:.4f} by it")
            else:  # its validations lack the new figure: comparing by it would let any next epoch win
                if self.dist.main:
                    tqdm.write(f"warning: {path} chose its best epoch by {saved}, whose checkpoints lack "
                               f"{self.select}; this run goes on choosing by {saved} (train.select)")
                self.select = self.cfg.train.select = saved  # what the artifacts' config records too
        saved_best = state.get("best_artifact")
        if saved_best is not None:
            self.best = Artifact(stage=self.stage_name, config=art.config, lineage=list(self.lineage), **saved_best)
        elif self.best_path is not None and self.best_path.is_file():
            self.best = Artifact.load(self.best_path)
        self.last_metrics, self.history = dict(state["last_metrics"]), list(state["history"])
        self.stopped = bool(state.get("stopped", False))
        self.stale = int(state.get("stale", 0))
        set_rng_state(state["rng"])
        if self.dist.main:
            tqdm.write(f"{self.stage_name}: resuming {path} after epoch {self.epoch} of {self.cfg.train.epochs} "
                       f"(step {self.global_step}, best {self.select} {self.best_score:.4f})")
        if self.last_metrics:  # what the stage adapts to, as an uninterrupted run would have it
            self.stage.on_validation(self.last_metrics, log=False)

    # -- logging

    @property
    def writer(self):
        if self._writer is None and self.dist.main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.global_step or None)
        return self._writer

    def log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and not k.startswith("vox_"):  # not the raw counts
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    # -- training

    def _autocast(self):
        """Training-step autocast of the resolved precision (a no-op context in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _batches(self, epoch: int) -> Iterator[dict]:
        """`steps_per_epoch` batches; the loader is restarted if it runs out first."""
        self.sampler.set_epoch(epoch)
        self.data.train_set.set_epoch(epoch)
        n = 0
        while True:
            for batch in self.loader:
                yield batch
                n += 1
                if n == self.steps_per_epoch:
                    return

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t = self.cfg.train
        self.ddp_model.train()
        self.stage.set_epoch(epoch)
        sums: dict[str, float] = {}
        first_step = self.run_steps == 0
        started = time.time()
        bar = tqdm(total=self.steps_per_epoch, desc=f"{self.stage_name} {epoch + 1}/{t.epochs}", unit="step",
                   disable=bar_off(self.dist.main), leave=False, dynamic_ncols=True)
        for batch in self._batches(epoch):
            batch = _to_device(batch, self.device)
            with self._autocast():
                loss, logs = self.stage.loss(self.ddp_model, batch)
            if not torch.isfinite(loss.detach()) and self.scaler is None:
                terms = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")  # which part went first
                raise FloatingPointError(
                    f"{self.stage_name}: loss is {float(loss.detach())} at epoch {epoch + 1}, step {self.global_step} "
                    f"(cases {batch.get('case')}; terms: {terms or 'none reported'}); last.pt holds the epoch "
                    "before, to reproduce it with --resume; lower train.lr or set train.amp=off"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if t.grad_clip and t.grad_clip > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(self.trainable_parameters(), t.grad_clip))
                if math.isfinite(grad_norm):  # fp16 overflow: the scaler skips this step anyway
                    logs = {**logs, "grad_norm": grad_norm}
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            lr = self.optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():
                if self.scaler is not None:
                    # the schedule counts steps taken, fp16 overflow steps the scaler skipped included;
                    # torch warns about those as if the order of the two calls were wrong
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()
            self.global_step += 1
            if first_step:
                first_step = False
                self._plan_line(time.time() - started)
            self.run_steps += 1
            logs = {"loss": float(loss.detach()), **logs}
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            self.log_scalars("train", {**logs, "lr": lr}, self.global_step)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update()
        bar.close()
        return {k: v / self.steps_per_epoch for k, v in sums.items()}

    def _plan_line(self, first_step_s: float) -> None:
        """After the first step: the plan and a duration estimate from that step's time (the first
        step includes warm-up, so the estimate errs long; validation passes are not included)."""
        t = self.cfg.train
        left = self.total_steps - self.global_step + 1
        if self.dist.main:
            tqdm.write(f"{self.stage_name}: plan {t.epochs} epoch(s) x {self.steps_per_epoch} step(s) of "
                       f"{t.batch_size} crop(s) {'x'.join(map(str, self.cfg.data.crop))}, validation every "
                       f"{max(1, t.val_every)} epoch(s) on {len(self.data.val_ids)} case(s); first step "
                       f"{first_step_s:.1f} s -> about {left * first_step_s / 60:.1f} min of training steps left"
                       + (f" (at most; train.patience={t.patience})" if t.patience else ""))

    # -- validation

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        """Sliding-window predictions of this rank's share of the validation cases, scored and
        gathered: every rank returns the same means (keys dice_wt, ..., hd95_et, iou_mean, val_cases)."""
        model = self.model
        was_training = model.training
        model.eval()

        def predict(x: torch.Tensor) -> torch.Tensor:  # fp32, as report.py and predict.py measure
            return model(x.to(self.device)).float()

        images = []

        def keep_image(case: str, image: torch.Tensor, truth: np.ndarray, pred: np.ndarray) -> None:
            if self.cfg.train.log_images and self.dist.main and len(images) < LOG_IMAGE_CASES:
                z = axial_slice(truth)
                images.append((case, contour_overlay(image[0, :, :, z].numpy(), truth[:, :, z], pred[:, :, z])))

        ids = self.data.val_ids[self.dist.rank:: self.dist.world]
        rows = score_cases(predict, self.data.cache, ids, self.cfg, on_case=keep_image)
        if self.dist.enabled:
            gathered: list[list[dict]] = [None] * self.dist.world  # type: ignore[list-item]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not rows:
            raise ConfigError("no labelled validation case to score")
        rows.sort(key=lambda r: r["case"])
        metrics = mean_rows(rows)
        metrics["val_cases"] = float(len(rows))
        if self.writer is not None:
            for case, img in images:
                self.writer.add_image(f"val/{case}", img, self.global_step)
        model.train(was_training)
        return metrics

    def _sync_buffers(self) -> None:
        """BatchNorm running stats differ per rank after local batches; take rank 0's."""
        if self.dist.enabled:
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)

    def _consider_best(self, metrics: dict, epoch: int) -> None:
        self.last_metrics = dict(metrics)
        score = metrics.get(self.select, -math.inf)
        if score > self.best_score:
            self.best_score, self.best_metrics = float(score), dict(metrics)
            self.stale = 0
            self.save_best(metrics, epoch)
        else:
            self.stale += 1

    def _out_of_patience(self) -> bool:
        patience = self.cfg.train.patience
        return bool(patience and self.stale >= patience)

    # -- the loop

    def run(self, resume: bool = False) -> FitResult:
        t = self.cfg.train
        if self.dist.main:
            claim_folder(self.out_dir)  # creates it; a second run writing the same folder fails here
        if resume:
            self.load_last()
        if t.val_at_start and self.epoch == 0 and not self.history:  # a resumed run validated it already
            self.validate_start()
        for epoch in range(self.epoch, t.epochs):
            if self.stopped:
                break
            start = time.time()
            train_logs = self.train_epoch(epoch)
            self._sync_buffers()
            due = (epoch + 1) % max(1, t.val_every) == 0 or epoch == t.epochs - 1
            metrics = self.validate(epoch) if due else None
            if metrics is not None:
                self._consider_best(metrics, epoch)
            self.stopped = metrics is not None and self._out_of_patience()
            entry = {"epoch": epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                     "train": train_logs, "val": metrics, "seconds": round(time.time() - start, 2)}
            self.history.append(entry)
            self.epoch = epoch + 1
            self.save_last()
            self._log_epoch(entry)
            if metrics is not None:
                self.stage.on_validation(metrics)
            if self.stopped and self.dist.main:  # after the epoch's line, which shows the validation it refers to
                tqdm.write(f"{self.stage_name}: no better validation Dice in {self.stale} validation(s) "
                           f"(train.patience={t.patience}, train.select={self.select}): stopping early, keeping the "
                           "best epoch")
        rising = None if self.stopped or self.epoch < t.epochs or not self.note_rising else \
            still_rising(self.history, self.select)
        if self.best is not None:  # the best epoch is the last one when rising: readable from it (report.md lists it)
            record = {"epoch": self.epoch, "epochs": t.epochs, "select": self.select, "earlier": rising[0],
                      "last": rising[1]} if rising else None
            if self.best.extra.get("rising") != record:  # new, or a resumed run's that no longer holds
                if record:
                    self.best.extra["rising"] = record
                else:
                    del self.best.extra["rising"]
                if self.dist.main and self.best_path is not None:
                    self.best.save(self.best_path)
            if rising and self.dist.main:
                tqdm.write(f"note: {self.stage_name}: validation {self.select} was still rising when train.epochs="
                           f"{t.epochs} ran out ({rising[0]:.4f} -> {rising[1]:.4f} at the last validation): a longer run "
                           "may raise it (--set train.epochs=N; train.patience ends a run that stops improving)")
        if self.writer is not None:
            self.writer.flush()
        if self.dist.enabled:
            dist.barrier()
        return FitResult(self.best_path, self.last_path, dict(self.best_metrics), list(self.history),
                         product_of(self.model), self.best)

    def validate_start(self) -> None:
        """Score the initial weights: history entry epoch 0 ("start"), a candidate for best.pt."""
        start = time.time()
        metrics = self.validate(-1)
        self._consider_best(metrics, -1)
        entry = {"epoch": 0, "start": True, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                 "train": {}, "val": metrics, "seconds": round(time.time() - start, 2)}
        self.history.append(entry)
        self.save_last()
        self._log_epoch(entry)
        self.stage.on_validation(metrics)

    def _log_epoch(self, entry: dict) -> None:
        if not self.dist.main:
            return
        # every curve uses the global step as x axis, so a resumed run's purge_step cuts them all
        self.log_scalars("epoch", {"epoch": entry["epoch"], **{f"train_{k}": v for k, v in entry["train"].items()}},
                         entry["step"])
        if entry.get("start"):
            line = f"{self.stage_name} start"
        else:
            line = f"{self.stage_name} epoch {entry['epoch']}/{self.cfg.train.epochs} loss {entry['train'].get('loss', math.nan):.4f}"
        val = entry["val"]
        if val:
            self.log_scalars("val", val, entry["step"])
            line += (f" | val dice wt {val['dice_wt']:.3f} tc {val['dice_tc']:.3f} et {val['dice_et']:.3f}"
                     f" mean {val['dice_mean']:.3f} hd95 {val.get('hd95_mean', math.nan):.1f}"
                     f" | pooled {val.get('pooled_dice_mean', math.nan):.3f}, ET missed {val.get('et_missed_cases', 0):.0f}"
                     + (f", ET false {val['et_false_cases']:.0f}" if "et_false_cases" in val else "")
                     + f" (best {self.select} {self.best_score:.3f})")
        tqdm.write(f"{line} | {entry['seconds']:.1f} s")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def best_epoch(art: Artifact) -> Artifact:
    """The best epoch's artifact of a `last.pt` written with `best_name=None` (a stage fine-tune,
    e.g. quantize.py's <out>/qat/last.pt); any other artifact is returned as it is."""
    saved = art.extra.get("train_state", {}).get("best_artifact")
    if saved is None:
        return art
    return Artifact(stage=art.stage, config=art.config, lineage=art.lineage, path=art.path, **saved)


RISING_MIN_GAIN = 0.002  # of train.select at the last validation over the best before it (grow.min_delta's default)


def still_rising(history: Sequence[dict], select: str, min_gain: float = RISING_MIN_GAIN) -> tuple[float, float] | None:
    """(best earlier figure, last figure) of `select` when a fit's last validation was its best and beat every
    earlier one by at least `min_gain`, else None. The start's validation (`train.val_at_start`) does not
    count: beating the compressed model it scored is recovery, not a rise the budget cut short. A fit that ran all its epochs with
    this was ended by its budget while validation Dice was still rising (its cosine schedule ends there
    too: a longer run is a longer schedule, not more epochs at the last rate)."""
    scores = [float(h["val"][select]) for h in history
              if isinstance(h.get("val"), dict) and select in h["val"] and not h.get("start")]
    if len(scores) < 2 or not scores[-1] - max(scores[:-1]) >= min_gain:
        return None
    return max(scores[:-1]), scores[-1]


def ended_rising(art: Artifact) -> dict | None:
    """The record `Trainer.run` leaves in the best epoch's artifact when its fit ended still rising
    (`still_rising`): {"epoch", "epochs", "select", "earlier", "last"}; None when there is none (a fit
    stopped by patience or flat at the end, no fine-tune, an artifact from before the record, a grown
    artifact: growth's phases do not record it, its history table shows each phase)."""
    info = art.extra.get("rising")
    if not isinstance(info, dict) or "train_state" in art.extra:
        return None
    if not all(isinstance(info.get(k), (int, float)) for k in ("epoch", "epochs", "earlier", "last")):
        return None
    return info


def warn_large_crop(crop: Sequence[int], shapes: Sequence[Sequence[int]]) -> bool:
    """Warn (True) when at least half of every crop is zero padding: the crop is larger than the
    brain-cropped training cases (a real-data recipe run on small phantoms, say). A crop a little
    larger along one axis (64 on 57 slices) pads little and is not worth a word."""
    if not shapes:
        return False
    largest = [max(s[a] for s in shapes) for a in range(3)]
    filled = max(math.prod(min(c, n) for c, n in zip(crop, s)) for s in shapes) / math.prod(crop)
    if filled < 0.5:
        tqdm.write(f"warning: data.crop={list(crop)} is larger than the brain-cropped training cases (largest "
                   f"{largest}): {100 * (1 - filled):.0f}% or more of every crop is padding; use a smaller data.crop")
        return True
    return False


def loader_workers(requested: int, main: bool = True) -> int:
    """DataLoader workers: `requested`, clamped to the CPUs this process may use (more workers than
    CPUs only compete with the training threads); says so when it clamps."""
    cpus = usable_cpus()
    limit = max(0, cpus - 1) if requested else 0  # leave a CPU to the main process
    if requested > limit:
        if main:
            tqdm.write(f"data.num_workers={requested} on {cpus} CPU(s): using {limit} loader worker(s)")
        return limit
    return requested


def _source_identity(lineage: Sequence[dict]) -> tuple:
    """What identifies a run's source artifact in its lineage: its stage and recorded metrics (not its path,
    so a moved folder still resumes)."""
    last = lineage[-1]
    return last.get("stage"), json.dumps(last.get("metrics"), sort_keys=True, default=str)


def check_size(name: str, size, stride: int) -> None:
    """ConfigError unless `size` is three positive multiples of the model's total `stride`."""
    if len(size) != 3 or any(not isinstance(n, int) or n < stride or n % stride for n in size):
        raise ConfigError(f"{name}={list(size)}: three sizes, each a positive multiple of {stride}, the "
                          "model's total stride")


def check_sizes(cfg: Config, stride: int) -> None:
    """ConfigError unless data.crop and train.window are three positive multiples of the model's total
    `stride` and train.overlap is in [0, 1): checked before any work (validation would otherwise fail
    only after the first epoch, a compression stage only after its surgery)."""
    for name, size in (("data.crop", cfg.data.crop), ("train.window", cfg.train.window)):
        check_size(name, size, stride)
    if not 0 <= cfg.train.overlap < 1:
        raise ConfigError(f"train.overlap={cfg.train.overlap}: a fraction of the window in [0, 1)")


def _check_crop(cfg: Config, model: nn.Module) -> int | None:
    """Reject crops the model cannot train on; return the voxel count of the deepest feature grid."""
    stride = getattr(getattr(model, "spec", None), "downsample", None)
    if not stride:
        return None
    check_sizes(cfg, stride)
    crop = cfg.data.crop
    deepest = math.prod(c // stride for c in crop)
    if deepest == 1 and cfg.train.batch_size < 2:
        raise ConfigError(
            f"data.crop={crop} leaves one voxel at the deepest stage, where BatchNorm needs more than one value: "
            "use train.batch_size >= 2 or a crop of at least 64"
        )
    return deepest


def fit(model: nn.Module, stage: Stage, cfg: Config, out_dir: str | Path, *, stage_name: str,
        lineage: Sequence[dict] = (), resume: bool = False, extra: dict | None = None,
        data: TrainData | None = None, best_name: str | None = BEST, note_rising: bool = True,
        announce: bool = True) -> FitResult:
    """Train `model` with `stage`'s loss; write `<out_dir>/last.pt` (resumable) and `<out_dir>/<best_name>`.

    `best_name=None` writes no best file: the best epoch is `FitResult.best` (and rides in last.pt
    for resume), so a stage runner can write its one artifact itself. `note_rising` False: no "still
    rising" note or record at the end (`still_rising`; growth's phases, whose epochs are what is left).
    `announce` False: no device line at the start (a later fit of the same stage run).
    """
    if resume and not (Path(out_dir) / LAST).is_file():  # before any data preparation
        raise ArtifactError(f"{Path(out_dir) / LAST}: nothing to resume (no last.pt in {out_dir})")
    info = init_distributed(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(model, stage, cfg, out_dir, stage_name=stage_name, lineage=lineage, extra=extra,
                          data=data, dist_info=info, best_name=best_name, note_rising=note_rising, announce=announce)
        return trainer.run(resume=resume)
    finally:
        if trainer is not None:
            trainer.close()
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()
