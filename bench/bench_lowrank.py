"""Low-rank factorisation of the distilled width-0.25 student: parameters and Dice, before and after.

One run at demo scale (configs/demo/lowrank.yaml, synthetic cases): the student as it is, the
factorised student before its fine-tune, and after it, all scored on the same validation cases.
The claim under test: 30-40 % fewer parameters at almost no Dice cost. With --control the
unfactorised student gets the same fine-tune too, so that extra training is not mistaken for
recovery (matters when the student is not converged).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_lowrank.py [--student runs/demo/student/student.pt]
        [--energy 0.9 | --ratio 0.5 | --params 200k] [--epochs 4] [--control]

Without a student artifact at --student, a demo teacher (configs/demo/teacher.yaml, unless one is
at runs/demo/teacher/best.pt) and a demo student (configs/demo/distill.yaml) are trained first,
which takes a while on CPUs.
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
from compress.lowrank import find_teacher, lowrank_stage  # noqa: E402
from student.distill import DistillStage, distill_finetune, evaluate, load_teacher  # noqa: E402
from teacher.engine import make_data, resolve_device, seed_everything  # noqa: E402
from teacher.model import count_params  # noqa: E402

DEMO_TEACHER = Path("runs/demo/teacher/best.pt")


def demo_student(path: Path) -> Path:
    """Train what the benchmark needs at demo settings: a teacher (if absent), then the student."""
    from student.distill import distill_student
    from teacher.train import train_teacher

    if not DEMO_TEACHER.is_file():
        print(f"no teacher at {DEMO_TEACHER}: training a demo teacher (configs/demo/teacher.yaml)")
        t0 = time.time()
        train_teacher(load_config("configs/demo/teacher.yaml"), DEMO_TEACHER.parent)
        print(f"  teacher trained in {time.time() - t0:.0f} s")
    print(f"no student at {path}: distilling a width-0.25 demo student (configs/demo/distill.yaml)")
    t0 = time.time()
    art = distill_student(load_config("configs/demo/distill.yaml", [f"distill.teacher={DEMO_TEACHER}"]), path.parent)
    print(f"  student distilled in {time.time() - t0:.0f} s")
    return art.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/demo/student/student.pt")
    p.add_argument("--teacher", default=None, help="default: the teacher in the student's lineage")
    p.add_argument("--config", default="configs/demo/lowrank.yaml")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=float)
    rule.add_argument("--ratio", type=float)
    rule.add_argument("--params")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--control", action="store_true", help="also fine-tune the unfactorised student the same way")
    p.add_argument("--out", default="runs/bench/lowrank")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    student_path = Path(args.student)
    if not student_path.is_file():
        student_path = demo_student(student_path)
    overrides = list(args.overrides)
    for key in ("energy", "ratio", "params"):
        if getattr(args, key) is not None:
            overrides += [f"lowrank.{k}={getattr(args, key) if k == key else 'null'}" for k in ("energy", "ratio", "params")]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.teacher:
        overrides.append(f"lowrank.teacher={args.teacher}")
    cfg = load_config(args.config, overrides)

    student_art = Artifact.load(student_path)
    student = build_model(student_art).to(resolve_device(cfg.train.device))
    data = make_data(cfg)
    student_dice = evaluate(student, data, cfg, desc="student")
    control = {}
    if args.control and cfg.train.epochs > 0:
        seed_everything(cfg.train.seed)
        teacher = load_teacher(find_teacher(student_art, cfg.lowrank))
        control = distill_finetune(
            build_model(student_art), teacher, cfg, Path(args.out) / "control", stage_name="control",
            lineage=student_art.child_lineage(), stage=DistillStage(teacher, cfg, perturb=cfg.distill.perturb_input),
            data=data,
        ).best_metrics
    t0 = time.time()
    art = lowrank_stage(student_path, cfg, args.out)
    seconds = time.time() - t0
    m, info = art.metrics, art.extra["lowrank"]
    assert m["params_before"] == count_params(student)

    rule_text = ", ".join(f"{k}={info[k]}" for k in ("mode", "energy", "ratio", "params") if k in info)
    print(f"\nlow-rank factorisation of {student_path} ({rule_text}; fine-tune {cfg.train.epochs} epochs, "
          f"{seconds:.0f} s incl. validation)")
    done = sum(r["factorised"] for r in info["table"])
    print(f"  parameters     {m['params_before']:>10,} -> {m['params_after']:,} "
          f"({100 * (1 - m['params_after'] / m['params_before']):.1f}% fewer; {done}/{len(info['table'])} layers factorised)")
    nan = float("nan")
    head = f"  {'':14} {'student':>10} {'factorised':>11} {'fine-tuned':>11}"
    print(head + (f" {'student fine-tuned (control)':>29}" if control else ""))
    for key in ("dice_wt", "dice_tc", "dice_et", "dice_mean"):
        before = info["metrics_before_finetune"][key]
        line = f"  {key:14} {student_dice[key]:>10.4f} {before:>11.4f} {m.get(key, nan):>11.4f}"
        print(line + (f" {control.get(key, nan):>29.4f}" if control else ""))
    reference = control or student_dice
    print(f"  Dice mean, factorised minus {'control' if control else 'student'}: "
          f"{m.get('dice_mean', nan) - reference['dice_mean']:+.4f} after fine-tune, "
          f"{m['dice_mean_before_finetune'] - student_dice['dice_mean']:+.4f} before it (vs student)")


if __name__ == "__main__":
    main()
