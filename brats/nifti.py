"""Read one BraTS case from NIfTI into arrays, checked; write label maps back.

Images are decoded straight to float32 (never through nibabel's float64 `get_fdata`): a
240x240x155x4 case is 143 MB in float32 and would be twice that in float64.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats.labels import BRATS_VALUES, msd_to_brats
from brats.layout import MODALITIES, CaseRef, DataError
from common.atomic import atomic_write

AFFINE_ATOL = 1e-3
_READ_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError, MemoryError)


@dataclass
class LoadedCase:
    case: str
    grade: str | None
    image: np.ndarray  # (4, X, Y, Z) float32, channels flair, t1, t1ce, t2
    label: np.ndarray | None  # (X, Y, Z) uint8, BraTS values 0/1/2/4
    affine: np.ndarray  # (4, 4) float64
    spacing: tuple[float, float, float]  # mm
    header: nib.Nifti1Header  # of the flair (or 4D) image, to write predictions alike


def load_case(ref: CaseRef) -> LoadedCase:
    """Load and check one case; any problem is a `DataError` naming the case and the file."""
    if ref.layout == "msd":
        return _load_msd(ref)
    for key in MODALITIES:
        if key not in ref.files or not Path(ref.files[key]).is_file():
            path = ref.files.get(key, f"<case>_{key}.nii.gz")
            raise DataError(f"case {ref.case}: missing {key} modality (expected {path})")
    channels, affine, header = [], None, None
    first = ref.files[MODALITIES[0]]
    for key in MODALITIES:
        path = Path(ref.files[key])
        img, data = _read(ref.case, path)
        data = _as_3d(ref.case, path, data)
        if affine is None:
            affine, header = img.affine.astype(np.float64), img.header.copy()
        else:
            _check_grid(ref.case, path, data.shape, img.affine, first, channels[0].shape, affine)
        channels.append(_to_float32(data, ref.case, path))
    label = None
    if ref.has_label:
        path = Path(ref.files.get("seg", ""))
        if "seg" not in ref.files or not path.is_file():
            raise DataError(f"case {ref.case}: missing seg (expected {ref.files.get('seg')})")
        img, data = _read(ref.case, path)
        data = _as_3d(ref.case, path, data)
        _check_grid(ref.case, path, data.shape, img.affine, first, channels[0].shape, affine)
        label = check_label(data, ref.case, path)
    image = np.stack(channels)
    return LoadedCase(ref.case, ref.grade, image, label, affine, _spacing(header), header)


def _load_msd(ref: CaseRef) -> LoadedCase:
    path = Path(ref.files["image4d"])
    if not path.is_file():
        raise DataError(f"case {ref.case}: missing 4D image {path}")
    img, data = _read(ref.case, path)
    if data.ndim != 4 or data.shape[3] != 4:
        raise DataError(f"case {ref.case}: {path}: expected a 4D image (X,Y,Z,4), got shape {data.shape}")
    # Decathlon channel order FLAIR, T1w, T1gd, T2w == flair, t1, t1ce, t2
    image = np.stack([_to_float32(data[..., c], ref.case, path) for c in range(4)])
    affine, header = img.affine.astype(np.float64), img.header.copy()
    label = None
    if ref.has_label:
        lpath = Path(ref.files.get("label", ""))
        if not lpath.is_file():
            raise DataError(f"case {ref.case}: missing label {lpath}")
        limg, ldata = _read(ref.case, lpath)
        ldata = _as_3d(ref.case, lpath, ldata)
        _check_grid(ref.case, lpath, ldata.shape, limg.affine, path, image.shape[1:], affine)
        _check_integer(ldata, ref.case, lpath)
        label = msd_to_brats(ldata, name=f"case {ref.case}: {lpath}")
    return LoadedCase(ref.case, ref.grade, image, label, affine, _spacing(header), header)


def check_label(data: np.ndarray, case: str, path: Path | str) -> np.ndarray:
    """BraTS label array -> uint8, or `DataError` listing non-integer or out-of-set values."""
    _check_integer(data, case, path)
    values = np.unique(data)
    bad = [v for v in values.tolist() if v not in BRATS_VALUES]
    if bad:
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DataError(f"case {case}: {path}: label values [{shown}] outside {{0, 1, 2, 4}}")
    return data.astype(np.uint8)


def _check_integer(data: np.ndarray, case: str, path: Path | str) -> None:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise DataError(f"case {case}: {path}: labels are not integers (dtype {data.dtype})")


def _read(case: str, path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Open and fully decode `path`; truncated or corrupt files become a `DataError`."""
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        if nib.is_proxy(proxy) and (slope != 1.0 or inter != 0.0):
            # apply the scaling ourselves in float32 (nibabel would promote to float64)
            raw = np.asanyarray(proxy.get_unscaled())
            data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
        else:
            data = np.asanyarray(proxy)
    except _READ_ERRORS as e:
        raise DataError(f"case {case}: {path}: unreadable or truncated NIfTI ({type(e).__name__}: {e})") from None
    return img, data


def _as_3d(case: str, path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"case {case}: {path}: expected a 3D volume, got shape {data.shape}")
    return data


def _to_float32(data: np.ndarray, case: str, path: Path) -> np.ndarray:
    out = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise DataError(f"case {case}: {path}: image holds NaN or infinite values")
    return out


def _check_grid(case: str, path: Path, shape: tuple, affine: np.ndarray, ref_path: Path | str,
                ref_shape: tuple, ref_affine: np.ndarray) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"case {case}: {path}: shape {tuple(shape)} differs from {Path(ref_path).name} {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        raise DataError(
            f"case {case}: {path}: affine differs from {Path(ref_path).name} "
            f"(max difference {np.abs(affine - ref_affine).max():.4g})"
        )


def _spacing(header: nib.Nifti1Header) -> tuple[float, float, float]:
    zooms = header.get_zooms()
    return tuple(float(z) for z in zooms[:3])  # type: ignore[return-value]


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> Path:
    """Write `data` as NIfTI atomically; `.nii.gz` is gzipped with mtime 0 (same bytes each run)."""
    path = Path(path)
    if header is not None:
        header = header.copy()
        header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header)
    if header is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)  # our data is stored unscaled
    raw = img.to_bytes()

    def writer(tmp: Path) -> None:
        if path.name.endswith(".gz"):
            tmp.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
        else:
            tmp.write_bytes(raw)

    return atomic_write(path, writer)


def save_label_map(path: str | Path, label: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> Path:
    """Write a uint8 BraTS label map with the input case's affine and header, atomically."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label map must be 3D, got shape {label.shape}")
    return write_nifti(path, label.astype(np.uint8, copy=False), np.asarray(affine, dtype=np.float64), header)
