"""Where the data comes from: the user's BraTS folder, or synthetic cases made on demand.

`resolve_data(cfg.data)` is what training calls: it returns (data_dir, cache_dir) with the cache
up to date. Call it on one process (DDP rank 0) and let the others wait: preparing is not meant
to run twice at once on one cache.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from brats.layout import DataError
from brats.phantom import write_phantom_dataset
from brats.prepare import prepare
from common.atomic import atomic_write_text
from common.config import DataConfig
from common.paths import project_path

PARAMS_FILE = "phantom.json"
PHANTOM_VERSION = 1


def _params(cases: int, val_cases: int, shape, seed: int, family: str = "demo") -> dict:
    params = {"version": PHANTOM_VERSION, "cases": int(cases), "val_cases": int(val_cases),
              "shape": [int(s) for s in shape], "seed": int(seed)}
    return params if family == "demo" else {**params, "family": family}  # demo folders stay as written before


def ensure_synthetic(root: str | Path = "data/synthetic", cases: int = 12, val_cases: int = 2,
                     shape=(96, 96, 64), seed: int = 0, family: str = "demo") -> Path:
    """Synthetic BraTS-layout data under `root`, generated unless `root/phantom.json` already
    records these parameters; a phantom folder with other parameters is replaced whole (its cases
    and `.cache`), so two sets never mix. Generation goes to a temporary sibling folder that is
    renamed into place at the end, so an interrupted run leaves no half-written dataset behind.
    DataError, before anything is written, when `root` holds anything but phantoms (no phantom.json)."""
    root = Path(root)
    want = _params(cases, val_cases, shape, seed, family)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder for synthetic cases")
    recorded = _recorded(root)
    if recorded == want:
        return root
    foreign = _foreign_files(root)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{root}: holds files that are not synthetic cases written here ({shown}); nothing was "
                        "changed: choose an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_phantom_dataset(tmp, cases, val_cases, tuple(shape), seed, family)
        atomic_write_text(tmp / PARAMS_FILE, json.dumps(want, indent=1) + "\n")
        if root.exists():
            if _recorded(root) == want:  # someone else finished first
                return root
            shutil.rmtree(root)  # old parameters: the data (and its .cache) no longer apply
        try:
            tmp.rename(root)
        except OSError:
            if _recorded(root) != want:  # lost a race to a writer with other parameters
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# What a phantom folder holds: its parameters, the two releases' case files, and the cache.
_PHANTOM_FILE = re.compile(r"(Brats17TrainingData/(HGG|LGG)|Brats17ValidationData)/(?P<case>[^/]+)/"
                           r"(?P=case)_(flair|t1|t1ce|t2|seg)\.nii\.gz")


def _foreign_files(root: Path) -> list[str]:
    """Files under `root` (relative paths) that a phantom folder does not hold: replacing the folder
    would lose them. Empty for a missing folder."""
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel == PARAMS_FILE or rel.startswith(".cache/") or _PHANTOM_FILE.fullmatch(rel):
            continue
        out.append(rel)
    return out


def _recorded(root: Path) -> dict | None:
    try:
        return json.loads((root / PARAMS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_data(cfg: DataConfig, synthetic_root: str | Path = project_path("data/synthetic"),
                 progress: bool = True) -> tuple[Path, Path]:
    """(data_dir, cache_dir) for `cfg`, with the cache prepared.

    data_dir: cfg.dir, or synthetic cases (cfg.synthetic_*) under `synthetic_root` when None.
    cache_dir: cfg.cache, or `<data_dir>/.cache`. Bad cases raise unless cfg.skip_bad; a modality
    constant inside the brain is one unless cfg.allow_constant_modality.
    """
    if cfg.dir is None:
        data_dir = ensure_synthetic(synthetic_root, cfg.synthetic_cases, cfg.synthetic_val_cases,
                                    tuple(cfg.synthetic_shape), cfg.synthetic_seed)
    else:
        data_dir = Path(cfg.dir)
    cache_dir = Path(cfg.cache) if cfg.cache else data_dir / ".cache"
    prepare(data_dir, cache_dir, skip_bad=cfg.skip_bad, progress=progress,
            allow_constant_modality=cfg.allow_constant_modality)
    return data_dir, cache_dir
