"""Train the RefineFormer3D teacher.

    python train.py --config configs/teacher.yaml --data /data/BraTS17 --out runs/teacher
    python train.py --config configs/demo/teacher.yaml            # synthetic cases, a few minutes on CPU
    torchrun --nproc_per_node=4 train.py --config configs/teacher.yaml --data ...   # DDP

Writes <out>/best.pt (the epoch with the best train.select, by default the pooled validation Dice) and
<out>/last.pt (resumable with --resume), TensorBoard logs in <out>/tb.
"""
from __future__ import annotations

import os

# Spin-waiting OpenMP threads make torch several times slower on a shared machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common.cli import config_from_args, main_rank, out_dir, run_main, stage_parser  # noqa: E402


def main() -> int:
    p = stage_parser("train.py", __doc__, default_config="configs/teacher.yaml", default_out="runs/teacher")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"], default=None,
                   help="training precision: auto (bf16 autocast on a CPU with native bf16, fp16 on CUDA, else fp32), off "
                        "(fp32), fp16 (CUDA only) or bf16; validation is always fp32 (default: train.amp, auto)")
    args = p.parse_args()
    cfg = config_from_args(args)
    if args.amp:
        cfg.train.amp = args.amp
    out = out_dir(args)

    # deferred: torch loads only once the command line and config are good
    from teacher.train import train_teacher

    result = train_teacher(cfg, out, resume=args.resume)
    if main_rank():
        m = result.best_metrics
        print(f"best: {result.best_path}")
        if m:
            print(f"  val Dice WT {m['dice_wt']:.4f}  TC {m['dice_tc']:.4f}  ET {m['dice_et']:.4f}  "
                  f"mean {m['dice_mean']:.4f}  |  HD95 mean {m.get('hd95_mean', float('nan')):.2f} mm "
                  f"({int(m.get('val_cases', 0))} case(s))")
    return 0


def cli() -> None:
    """The `rf3d-train` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
