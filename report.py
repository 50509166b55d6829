"""Compare every stage's artifact on the same held-out cases: one table, CSV, JSON and plots.

    python report.py [RUNS_DIR | ARTIFACT ...] [--data DIR] [--out report/] [--metrics legacy|official|both]
        [--runtime auto|torch|onnxruntime|openvino] [--profile] [--config ...] [--set ...]
    python report.py --arch segformer3d [--width 0.25] [--input 128 128 128]

RUNS_DIR (default runs/) is searched for artifacts (*.pt): every file but the engine's resumable
last.pt checkpoints is a row (each stage folder holds one artifact: the teacher's best.pt,
<stage>.pt for the others); artifacts named on the command line are always rows. report.et_min_voxels (default: train.et_min_voxels) relabels a
case's predicted ET smaller than that as NCR/NET before scoring. Without --data/--config/--set data.*, the held-out cases are the
validation split of the data the teacher artifact was trained on. --arch profiles an architecture
without weights (parameters and G multiply-adds) to size a student before training it.
--metrics official|both adds the official BraTS metrics (the optional brats-evaluation package) beside
ours. With report.plots, the median and the worst held-out case (by the teacher's mean Dice) are
drawn with every stage's contours (case_median.png, case_worst.png).
Every artifact is timed per window in each runtime that can run it (PyTorch eager, ONNX Runtime,
OpenVINO: one row each in report.md) and scored in --runtime (report.runtime; auto: the fastest measured
here). --profile (report.profile) adds per stage where a window's time goes: top operators and modules by
time in PyTorch's profiler, their multiply-adds and achieved G multiply-adds/s against this CPU's fp32
GEMM peak (a 2048x2048 matrix product, measured once per report).
A quicker report: --set report.max_cases=2 (held-out cases scored per row), --set report.latency_runs=1,
--set report.case_latency=false (no whole-case timing), --set report.plots=false.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: spin-waiting threads make timings on a shared CPU erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from common.cli import RUNTIME_CHOICES, config_from_args, data_given, run_main, stage_parser, writable_folder  # noqa: E402
from common.errors import UserInputError  # noqa: E402
from common.paths import project_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("report.py", __doc__)
    parser.set_defaults(out=str(project_path("report")))
    for action in parser._actions:  # the shared --out / --overwrite help is about stage runs
        if action.dest == "out":
            action.help = "report folder: report.md, .csv, .json and plots (default: the project's report/)"
        if action.dest == "overwrite":
            action.help = "accepted for symmetry; a report is always rewritten in place"
    parser.add_argument("sources", nargs="*", default=[str(project_path("runs"))], metavar="RUNS_DIR|ARTIFACT",
                        help="runs folder(s) to search and/or artifact files (default: the project's runs/)")
    parser.add_argument("--arch", default=None, help="profile a preset architecture without weights "
                        "(segformer3d | refineformer3d)")
    parser.add_argument("--width", type=float, default=1.0,
                        help="width multiplier in (0, 1] for --arch, as distill.py --width (default 1.0: full width)")
    parser.add_argument("--input", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="input size for --arch (default: report.input, 128 128 128)")
    parser.add_argument("--metrics", choices=["legacy", "official", "both"], default="legacy",
                        help="legacy: ours only (BraTS 2017 era, medpy HD95 in mm; the default); official / both: "
                             "also the brats-evaluation package's lesion-wise and global values, in their own "
                             "section (an optional extra: pip install brats-evaluation)")
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default=None,
                        help="runtime each row is scored and timed in (report.runtime, default auto: the fastest "
                             "measured here); every runtime's time is in the report either way")
    parser.add_argument("--profile", action="store_true", default=None,
                        help="add per stage where a window's time goes (report.profile): top operators and modules, "
                             "their multiply-adds and achieved rate against this CPU's fp32 GEMM peak")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        writable_folder(Path(args.out))
    except UserInputError as e:
        parser.error(str(e))
    cfg = config_from_args(args)
    if args.runtime is not None:
        cfg.report.runtime = args.runtime
    if args.profile:
        cfg.report.profile = True

    # deferred: torch loads only once the command line and config are good
    from pipeline.report import format_profile, make_report, profile_arch

    if args.arch:
        if not 0.0 < args.width <= 1.0:
            print(f"error: --width {args.width}: must be in (0, 1]", file=sys.stderr)
            return 2
        try:
            profile = profile_arch(args.arch, args.width, args.input or cfg.report.input)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_profile(profile))
        return 0
    # a --config that sets only report.* keys must not switch the data: only naming data does
    result = make_report(args.sources, cfg, args.out, data=cfg.data if data_given(args) else None,
                         progress=not args.quiet, metrics=args.metrics)
    print(f"{len(result.rows)} artifact(s) on {len(result.cases)} held-out case(s); wrote "
          + ", ".join(str(p) for p in result.files.values()))
    for row in result.failed:
        print(f"failed: {row['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def cli() -> None:
    """The `rf3d-report` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
