"""Where the project's own files are, so every command works from any folder."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_path(relative: str | Path) -> Path:
    """`relative` inside the project (configs/, data/synthetic/, runs/, report/); absolute paths pass."""
    path = Path(relative)
    return path if path.is_absolute() else PROJECT_ROOT / path


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent: what decides whether it can be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def recorded_path(recorded: str) -> str:
    """A path an artifact recorded: as recorded when it exists (or nothing better does), else the same
    relative path inside the project (older versions recorded data and lineage paths relative to it)."""
    if Path(recorded).exists() or not project_path(recorded).exists():
        return recorded
    return str(project_path(recorded))
