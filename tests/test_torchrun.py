"""`torchrun --nproc_per_node=2` (gloo, CPU) of distill.py and quantize.py: rank 0 alone prepares the
cache while the other rank waits, and each stage's artifact is written once, by rank 0."""
import os
import subprocess
import sys
from pathlib import Path


from brats.phantom import write_phantom_dataset
from common.artifact import Artifact
from test_cli import tiny_artifact

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.crop=[32,32,32]", "data.samples_per_epoch=4", "data.val_fraction=0.5", "train.batch_size=2",
         "train.epochs=1", "train.steps_per_epoch=1", "train.window=[32,32,32]", "train.sw_batch=1",
         "train.threads=1", "train.amp=off", "train.log_images=false"]


def torchrun(log: Path, *args: str) -> list[str]:
    env = {**os.environ, "DDP_PROBE_LOG": str(log), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_probe.py"), *args]
    # its own session: torchrun signals its process group when it shuts down, which must not reach pytest's worker
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_torchrun_prepares_the_cache_once_and_writes_each_artifact_once(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    tiny_artifact(tmp_path / "teacher.pt", decoder_dim=16, fuse_dim=16)
    sets = [arg for item in SMALL for arg in ("--set", item)]
    log = tmp_path / "probe.log"

    lines = torchrun(log, "distill.py", "--teacher", str(tmp_path / "teacher.pt"), "--width", "0.5",
                     "--config", "configs/demo/distill.yaml", "--data", str(data), "--out", str(tmp_path / "student"),
                     *sets, "--set", f"data.cache={tmp_path / 'cache1'}")
    builds = sorted(line for line in lines if " build " in line)
    assert builds == [f"0 build {case}" for case in sorted(p.name for p in (data / "Brats17TrainingData").rglob("*")
                                                           if p.is_dir() and p.name.startswith("Brats"))]
    assert [line for line in lines if "student.pt" in line] == ["0 save student/student.pt"]
    assert all(line.startswith("0 ") for line in lines)  # rank 1 writes nothing
    assert sorted(p.name for p in (tmp_path / "student").glob("*.pt")) == ["last.pt", "student.pt"]

    lines = torchrun(log, "quantize.py", str(tmp_path / "student" / "student.pt"), "--config",
                     "configs/demo/quantize.yaml", "--data", str(data), "--out", str(tmp_path / "int8"), *sets,
                     "--set", f"data.cache={tmp_path / 'cache2'}", "--set", "quant.decide=all", "--set", "quant.calib=1",
                     "--set", "quant.input=[32,32,32]")
    assert len([line for line in lines if " build " in line]) == 4
    assert [line for line in lines if "int8.pt" in line] == ["0 save int8/int8.pt"]
    assert all(line.startswith("0 ") for line in lines)
    int8 = Artifact.load(tmp_path / "int8" / "int8.pt")
    assert int8.stage == "int8" and [e["stage"] for e in int8.lineage] == ["teacher", "student"]
