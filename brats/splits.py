"""Train/validation splits stratified by grade, kept in an editable `splits.json`.

    {"seed": 0, "val_fraction": 0.2, "folds": [{"train": [...], "val": [...]}, ...]}

Once the file exists it is the truth: it is read (and checked), never regenerated, so a user may
move cases between lists by hand. Delete it to draw a new split.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from brats.layout import DataError
from common.atomic import atomic_write_text


@dataclass(frozen=True)
class Fold:
    train: list[str]
    val: list[str]


def _strata(cases: list[tuple[str, str | None]]) -> dict[str, list[str]]:
    strata: dict[str, list[str]] = {}
    for case, grade in cases:
        strata.setdefault(grade or "unknown", []).append(case)
    return {g: sorted(strata[g]) for g in sorted(strata)}


def _shuffled(strata: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for grade, names in strata.items():
        names = list(names)
        rng.shuffle(names)
        out[grade] = names
    return out


def make_splits(cases: list[tuple[str, str | None]], val_fraction: float = 0.2, folds: int = 1,
                seed: int = 0) -> list[Fold]:
    """Deterministic stratified split(s) of (case, grade) pairs.

    folds == 1: one split; round(n * val_fraction) validation cases, shared among grades by
    largest remainder, at least 1 when n >= 2 and at least 1 training case.
    folds > 1: k-fold; the shuffled cases of each grade are dealt round-robin to the folds
    (continuing across grades, so fold sizes differ by at most one); val_fraction is unused.
    """
    names = [c for c, _ in cases]
    if len(set(names)) != len(names):
        raise DataError("duplicate case names given to make_splits")
    n = len(cases)
    if n == 0:
        raise DataError("no cases to split")
    strata = _shuffled(_strata(cases), seed)
    if folds > 1:
        if n < folds:
            raise DataError(f"{folds} folds need at least {folds} cases, got {n}")
        assigned: list[list[str]] = [[] for _ in range(folds)]
        i = 0
        for grade_cases in strata.values():
            for case in grade_cases:
                assigned[i % folds].append(case)
                i += 1
        return [
            Fold(train=sorted(c for j, a in enumerate(assigned) if j != k for c in a), val=sorted(assigned[k]))
            for k in range(folds)
        ]
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    # largest remainder: each grade gets floor(share), the biggest remainders get the rest
    shares = {g: len(c) * n_val / n for g, c in strata.items()}
    take = {g: int(s) for g, s in shares.items()}
    rest = n_val - sum(take.values())
    for g in sorted(shares, key=lambda g: (-(shares[g] - take[g]), g))[:rest]:
        take[g] += 1
    val = sorted(c for g, cs in strata.items() for c in cs[: take[g]])
    train = sorted(c for g, cs in strata.items() for c in cs[take[g]:])
    return [Fold(train=train, val=val)]


def save_splits(path: str | Path, folds: list[Fold], seed: int, val_fraction: float) -> Path:
    data = {
        "seed": seed,
        "val_fraction": val_fraction,
        "folds": [{"train": f.train, "val": f.val} for f in folds],
    }
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_splits(path: str | Path, known: set[str] | None = None) -> list[Fold]:
    """Read and check a splits file; errors name the file (and any unknown cases)."""
    path = Path(path)
    return _folds(_read_json(path), path, known)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"split file {path}: unreadable ({e})") from None


def _folds(data, path: Path, known: set[str] | None) -> list[Fold]:
    """The checked folds of a splits file's parsed `data` (`read_splits`)."""
    if not isinstance(data, dict) or not isinstance(data.get("folds"), list) or not data["folds"]:
        raise DataError(f"split file {path}: expected {{\"folds\": [{{\"train\": [...], \"val\": [...]}}]}}")
    folds = []
    for k, fold in enumerate(data["folds"]):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(key), list) for key in ("train", "val")):
            raise DataError(f"split file {path}: fold {k} needs 'train' and 'val' lists")
        train, val = [str(c) for c in fold["train"]], [str(c) for c in fold["val"]]
        overlap = sorted(set(train) & set(val))
        if overlap:
            raise DataError(f"split file {path}: fold {k} has cases in both train and val: {overlap[:10]}")
        if known is not None:
            unknown = sorted((set(train) | set(val)) - known)
            if unknown:
                raise DataError(
                    f"split file {path}: fold {k} names {len(unknown)} case(s) not in the data: "
                    f"{', '.join(unknown[:10])}; edit the file or delete it to draw a new split"
                )
        if not train:
            raise DataError(f"split file {path}: fold {k} has no training cases")
        folds.append(Fold(train=train, val=val))
    return folds


def _same_number(recorded, asked: float) -> bool:
    """`recorded` (anything a hand-made file may hold) is the number `asked`."""
    number = isinstance(recorded, (int, float)) and not isinstance(recorded, bool)
    return number and math.isclose(float(recorded), float(asked), rel_tol=0, abs_tol=1e-9)


def load_or_create_splits(path: str | Path, cases: list[tuple[str, str | None]], val_fraction: float = 0.2,
                          folds: int = 1, seed: int = 0, note: Callable[[str], None] | None = None) -> list[Fold]:
    """Read `path` if it exists (checked against `cases`), else draw the split(s) and save them.

    An existing file wins over `val_fraction` and `seed` (it may have been edited by hand): where it
    records others, `note` gets one line saying so. A file with another number of folds than `folds`
    is a DataError (a k-fold run on a one-split file would validate on the wrong cases)."""
    path = Path(path)
    if path.exists():
        recorded = _read_json(path)
        result = _folds(recorded, path, {c for c, _ in cases})
        if len(result) != folds:
            raise DataError(f"split file {path} has {len(result)} fold(s), but data.folds={folds}: delete it to draw "
                            f"{folds} fold(s), or set data.split_file to another file (or data.folds={len(result)})")
        asked = [("seed", seed)] + ([("val_fraction", val_fraction)] if folds == 1 else [])  # k folds: no fraction
        differ = [f"{key} {recorded[key]!r} (asked {value})" for key, value in asked
                  if key in recorded and not _same_number(recorded[key], value)]
        if differ and note is not None:
            note(f"split file {path}: used as it is, drawn with {', '.join(differ)}; delete it to draw a new split")
        return result
    result = make_splits(cases, val_fraction=val_fraction, folds=folds, seed=seed)
    save_splits(path, result, seed=seed, val_fraction=val_fraction)
    return result
