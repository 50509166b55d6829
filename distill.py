"""Self-distil a thinned student from a trained teacher.

    python distill.py --teacher runs/teacher/best.pt --width 0.25 --out runs/student
    python distill.py --teacher runs/demo/teacher/best.pt --config configs/demo/distill.yaml --out runs/demo/student
    python distill.py --teacher best.pt --init scratch ...     # same shape, random weights (for comparison)

The student is the teacher at `--width` (heads kept, head size shrinks), its surviving channels
chosen by magnitude or Taylor importance over torch-pruning's dependency groups; it trains against
the frozen teacher (Dice + BCE, logit KD at temperature T, optional feature KD) on perturbed crops.
Writes <out>/student.pt (the best epoch, with the teacher-vs-student Dice gap) and <out>/last.pt
(resumable with --resume). Under torchrun, rank 0 prepares the data and writes the artifact.
"""
from __future__ import annotations

import os

# Spin-waiting OpenMP threads make torch several times slower on a shared machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common.cli import add_strict, config_from_args, data_given, out_dir, run_main, stage_parser  # noqa: E402


def main() -> int:
    p = stage_parser("distill.py", __doc__, default_config="configs/distill.yaml", default_out="runs/student")
    p.add_argument("--teacher", default=None, help="teacher artifact (default: distill.teacher)")
    p.add_argument("--width", type=float, default=None, help="student width, e.g. 0.25 (default: distill.width)")
    p.add_argument("--init", choices=["pruned", "scratch"], default=None,
                   help="student start: pruned (the teacher's most important channels and their weights) or scratch "
                        "(random weights, same shape) (default: distill.init, pruned)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    add_strict(p, "teacher's")
    args = p.parse_args()
    cfg = config_from_args(args)
    for key in ("teacher", "width", "init"):
        if getattr(args, key) is not None:
            setattr(cfg.distill, key, getattr(args, key))
    out = out_dir(args)

    # deferred: torch loads only once the command line and config are good
    from engine.runner import exit_code
    from student.distill import distill_student

    art = distill_student(cfg, out, resume=args.resume, data_given=data_given(args))
    m = art.metrics
    print(f"student: {art.path}")
    print(f"  val Dice WT {m['dice_wt']:.4f}  TC {m['dice_tc']:.4f}  ET {m['dice_et']:.4f}  mean {m['dice_mean']:.4f}"
          f"  |  teacher mean {m['teacher_dice_mean']:.4f}  gap {m['dice_gap_mean']:+.4f}")
    return exit_code(art)


def cli() -> None:
    """The `rf3d-distill` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
