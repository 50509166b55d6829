"""Where the project's own files are, so every command works from any folder."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_path(relative: str | Path) -> Path:
    """`relative` inside the project (configs/, data/synthetic/, runs/, report/); absolute paths pass."""
    path = Path(relative)
    return path if path.is_absolute() else PROJECT_ROOT / path
