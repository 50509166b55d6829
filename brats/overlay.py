"""Pictures of segmentations: reference and predicted contours over an MRI slice.

`contour_overlay` is an RGB array (TensorBoard); `case_figure` a PNG with one column per stage.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.atomic import atomic_write


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


# region -> (labels, colour); rows of `case_figure`: FLAIR shows WT and TC, T1ce shows TC and ET
REGION_COLOURS = {"wt": ((1, 2, 4), "lime"), "tc": ((1, 4), "yellow"), "et": ((4,), "red")}
FIGURE_ROWS = (("FLAIR", ("wt", "tc")), ("T1ce", ("tc", "et")))
PANEL_INCHES, FIGURE_DPI = 2.2, 100


def _crop_box(slices: list[np.ndarray], margin: int = 4) -> tuple[slice, slice]:
    """Bounding box of everything non-zero in the 2D slices (brain and labels), plus a margin."""
    nonzero = np.zeros(slices[0].shape, bool)
    for s in slices:
        nonzero |= np.asarray(s) != 0
    if not nonzero.any():
        return slice(None), slice(None)
    box = []
    for axis in (0, 1):
        idx = np.flatnonzero(nonzero.any(axis=1 - axis))
        box.append(slice(max(idx[0] - margin, 0), idx[-1] + 1 + margin))
    return box[0], box[1]


def _grey_limits(image: np.ndarray) -> tuple[float, float]:
    brain = image[image != 0]
    if brain.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(brain, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def case_figure(path, flair: np.ndarray, t1ce: np.ndarray, panels, truth: np.ndarray | None = None,
                title: str = "") -> list[str]:
    """One PNG of an axial slice: a column for the truth (when given) and one per prediction; the
    top row is FLAIR with WT (green) and TC (yellow) contours, the bottom row T1ce with TC and ET
    (red). In a prediction's column its contours are solid and the truth's dashed, so a lost core
    or enhancing rim shows as a dashed line alone. Returns the column titles, left to right.

    flair, t1ce, truth: (X, Y) slices of one case; panels: [(title, (X, Y) BraTS label slice)].
    Shown cropped to the brain, X to the right and Y up; `PANEL_INCHES` square per panel.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D


    columns = ([("truth", None)] if truth is not None else []) + [(str(n), np.asarray(p)) for n, p in panels]
    if not columns:
        raise ValueError("case_figure needs a truth or at least one prediction")
    box = _crop_box([flair, *(p for _, p in columns if p is not None), *([truth] if truth is not None else [])])
    crop = lambda a: np.asarray(a)[box].T  # noqa: E731  (Y rows, X columns: imshow with origin lower)
    backgrounds = {"FLAIR": crop(flair), "T1ce": crop(t1ce)}
    truth_c = crop(truth) if truth is not None else None

    handles = [Line2D([], [], color=REGION_COLOURS[k][1], label=k.upper()) for k in REGION_COLOURS]
    handles.append(Line2D([], [], color="0.3", linestyle="-", label="prediction" if panels else "truth"))
    if truth is not None and panels:
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="truth (over a prediction)"))
    legend_cols = len(handles) if len(columns) >= 3 else 2
    top, bottom = 0.75 if title else 0.4, 0.1 + 0.17 * -(-len(handles) // legend_cols)  # inches
    height = PANEL_INCHES * len(FIGURE_ROWS) + top + bottom
    fig = Figure(figsize=(PANEL_INCHES * len(columns), height), dpi=FIGURE_DPI)
    axes = fig.subplots(len(FIGURE_ROWS), len(columns), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - top / height, bottom=bottom / height, wspace=0.04, hspace=0.04)
    for r, (modality, regions) in enumerate(FIGURE_ROWS):
        image = backgrounds[modality]
        lo, hi = _grey_limits(image)
        for c, (name, pred) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            layers = [(truth_c, "-")] if pred is None else [(crop(pred), "-")] + (
                [(truth_c, "--")] if truth_c is not None else [])
            for label, style in layers:
                for region in regions:
                    values, colour = REGION_COLOURS[region]
                    mask = np.isin(label, values)
                    if mask.any() and not mask.all():
                        ax.contour(mask.astype(np.uint8), levels=[0.5], colors=[colour], linestyles=style,
                                   linewidths=1.3 if style == "-" else 0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.text(0.03, 0.97, modality, transform=ax.transAxes, color="white", va="top", fontsize=8)
            if r == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=7, frameon=False)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=FIGURE_DPI))
    return [name for name, _ in columns]
