"""Progressive growth of the low-rank student: parameters and Dice, grown vs. fixed width.

One run at demo scale (configs/demo/grow.yaml, synthetic cases), all scored on the same validation
cases: the low-rank student as it is; after a distillation fine-tune that grows it (compress.grow);
and after the same fine-tune at fixed width for the same number of steps (same schedule, same data,
same seed). The claim under test: growth buys Dice where the gradients ask for width, for a modest
parameter increase.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_grow.py [--model runs/demo/lowrank/lowrank.pt]
        [--teacher PATH] [--epochs 6] [--set grow.top_k=3]

Without an artifact at --model, one is made from a demo student (runs/demo/student/student.pt, made
by bench/bench_lowrank.py or distill.py with configs/demo/distill.yaml) with configs/demo/lowrank.yaml.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.artifact import Artifact, build_model  # noqa: E402
from common.config import load_config  # noqa: E402
from compress.grow import GrowStage, format_history  # noqa: E402
from student.distill import DistillStage, distill_finetune, evaluate, load_teacher  # noqa: E402
from teacher.engine import make_data, resolve_device, seed_everything  # noqa: E402
from teacher.model import count_params  # noqa: E402

DEMO_STUDENT = Path("runs/demo/student/student.pt")
KEYS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


class StopAt(DistillStage):
    """The fixed-width arm: plain distillation that stops after the grown arm's last epoch."""

    def __init__(self, *args, last_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_epoch = last_epoch

    def on_epoch_end(self, trainer, epoch, val_metrics) -> bool:
        return epoch >= self.last_epoch


def demo_lowrank(path: Path) -> Path:
    from compress.lowrank import lowrank_stage

    if not DEMO_STUDENT.is_file():
        sys.exit(f"no artifact at {path} and no demo student at {DEMO_STUDENT}: run bench/bench_lowrank.py first "
                 "(it trains the demo teacher and student), or pass --model")
    print(f"no artifact at {path}: factorising {DEMO_STUDENT} with configs/demo/lowrank.yaml")
    return lowrank_stage(DEMO_STUDENT, load_config("configs/demo/lowrank.yaml"), path.parent).path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/lowrank/lowrank.pt", help="low-rank student artifact")
    p.add_argument("--teacher", default=None, help="default: the teacher in the model's lineage")
    p.add_argument("--config", default="configs/demo/grow.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="runs/bench/grow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    model_path = Path(args.model)
    if not model_path.is_file():
        model_path = demo_lowrank(model_path)
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    cfg = load_config(args.config, overrides)
    art = Artifact.load(model_path)
    teacher_path = args.teacher or cfg.grow.teacher or art.ancestor("teacher")
    if teacher_path is None:
        sys.exit(f"{model_path}: no teacher in its lineage; pass --teacher")
    teacher = load_teacher(teacher_path)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = make_data(cfg)
    start = build_model(art).to(device)
    start_params = count_params(start)
    start_dice = evaluate(start, data, cfg, desc="start")
    out = Path(args.out)

    results = {}
    t0 = time.time()
    grow = GrowStage(DistillStage(teacher, cfg, perturb=cfg.distill.perturb_input), cfg.grow, seed=cfg.train.seed)
    seed_everything(cfg.train.seed)
    res = distill_finetune(build_model(art), teacher, cfg, out / "grown", stage_name="grown",
                           lineage=art.child_lineage(), stage=grow, data=data)
    epochs_run = len(res.history)
    best = Artifact.load(res.best_path)
    results["grown"] = (count_params(build_model(best)), best.metrics, time.time() - t0, res.history[-1]["step"])

    t0 = time.time()
    fixed = StopAt(teacher, cfg, perturb=cfg.distill.perturb_input, last_epoch=epochs_run - 1)
    seed_everything(cfg.train.seed)
    res_fixed = distill_finetune(build_model(art), teacher, cfg, out / "fixed", stage_name="fixed",
                                 lineage=art.child_lineage(), stage=fixed, data=data)
    best_fixed = Artifact.load(res_fixed.best_path)
    results["fixed width"] = (start_params, best_fixed.metrics, time.time() - t0, res_fixed.history[-1]["step"])

    print(f"\nprogressive growth of {model_path} (teacher {teacher_path}; {epochs_run}/{cfg.train.epochs} epochs, "
          f"top_k {cfg.grow.top_k}, factor {cfg.grow.factor}, budget {cfg.grow.budget})")
    print(format_history(grow.history))
    print(f"  {'':12} {'params':>10} {'steps':>6} {'seconds':>8} " + " ".join(f"{k:>10}" for k in KEYS))
    print(f"  {'start':12} {start_params:>10,} {0:>6} {0:>8} " + " ".join(f"{start_dice[k]:>10.4f}" for k in KEYS))
    for arm, (params, metrics, seconds, steps) in results.items():
        print(f"  {arm:12} {params:>10,} {steps:>6} {seconds:>8.0f} "
              + " ".join(f"{metrics.get(k, float('nan')):>10.4f}" for k in KEYS))
    g, f = results["grown"], results["fixed width"]
    print(f"  grown vs fixed width: {g[0] - f[0]:+,} parameters ({100 * (g[0] / f[0] - 1):+.1f}%), "
          f"Dice mean {g[1]['dice_mean'] - f[1]['dice_mean']:+.4f}")


if __name__ == "__main__":
    main()
