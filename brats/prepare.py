"""Build the preprocessing cache: crop to the brain, z-score, store memory-mappable arrays.

    python -m brats.prepare DATA --out CACHE [--skip-bad] [--allow-constant-modality]

Per case: crop all modalities (and the label) to the bounding box of voxels non-zero in any of
them, z-score each modality over its non-zero voxels (background stays 0), save float16 images and
uint8 labels. Unchanged cases (same source sizes and mtimes) are reused; changed ones are rebuilt.
Every bad case is reported, not just the first. Cases are read and checked by `brats.nifti.load_case`,
the reader prediction and evaluation use too; a modality constant inside the brain is a bad case
unless `allow_constant_modality` (then a warning, and the cache entry lists it under "constant").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats.cache import CACHE_VERSION, LOCK, MANIFEST, Cache, CaseMeta, open_cache, read_manifest
from brats.layout import CaseRef, DataError, discover_cases, warn
from brats.nifti import LoadedCase, load_case
from common.atomic import atomic_path, atomic_write_text, exclusive_lock
from common.paths import nearest_existing
from common.progress import bar_off

CASES_DIR = "cases"


class PrepareError(DataError):
    """One or more bad cases; `bad` maps case -> message."""

    def __init__(self, bad: dict[str, str], data_dir: Path):
        self.bad = bad
        lines = "\n".join(f"  {msg}" for msg in bad.values())
        super().__init__(
            f"{len(bad)} bad case(s) in {data_dir}:\n{lines}\n"
            "fix them, or skip them: --set data.skip_bad=true (python -m brats.prepare: --skip-bad)"
        )


@dataclass
class PrepareReport:
    cache_dir: Path
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # case -> message naming case and file


def brain_bbox(image: np.ndarray, label: np.ndarray | None = None) -> tuple[tuple[int, int], ...]:
    """Bounding box ((x0, x1), ...) end exclusive of voxels non-zero in any channel (or the label)."""
    mask = np.any(image != 0, axis=0)
    if label is not None:
        mask |= label != 0
    if not mask.any():
        raise ValueError("all modalities are zero")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def zscore(image: np.ndarray) -> np.ndarray:
    """Per channel (C, ...): (x - mean) / std over the channel's non-zero voxels; zeros stay 0."""
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        brain = image[c] != 0
        if not brain.any():
            continue
        values = image[c][brain]
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        out[c][brain] = (values - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
    return out


def source_stamps(ref: CaseRef) -> dict[str, dict]:
    stamps = {}
    for key, path in sorted(ref.files.items()):
        path = Path(path)
        try:
            st = path.stat()
            stamps[key] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            stamps[key] = {"path": str(path), "size": None, "mtime_ns": None}
    return stamps


def preprocess_case(loaded: LoadedCase) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """(image float16 (4,d,h,w), label uint8 (d,h,w) or None, bbox) for one loaded case."""
    try:
        bbox = brain_bbox(loaded.image, loaded.label)
    except ValueError as e:
        raise DataError(f"case {loaded.case}: {e}") from None
    sl = tuple(slice(a, b) for a, b in bbox)
    image = zscore(loaded.image[(slice(None), *sl)])
    if np.abs(image).max(initial=0.0) > 60000:
        raise DataError(f"case {loaded.case}: z-scored intensities exceed float16 range")
    label = None if loaded.label is None else np.ascontiguousarray(loaded.label[sl])
    return image.astype(np.float16), label, bbox


def _token(stamps: dict) -> str:
    blob = json.dumps([CACHE_VERSION, stamps], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _build(ref: CaseRef, stamps: dict, cache_dir: Path, allow_constant_modality: bool = False) -> CaseMeta:
    loaded = load_case(ref, allow_constant_modality)
    image, label, bbox = preprocess_case(loaded)
    token = _token(stamps)
    image_file = f"{CASES_DIR}/{ref.case}.{token}.image.npy"
    label_file = None if label is None else f"{CASES_DIR}/{ref.case}.{token}.label.npy"
    _save_npy(cache_dir / image_file, image)
    if label is not None:
        _save_npy(cache_dir / label_file, label)
    return CaseMeta(
        case=ref.case,
        grade=ref.grade,
        layout=ref.layout,
        full_shape=tuple(int(s) for s in loaded.image.shape[1:]),
        bbox=bbox,
        affine=loaded.affine.tolist(),
        spacing=loaded.spacing,
        has_label=label is not None,
        sources=stamps,
        image_file=image_file,
        label_file=label_file,
        constant=loaded.constant,
    )


def _reusable(old: dict | None, ref: CaseRef, stamps: dict, cache_dir: Path,
              allow_constant_modality: bool = False) -> CaseMeta | None:
    if old is None or old.get("sources") != stamps:
        return None
    if old.get("grade") != ref.grade or old.get("layout") != ref.layout:
        return None
    meta = CaseMeta.from_json(old)
    if meta.constant and not allow_constant_modality:
        return None  # cached while allowed: rebuild, so that the check reports it now
    if not (cache_dir / meta.image_file).is_file():
        return None
    if meta.has_label and (meta.label_file is None or not (cache_dir / meta.label_file).is_file()):
        return None
    return meta


def run_prepare(data_dir: str | Path, cache_dir: str | Path, progress: bool = True,
                allow_constant_modality: bool = False) -> PrepareReport:
    """Bring the cache up to date with `data_dir`; returns what was built, reused and bad.

    The manifest lists the good cases only (bad ones under "bad"), and is written last.
    `allow_constant_modality`: a modality constant inside the brain is a warning, not a bad case.
    One writer at a time: a second prepare (or training job) on the same cache waits for the
    first, then reuses what it built, so neither removes files the other is writing.
    """
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    refs = discover_cases(data_dir)
    if not _writable(cache_dir):  # a read-only data share: use an up-to-date cache as it is, or say what to do
        return _read_only(refs, data_dir, cache_dir, allow_constant_modality)
    with exclusive_lock(cache_dir / LOCK, on_wait=lambda: warn(f"waiting for another prepare of {cache_dir}")):
        return _update(refs, data_dir, cache_dir, progress, allow_constant_modality)


def _writable(folder: Path) -> bool:
    """Whether this process could create files in `folder` (or create it: its nearest existing parent)."""
    return os.access(nearest_existing(folder), os.W_OK | os.X_OK)


def _read_only(refs: list[CaseRef], data_dir: Path, cache_dir: Path, allow_constant_modality: bool) -> PrepareReport:
    """A cache this process cannot write: every case reused from its manifest, or DataError naming how many
    cases would need building and the setting that moves the cache to a writable folder. Nothing is written
    (no lock either: no process can write there)."""
    old = read_manifest(cache_dir) or {"cases": {}}
    stale = [ref.case for ref in refs
             if _reusable(old["cases"].get(ref.case), ref, source_stamps(ref), cache_dir, allow_constant_modality) is None]
    if stale:
        raise DataError(f"{cache_dir}: the preprocessing cache of {data_dir} cannot be written here (read-only) and "
                        f"{len(stale)} of {len(refs)} case(s) are not in it or changed since (e.g. {stale[0]}): "
                        "put the cache in a writable folder with --set data.cache=DIR")
    report = PrepareReport(cache_dir)
    report.reused = [ref.case for ref in refs]
    return report


def _update(refs: list[CaseRef], data_dir: Path, cache_dir: Path, progress: bool,
            allow_constant_modality: bool) -> PrepareReport:
    old = read_manifest(cache_dir) or {"cases": {}}
    report = PrepareReport(cache_dir)
    entries: dict[str, dict] = {}
    (cache_dir / CASES_DIR).mkdir(parents=True, exist_ok=True)
    for ref in tqdm(refs, desc="prepare", unit="case", disable=bar_off(progress), file=sys.stderr):
        stamps = source_stamps(ref)
        meta = _reusable(old["cases"].get(ref.case), ref, stamps, cache_dir, allow_constant_modality)
        if meta is not None:
            report.reused.append(ref.case)
            if meta.constant:
                warn(f"case {ref.case}: cached with constant {', '.join(meta.constant)} (allow_constant_modality)")
        else:
            try:
                meta = _build(ref, stamps, cache_dir, allow_constant_modality)
            except DataError as e:
                report.bad[ref.case] = str(e)
                continue
            report.built.append(ref.case)
        entries[ref.case] = meta.to_json()
    manifest = {
        "version": CACHE_VERSION,
        "source": str(data_dir.resolve()),
        "cases": entries,
        "bad": report.bad,
    }
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1))
    _remove_unreferenced(cache_dir, entries)
    return report


