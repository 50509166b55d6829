"""Time HD95 (and the whole score_case) on a realistic 240 x 240 x 155 case.

A tumour-like pair: truth is a smoothed random blob (WT ~ 100 cm^3) with a core and an enhancing
rim inside; the prediction is the truth shifted by two voxels and re-thresholded. Prints seconds.
Run: OMP_NUM_THREADS=1 python bench/bench_metrics.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brats.metrics import REGIONS, hd95, region_masks, score_case  # noqa: E402

SHAPE = (240, 240, 155)


def tumour_label(rng: np.random.Generator, centre: tuple[int, int, int], radius: float) -> np.ndarray:
    """BraTS label map: edema (2) blob, core (1) inside it, enhancing (4) rim around a necrotic centre."""
    grid = np.indices(SHAPE, dtype=np.float32)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), sigma=4) * 40
    r = dist + noise
    label = np.zeros(SHAPE, np.uint8)
    label[r < radius] = 2
    label[r < 0.6 * radius] = 4
    label[r < 0.4 * radius] = 1
    return label


def main() -> None:
    rng = np.random.default_rng(0)
    truth = tumour_label(rng, (120, 110, 80), 30.0)
    pred = np.roll(tumour_label(np.random.default_rng(1), (122, 110, 79), 29.0), 2, axis=0)
    spacing = (1.0, 1.0, 1.0)
    t_masks, p_masks = region_masks(truth), region_masks(pred)
    for region in REGIONS:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            value = hd95(p_masks[region], t_masks[region], spacing)
            best = min(best, time.perf_counter() - t0)
        print(f"hd95_{region}: {value:7.2f} mm  voxels truth {np.count_nonzero(t_masks[region]):7d}  "
              f"time {best:.3f} s (best of 3)")
    t0 = time.perf_counter()
    scores = score_case(pred, truth, spacing)
    print(f"score_case (all metrics, 3 regions): {time.perf_counter() - t0:.3f} s; "
          f"dice wt/tc/et {scores['dice_wt']:.3f}/{scores['dice_tc']:.3f}/{scores['dice_et']:.3f}")
    # worst case for the bbox crop: a blob pair spanning most of the volume
    big_t = tumour_label(np.random.default_rng(2), (120, 120, 77), 90.0) > 0
    big_p = np.roll(big_t, 3, axis=1)
    t0 = time.perf_counter()
    value = hd95(big_p, big_t, spacing)
    print(f"hd95 huge blob ({np.count_nonzero(big_t)} voxels): {value:.2f} mm, {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
