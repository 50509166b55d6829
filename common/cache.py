"""Measurements cached per machine: JSON files under ~/.cache/refineformer3d (REFINEFORMER3D_CACHE overrides
the folder), read as {} when missing or unreadable and rewritten atomically, so a cache never breaks a run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from common.atomic import atomic_write_text


def cache_file(name: str) -> Path:
    root = os.environ.get("REFINEFORMER3D_CACHE") or Path.home() / ".cache" / "refineformer3d"
    return Path(root) / name


def read_cache(path: Path) -> dict:
    try:
        store = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return store if isinstance(store, dict) else {}


def write_cache(path: Path, store: dict) -> None:
    """Rewrite the cache atomically; a cache that cannot be written (its folder a file, no permission, a full
    disk) is one warning on stderr: the run goes on, only without keeping its measurements."""
    try:
        atomic_write_text(path, json.dumps(store, indent=1, sort_keys=True))
    except OSError as e:
        print(f"warning: cannot write the cache {path} ({e.strerror or e}); the measurements are not kept "
              "(REFINEFORMER3D_CACHE sets its folder)", file=sys.stderr)
