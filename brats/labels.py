"""BraTS label values <-> network targets and back.

BraTS 2017 values: 0 background, 1 NCR/NET, 2 edema (ED), 4 enhancing tumour (ET); no 3.

Schemes:
    regions  (default) 3 overlapping sigmoid channels in SegFormer3D's order [TC, WT, ET]:
             TC = {1, 4}, WT = {1, 2, 4}, ET = {4}.
    seed3    3 softmax classes: 0 background, 1 tumour core = NCR/NET + ET (labels 1, 4),
             2 edema (label 2). It cannot express ET: mapped back, the core becomes label 1, so ET
             scores from a seed3 model are 0 wherever the reference has ET (never folded into edema).

`to_target` and `probs_to_brats` accept numpy arrays or torch tensors and return the same kind.
They trust their input to hold only BraTS values (`brats.nifti.load_case` checks that).
"""
from __future__ import annotations

import numpy as np
import torch

from brats.layout import DataError

REGIONS = ("tc", "wt", "et")  # channel order of the regions scheme
SCHEMES = ("regions", "seed3")
BRATS_VALUES = (0, 1, 2, 4)
SEED3_CLASSES = ("background", "core", "edema")

# Decathlon Task01 labels: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour
_MSD_TO_BRATS = {0: 0, 1: 2, 2: 1, 3: 4}

Array = np.ndarray | torch.Tensor


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def num_outputs(scheme: str) -> int:
    """Network output channels for `scheme` (3 for both)."""
    _check_scheme(scheme)
    return 3


def is_softmax(scheme: str) -> bool:
    """True when the outputs are mutually exclusive classes (softmax), False for sigmoid regions."""
    _check_scheme(scheme)
    return scheme == "seed3"


def region_masks(label: Array) -> tuple[Array, Array, Array]:
    """Boolean (tc, wt, et) masks of a BraTS label map, same shape as `label`."""
    tc = (label == 1) | (label == 4)
    wt = tc | (label == 2)
    et = label == 4
    return tc, wt, et


def to_target(label: Array, scheme: str) -> Array:
    """Training target from BraTS labels (..., D, H, W) of any integer dtype.

    regions: float32 (..., 3, D, H, W), channels [TC, WT, ET] inserted before the spatial dims.
    seed3:   int64 class index, same shape as `label` (0 bg, 1 core = {1, 4}, 2 edema = {2}).
    """
    _check_scheme(scheme)
    if scheme == "regions":
        tc, wt, et = region_masks(label)
        if isinstance(label, torch.Tensor):
            return torch.stack((tc, wt, et), dim=-4).to(torch.float32)
        return np.stack((tc, wt, et), axis=-4).astype(np.float32)
    tc, _, _ = region_masks(label)
    if isinstance(label, torch.Tensor):
        out = torch.zeros(label.shape, dtype=torch.int64, device=label.device)
    else:
        out = np.zeros(label.shape, dtype=np.int64)
    out[tc] = 1
    out[label == 2] = 2  # explicit: ET (4) is core, never edema
    return out


def probs_to_brats(probs: Array, scheme: str, threshold: float = 0.5) -> Array:
    """BraTS label map (uint8, values 0/1/2/4) from network outputs (..., K, D, H, W).

    regions: `probs` are sigmoid probabilities [TC, WT, ET]. Nesting rule (union): a voxel over
    the threshold in an inner region counts in every outer one, so ET -> 4; else TC -> 1;
    else WT -> 2; else 0. The output regions then satisfy ET <= TC <= WT.
    seed3: argmax over classes (probabilities or logits alike); class 1 -> 1, class 2 -> 2.
    """
    _check_scheme(scheme)
    is_torch = isinstance(probs, torch.Tensor)
    if probs.shape[-4] != 3:
        raise ValueError(f"expected 3 channels at dim -4, got shape {tuple(probs.shape)}")
    if scheme == "seed3":
        cls = probs.argmax(dim=-4) if is_torch else probs.argmax(axis=-4)
        return cls.to(torch.uint8) if is_torch else cls.astype(np.uint8)
    tc, wt, et = (probs[..., i, :, :, :] > threshold for i in range(3))
    out = wt.to(torch.uint8) * 2 if is_torch else wt.astype(np.uint8) * np.uint8(2)
    out[tc] = 1
    out[et] = 4
    return out


def msd_to_brats(label: np.ndarray, name: str = "label") -> np.ndarray:
    """Decathlon Task01 labels (1 edema, 2 non-enhancing, 3 enhancing) -> BraTS (2, 1, 4), uint8.

    Any other value is a `DataError` naming `name` and the bad values.
    """
    values = np.unique(label)
    bad = [v for v in values.tolist() if v not in _MSD_TO_BRATS]
    if bad:
        raise DataError(f"{name}: Decathlon label values {bad} outside {{0, 1, 2, 3}}")
    lut = np.zeros(4, dtype=np.uint8)
    for src, dst in _MSD_TO_BRATS.items():
        lut[src] = dst
    return lut[np.asarray(label).astype(np.intp)]


def suppress_small_et(label: np.ndarray, min_voxels: int) -> np.ndarray:
    """Relabel a case's ET (4) as NCR/NET (1) when fewer than `min_voxels` voxels are ET.

    The usual BraTS post-processing: many LGG cases have no enhancing tumour, and a handful of
    false-positive ET voxels there costs Dice 0 and the maximal HD95 for the whole case. The tumour
    core is unchanged (ET and NCR are both in TC). `min_voxels <= 0` leaves the label as it is.
    """
    if min_voxels <= 0:
        return label
    et = label == 4
    count = int(et.sum())
    if 0 < count < min_voxels:
        label = label.copy()
        label[et] = 1
    return label
