"""BraTS evaluation metrics on label maps: Dice, IoU, sensitivity, specificity and HD95 per region.

Regions are the challenge's: whole tumour WT = {1, 2, 4}, tumour core TC = {1, 4}, enhancing
tumour ET = {4}. Every metric takes two boolean masks of one shape.

Empty-mask conventions (LGG cases often have no ET; they must be explicit):
- both masks empty: Dice 1, IoU 1, HD95 0 (a correct "no tumour" answer).
- exactly one empty: Dice 0, IoU 0, HD95 = `HD95_EMPTY`.
- sensitivity with an empty reference: 1 if the prediction is empty too, else 0, mirroring Dice,
  so a false-positive ET in an LGG case is penalised by every overlap metric alike.
- specificity with no negative voxel in the reference (a volume that is all tumour): 1 if the
  prediction is all tumour too, else 0.

HD95 is medpy's `hd95` (equal to it, tests/test_metrics.py): surface voxels are mask XOR its
erosion by the 3D 6-connected structuring element (border voxels of the array count as surface);
for each surface voxel of one mask, the Euclidean distance (mm, honouring voxel spacing) to the
nearest surface voxel of the other; both directions pooled; 95th percentile (`np.percentile`,
linear). MONAI's HD95 takes the larger of the two directed percentiles instead (so it is never
smaller, up to interpolation), and the official BraTS package (`brats.official`) has other
empty-mask and spacing conventions.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

REGIONS = ("wt", "tc", "et")
DICE_KEYS = tuple(f"dice_{r}" for r in REGIONS)  # the per-region Dice keys of score_case's rows
REGION_LABELS = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}
BRATS_LABELS = (0, 1, 2, 4)

# HD95 when exactly one mask is empty: the diagonal of the 240 x 240 x 155 BraTS grid at 1 mm,
# sqrt(240^2 + 240^2 + 155^2) = 373.13 mm, the largest distance two voxels of a case can have.
HD95_EMPTY = 373.13
DICE_BOTH_EMPTY = 1.0
DICE_ONE_EMPTY = 0.0
HD95_BOTH_EMPTY = 0.0


def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT/TC/ET masks from a BraTS label map (values 0, 1, 2, 4)."""
    label = np.asarray(label)
    ncr, ed, et = label == 1, label == 2, label == 4
    tc = ncr | et
    return {"wt": tc | ed, "tc": tc, "et": et}


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs reference {truth.shape}")
    return pred, truth


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) voxel counts."""
    tp = int(np.count_nonzero(pred & truth))
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    fp, fn = n_pred - tp, n_truth - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P & T| / (|P| + |T|); both empty -> 1."""
    pred, truth = _check_pair(pred, truth)
    tp, fp, fn, _ = _counts(pred, truth)
    denom = 2 * tp + fp + fn
    return DICE_BOTH_EMPTY if denom == 0 else 2.0 * tp / denom


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """|P & T| / |P | T|; both empty -> 1."""
    pred, truth = _check_pair(pred, truth)
    tp, fp, fn, _ = _counts(pred, truth)
    denom = tp + fp + fn
    return DICE_BOTH_EMPTY if denom == 0 else tp / denom


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FN); empty reference -> 1 if the prediction is empty, else 0."""
    pred, truth = _check_pair(pred, truth)
    tp, fp, fn, _ = _counts(pred, truth)
    if tp + fn == 0:
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


def specificity(pred: np.ndarray, truth: np.ndarray) -> float:
    """TN / (TN + FP); no reference negatives -> 1 if the prediction has none either, else 0."""
    pred, truth = _check_pair(pred, truth)
    tp, fp, fn, tn = _counts(pred, truth)
    if tn + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tn / (tn + fp)


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by `margin` voxels and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask XOR its 6-connected erosion (voxels on the array border count)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)  # 6-connected in 3D, as medpy
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), crop: bool = True
) -> np.ndarray:
    """Pooled surface distances (mm), pred->truth then truth->pred; both masks non-empty.

    With `crop`, both masks are cut to the union's bounding box plus one voxel. That is exact:
    erosion sees background beyond the margin just as in the full array (and the array border is
    kept where the box touches it), and every distance is to a surface voxel inside the box, which
    the EDT of the cropped array still contains.
    """
    pred, truth = _check_pair(pred, truth)
    if not pred.any() or not truth.any():
        raise ValueError("surface distances need two non-empty masks")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} does not match {pred.ndim}-D masks")
    if crop:
        box = _bbox(pred | truth, margin=1)
        pred, truth = pred[box], truth[box]
    surf_pred, surf_truth = surface(pred), surface(truth)
    # EDT of the complement: distance of every voxel to the nearest surface voxel
    to_truth = ndimage.distance_transform_edt(~surf_truth, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return np.concatenate([to_truth[surf_pred], to_pred[surf_truth]])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric surface distance (mm); see the module docstring for empties."""
    pred, truth = _check_pair(pred, truth)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return HD95_BOTH_EMPTY
    if not has_pred or not has_truth:
        return HD95_EMPTY
    return float(np.percentile(surface_distances(pred, truth, spacing), 95))


