"""Run a command script the way torchrun starts it, logging each cache build and artifact save with
its rank (one line each in $DDP_PROBE_LOG). Used by tests/test_torchrun.py; not a test itself.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py distill.py --teacher ...
"""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import brats.prepare  # noqa: E402
from common.artifact import Artifact  # noqa: E402

LOG = Path(os.environ["DDP_PROBE_LOG"])
RANK = os.environ.get("RANK", "0")


def note(what: str) -> None:
    with open(LOG, "a") as f:
        f.write(f"{RANK} {what}\n")


_build, _save = brats.prepare._build, Artifact.save


def build(ref, *args, **kwargs):
    note(f"build {ref.case}")
    return _build(ref, *args, **kwargs)


def save(self, path):
    note(f"save {Path(path).relative_to(Path(path).parents[1])}")
    return _save(self, path)


brats.prepare._build, Artifact.save = build, save
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(str(ROOT / script), run_name="__main__")
