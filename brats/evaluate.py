"""Score BraTS-label NIfTI predictions against ground truth.

    python -m brats.evaluate PRED_DIR TRUTH_DIR [--out scores.csv [--overwrite]] [--metrics legacy|official|both]

PRED_DIR holds `<case>.nii.gz` or `<case>_seg.nii.gz` (flat). TRUTH_DIR is a BraTS-layout folder
(`<case>/<case>_seg.nii.gz`, possibly under HGG/, LGG/ or Brats17TrainingData/) or a flat folder
of `<case>_seg.nii.gz`; it is searched recursively, and a case folder without `*_seg` gets its
label by the rule training uses (`brats.layout.find_label`: e.g. BraTS 2020's
`W39_1998.09.19_Segm.nii`). Voxel spacing comes from the truth header.

Files are read and checked by `brats.nifti` (`load_label`, `align_to_grid`), the reader training
and prediction use: a file rejected there is rejected here with the same message. A prediction
on another voxel order of the same grid (saved RAS by another tool, say) is reoriented onto the
truth's grid; a prediction whose affine differs otherwise (shifted, other spacing) is an error
naming both files, never a Dice computed on misaligned voxels.

--metrics: `legacy` (default) is `brats.metrics` (BraTS 2017 era, medpy's HD95, voxel spacing
honoured; both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.13). `official` hands every
case to the `brats-evaluation` package the challenges rank with since 2023 (an optional extra:
`pip install brats-evaluation`; its conventions in `brats.official`): lesion-wise Dice / HD95, its
global values and detection F1. `both` puts the two side by side in one row per case.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from brats import official
from brats.layout import DataError, find_label, is_case_folder
from brats.metrics import REGIONS, score_case, summarize
from brats.nifti import align_to_grid, load_label
from common.atomic import atomic_write_text
from common.progress import bar_off

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CSV_COLUMNS = ["case"] + [f"{m}_{r}" for m in ("dice", "hd95", "iou", "sens", "spec") for r in REGIONS] + [
    "dice_mean",
    "hd95_mean",
    "iou_mean",
]
METRIC_CHOICES = ("legacy", "official", "both")


def csv_columns(metrics: str = "legacy") -> list[str]:
    """CSV columns of one `--metrics` choice: ours, the package's (its own names), or both."""
    check_metrics(metrics)
    ours = CSV_COLUMNS if metrics != "official" else ["case"]
    return ours + (official.COLUMNS if metrics != "legacy" else [])


def check_metrics(metrics: str) -> None:
    if metrics not in METRIC_CHOICES:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_CHOICES)}, got {metrics!r}")


