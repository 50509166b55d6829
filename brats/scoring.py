"""The one scoring loop: sliding-window prediction of whole cases, scored per region.

Validation in the engine, every stage's before/after figures, INT8 vs FP32, the report and the
benchmarks all score through `score_cases`, so their numbers are comparable by construction.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from brats.cache import Cache
from brats.dataset import iter_cases
from brats.inference import WindowCount, predict_case
from brats.labels import suppress_small_et
from brats.metrics import REGIONS, dice, region_masks, score_case
from common.artifact import Artifact
from common.config import Config, ConfigError
from common.precision import exact_fp32
from common.progress import bar_off


def score_cases(
    predict, cache, case_ids: Sequence[str], cfg: Config, *, on_case=None, desc: str | None = None,
    count: WindowCount | None = None, served_rule: int | None = None,
) -> list[dict]:
    """The one scoring loop (validation, stages, benchmarks): sliding-window prediction of every
    labelled case with `cfg.train`'s window, overlap, batch, ET rule and background skipping, then
    `score_case`.

    `predict` maps a (B, 4, *window) batch to logits; `on_case(case, image, truth, pred)` sees each
    case's arrays (the ET rule applied); `count` adds up the windows and skipped background windows of
    every case. Rows are {"case": name, dice_wt, ..., hd95_et, ..., truth_et (1.0: the truth has ET),
    et_missed (1.0: the truth has ET, the prediction none), et_false (1.0: the prediction has ET, the
    truth none), dice_et_norule (ET Dice before the ET rule: rules calibrated per artifact make ET
    figures of two artifacts comparable only this way), vox_tp_wt, vox_fp_wt, vox_fn_wt, ... (voxel
    counts for `pooled_dice`)}; unlabelled cases are skipped. `served_rule`: rows also get the ET Dice and
    et_missed at that ET rule threshold ("dice_et_served", "et_missed_served"), the one the artifact is
    served with, from the same prediction (the stage runner's guard compares models as served).
    """
    t, rows = cfg.train, []
    cases = iter_cases(cache, case_ids)
    for case, image, label, meta in tqdm(cases, total=len(case_ids), desc=desc, leave=False, disable=bar_off(desc is not None)):
        if label is None:
            continue
        with exact_fp32():  # no TF32 on CUDA: the Dice predict.py gives back on a CPU
            raw = predict_case(predict, image, cfg.data.scheme, t.window, t.overlap, t.sw_batch,
                               skip_background=t.skip_background, count=count)
        pred = suppress_small_et(raw, t.et_min_voxels)  # predict_case's own last step, kept apart here
        truth = label.numpy()
        truth_et, pred_et = bool((truth == 4).any()), bool((pred == 4).any())
        # cases whose ET is missed or invented: a mean over cases hides them
        rows.append({"case": case, **score_case(pred, truth, meta.spacing), "truth_et": float(truth_et),
                     "et_missed": float(truth_et and not pred_et), "et_false": float(pred_et and not truth_et),
                     "dice_et_norule": dice(raw == 4, truth == 4), **voxel_counts(pred, truth)})
        if served_rule is not None:
            served_et = suppress_small_et(raw, served_rule) == 4
            rows[-1].update(dice_et_served=dice(served_et, truth == 4),
                            et_missed_served=float(truth_et and not served_et.any()))
        if on_case is not None:
            on_case(case, image, truth, pred)
    return rows


def voxel_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """True/false positive and false negative voxels per region: {"vox_tp_wt", "vox_fp_wt", "vox_fn_wt", ...}."""
    p, t = region_masks(pred), region_masks(truth)
    out = {}
    for r in REGIONS:
        out[f"vox_tp_{r}"] = float(np.count_nonzero(p[r] & t[r]))
        out[f"vox_fp_{r}"] = float(np.count_nonzero(p[r] & ~t[r]))
        out[f"vox_fn_{r}"] = float(np.count_nonzero(~p[r] & t[r]))
    return out


def pooled_dice(metrics: dict) -> dict[str, float]:
    """Dice per region over all cases' voxels at once, 2 TP / (2 TP + FP + FN) with the counts summed
    (here: averaged, the same ratio) over cases, and their mean: {"pooled_dice_wt", ..., "pooled_dice_mean"}.

    nnU-Net's "pseudo Dice" for checkpoint selection (Isensee et al., Nat. Methods 2021). Unlike the
    BraTS per-case mean, a case without ET scores no free 1.0 for predicting nothing, so a model that
    never predicts ET cannot win on the cases without ET; false ET there costs its voxels. A region
    absent from every truth and prediction scores 1. {} when the counts are missing."""
    if any(f"vox_tp_{r}" not in metrics for r in REGIONS):
        return {}
    out = {}
    for r in REGIONS:
        tp, fp, fn = (metrics[f"vox_{k}_{r}"] for k in ("tp", "fp", "fn"))
        out[f"pooled_dice_{r}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0
    out["pooled_dice_mean"] = float(np.mean([out[f"pooled_dice_{r}"] for r in REGIONS]))
    return out


def evaluate(model: nn.Module, cache: Cache, case_ids: Sequence[str], cfg: Config,
             desc: str = "evaluate", served_rule: int | None = None) -> dict[str, float]:
    """Mean metrics of any model (FP32, INT8, ONNX wrapper) on `case_ids` (e.g. a run's validation
    cases), scored exactly as the engine's validation scores them; `served_rule` as in `score_cases`.
    ConfigError if none is labelled."""
    device = next(iter(model.parameters()), torch.empty(0)).device  # an ONNX wrapper has no parameters
    model.eval()
    with torch.no_grad():
        rows = score_cases(lambda x: model(x.to(device)).float(), cache, case_ids, cfg, desc=desc,
                           served_rule=served_rule)
    if not rows:
        raise ConfigError(f"{desc}: no labelled validation case to score")
    return mean_rows(rows)


CASE_FLAGS = ("et_missed", "et_false", "truth_et", "et_missed_served")  # per-case 0/1 flags of score_cases' rows


def case_counts(rows: Sequence[dict], flags: Sequence[str] = CASE_FLAGS) -> dict[str, float]:
    """{"<flag>_cases": how many of `rows` have the flag set}, for each of `flags` (0 when `rows` is empty)."""
    return {f"{key}_cases": float(sum(r.get(key, 0.0) for r in rows)) for key in flags}


def mean_rows(rows: list[dict]) -> dict[str, float]:
    """Mean of every numeric key over per-case rows (NaNs skipped); `et_missed`, `et_false` and `truth_et`
    are also counted (`et_missed_cases`: cases whose truth has ET and whose prediction has none;
    `et_false_cases`: the reverse; `truth_et_cases`: cases with ET); with voxel counts, `pooled_dice` too."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and not math.isnan(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else math.nan
    out.update(case_counts(rows, [k for k in CASE_FLAGS if k in out]))  # counts of cases, beside the shares
    out.update(pooled_dice(out))
    return out


ET_RULE_GRID = (0, 10, 25, 50, 100, 200, 400, 800)  # candidate et_min_voxels (voxels of the cropped grid)


def artifact_et_rule(art: Artifact) -> int:
    """The ET rule threshold `art` is served with: its calibration record's (`calibrate_et_rule`, stored as
    extra["et_rule"] by every stage), 0 (the rule off) when none is recorded."""
    rule = art.extra.get("et_rule")
    value = rule.get("et_min_voxels", 0) if isinstance(rule, dict) else 0
    return int(value) if isinstance(value, (int, float)) else 0


def calibrate_et_rule(predict, cache: Cache, case_ids: Sequence[str], cfg: Config,
                      grid: Sequence[int] = ET_RULE_GRID) -> dict:
    """Choose the BraTS ET rule's threshold (`suppress_small_et`: a case with fewer predicted ET
    voxels gets them relabelled NCR/NET) that maximises mean ET Dice over `case_ids`, among the
    thresholds that empty the ET of no case whose truth has ET (the rule off misses what it misses;
    no threshold may miss more). The per-case mean scores an emptied ET 1 on every case without ET,
    so without that condition it could pay for them with the thin, poorly segmented ET of the others:
    on lgg-rich (3 of 8 validation cases without ET) the chosen rules emptied 3 of 5 ET cases.

    One sliding-window pass per case (rule off), then every threshold of `grid` is applied to the
    kept label maps. Returns plain data {"grid", "dice_et" (mean per threshold), "et_missed" (ET
    cases emptied, per threshold), "et_min_voxels" (the best allowed; ties: the smallest), "cases"}.
    Calibrated on the cases it is then scored on, the chosen figure is optimistic by the choice of
    one integer.
    """
    t, kept = cfg.train, []
    for case, image, label, meta in iter_cases(cache, case_ids):
        if label is None:
            continue
        with exact_fp32():
            pred = predict_case(predict, image, cfg.data.scheme, t.window, t.overlap, t.sw_batch, et_min_voxels=0,
                                skip_background=t.skip_background)
        et = pred == 4
        kept.append((et, int(et.sum()), label.numpy() == 4))
    if not kept:
        raise ConfigError("ET rule calibration: no labelled case to score")
    means, missed = [], []
    for threshold in grid:
        scores = [dice(np.zeros_like(p) if 0 < n < threshold else p, truth) for p, n, truth in kept]
        means.append(float(np.mean(scores)))
        missed.append(sum(1 for _, n, truth in kept if truth.any() and (n == 0 or n < threshold)))
    allowed = [i for i in range(len(grid)) if missed[i] <= min(missed)]
    best = max(allowed, key=lambda i: (round(means[i], 9), -grid[i]))
    return {"grid": [int(g) for g in grid], "dice_et": means, "et_missed": missed, "et_min_voxels": int(grid[best]),
            "cases": len(kept)}
