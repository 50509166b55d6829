"""Atomic file writes: write to a temporary sibling, fsync, rename; exclusive folder locks.

A kill at any moment leaves either the previous good file or the new one, never a partial file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from common.errors import UserInputError

OUT_LOCK = ".lock"
_CLAIMED: dict[Path, IO[str]] = {}  # folder -> its open lock file, held until this process exits


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if absent) for the block.

    `on_wait()` is called once when another process holds the lock, before waiting for it. The
    kernel drops the lock when its holder dies, so a killed writer never leaves the folder locked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _lock_or_holder(f: IO[str]) -> str | None:
    """Take an exclusive `flock` on the open lock file `f` without waiting: None when taken, else what
    its holder wrote in it ("pid N")."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "pid unknown"
    return None


def busy_error(path: Path, holder: str) -> UserInputError:
    return UserInputError(f"{path}: another run is writing this folder ({holder}); wait for it to finish "
                          "or choose another --out")


def claim_folder(path: str | os.PathLike) -> None:
    """Hold an exclusive `flock` on `<path>/.lock` until this process exits, so two runs never write
    one output folder at once (the kernel drops the lock when its holder dies: a killed run leaves
    nothing to clean up). Claiming a folder this process holds already is a no-op. UserInputError,
    naming the holder's pid, when another process holds it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _CLAIMED:
        return
    f = open(path / OUT_LOCK, "a+")
    if (holder := _lock_or_holder(f)) is not None:
        f.close()
        raise busy_error(path, holder)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _CLAIMED[key] = f


def folder_holder(path: str | os.PathLike) -> str | None:
    """"pid N" of another process holding `claim_folder(path)`, else None (nothing is locked or created)."""
    path = Path(path)
    lock = path / OUT_LOCK
    if path.resolve() in _CLAIMED or not lock.is_file():
        return None
    with open(lock, "a+") as f:
        if (holder := _lock_or_holder(f)) is not None:
            return holder
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
