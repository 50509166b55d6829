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

Labels (`find_label`): `<case>_seg.nii[.gz]`, else the one `*_seg` file, else the one NIfTI whose
name (case prefix removed) holds `seg` or `label`, case-insensitively. Releases do not all follow
`_seg`: BraTS 2020's BraTS20_Training_355 ships its label as `W39_1998.09.19_Segm.nii`, and
other collections use `Segm` or `_label`. Two such candidates are ambiguous: the case then fails
to load, naming both (the error waits for loading, so `--skip-bad` and prediction, which never
reads labels, still work).

Labelled sets: in `grades` and `brats17-training`, and in a `flat` set where most cases have a
label, every case is expected to have one; one without fails to load, naming its folder, instead
of being cached as unlabelled and silently left out of training. `brats17-validation` and a flat
set of mostly unlabelled cases stay unlabelled.

Unrecognised NIfTI files in a case folder (neither a modality nor the label) are a warning, not an
error: every file that is read was found by a rule, so an extra file (a brain mask, a registration
by-product, a second label-like file next to `<case>_seg`) changes nothing that is loaded. The
warning names the file, and a load that then misses a modality lists it too.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.errors import UserInputError

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order everywhere
GRADES = ("hgg", "lgg")
SUFFIXES = (".nii.gz", ".nii")
LABEL_NAME_PARTS = ("seg", "label")  # in a label file's name, any case; "segm" holds "seg"


class DataError(UserInputError, ValueError):
    """Input data that cannot be used; the message names the case and the file."""


@dataclass(frozen=True)
class CaseRef:
    case: str
    grade: str | None  # "hgg" | "lgg" | None (unknown)
    files: dict[str, Path] = field(compare=False)  # flair,t1,t1ce,t2[,seg] or image4d[,label] (msd)
    layout: str = "flat"
    has_label: bool = False
    label_problem: str | None = field(default=None, compare=False)  # why no label could be chosen
    extra: tuple[Path, ...] = field(default=(), compare=False)  # NIfTI files no rule recognised


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, kept clear of progress bars (as the engine warns)."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


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
            refs += (_discover_grades(train, "brats17-training")
                     or _discover_flat(train, "brats17-training", expect_label=True) or [])
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


def _discover_flat(root: Path, layout: str, expect_label: bool = False) -> list[CaseRef] | None:
    """Case folders directly under `root`. When most of them have a label (or `expect_label`), the
    set is a labelled one and a case without a label is expected to have one (its load fails)."""
    refs = [
        _case_ref(p, None, layout, expect_label=expect_label)
        for p in sorted(_visible(root))
        if p.is_dir() and is_case_folder(p)
    ]
    if 2 * sum(r.has_label for r in refs) > len(refs):
        refs = [r if r.has_label else _expecting_label(r) for r in refs]
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
    known = [p for p in files.values() if p.is_file()]
    candidates = _label_candidates(folder, known)
    problem = None
    if len(candidates) > 1:
        problem = _ambiguous_label(folder, candidates)
    if len(candidates) == 1 or expect_label or problem:
        files["seg"] = candidates[0] if len(candidates) == 1 else folder / f"{case}_seg.nii.gz"
    used = {*files.values(), *candidates}
    extra = tuple(p for p in _niftis(folder) if p not in used)
    for path in extra:
        warn(f"case {case}: {path}: NIfTI file not recognised as {', '.join(MODALITIES)} or a label; "
             f"ignored (rename it {case}_<modality>.nii.gz or {case}_seg.nii.gz if it is one, else move it out)")
    return CaseRef(case, grade, files, layout, has_label="seg" in files, label_problem=problem, extra=extra)


def _expecting_label(ref: CaseRef) -> CaseRef:
    """`ref` in a labelled set: its missing label is to be reported when it is loaded."""
    folder = Path(ref.files[MODALITIES[0]]).parent
    return dataclasses.replace(ref, files={**ref.files, "seg": folder / f"{ref.case}_seg.nii.gz"}, has_label=True)


def find_label(folder: str | Path) -> Path | None:
    """The label file of a case folder, or None if it has none.

    Rules, in order: `<case>_seg.nii[.gz]`; the one visible `*_seg.nii[.gz]`; the one NIfTI,
    other than the modality files, whose name without the `<case>` prefix holds `seg` or `label`
    in any case (BraTS 2020's BraTS20_Training_355 ships `W39_1998.09.19_Segm.nii`).
    Two or more candidates: `DataError` naming the folder and every candidate.
    """
    folder = Path(folder)
    known = [p for p in (_find(folder, key) for key in MODALITIES) if p is not None]
    candidates = _label_candidates(folder, known)
    if len(candidates) > 1:
        raise DataError(_ambiguous_label(folder, candidates))
    return candidates[0] if candidates else None


def _label_candidates(folder: Path, known: list[Path]) -> list[Path]:
    """[the label] when a `*_seg` rule settles it, else every label-like NIfTI (0, 1 or more)."""
    seg = _find(folder, "seg")
    if seg is not None:
        return [seg]
    prefix = folder.name.lower()
    hits = []
    for path in _niftis(folder):
        if path in known:
            continue
        name = _strip_suffix(path.name).lower()
        name = name[len(prefix):] if name.startswith(prefix) else name
        if any(part in name for part in LABEL_NAME_PARTS):
            hits.append(path)
    return hits


def _ambiguous_label(folder: Path, candidates: list[Path]) -> str:
    names = " and ".join(p.name for p in candidates)
    return (f"case {folder.name}: {folder}: {len(candidates)} files could be the label ({names}); "
            f"keep one, or rename the right one {folder.name}_seg.nii.gz")


def missing_label_message(ref: CaseRef) -> str:
    """Why a case of a labelled set has no label, naming its folder and what to do."""
    folder = Path(ref.files[MODALITIES[0]]).parent
    return (f"case {ref.case}: {folder}: no label file (expected {ref.case}_seg.nii.gz, or one NIfTI whose "
            f"name holds 'seg' or 'label') in a labelled set ({ref.layout}); add the label, move the case "
            "folder to an unlabelled set such as Brats17ValidationData/, or skip it: --set data.skip_bad=true "
            "(python -m brats.prepare: --skip-bad)")


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


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in _visible(folder) if p.name.endswith(SUFFIXES) and p.is_file())


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
