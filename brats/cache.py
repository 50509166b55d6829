"""Read side of the preprocessing cache written by `brats.prepare`.

Layout of a cache folder:

    manifest.json          written last, atomically; the only thing that makes a case trusted
    .lock                  held (flock) by the one prepare writing the cache
    cases/<case>.<token>.image.npy   float16 (4, d, h, w), z-scored, cropped to the brain bbox
    cases/<case>.<token>.label.npy   uint8 (d, h, w) BraTS values (labelled cases only)

`token` hashes the source files' sizes and mtimes, so a rebuilt case never overwrites the files an
older manifest still points at.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brats.layout import DataError

MANIFEST = "manifest.json"
LOCK = ".lock"
CACHE_VERSION = 2  # 2: cases checked for constant modalities and alternative label names (issue #11)


@dataclass
class CaseMeta:
    case: str
    grade: str | None
    layout: str
    full_shape: tuple[int, int, int]  # source grid (X, Y, Z)
    bbox: tuple[tuple[int, int], ...]  # ((x0, x1), (y0, y1), (z0, z1)), end exclusive
    affine: list[list[float]]  # source 4x4
    spacing: tuple[float, float, float]
    has_label: bool
    sources: dict[str, dict] = field(default_factory=dict)  # key -> {"path", "size", "mtime_ns"}
    image_file: str = ""  # relative to the cache folder
    label_file: str | None = None
    constant: tuple[str, ...] = ()  # modalities constant inside the brain, kept by allow_constant_modality

    @property
    def shape(self) -> tuple[int, int, int]:
        """Cropped grid (d, h, w)."""
        return tuple(b - a for a, b in self.bbox)  # type: ignore[return-value]

    def source_path(self, key: str) -> Path:
        """Original file for `key` (flair, t1, t1ce, t2, seg, or image4d/label for msd)."""
        return Path(self.sources[key]["path"])

    def to_json(self) -> dict:
        return {
            "case": self.case,
            "grade": self.grade,
            "layout": self.layout,
            "full_shape": list(self.full_shape),
            "bbox": [list(b) for b in self.bbox],
            "affine": [list(map(float, row)) for row in self.affine],
            "spacing": list(self.spacing),
            "has_label": self.has_label,
            "sources": self.sources,
            "image_file": self.image_file,
            "label_file": self.label_file,
            "constant": list(self.constant),
        }

    @classmethod
    def from_json(cls, d: dict) -> "CaseMeta":
        return cls(
            case=d["case"],
            grade=d["grade"],
            layout=d["layout"],
            full_shape=tuple(int(v) for v in d["full_shape"]),
            bbox=tuple((int(a), int(b)) for a, b in d["bbox"]),
            affine=[list(map(float, row)) for row in d["affine"]],
            spacing=tuple(float(v) for v in d["spacing"]),
            has_label=bool(d["has_label"]),
            sources=d.get("sources", {}),
            image_file=d["image_file"],
            label_file=d.get("label_file"),
            constant=tuple(d.get("constant", ())),
        )


class Cache:
    """Opened cache: metadata in memory, arrays memory-mapped on demand."""

    def __init__(self, root: Path, cases: list[CaseMeta], bad: dict[str, str] | None = None,
                 source: str | None = None):
        self.root = Path(root)
        self.cases = cases
        self.bad = dict(bad or {})  # case -> error, from the last prepare
        self.source = source
        self._by_name = {m.case: m for m in cases}

    def __len__(self) -> int:
        return len(self.cases)

    def __contains__(self, case: str) -> bool:
        return case in self._by_name

    def meta(self, case: str) -> CaseMeta:
        try:
            return self._by_name[case]
        except KeyError:
            raise DataError(f"case {case} is not in the cache {self.root}") from None

    def image(self, case: str) -> np.ndarray:
        """Memory-mapped float16 (4, d, h, w)."""
        return self._load(self.meta(case).image_file, case)

    def label(self, case: str) -> np.ndarray | None:
        """Memory-mapped uint8 (d, h, w) BraTS values, or None for an unlabelled case."""
        meta = self.meta(case)
        return None if meta.label_file is None else self._load(meta.label_file, case)

    def labelled(self) -> list[str]:
        return [m.case for m in self.cases if m.has_label]

    def grades(self, case_ids: list[str] | None = None) -> list[tuple[str, str | None]]:
        """(case, grade) pairs, the input `brats.splits` wants."""
        ids = self.labelled() if case_ids is None else case_ids
        return [(c, self.meta(c).grade) for c in ids]

    def _load(self, name: str, case: str) -> np.ndarray:
        path = self.root / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"case {case}: cached array {path} unreadable ({e}); rerun brats.prepare") from None


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The parsed manifest, or None when absent, unreadable, or of another cache version."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return None
    return data


def open_cache(cache_dir: str | Path) -> Cache:
    cache_dir = Path(cache_dir)
    data = read_manifest(cache_dir)
    if data is None:
        raise DataError(
            f"no usable {MANIFEST} in {cache_dir}; build the cache with `python -m brats.prepare DATA --out {cache_dir}`"
        )
    cases = [CaseMeta.from_json(d) for d in data["cases"].values()]
    return Cache(cache_dir, cases, bad=data.get("bad", {}), source=data.get("source"))


def uncrop(array, meta: CaseMeta):
    """Put a cropped (..., d, h, w) array back on the full grid (..., X, Y, Z), zeros outside."""
    (x0, x1), (y0, y1), (z0, z1) = meta.bbox
    if tuple(array.shape[-3:]) != meta.shape:
        raise ValueError(f"case {meta.case}: array shape {tuple(array.shape)} does not end in the crop {meta.shape}")
    shape = tuple(array.shape[:-3]) + tuple(meta.full_shape)
    if isinstance(array, torch.Tensor):
        out = torch.zeros(shape, dtype=array.dtype, device=array.device)
    else:
        out = np.zeros(shape, dtype=array.dtype)
    out[..., x0:x1, y0:y1, z0:z1] = array
    return out
