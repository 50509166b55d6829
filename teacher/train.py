"""Train the teacher: RefineFormer3D from `cfg.model`, supervised Dice + (B)CE, through the engine."""
from __future__ import annotations

from pathlib import Path

from common.cli import main_rank
from common.config import Config
from common.paths import project_path
from engine.data import make_data
from engine.loop import FitResult, SupervisedStage, fit
from engine.runner import et_rule
from engine.runtime import seed_everything
from model.refineformer3d import build_from_config

STAGE = "teacher"


def train_teacher(cfg: Config, out_dir: str | Path, resume: bool = False) -> FitResult:
    """Build the model (seeded, so a run is reproducible) and fit it; writes best.pt and last.pt.

    best.pt then records the BraTS ET rule calibrated on the validation cases (`extra["et_rule"]`,
    `engine.runner.et_rule`), as every compression stage's artifact does, so predict.py and report.py
    treat the teacher like the models made from it."""
    if main_rank():
        d = cfg.data
        print(f"{STAGE}: data: " + (d.dir if d.dir else
              f"built-in synthetic cases in {project_path('data/synthetic')} (no --data given: {d.synthetic_cases} labelled, "
              f"{'x'.join(map(str, d.synthetic_shape))}, seed {d.synthetic_seed})") + f", fold {d.fold}", flush=True)
    seed_everything(cfg.train.seed)
    model = build_from_config(cfg.model)
    stage = SupervisedStage(cfg.data.scheme, cfg.train.dice_weight, cfg.train.ce_weight)
    result = fit(model, stage, cfg, out_dir, stage_name=STAGE, resume=resume)
    if result.best is not None and result.best_path is not None and main_rank():
        # rank 0 alone (fit has left the process group): the cache and split it prepared are only read
        rule = et_rule(result.best, make_data(cfg), cfg)
        result.best.extra["et_rule"] = rule
        result.best.save(result.best_path)
        print(f"{STAGE}: ET rule calibrated on {rule['cases']} validation case(s): predicted ET under "
              f"{rule['et_min_voxels']} voxel(s) becomes NCR/NET (0: off), recorded in {result.best_path}", flush=True)
    return result
