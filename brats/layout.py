"""Find BraTS cases on disk, whatever folder the user points at.

Layouts recognised (the `layout` field of each `CaseRef`):

    grades               DIR/HGG/<case>/, DIR/LGG/<case>/ (grade kept per case)
    brats17-training     DIR/Brats17TrainingData/{HGG,LGG}/<case>/
    brats17-validation   DIR/Brats17ValidationData/<case>/ (no seg)
    flat                 DIR/<case>/ (seg optional; grade None)
    case                 DIR itself is one case folder
    msd                  Medical Segmentation Decathlon Task01: DIR/imagesTr/*.nii.gz (4D, channels
                         FLAIR, T1w, T1gd, T2w), DIR/labelsTr/, DIR/imagesTs/ (no label)

A case folder holds `<case>_{flair,t1,t1ce,t2,seg}.nii.gz` (or `.nii`). Missing files are not an
error here: `files` then holds the expected path, and loading names it.
Hidden entries (`.cache`, macOS `._*` files) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order everywhere
GRADES = ("hgg", "lgg")
SUFFIXES = (".nii.gz", ".nii")


class DataError(ValueError):
    """Input data that cannot be used; the message names the case and the file."""


@dataclass(frozen=True)
class CaseRef:
    case: str
    grade: str | None  # "hgg" | "lgg" | None (unknown)
    files: dict[str, Path] = field(compare=False)  # flair,t1,t1ce,t2[,seg] or image4d[,label] (msd)
    layout: str = "flat"
    has_label: bool = False


def discover_cases(root: str | Path) -> list[CaseRef]:
    """All cases under `root`, sorted by layout part then case name; `DataError` if none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    refs = _discover(root)
    if refs is None:
        entries = _visible(root)
        if not entries:
            raise DataError(f"data folder {root} is empty")
        names = ", ".join(sorted(p.name for p in entries)[:8])
        raise DataError(
            f"no BraTS layout recognised in {root} (found: {names}); expected HGG/ and LGG/, "
            "Brats17TrainingData/, case folders holding <case>_flair.nii.gz ..., a single case "
            "folder, or a Decathlon Task01 folder with imagesTr/"
        )
    _check_unique(refs, root)
    return refs


def is_case_folder(folder: Path) -> bool:
    """True when `folder` directly holds at least one `*_{modality|seg}.nii[.gz]` file."""
    return any(_find(folder, key) is not None for key in (*MODALITIES, "seg"))


def _discover(root: Path) -> list[CaseRef] | None:
    if is_case_folder(root):
        grade = root.parent.name.lower() if root.parent.name.lower() in GRADES else None
        return [_case_ref(root, grade, "case", expect_label=grade is not None)]
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return _discover_msd(root)
    train, val = root / "Brats17TrainingData", root / "Brats17ValidationData"
    if train.is_dir() or val.is_dir():
        refs: list[CaseRef] = []
        if train.is_dir():
            refs += _discover_grades(train, "brats17-training") or _discover_flat(train, "brats17-training") or []
        if val.is_dir():
            refs += _discover_flat(val, "brats17-validation") or []
        return refs or None
    return _discover_grades(root, "grades") or _discover_flat(root, "flat")


def _discover_grades(root: Path, layout: str) -> list[CaseRef] | None:
    grade_dirs = [(g, root / g.upper()) for g in GRADES if (root / g.upper()).is_dir()]
    if not grade_dirs:
        return None
    refs = []
    for grade, folder in grade_dirs:
        for case_dir in sorted(p for p in _visible(folder) if p.is_dir()):
            refs.append(_case_ref(case_dir, grade, layout, expect_label=True))
    return refs or None


def _discover_flat(root: Path, layout: str) -> list[CaseRef] | None:
    refs = [
        _case_ref(p, None, layout, expect_label=False)
        for p in sorted(_visible(root))
        if p.is_dir() and is_case_folder(p)
    ]
    return refs or None


def _discover_msd(root: Path) -> list[CaseRef] | None:
    refs = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = root / images
        if not folder.is_dir():
            continue
        for path in sorted(p for p in _visible(folder) if p.name.endswith(SUFFIXES) and p.is_file()):
            case = _strip_suffix(path.name)
            files = {"image4d": path}
            if labels is not None:
                files["label"] = _find_named(root / labels, case) or root / labels / path.name
            refs.append(CaseRef(case, None, files, "msd", has_label=labels is not None))
    return refs or None


def _case_ref(folder: Path, grade: str | None, layout: str, expect_label: bool) -> CaseRef:
    case = folder.name
    files: dict[str, Path] = {}
    for key in MODALITIES:
        files[key] = _find(folder, key) or folder / f"{case}_{key}.nii.gz"
    seg = _find(folder, "seg")
    if seg is not None or expect_label:
        files["seg"] = seg or folder / f"{case}_seg.nii.gz"
    return CaseRef(case, grade, files, layout, has_label="seg" in files)


def _find(folder: Path, key: str) -> Path | None:
    """`<folder.name>_<key>.nii[.gz]`, else the one visible `*_<key>.nii[.gz]` in `folder`."""
    for suffix in SUFFIXES:
        exact = folder / f"{folder.name}_{key}{suffix}"
        if exact.is_file():
            return exact
    hits = sorted(
        p for suffix in SUFFIXES for p in folder.glob(f"*_{key}{suffix}") if not p.name.startswith(".")
    )
    return hits[0] if len(hits) == 1 else None


def _find_named(folder: Path, case: str) -> Path | None:
    for suffix in SUFFIXES:
        if (folder / f"{case}{suffix}").is_file():
            return folder / f"{case}{suffix}"
    return None


def _strip_suffix(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _visible(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _check_unique(refs: list[CaseRef], root: Path) -> None:
    seen: dict[str, CaseRef] = {}
    for ref in refs:
        if ref.case in seen:
            first = next(iter(seen[ref.case].files.values())).parent
            second = next(iter(ref.files.values())).parent
            raise DataError(f"case {ref.case} appears twice under {root}: {first} and {second}")
        seen[ref.case] = ref
