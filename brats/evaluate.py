"""Score BraTS-label NIfTI predictions against ground truth.

    python -m brats.evaluate PRED_DIR TRUTH_DIR [--out scores.csv]

PRED_DIR holds `<case>.nii.gz` or `<case>_seg.nii.gz` (flat). TRUTH_DIR is a BraTS-layout folder
(`<case>/<case>_seg.nii.gz`, possibly under HGG/, LGG/ or Brats17TrainingData/) or a flat folder
of `<case>_seg.nii.gz`; it is searched recursively. Voxel spacing comes from the truth header.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from brats.metrics import BRATS_LABELS, REGIONS, score_case, summarize
from common.atomic import atomic_write_text

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CSV_COLUMNS = ["case"] + [f"{m}_{r}" for m in ("dice", "hd95", "iou", "sens", "spec") for r in REGIONS] + [
    "dice_mean",
    "hd95_mean",
    "iou_mean",
]


class EvaluationError(ValueError):
    """Bad evaluation input: missing cases, mismatched shapes, bad labels, unreadable files."""


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_truth(truth_dir: str | Path) -> dict[str, Path]:
    """Case name -> `<case>_seg.nii[.gz]`, searched recursively under `truth_dir`."""
    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise EvaluationError(f"truth folder not found: {truth_dir}")
    found: dict[str, Path] = {}
    for path in sorted(truth_dir.rglob("*_seg.nii*")):
        stem = _strip_nifti(path.name)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        case = stem[: -len("_seg")]
        if case in found:
            raise EvaluationError(f"case {case} has two truth files: {found[case]} and {path}")
        found[case] = path
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
        problems.append(f"{len(no_pred)} truth case(s) without prediction: {_shorten(no_pred)}")
    if problems:
        raise EvaluationError("; ".join(problems))
    if not preds:
        raise EvaluationError("no prediction or truth files found")
    return sorted(preds)


def load_label(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D BraTS label map as uint8 and its voxel spacing; bad values or files raise."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # stored dtype, no float64 decoding
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error)
        raise EvaluationError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 3:
        raise EvaluationError(f"{path}: expected a 3D label map, got shape {data.shape}")
    valid = np.isin(data, BRATS_LABELS)
    if not valid.all():
        bad = np.unique(data[~valid])
        shown = ", ".join(f"{v:g}" for v in bad[:8])
        raise EvaluationError(f"{path}: label values outside {{0,1,2,4}}: {shown}")
    return data.astype(np.uint8), zooms


def evaluate_case(case: str, pred_path: Path, truth_path: Path) -> dict:
    """Scores of one case as a CSV row (`case` first)."""
    truth, spacing = load_label(truth_path)
    pred, _ = load_label(pred_path)
    if pred.shape != truth.shape:
        raise EvaluationError(
            f"case {case}: shape mismatch, prediction {pred_path} {pred.shape} vs truth {truth_path} {truth.shape}"
        )
    return {"case": case, **score_case(pred, truth, spacing)}


def evaluate_dirs(
    pred_dir: str | Path, truth_dir: str | Path, progress: bool = False, subset: bool = False
) -> list[dict]:
    """Score every prediction in `pred_dir` against `truth_dir`; one dict per case, sorted by name."""
    preds, truths = find_predictions(pred_dir), find_truth(truth_dir)
    cases = match_cases(preds, truths, subset)
    return [
        evaluate_case(case, preds[case], truths[case])
        for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress)
    ]


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def format_summary(rows: list[dict]) -> str:
    """Table of mean / std / median Dice and HD95 per region over the cases."""
    summary = summarize(rows)
    lines = [
        f"{len(rows)} case(s)",
        f"{'region':<7}{'dice mean':>10}{'std':>8}{'median':>8}   {'hd95 mean':>10}{'std':>8}{'median':>8}",
    ]
    for region in (*REGIONS, "mean"):
        d, h = summary[f"dice_{region}"], summary[f"hd95_{region}"]
        lines.append(
            f"{region:<7}{d['mean']:>10.4f}{d['std']:>8.4f}{d['median']:>8.4f}   "
            f"{h['mean']:>10.2f}{h['std']:>8.2f}{h['median']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("pred_dir", help="folder of <case>.nii.gz or <case>_seg.nii.gz predictions")
    parser.add_argument("truth_dir", help="BraTS-layout or flat folder holding <case>_seg.nii.gz")
    parser.add_argument("--out", default=None, help="per-case CSV to write (atomically)")
    parser.add_argument(
        "--subset", action="store_true",
        help="score only the predicted cases (e.g. the held-out split); truth cases without a prediction are skipped",
    )
    args = parser.parse_args(argv)
    try:
        rows = evaluate_dirs(args.pred_dir, args.truth_dir, progress=True, subset=args.subset)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, rows_to_csv(rows))
        print(f"wrote {args.out}")
    print(format_summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
