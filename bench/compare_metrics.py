"""How far our metrics (brats.metrics, "legacy") are from medpy's, MONAI's and the official package's.

    python bench/compare_metrics.py [--cases 12] [--shape 96 96 64] [--spacing 1 1 1] [--seed 0]

Needs medpy, monai and brats-evaluation besides the project's packages (none is a dependency of the
project: run it from an environment that has them). Truths are phantom cases of both families
(`brats.phantom`); predictions are made from them by errors a segmentation model makes: every
region's boundary moved by about 1.5 voxels (a smooth random field on its signed distance),
then per case in turn nothing more, a spurious 3x3x3 edema blob, a spurious 3x3x3 ET blob, or the
ET relabelled as core (a lost enhancing rim). `--spacing` declares a voxel size to every library
(the phantoms are 1 mm isotropic). Prints one Markdown table of per-region means and one of
differences to ours; the numbers belong to these synthetic cases, not to a model.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brats.layout import discover_cases  # noqa: E402
from brats.metrics import REGIONS, region_masks, score_case  # noqa: E402
from brats.nifti import load_case  # noqa: E402
from brats.phantom import write_phantom_dataset  # noqa: E402


def perturb(truth: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """A prediction: boundaries moved by a smooth field, then error `kind` (0-3, see the docstring)."""
    masks = region_masks(truth)
    moved = {}
    for region in REGIONS:
        mask = masks[region]
        inside = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
        field = ndimage.gaussian_filter(rng.standard_normal(truth.shape), 3.0)
        moved[region] = inside + 1.5 * field / (field.std() + 1e-9) > 0.5  # about +-1.5 voxels, tails 4
    moved["tc"] &= moved["wt"]
    moved["et"] &= moved["tc"]
    pred = np.zeros(truth.shape, np.uint8)
    pred[moved["wt"]], pred[moved["tc"]], pred[moved["et"]] = 2, 1, 4
    if kind in (1, 2):  # a spurious blob in the brain, well away from the tumour
        far = ndimage.distance_transform_edt(~masks["wt"]) > 12
        far &= ndimage.binary_erosion(truth >= 0, iterations=4)  # inside the array
        spots = np.argwhere(far)
        x, y, z = spots[rng.integers(len(spots))]
        pred[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] = 2 if kind == 1 else 4
    elif kind == 3:
        pred[pred == 4] = 1
    return pred


def library_scores(pred: np.ndarray, truth: np.ndarray, spacing, case: str) -> dict:
    """Per region: ours, medpy, MONAI, official (global and lesion-wise)."""
    import torch
    from medpy.metric.binary import hd95 as medpy_hd95
    from monai.metrics import compute_hausdorff_distance

    from brats.official import score_case_official

    ours, theirs = score_case(pred, truth, spacing), score_case_official(pred, truth, spacing, case)
    p_masks, t_masks = region_masks(pred), region_masks(truth)
    out = {}
    for r in REGIONS:
        p, t = p_masks[r], t_masks[r]
        both = bool(p.any() and t.any())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai = compute_hausdorff_distance(torch.as_tensor(p)[None, None], torch.as_tensor(t)[None, None],
                                               percentile=95, spacing=[float(s) for s in spacing]).item()
        out[r] = {
            "both": both, "empty_both": not p.any() and not t.any(), "overlap": bool((p & t).any()),
            "dice": ours[f"dice_{r}"], "hd95": ours[f"hd95_{r}"],
            "medpy": medpy_hd95(p, t, voxelspacing=spacing) if both else math.nan,
            "monai": monai,
            "g_dice": theirs[f"global_dsc_{r}"], "g_hd95": theirs[f"global_hd95_{r}"],
            "lw_dice": theirs[f"lesionwise_dsc_mean_{r}"], "lw_hd95": theirs[f"lesionwise_hd95_mean_{r}"],
        }
    return out


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def report(scores: list[dict]) -> str:
    lines = ["| region | cases | Dice ours | Dice official global | Dice official lesion-wise | HD95 ours | "
             "HD95 medpy | HD95 MONAI | HD95 official global | HD95 official lesion-wise |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in REGIONS:
        s = [c[r] for c in scores]
        finite_lw = [x["lw_hd95"] for x in s if math.isfinite(x["lw_hd95"])]
        lines.append(
            f"| {r.upper()} | {len(s)} ({sum(x['empty_both'] for x in s)} both empty) "
            f"| {_mean(x['dice'] for x in s):.4f} | {_mean(x['g_dice'] for x in s):.4f} "
            f"| {_mean(x['lw_dice'] for x in s):.4f} | {_mean(x['hd95'] for x in s):.2f} "
            f"| {_mean(x['medpy'] for x in s):.2f} (both non-empty) | {_mean(x['monai'] for x in s):.2f} "
            f"({sum(math.isnan(x['monai']) for x in s)} NaN) | {_mean(x['g_hd95'] for x in s):.2f} "
            f"| {_mean(finite_lw):.2f} ({len(s) - len(finite_lw)} inf/NaN left out) |")
    both = [c[r] for c in scores for r in REGIONS if c[r]["both"]]
    medpy = [abs(x["medpy"] - x["hd95"]) for x in both]
    monai = [x["monai"] - x["hd95"] for x in both]
    overlap = [x for x in both if x["overlap"]]
    g_hd = [x["g_hd95"] - x["hd95"] for x in overlap]
    g_dice = [abs(x["g_dice"] - x["dice"]) for x in both]
    no_overlap = [x for x in both if not x["overlap"]]
    ours_far = ", ".join(f"{x['hd95']:.1f}" for x in no_overlap) or "-"
    theirs_far = ", ".join(f"{x['g_hd95']:.0f}" for x in no_overlap) or "-"
    lines += [
        "",
        f"Over {len(both)} region pairs with both masks non-empty:",
        f"- medpy HD95 - ours: max |difference| {max(medpy):.2e} mm",
        f"- MONAI HD95 - ours: mean {np.mean(monai):+.2f} mm, max {max(monai):+.2f} mm, min {min(monai):+.2f} mm; "
        f"larger in {sum(d > 1e-9 for d in monai)} pairs",
        f"- official global Dice - ours: max |difference| {max(g_dice):.2e}",
        f"- official global HD95 - ours, where the masks overlap ({len(overlap)}): mean {np.mean(g_hd):+.2f}, "
        f"max |difference| {max(abs(d) for d in g_hd):.2f}",
        f"- no shared voxel ({len(no_overlap)}): ours {ours_far} mm, official {theirs_far}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="phantom cases per family (default 12)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="voxel size declared (mm)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("demo", "lgg-rich"):
            root = Path(tmp) / family
            write_phantom_dataset(root, cases=args.cases, val_cases=0, shape=tuple(args.shape), seed=args.seed,
                                  family=family)
            for i, ref in enumerate(r for r in discover_cases(root) if r.has_label):
                truth = load_case(ref).label
                scores.append(library_scores(perturb(truth, i % 4, rng), truth, tuple(args.spacing), ref.case))
    print(f"{len(scores)} phantom cases (demo and lgg-rich, {'x'.join(map(str, args.shape))}), seed {args.seed}, "
          f"spacing {' x '.join(f'{s:g}' for s in args.spacing)} mm")
    print(report(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