class EvaluationError(DataError):
    """Bad evaluation input: missing cases, mismatched grids, bad labels, unreadable files.

    A `DataError`: file problems carry the very message `brats.nifti` gives training and prediction.
    """


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_truth(truth_dir: str | Path) -> dict[str, Path]:
    """Case name -> truth label file, searched recursively under `truth_dir` (hidden folders skipped).

    Every `<case>_seg.nii[.gz]` names its case; a case folder holding no `*_seg` file gets the
    label `brats.layout.find_label` picks (case = folder name), as training would.
    """
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise EvaluationError(f"truth folder not found: {truth_dir}")
    found: dict[str, Path] = {}

    def add(case: str, path: Path) -> None:
        if case in found:
            raise EvaluationError(f"case {case} has two truth files: {found[case]} and {path}")
        found[case] = path

    folders = [truth_dir] + sorted(
        p for p in truth_dir.rglob("*") if p.is_dir() and not any(
            part.startswith(".") for part in p.relative_to(truth_dir).parts))
    for folder in folders:
        segs = [p for p in sorted(folder.iterdir())
                if p.is_file() and not p.name.startswith(".") and (_strip_nifti(p.name) or "").endswith("_seg")]
        for path in segs:
            add(_strip_nifti(path.name)[: -len("_seg")], path)
        if not segs and is_case_folder(folder):
            try:
                label = find_label(folder)
            except DataError as e:
                raise EvaluationError(str(e)) from None
            if label is not None:
                add(folder.name, label)
    return found


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """Case name -> `<case>.nii[.gz]` or `<case>_seg.nii[.gz]` directly in `pred_dir`."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction folder not found: {pred_dir}")
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        case = stem[: -len("_seg")] if stem.endswith("_seg") else stem
        if case in found:
            raise EvaluationError(f"case {case} has two predictions: {found[case].name} and {path.name}")
        found[case] = path
    return found


def _shorten(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def match_cases(preds: dict[str, Path], truths: dict[str, Path], subset: bool = False) -> list[str]:
    """Sorted case names present in both; any case on one side only is an error.

    `subset=True` scores a subset of the truth (e.g. only the held-out cases): truth cases without a
    prediction are then allowed, predictions without truth still are not.
    """
    no_truth = sorted(set(preds) - set(truths))
    no_pred = [] if subset else sorted(set(truths) - set(preds))
    problems = []
    if no_truth:
        problems.append(f"{len(no_truth)} prediction(s) without truth: {_shorten(no_truth)}")
    if no_pred:
        problems.append(f"{len(no_pred)} truth case(s) without prediction: {_shorten(no_pred)} (to score only "
                        "the predicted cases, e.g. a held-out split: --subset)")
    if problems:
        raise EvaluationError("; ".join(problems))
    if not preds:
        raise EvaluationError("no prediction or truth files found")
    return sorted(preds)


def evaluate_case(case: str, pred_path: Path, truth_path: Path, metrics: str = "legacy") -> dict:
    """Scores of one case as a CSV row (`case` first), the prediction put on the truth's grid.

    Both files go through `brats.nifti.load_label`; the prediction through `align_to_grid` onto
    the truth (reoriented when only the voxel order differs). Any problem: `EvaluationError`
    carrying the `brats.nifti` message (it names the case and the file(s)). `metrics`: see
    `csv_columns`; the official package sees the same aligned arrays and the truth's spacing.
    """
    check_metrics(metrics)
    try:
        truth = load_label(truth_path, case)
        pred = load_label(pred_path, case)
        label = align_to_grid(pred.label, pred.affine, pred_path, truth.label.shape, truth.affine, truth_path, case)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    row = {"case": case}
    if metrics != "official":
        row.update(score_case(label, truth.label, truth.spacing))
    if metrics != "legacy":
        row.update(official.score_case_official(label, truth.label, truth.spacing, case))
    return row


def evaluate_dirs(
    pred_dir: str | Path, truth_dir: str | Path, progress: bool = False, subset: bool = False,
    metrics: str = "legacy",
) -> list[dict]:
    """Score every prediction in `pred_dir` against `truth_dir`; one dict per case, sorted by name.

    `metrics` official / both: `official.OfficialMetricsError` before any file is read when the
    optional package is missing.
    """
    check_metrics(metrics)
    if metrics != "legacy":
        official.require()
    preds, truths = find_predictions(pred_dir), find_truth(truth_dir)
    for found, folder, what in ((preds, pred_dir, "prediction (<case>.nii.gz or <case>_seg.nii.gz)"),
                                (truths, truth_dir, "truth (<case>_seg.nii.gz)")):
        if not found:
            raise EvaluationError(f"{folder}: no {what} file found")
    cases = match_cases(preds, truths, subset)
    return [
        evaluate_case(case, preds[case], truths[case], metrics)
        for case in tqdm(cases, desc="evaluate", unit="case", disable=bar_off(progress))
    ]


def rows_to_csv(rows: list[dict], metrics: str = "legacy") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(metrics), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def format_summary(rows: list[dict], metrics: str = "legacy") -> str:
    """Table of mean / std / median Dice and HD95 per region over the cases (per `metrics`)."""
    check_metrics(metrics)
    with np.errstate(invalid="ignore"):  # an official lesion-wise HD95 of inf has no std
        summary = summarize(rows)
    lines = [f"{len(rows)} case(s)"]
    if metrics != "official":
        lines += _legacy_summary(summary)
    if metrics != "legacy":
        lines += _official_summary(summary)
    return "\n".join(lines)


def _legacy_summary(summary: dict) -> list[str]:
    lines = [
        "legacy (brats.metrics: medpy HD95 in mm; both empty -> Dice 1, HD95 0; one empty -> HD95 373.13)",
        f"{'region':<7}{'dice mean':>10}{'std':>8}{'median':>8}   {'hd95 mean':>10}{'std':>8}{'median':>8}",
    ]
    for region in (*REGIONS, "mean"):
        d, h = summary[f"dice_{region}"], summary[f"hd95_{region}"]
        lines.append(
            f"{region:<7}{d['mean']:>10.4f}{d['std']:>8.4f}{d['median']:>8.4f}   "
            f"{h['mean']:>10.2f}{h['std']:>8.2f}{h['median']:>8.2f}"
        )
    return lines


def _official_summary(summary: dict) -> list[str]:
    """Means over the cases where the package gives a number (NaN: region empty in both, left out;
    n says how many counted); an inf lesion-wise HD95 (no lesion matched) makes its mean inf."""
    lines = [
        f"official ({official.versions()}; both empty -> NaN, left out of means)",
        f"{'region':<7}{'n':>4}{'global dice':>12}{'hd95':>8}{'lesion-wise dice':>18}{'hd95':>8}"
        f"{'detection F1':>14}",
    ]
    for region in official.REGIONS:
        s = {m: summary.get(f"{m}_{region}", {"mean": math.nan, "n": 0}) for m in official.METRICS}
        lines.append(
            f"{region:<7}{s['global_dsc']['n']:>4}{s['global_dsc']['mean']:>12.4f}{s['global_hd95']['mean']:>8.2f}"
            f"{s['lesionwise_dsc_mean']['mean']:>18.4f}{s['lesionwise_hd95_mean']['mean']:>8.2f}"
            f"{s['all_instance_f1']['mean']:>14.4f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("pred_dir", help="folder of <case>.nii.gz or <case>_seg.nii.gz predictions")
    parser.add_argument("truth_dir", help="BraTS-layout or flat folder holding <case>_seg.nii.gz")
    parser.add_argument("--out", default=None,
                        help="per-case CSV file to write (atomically) (default: none; the summary is printed either way); "
                             "an existing file is kept unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--subset", action="store_true",
        help="score only the predicted cases (e.g. the held-out split); truth cases without a prediction are skipped",
    )
    parser.add_argument(
        "--metrics", choices=METRIC_CHOICES, default="legacy",
        help="legacy: ours (BraTS 2017 era, medpy HD95, spacing in mm; the default); official: the "
             "brats-evaluation package the challenges rank with since 2023 (lesion-wise and global values; "
             "an optional extra: pip install brats-evaluation); both: side by side",
    )
    args = parser.parse_args(argv)
    if args.out:  # before any scoring: nothing already written is replaced unasked
        out = Path(args.out)
        if out.is_dir():
            parser.error(f"--out {out} is a folder; give the CSV file to write, e.g. {out / 'scores.csv'}")
        if out.exists() and not args.overwrite:
            parser.error(f"--out {out} already exists; replace it with --overwrite or choose another file")
    try:
        rows = evaluate_dirs(args.pred_dir, args.truth_dir, progress=True, subset=args.subset,
                             metrics=args.metrics)
    except (EvaluationError, official.OfficialMetricsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, rows_to_csv(rows, args.metrics))
        print(f"wrote {args.out}")
    print(format_summary(rows, args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
