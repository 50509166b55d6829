"""Distillation vs training from scratch: the thinned student's Dice gap to its teacher.

Two students of the same shape (the teacher at --width), the same epochs and data, on synthetic
cases at demo scale (configs/demo/distill.yaml):
  distilled  pruned init from the teacher + DistillStage (supervised + logit KD, perturbed input)
  scratch    random init, plain supervised training, no teacher
Prints both students' validation Dice and their gaps to the teacher (teacher minus student; the
claim under test is a gap under 0.3 Dice points, i.e. 0.003, after 10 epochs).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_distill.py [--teacher runs/demo/teacher/best.pt] [--epochs 10]

Without a teacher artifact at --teacher, a demo teacher is trained first (configs/demo/teacher.yaml).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.artifact import Artifact  # noqa: E402
from common.config import load_config  # noqa: E402
from brats.scoring import evaluate  # noqa: E402
from student.distill import distill_setup, dice_gap, load_teacher, make_student  # noqa: E402
from engine.data import make_data  # noqa: E402
from engine.loop import SupervisedStage, fit  # noqa: E402
from engine.runtime import seed_everything  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/demo/teacher/best.pt")
    p.add_argument("--config", default="configs/demo/distill.yaml")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/bench/distill")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    teacher_path = Path(args.teacher)
    if not teacher_path.is_file():
        from teacher.train import train_teacher

        print(f"no teacher at {teacher_path}: training a demo teacher (configs/demo/teacher.yaml)")
        t0 = time.time()
        result = train_teacher(load_config("configs/demo/teacher.yaml"), teacher_path.parent)
        teacher_path = result.best_path
        print(f"  teacher trained in {time.time() - t0:.0f} s")

    cfg = load_config(args.config, [*args.overrides, f"train.epochs={args.epochs}", f"train.val_every={args.epochs}",
                                    f"distill.width={args.width}", f"distill.teacher={teacher_path}"])
    teacher = load_teacher(teacher_path)
    lineage = Artifact.load(teacher_path).child_lineage()
    data = make_data(cfg)
    teacher_metrics = evaluate(teacher, data.cache, data.val_ids, cfg, desc="teacher")

    rows = {}
    for arm in ("distilled", "scratch"):
        seed_everything(cfg.train.seed)
        cfg.distill.init = "pruned" if arm == "distilled" else "scratch"
        student = make_student(teacher, cfg, data)
        trainee, stage = distill_setup(student, teacher, cfg, perturb=cfg.distill.perturb_input) if arm == "distilled" \
            else (student, SupervisedStage(cfg.data.scheme, cfg.train.dice_weight, cfg.train.ce_weight))
        t0 = time.time()
        result = fit(trainee, stage, cfg, Path(args.out) / arm, stage_name=f"bench_{arm}", lineage=lineage, data=data)
        rows[arm] = (result.best_metrics, time.time() - t0)

    def fmt(m: dict) -> str:
        return "  ".join(f"{k.split('_')[1]} {m[k]:.4f}" for k in ("dice_wt", "dice_tc", "dice_et", "dice_mean"))

    print(f"\nteacher {teacher_path} ({args.epochs} student epochs, width {args.width}, "
          f"{len(data.val_ids)} validation case(s))")
    print(f"  teacher            Dice {fmt(teacher_metrics)}")
    for arm, (m, seconds) in rows.items():
        gap = dice_gap(teacher_metrics, m)
        print(f"  student {arm:<10} Dice {fmt(m)}  | gap mean {gap['dice_gap_mean']:+.4f} "
              f"(wt {gap['dice_gap_wt']:+.4f} tc {gap['dice_gap_tc']:+.4f} et {gap['dice_gap_et']:+.4f})"
              f"  | {seconds:.0f} s")


if __name__ == "__main__":
    main()
