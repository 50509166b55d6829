"""The arguments every stage command shares: --config, --data, --out, --set."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from common.config import Config, load_config
from common.errors import UserInputError


def stage_parser(prog: str, description: str, default_config: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    p.add_argument("--data", default=None, help="BraTS-layout data folder (default: built-in synthetic cases)")
    p.add_argument("--out", default=None, help="output folder; the stage's artifact (.pt) is written there")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "data", None):
        cfg.data.dir = args.data
    return cfg


def run_main(main: Callable[[], int | None]) -> None:
    """Run a command's main; user errors (config, artifact, data, missing file) become one line on stderr
    and exit code 2."""
    try:
        code = main()
    except (UserInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def out_dir(args: argparse.Namespace, default: str) -> Path:
    path = Path(args.out or default)
    path.mkdir(parents=True, exist_ok=True)
    return path
