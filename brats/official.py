"""The official BraTS metrics beside ours: a thin adapter over the optional `brats-evaluation` package.

    pip install brats-evaluation    # the extra: pulls panoptica, pandas, SimpleITK, scikit-image, ...

Since 2023 the BraTS challenges score with this package (panoptica underneath). Nothing here
computes a metric: a case goes to the package's `evaluate_single_exam` with its bundled glioma
config ("gli"), as in-memory NIfTI images on the truth's grid (what its command line reads from
files), and the result becomes a row through the package's own parser (`parse_seg_results`), so
every convention below is the package's. Measured on brats-evaluation 0.0.10 / panoptica 2.1.7
(tests/test_official.py pins each one):

- labels: the package's glioma labels are 1 NETC, 2 SNFH, 3 ET, 4 resection cavity. BraTS 2017's
  ET (4) is handed over as 3 (`to_official_labels`); unmapped, ET would count as resection cavity
  and drop out of WT and TC. Regions: wt = {1, 2, 3}, tc = {1, 3}, et = {3}.
- `global_dsc_*`, `global_hd95_*`: the whole region, as ours, but both empty -> NaN (left out of
  means over cases, where ours counts Dice 1, HD95 0); HD95 373 whenever prediction and truth share
  no voxel, both non-empty included (ours: the surface distance); voxel spacing ignored (voxels).
- `lesionwise_dsc_mean_*`, `lesionwise_hd95_mean_*`: each connected component is a lesion, matched
  one to one by overlap; the mean over matched lesions (panoptica's segmentation quality). An
  unmatched lesion does not lower it: it counts in `all_instance_f1_*` (detection F1). No lesion
  matched: Dice 0, HD95 inf. This HD95 honours voxel spacing.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from brats.metrics import BRATS_LABELS, REGIONS
from common.errors import UserInputError

EXTRA = "brats-evaluation"
CONFIG = "gli"  # the bundled glioma config: the task BraTS 2017 belongs to
METRICS = ("global_dsc", "global_hd95", "lesionwise_dsc_mean", "lesionwise_hd95_mean", "all_instance_f1")
COLUMNS = [f"{m}_{r}" for m in METRICS for r in REGIONS]
ET_2017, ET_OFFICIAL = 4, 3
CITATION = "https://github.com/BrainLesion/panoptica#citation"


class OfficialMetricsError(UserInputError):
    """The official metrics were asked for but cannot be computed (package missing, or it failed)."""


def _missing_message() -> str:
    return (f"--metrics official|both needs the optional package {EXTRA}: pip install -r requirements-official.txt "
            f"(the version checked here, {EXTRA}==0.0.10; it pulls panoptica, pandas, SimpleITK, scikit-image; "
            "panoptica asks for numpy < 2.3)")


@functools.cache
def _package():
    """(brats_evaluation module, panoptica evaluator of the glioma config), loaded once."""
    try:
        import brats_evaluation
        from panoptica import Panoptica_Evaluator
    except ImportError:
        raise OfficialMetricsError(_missing_message()) from None
    with _quiet():
        evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path(CONFIG)))
    return brats_evaluation, evaluator


def require() -> None:
    """Raise `OfficialMetricsError` naming the extra to install unless the package loads."""
    _package()


def versions() -> str:
    """Which package computed the official figures, and where to cite it (for reports)."""
    require()
    return (f"{EXTRA} {metadata.version(EXTRA)} (panoptica {metadata.version('panoptica')}, "
            f"cite {CITATION})")


@contextlib.contextmanager
def _quiet():
    """The package prints a citation banner, config notes and a table per parsed case on stdout:
    kept out of ours (`versions()` names panoptica and its citation page for the reports instead);
    its NSD-threshold warning concerns a metric not reported here."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The threshold is set to", category=UserWarning)
        yield


def to_official_labels(label: np.ndarray) -> np.ndarray:
    """BraTS 2017 labels (0, 1 NCR/NET, 2 edema, 4 ET) as the package's glioma labels (ET = 3)."""
    label = np.asarray(label)
    bad = np.setdiff1d(np.unique(label), BRATS_LABELS)
    if bad.size:
        raise ValueError(f"not BraTS 2017 labels: {bad.tolist()} (expected {list(BRATS_LABELS)})")
    out = label.astype(np.uint8)
    out[label == ET_2017] = ET_OFFICIAL
    return out


def evaluate_official(case: str, pred_label: np.ndarray, true_label: np.ndarray,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """The package's raw result for one case (BraTS 2017 label maps on one grid, spacing in mm)."""
    import nibabel as nib

    package, evaluator = _package()
    if np.shape(pred_label) != np.shape(true_label):
        raise ValueError(f"label map shapes differ: prediction {np.shape(pred_label)} vs "
                         f"reference {np.shape(true_label)}")
    affine = np.diag([*(float(s) for s in spacing), 1.0])  # the header's zooms are what it reads
    pred = nib.Nifti1Image(to_official_labels(pred_label), affine)
    truth = nib.Nifti1Image(to_official_labels(true_label), affine)
    with _quiet():
        result = package.evaluate_single_exam(pred, truth, case, evaluator)
    if "error" in result:
        raise OfficialMetricsError(f"case {case}: {EXTRA} failed: {result['error']}")
    return result


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def parse_official(results: list[dict]) -> list[dict]:
    """Rows {"case", *COLUMNS} from raw results, by the package's parser (its CSV read back)."""
    if not results:
        return []
    package, _ = _package()
    with tempfile.TemporaryDirectory(prefix="brats-official-") as tmp:
        summary, table = Path(tmp) / "summary.json", Path(tmp) / "metrics.csv"
        summary.write_text(json.dumps({"metrics": results, "missings": []}, default=_jsonable))
        with _quiet():
            package.parse_seg_results(str(summary), str(table))
        with open(table, newline="") as f:
            parsed = list(csv.DictReader(f))[: len(results)]  # then its mean / std / median rows
    rows = []
    for result, row in zip(results, parsed):
        if row["subject_id"] != result["subject_name"]:
            raise OfficialMetricsError(f"{EXTRA} parser: row {row['subject_id']} where "
                                       f"{result['subject_name']} was expected")
        rows.append({"case": result["subject_name"], **{c: _float(row.get(c)) for c in COLUMNS}})
    return rows


def score_case_official(pred_label: np.ndarray, true_label: np.ndarray,
                        spacing: Sequence[float] = (1.0, 1.0, 1.0), case: str = "case") -> dict[str, float]:
    """The official metrics of one case (COLUMNS keys), as the package's parser reports them."""
    row = parse_official([evaluate_official(case, pred_label, true_label, spacing)])[0]
    del row["case"]
    return row