def _score_masks(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], suffix: str) -> dict:
    return {
        f"dice_{suffix}": dice(pred, truth),
        f"hd95_{suffix}": hd95(pred, truth, spacing),
        f"iou_{suffix}": iou(pred, truth),
        f"sens_{suffix}": sensitivity(pred, truth),
        f"spec_{suffix}": specificity(pred, truth),
    }


def score_case(
    pred_label: np.ndarray, true_label: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """All region metrics of one case from two BraTS label maps, plus dice/hd95/iou means."""
    pred_label, true_label = np.asarray(pred_label), np.asarray(true_label)
    if pred_label.shape != true_label.shape:
        raise ValueError(f"label map shapes differ: prediction {pred_label.shape} vs reference {true_label.shape}")
    pred_regions, true_regions = region_masks(pred_label), region_masks(true_label)
    scores: dict[str, float] = {}
    per_metric: dict[str, dict[str, float]] = {}
    for region in REGIONS:
        for key, value in _score_masks(pred_regions[region], true_regions[region], spacing, region).items():
            per_metric.setdefault(key.split("_")[0], {})[key] = value
    for metric in ("dice", "hd95", "iou", "sens", "spec"):
        scores.update(per_metric[metric])
    for metric in ("dice", "hd95", "iou"):
        scores[f"{metric}_mean"] = float(np.mean([scores[f"{metric}_{r}"] for r in REGIONS]))
    return scores


def score_classes(
    pred: np.ndarray, truth: np.ndarray, classes: Iterable[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Per-class metrics for a softmax scheme's class maps (e.g. seed3: 1 core, 2 edema).

    Keys `dice_c{k}`, `hd95_c{k}`, `iou_c{k}`, `sens_c{k}`, `spec_c{k}` for each class k, and
    `dice_mean` over the classes given.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"class map shapes differ: prediction {pred.shape} vs reference {truth.shape}")
    classes = [int(k) for k in classes]
    if not classes:
        raise ValueError("score_classes needs at least one class")
    scores: dict[str, float] = {}
    for k in classes:
        scores.update(_score_masks(pred == k, truth == k, spacing, f"c{k}"))
    scores["dice_mean"] = float(np.mean([scores[f"dice_c{k}"] for k in classes]))
    return scores


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean, std (population, ddof 0), median and count per numeric key over the rows.

    Non-numeric values (case names) are skipped; NaNs are ignored and not counted.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            values.setdefault(key, []).append(float(value))
    summary = {}
    for key, vals in values.items():
        arr = np.asarray([v for v in vals if not math.isnan(v)], dtype=np.float64)
        if arr.size == 0:
            summary[key] = {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
            continue
        summary[key] = {
            "mean": float(arr.mean()),
            "std": float(arr.std()),
            "median": float(np.median(arr)),
            "n": int(arr.size),
        }
    return summary
