"""Pictures of segmentations: reference and predicted contours over an MRI slice."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def contour_overlay(flair: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8 (3, H, 2W): a FLAIR slice with reference (left) and predicted (right) contours.

    flair (H, W) float; truth / pred (H, W) BraTS labels. Colours: WT green, TC yellow, ET red.
    """
    lo, hi = np.percentile(flair, [1, 99]) if flair.size else (0.0, 1.0)
    grey = np.clip((flair - lo) / max(hi - lo, 1e-6), 0, 1)
    panels = []
    for label in (truth, pred):
        rgb = np.repeat(grey[None], 3, axis=0)
        for values, colour in (((1, 2, 4), (0, 1, 0)), ((1, 4), (1, 1, 0)), ((4,), (1, 0, 0))):
            mask = np.isin(label, values)
            edge = mask & ~ndimage.binary_erosion(mask)
            for c in range(3):
                rgb[c][edge] = colour[c]
        panels.append(rgb)
    return (np.concatenate(panels, axis=2) * 255).astype(np.uint8)


def axial_slice(label: np.ndarray) -> int:
    """Axial (last axis, Z) index through the middle of the reference tumour, else the volume's."""
    z = np.flatnonzero(np.asarray(label).any(axis=(0, 1)))
    return int((z[0] + z[-1]) // 2) if z.size else label.shape[-1] // 2
