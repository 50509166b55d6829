"""Torch views of the cache: random training crops and whole validation cases.

Randomness of item i in epoch e comes from `np.random.default_rng((seed, e, i))`, so a crop does
not depend on which worker draws it or on what was drawn before: a resumed run sees the same
crops. Call `set_epoch(e)` before building each epoch's DataLoader iterator (workers copy the
dataset when the iterator starts; with `persistent_workers` they would keep the old epoch).
"""
from __future__ import annotations

import zlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brats.cache import Cache, CaseMeta
from brats.layout import DataError

MAX_FG_VOXELS = 20000  # tumour voxel positions kept per case to draw fg centres from


def crop_window(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Window (..., *size) of `volume` (..., X, Y, Z) at `start` (may lie partly outside: zeros)."""
    spatial = volume.shape[-3:]
    out = np.zeros(volume.shape[:-3] + tuple(size), dtype=volume.dtype)
    src, dst = [], []
    for s, st, c in zip(spatial, start, size):
        a, b = max(st, 0), min(st + c, s)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    out[(..., *dst)] = volume[(..., *src)]
    return out


class CropDataset(Dataset):
    """Random crops of cached, labelled cases.

    Item i: case `case_ids[i % n]`; with probability `fg_ratio` the crop is centred on a random
    tumour voxel (the window may then reach past the volume: zero padded), otherwise it is uniform
    inside the volume (zero padded along axes shorter than the crop).
    Returns {"image": float32 (4, *crop), "label": int64 (*crop) BraTS values, "case": str}.
    """

    def __init__(self, cache: Cache, case_ids: Sequence[str], crop: Sequence[int] = (128, 128, 128),
                 fg_ratio: float = 0.33, samples: int | None = None, seed: int = 0):
        if not case_ids:
            raise DataError("CropDataset needs at least one case")
        unlabelled = [c for c in case_ids if not cache.meta(c).has_label]
        if unlabelled:
            raise DataError(f"training crops need labels; unlabelled case(s): {', '.join(unlabelled[:10])}")
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop must be 3 positive sizes, got {crop}")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.crop = tuple(int(c) for c in crop)
        self.fg_ratio = float(fg_ratio)
        self.samples = len(self.case_ids) if samples is None else int(samples)
        self.seed = int(seed)
        self.epoch = 0
        self._fg: dict[str, np.ndarray] = {}  # case -> flat indices of tumour voxels (subsampled)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples

    def _foreground(self, case: str, label: np.ndarray) -> np.ndarray:
        if case not in self._fg:
            idx = np.flatnonzero(np.asarray(label) > 0)
            if idx.size > MAX_FG_VOXELS:  # evenly thinned, deterministic
                idx = idx[:: -(-idx.size // MAX_FG_VOXELS)]
            self._fg[case] = idx.astype(np.int64)
        return self._fg[case]

    def crop_start(self, case: str, rng: np.random.Generator) -> tuple[int, ...]:
        """Start corner of the next window for `case` (may be negative / past the end)."""
        meta: CaseMeta = self.cache.meta(case)
        shape = meta.shape
        label = self.cache.label(case)
        if rng.random() < self.fg_ratio:
            fg = self._foreground(case, label)
            if fg.size:
                centre = np.unravel_index(fg[rng.integers(fg.size)], shape)
                return tuple(int(v) - c // 2 for v, c in zip(centre, self.crop))
        start = []
        for s, c in zip(shape, self.crop):
            if s >= c:
                start.append(int(rng.integers(0, s - c + 1)))
            else:  # shorter than the crop: the whole axis, at a random place in the window
                start.append(-int(rng.integers(0, c - s + 1)))
        return tuple(start)

    def __getitem__(self, index: int) -> dict:
        case = self.case_ids[index % len(self.case_ids)]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        start = self.crop_start(case, rng)
        image = crop_window(self.cache.image(case), start, self.crop)
        label = crop_window(self.cache.label(case), start, self.crop)
        return {
            "image": torch.from_numpy(image.astype(np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case": case,
        }


class ValCase(NamedTuple):
    case: str
    image: torch.Tensor  # float32 (4, d, h, w), cropped grid
    label: torch.Tensor | None  # int64 (d, h, w) BraTS values
    meta: CaseMeta  # bbox / full_shape to map back with `brats.cache.uncrop`


def iter_cases(cache: Cache, case_ids: Sequence[str]) -> Iterator[ValCase]:
    """Whole cases, one at a time, for sliding-window validation or prediction."""
    for case in case_ids:
        meta = cache.meta(case)
        image = torch.from_numpy(np.asarray(cache.image(case), dtype=np.float32))
        label = cache.label(case)
        label_t = None if label is None else torch.from_numpy(np.asarray(label).astype(np.int64))
        yield ValCase(case, image, label_t, meta)


REGION_CENTRES = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}  # BraTS labels inside each evaluated region


def region_centred_crops(cache: Cache, case_ids: Sequence[str], crop: Sequence[int], seed: int = 0) -> list[dict]:
    """One crop per case and region (WT, TC, ET) present in it, centred on a random voxel of that
    region: calibration crops in which every region, ET included, is in view.

    Returns items like `CropDataset`'s ({"image": (4, *crop), "label": (*crop), "case", "region"}),
    case by case, regions in WT, TC, ET order; a case without ET gives two crops. Seeded per case.
    """
    crop = tuple(int(c) for c in crop)
    items = []
    for case in case_ids:
        label = cache.label(case)
        if label is None:
            continue
        label = np.asarray(label)
        rng = np.random.default_rng((seed, zlib.crc32(case.encode())))
        image = cache.image(case)
        for region, values in REGION_CENTRES.items():
            idx = np.flatnonzero(np.isin(label, values))
            if not idx.size:
                continue
            centre = np.unravel_index(idx[rng.integers(idx.size)], label.shape)
            start = tuple(int(v) - c // 2 for v, c in zip(centre, crop))
            items.append({"image": torch.from_numpy(crop_window(image, start, crop).astype(np.float32)),
                          "label": torch.from_numpy(crop_window(label, start, crop).astype(np.int64)),
                          "case": case, "region": region})
    return items
