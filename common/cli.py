"""The arguments every stage command shares: --config, --data, --out, --overwrite, --set.

Defaults that name the project's own files (configs/*.yaml, runs/<stage>) are resolved against the
project (`common.paths`), so a command typed in any folder finds them; paths the user types are
relative to the current folder as usual.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from common.atomic import busy_error, folder_holder
from common.config import DATA_IDENTITY, Config, load_config
from common.errors import UserInputError
from common.paths import nearest_existing, project_path

# where predict.py / report.py run a model (pipeline.runtimes), named here so that the CLIs need no torch
RUNTIME_CHOICES = ("auto", "torch", "onnxruntime", "openvino")


def stage_parser(prog: str, description: str, default_config: str | None = None,
                 default_out: str | None = None) -> argparse.ArgumentParser:
    """The shared options; `default_config` / `default_out` name project files (e.g. configs/distill.yaml,
    runs/student), resolved against the project."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = str(project_path(default_config)) if default_config else None
    p.add_argument("--config", default=config,
                   help=f"YAML config (default: the project's {default_config})" if default_config
                   else "YAML config (default: none, the built-in settings of common/config.py)")
    p.add_argument("--data", default=None, help="BraTS-layout data folder (default: a compression stage takes its "
                   "source artifact's data and split; train.py the built-in synthetic cases)")
    p.add_argument("--out", default=str(project_path(default_out)) if default_out else None,
                   help="output folder; the stage's artifact (.pt) is written there"
                        + (f" (default: the project's {default_out})" if default_out else ""))
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a folder holding a run is refused)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    return p


def add_strict(p: argparse.ArgumentParser, source: str = "source's") -> None:
    """--strict of a compression stage (guard.strict; `config_from_args` applies it)."""
    p.add_argument("--strict", action="store_true",
                   help=f"exit 3 when a region's Dice falls more than guard.max_region_drop below the {source}")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "data", None):
        cfg.data.dir = args.data
    for key in ("dir", "cache"):  # recorded in artifacts: absolute, so a later stage finds them from any folder
        value = getattr(cfg.data, key, None)
        if value:
            setattr(cfg.data, key, str(Path(value).resolve()))
    if getattr(args, "strict", False):
        cfg.guard.strict = True
    return cfg


def data_given(args: argparse.Namespace) -> bool:
    """True when the user named the data (--data, or --set data.dir / data.split_file / data.fold...):
    otherwise a stage takes the data set and split of the artifact it starts from. Neither how many
    cases to score (max_val_cases) nor where the cache goes (data.cache: `engine.runner.inherit_data`
    keeps it) says which data."""
    named = tuple(f"data.{key}" for key in DATA_IDENTITY if key not in ("max_val_cases", "cache"))
    return bool(getattr(args, "data", None)) or any(o.startswith(named) for o in getattr(args, "overrides", []))


def run_main(main: Callable[[], int | None]) -> None:
    """Run a command's main; user errors (config, artifact, data, missing file) become one line on stderr
    and exit code 2."""
    try:
        code = main()
    except (UserInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact (a training command continues from its last.pt "
              "with the same command plus --resume)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def main_rank() -> bool:
    """Whether this process is rank 0 under torchrun (RANK unset: a plain run), so a command's closing
    summary is printed once, not once per rank."""
    return int(os.environ.get("RANK", "0")) == 0


RUN_FILES = ("*.pt", "*.onnx")  # what a stage writes (artifacts, checkpoints; quantize.py's ONNX graphs)


def out_dir(args: argparse.Namespace) -> Path:
    """The output folder (`--out`, whose default `stage_parser` set), checked before any work.

    UserInputError when it cannot be written (a file in the way, no write permission), when another
    run is writing it (`common.atomic.claim_folder`: said first, whatever the flags), or when it
    already holds a run (any RUN_FILES) and neither --resume nor --overwrite was given: nothing already
    written is replaced silently. The folder itself is created by the first write, so a command that
    fails its checks leaves none behind.
    """
    path = Path(args.out)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UserInputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    writable_folder(path)
    if (holder := folder_holder(path)) is not None:  # first: --resume / --overwrite would not help
        raise busy_error(path, holder)
    existing = sorted(str(p.relative_to(path)) for pattern in RUN_FILES for p in path.rglob(pattern)) \
        if path.is_dir() else []
    if existing and not (getattr(args, "resume", False) or getattr(args, "overwrite", False)):
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        # --resume continues from a training checkpoint (last.pt); a folder of artifacts or graphs only has none
        resumable = hasattr(args, "resume") and any(Path(p).name == "last.pt" for p in existing)
        resume = "continue it with --resume, " if resumable else ""
        raise UserInputError(f"{path} already holds a run ({shown}); {resume}replace it with --overwrite, "
                             "or choose another --out")
    return path


def writable_folder(path: Path) -> None:
    """UserInputError unless `path` is, or can be created as, a folder this process may write."""
    probe = nearest_existing(path)
    if not probe.is_dir():
        raise UserInputError(f"{path}: cannot create the output folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"{path}: cannot write the output folder: no write permission on {probe}")
    try:  # permission bits are not the whole story (read-only mounts, /proc): make and remove a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=probe))
    except OSError as e:
        raise UserInputError(f"{path}: cannot create the output folder in {probe}: {e.strerror}") from None