def _remove_unreferenced(cache_dir: Path, entries: dict[str, dict]) -> None:
    """Old arrays and temp files left by killed writers; safe only under the cache lock."""
    keep = {Path(e[k]).name for e in entries.values() for k in ("image_file", "label_file") if e.get(k)}
    for path in (cache_dir / CASES_DIR).iterdir():
        if path.name not in keep and path.suffix in (".npy", ".tmp"):
            try:
                path.unlink()
            except OSError:
                pass


def print_bad(bad: dict[str, str], file=None) -> None:
    file = file or sys.stderr
    if bad:
        print(f"{len(bad)} bad case(s):", file=file)
        for msg in bad.values():
            print(f"  {msg}", file=file)


def prepare(data_dir: str | Path, cache_dir: str | Path, skip_bad: bool = False, progress: bool = True,
            allow_constant_modality: bool = False) -> Cache:
    """Prepare (or refresh) the cache and open it. Bad cases raise `PrepareError` listing all of
    them, unless `skip_bad`, which prints them and goes on with the good ones.
    `allow_constant_modality`: see `run_prepare`."""
    report = run_prepare(data_dir, cache_dir, progress=progress, allow_constant_modality=allow_constant_modality)
    if report.bad:
        if not skip_bad:
            raise PrepareError(report.bad, Path(data_dir))
        print_bad(report.bad)
    return open_cache(cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brats.prepare",
        description="Crop, z-score and cache BraTS cases as memory-mappable arrays.",
    )
    parser.add_argument("data", help="BraTS folder (HGG/LGG, Brats17TrainingData, case folders, or MSD Task01)")
    parser.add_argument("--out", required=True, help="cache folder (manifest.json and cases/)")
    parser.add_argument("--skip-bad", action="store_true", help="go on with the good cases when some are bad")
    parser.add_argument("--allow-constant-modality", action="store_true",
                        help="keep a case whose modality is constant (e.g. all zero) inside the brain, with a "
                             "warning (default: a bad case)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = run_prepare(args.data, args.out, progress=not args.quiet,
                             allow_constant_modality=args.allow_constant_modality)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    good = len(report.built) + len(report.reused)
    print(f"{good} case(s) in {args.out}: {len(report.built)} built, {len(report.reused)} reused, {len(report.bad)} bad")
    print_bad(report.bad)
    if report.bad and not args.skip_bad:
        print("error: bad cases (above); pass --skip-bad to use the good cases only", file=sys.stderr)
        return 2  # bad input, as every other command says it
    return 0


if __name__ == "__main__":
    sys.exit(main())
