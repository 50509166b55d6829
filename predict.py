"""Segment BraTS cases with any artifact (FP32 or INT8; PyTorch, ONNX Runtime or OpenVINO).

    python predict.py ARTIFACT --input DIR --output DIR [--window D H W] [--overlap 0.5]
        [--cases NAME ... | --split splits.json [--fold K]] [--et-min-voxels N] [--threads N]
        [--allow-constant-modality] [--overlay DIR] [--no-skip-background] [--coarse F]
        [--runtime auto|torch|onnxruntime|openvino]

DIR may be one case folder or any BraTS layout (the validation release included). Writes
<case>.nii.gz label maps (uint8, BraTS values 0/1/2/4) on each input's grid with its affine and
header. A bad case is reported and skipped; the exit code is 1 if any case failed. --overlay DIR
also writes DIR/<case>.png: an axial slice through the tumour with the prediction's contours over
FLAIR (WT, TC) and T1ce (TC, ET), beside the truth's when the case has one (as the report draws).
Windows without a brain voxel are not run (their logits are one all-zero window's, so the label maps
are the same); it says how many it skipped. --no-skip-background runs every window.
--runtime auto (the default) times each runtime that can run the artifact on one window on this
machine, uses the fastest and says which, with each one's time; the choice is cached per artifact and
machine (~/.cache/refineformer3d/runtimes.json), so the next run does not measure again.

--split takes the held-out ("val") cases of a fold of a splits.json (e.g. <cache>/splits.json), so
a run's held-out training cases can be predicted and then scored with `python -m brats.evaluate`:
    python predict.py runs/int8/int8.pt --input DATA --split CACHE/splits.json --output preds/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import RUNTIME_CHOICES, run_main
from common.errors import UserInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact file (.pt) of any stage")
    parser.add_argument("--input", required=True, help="case folder or BraTS-layout folder")
    parser.add_argument("--output", required=True, help="folder for <case>.nii.gz label maps")
    parser.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="sliding-window size, multiples of 32 (default: the artifact's own: an ONNX graph's "
                             "input size, else the window its stage validated with, train.window; else 128 128 128)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch", type=int, default=1, help="windows per forward pass (default 1)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                        help="predict only these cases of --input")
    select.add_argument("--split", default=None, metavar="FILE",
                        help="predict only the 'val' cases of a splits.json fold")
    parser.add_argument("--fold", type=int, default=None, help="fold of --split (default 0)")
    parser.add_argument("--et-min-voxels", type=int, default=None, metavar="N",
                        help="a case whose predicted ET has fewer than N voxels gets it relabelled NCR/NET "
                             "(BraTS post-processing for cases without ET; default: the threshold calibrated "
                             "for the artifact on its validation cases, 0 when it records none)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use)")
    parser.add_argument("--allow-constant-modality", action="store_true",
                        help="predict a case whose modality is constant (e.g. all zero) inside the brain, with a "
                             "warning (default: the case fails)")
    parser.add_argument("--overlay", default=None, metavar="DIR",
                        help="also write DIR/<case>.png: the prediction's contours on an axial slice through the "
                             "tumour, over FLAIR and T1ce, beside the truth's when the case has one")
    parser.add_argument("--no-skip-background", dest="skip_background", action="store_false",
                        help="run every window (default: windows without a brain voxel reuse one all-zero "
                             "window's logits; the same label maps)")
    parser.add_argument("--coarse", type=int, default=0, metavar="F",
                        help="coarse-to-fine: a first pass on the image pooled by F (e.g. 2; in PyTorch in a window fitted to "
                             "the pooled image) finds the tumour's box, "
                             "only that box is predicted at full resolution, the rest is background (faster on "
                             "whole cases; not the same label maps; a case that fits in one window gets the full "
                             "pass; default 0: off)")
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto",
                        help="where the model runs: PyTorch eager, ONNX Runtime or OpenVINO; auto (default): the "
                             "fastest measured here on one window (cached per artifact and machine)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace label maps already in --output (and pictures already in --overlay)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.fold is not None and args.split is None:
        parser.error("--fold needs --split")
    if args.coarse and args.coarse < 2:
        parser.error(f"--coarse must be a pooling factor >= 2 (or 0: off), got {args.coarse}")
    if args.sw_batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error(f"--sw-batch and --threads must be >= 1 (got {args.sw_batch}, {args.threads})")
    from common.cli import writable_folder  # light: no torch
    try:
        for folder in (args.output, args.overlay):
            if folder is not None:
                writable_folder(Path(folder))
    except UserInputError as e:
        parser.error(str(e))

    # deferred: torch loads only once the command line is good
    from engine.runtime import resolve_runtime
    from pipeline.predict import predict_folder, split_cases

    print(resolve_runtime("cpu", "off", args.threads).line("predict", training=False), file=sys.stderr)

    cases = split_cases(args.split, args.fold or 0) if args.split else args.cases
    try:
        result = predict_folder(args.artifact, args.input, args.output, args.window, args.overlap,
                                args.sw_batch, progress=not args.quiet, cases=cases,
                                et_min_voxels=args.et_min_voxels,
                                allow_constant_modality=args.allow_constant_modality, overwrite=args.overwrite,
                                overlay_dir=args.overlay, skip_background=args.skip_background,
                                runtime=args.runtime, coarse=args.coarse)
    except UserInputError:
        raise  # bad data or artifact: run_main reports it
    except ValueError as e:  # window / overlap that the model cannot use
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(result.written)} label map(s) to {args.output}; {result.windows.line()}")
    if args.overlay:
        print(f"wrote {len(result.overlays)} overlay(s) to {args.overlay}")
    if result.failed:
        print(f"{len(result.failed)} case(s) failed and were skipped:", file=sys.stderr)
        for message in result.failed.values():
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The `rf3d-predict` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
