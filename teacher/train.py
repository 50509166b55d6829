"""Train the teacher: RefineFormer3D from `cfg.model`, supervised Dice + (B)CE, through the engine."""
from __future__ import annotations

from pathlib import Path

from common.config import Config
from engine.loop import FitResult, SupervisedStage, fit
from engine.runtime import seed_everything
from model.refineformer3d import build_from_config

STAGE = "teacher"


def train_teacher(cfg: Config, out_dir: str | Path, resume: bool = False) -> FitResult:
    """Build the model (seeded, so a run is reproducible) and fit it; writes best.pt and last.pt."""
    seed_everything(cfg.train.seed)
    model = build_from_config(cfg.model)
    stage = SupervisedStage(cfg.data.scheme, cfg.train.dice_weight, cfg.train.ce_weight)
    return fit(model, stage, cfg, out_dir, stage_name=STAGE, resume=resume)
