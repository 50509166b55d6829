"""Read one BraTS case from NIfTI into arrays, checked; write label maps back.

The one reader of NIfTI input: `brats.prepare` (the training cache), `pipeline.predict` and
`brats.evaluate` (prediction and truth files) all go through `read_volume`, `load_label`,
`align_to_grid` and `load_case`, so a file one of them accepts the others accept the same way,
and a file one rejects the others reject with the same `DataError` message (naming the case, the
file, what is wrong).

Checks: readable and fully decodable; 3D (a trailing axis of size 1 is dropped); finite image
values; labels integer and in {0, 1, 2, 4}; every file on the grid of the reference file (the
flair of a case, the truth in evaluation). A file whose affine differs from the reference's only
by voxel axis order and flips (saved RAS by another tool, say) is reoriented onto the reference
grid with nibabel's orientation tools; any other difference of shape or affine is an error naming
both files. A modality constant inside the brain (the non-zero region of the union of the four
modalities) is an error unless `allow_constant_modality`: an all-zero or flat modality is almost
always a failed conversion, and a network would silently be fed a channel it never saw.

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
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt2axcodes, ornt_transform

from brats.labels import BRATS_VALUES, msd_to_brats
from brats.layout import MODALITIES, CaseRef, DataError, missing_label_message, warn
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
    constant: tuple[str, ...] = ()  # modalities constant inside the brain (only when allowed)


@dataclass
class LabelMap:
    path: Path
    label: np.ndarray  # (X, Y, Z) uint8, BraTS values 0/1/2/4
    affine: np.ndarray  # (4, 4) float64
    spacing: tuple[float, float, float]  # mm, from the header


def load_case(ref: CaseRef, allow_constant_modality: bool = False) -> LoadedCase:
    """Load and check one case; any problem is a `DataError` naming the case and the file.

    image (4, X, Y, Z) float32 on the flair's grid (other files reoriented onto it when they differ
    only by axis order, see `align_to_grid`); label (X, Y, Z) uint8 when `ref.has_label`. A modality
    constant inside the brain raises, or with `allow_constant_modality` warns and is kept (listed
    in `LoadedCase.constant`).
    """
    if ref.layout == "msd":
        return _load_msd(ref, allow_constant_modality)
    for key in MODALITIES:
        if key not in ref.files or not Path(ref.files[key]).is_file():
            path = ref.files.get(key, f"<case>_{key}.nii.gz")
            unknown = f"; unrecognised NIfTI in the folder: {', '.join(p.name for p in ref.extra)}" if ref.extra else ""
            raise DataError(f"case {ref.case}: missing {key} modality (expected {path}{unknown})")
    channels, affine, header = [], None, None
    first = Path(ref.files[MODALITIES[0]])
    for key in MODALITIES:
        path = Path(ref.files[key])
        img, data = read_volume(path, ref.case)
        if affine is None:
            affine, header = img.affine.astype(np.float64), img.header.copy()
        else:
            data = align_to_grid(data, img.affine, path, channels[0].shape, affine, first, ref.case)
        channels.append(_to_float32(data, ref.case, path))
    image = np.stack(channels)
    sources = [str(ref.files[key]) for key in MODALITIES]
    constant = check_modalities(image, sources, ref.case, allow_constant_modality)
    label = None
    if ref.has_label:
        if ref.label_problem:
            raise DataError(ref.label_problem)
        path = Path(ref.files.get("seg", ""))
        if "seg" not in ref.files or not path.is_file():
            raise DataError(missing_label_message(ref))
        found = load_label(path, ref.case)
        label = align_to_grid(found.label, found.affine, path, image.shape[1:], affine, first, ref.case)
    return LoadedCase(ref.case, ref.grade, image, label, affine, _spacing(header), header, constant)


def _load_msd(ref: CaseRef, allow_constant_modality: bool = False) -> LoadedCase:
    path = Path(ref.files["image4d"])
    if not path.is_file():
        raise DataError(f"case {ref.case}: missing 4D image {path}")
    img, data = _read(ref.case, path)
    if data.ndim != 4 or data.shape[3] != 4:
        raise DataError(f"case {ref.case}: {path}: expected a 4D image (X,Y,Z,4), got shape {data.shape}")
    # Decathlon channel order FLAIR, T1w, T1gd, T2w == flair, t1, t1ce, t2
    image = np.stack([_to_float32(data[..., c], ref.case, path) for c in range(4)])
    sources = [f"{path} (channel {c})" for c in range(4)]
    constant = check_modalities(image, sources, ref.case, allow_constant_modality)
    affine, header = img.affine.astype(np.float64), img.header.copy()
    label = None
    if ref.has_label:
        lpath = Path(ref.files.get("label", ""))
        if not lpath.is_file():
            raise DataError(f"case {ref.case}: missing label {lpath}")
        limg, ldata = read_volume(lpath, ref.case)
        ldata = align_to_grid(ldata, limg.affine, lpath, image.shape[1:], affine, path, ref.case)
        _check_integer(ldata, ref.case, lpath)
        label = msd_to_brats(ldata, name=f"case {ref.case}: {lpath}")
    return LoadedCase(ref.case, ref.grade, image, label, affine, _spacing(header), header, constant)


def check_modalities(image: np.ndarray, sources: list[str], case: str, allow_constant: bool = False) -> tuple[str, ...]:
    """Modalities of `image` (4, X, Y, Z) that are constant inside the brain; raises unless allowed.

    The brain is the non-zero region of the union of the four modalities (what `brats.prepare`
    crops to); a modality whose values there have max == min (all zero, say) is constant.
    `sources[c]` names the file of channel c. No brain at all (all four zero) is always an error.
    """
    brain = np.any(image != 0, axis=0)  # (X, Y, Z)
    if not brain.any():
        raise DataError(f"case {case}: all modalities are zero ({', '.join(sources)}); "
                        "the files are empty or failed to convert: replace them")
    voxels = int(brain.sum())
    constant = []
    for c, key in enumerate(MODALITIES):
        lo = image[c].min(where=brain, initial=np.inf)  # no copy of the brain voxels
        hi = image[c].max(where=brain, initial=-np.inf)
        if lo != hi:
            continue
        problem = (f"case {case}: {sources[c]}: {key} is constant ({float(lo):g}) over the {voxels} brain voxels "
                   "(non-zero in any modality)")
        if not allow_constant:
            raise DataError(f"{problem}; the file is likely empty or a failed conversion: replace it, or accept "
                            "it with allow_constant_modality (--allow-constant-modality, "
                            "data.allow_constant_modality=true)")
        warn(f"{problem}; used anyway (allow_constant_modality)")
        constant.append(key)
    return tuple(constant)


def read_volume(path: str | Path, case: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """(image, data (X, Y, Z) in its stored dtype) of a 3D NIfTI; a trailing axis of size 1 is
    dropped. Unreadable or truncated files and other shapes are a `DataError` naming the file."""
    path = Path(path)
    img, data = _read(case, path)
    return img, _as_3d(case, path, data)


def load_label(path: str | Path, case: str) -> LabelMap:
    """A checked BraTS label file: (X, Y, Z) uint8 with values in {0, 1, 2, 4}, its affine and
    spacing. The one label reader of prepare, predict and evaluate: same checks, same messages."""
    path = Path(path)
    img, data = read_volume(path, case)
    return LabelMap(path, check_label(data, case, path), img.affine.astype(np.float64), _spacing(img.header))


def align_to_grid(data: np.ndarray, affine: np.ndarray, path: str | Path, ref_shape: tuple, ref_affine: np.ndarray,
                  ref_path: str | Path, case: str) -> np.ndarray:
    """`data` (X, Y, Z) of `path` on the grid of `ref_path` (shape `ref_shape`, `ref_affine`).

    Same shape and affines equal within AFFINE_ATOL mm: `data` as is. Affines that differ only by
    voxel axis order and flips (nibabel `io_orientation`): `data` permuted and flipped onto the
    reference grid, and the moved affine checked against the reference again. Anything else (a
    shift, another spacing, an oblique grid, another shape): `DataError` naming both files; the
    file then needs resampling onto the reference grid, which this reader never does silently.
    """
    shape, ref_shape = tuple(data.shape), tuple(ref_shape)
    affine, ref_affine = np.asarray(affine, np.float64), np.asarray(ref_affine, np.float64)
    if shape == ref_shape and np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        return data
    try:
        ornt, ref_ornt = io_orientation(affine), io_orientation(ref_affine)
        transform = None if np.array_equal(ornt, ref_ornt) else ornt_transform(ornt, ref_ornt)
    except ValueError:  # a degenerate affine has no orientation: report it as an affine mismatch
        transform = None
    if transform is not None:
        moved = apply_orientation(data, transform)
        moved_affine = affine @ inv_ornt_aff(transform, shape)
        if moved.shape == ref_shape and np.allclose(moved_affine, ref_affine, atol=AFFINE_ATOL):
            return np.ascontiguousarray(moved)
        axes = f"voxel axes {''.join(ornt2axcodes(ornt))} vs {''.join(ornt2axcodes(ref_ornt))}"
        if moved.shape != ref_shape:
            raise DataError(f"case {case}: {path}: shape {shape} ({axes}) does not match {ref_path} {ref_shape} "
                            "even after reorienting; resample it onto the reference grid")
        raise DataError(f"case {case}: {path}: affine differs from {ref_path} even after reorienting ({axes}; "
                        f"max difference {np.abs(moved_affine - ref_affine).max():.4g}); resample it onto the "
                        "reference grid")
    if shape != ref_shape:
        raise DataError(f"case {case}: {path}: shape {shape} differs from {ref_path} {ref_shape}")
    raise DataError(f"case {case}: {path}: affine differs from {ref_path} "
                    f"(max difference {np.abs(affine - ref_affine).max():.4g}); resample it onto the reference grid")


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
