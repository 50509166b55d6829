"""The whole chain, through the real command lines, at a tiny size: phantom cases -> teacher ->
distilled student -> slim (head at 1/4, patchifying stem) -> low-rank -> growth -> INT8 -> predict -> evaluate -> report.

Every stage reads only the previous stage's artifact (plus data), as a user would run it.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import compress.quant  # noqa: F401  (registers the INT8 / ONNX artifact kinds build_model rebuilds)
import model.refineformer3d  # noqa: F401  (registers the fp32 kind)
from common.artifact import Artifact, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "model.overrides={embed_dims: [8, 16, 24, 32], num_heads: [1, 2, 2, 2], depths: [1, 1, 1, 1], decoder_dim: 16, fuse_dim: 16, refine_dim: 4}"
SMALL = [
    "data.crop=[32,32,32]", "data.samples_per_epoch=4", "train.batch_size=2", "train.epochs=1",
    "train.window=[32,32,32]", "train.sw_batch=1", "train.threads=1", "train.log_images=false",
    "train.steps_per_epoch=2", "train.amp=off",
]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return run_chain(tmp_path_factory.mktemp("pipeline"))


def run_chain(tmp: Path, train: tuple[str, ...] = (), serve_env: dict | None = None) -> Path:
    """The whole chain into `tmp` (data/, runs/, pred_*/, scores.csv, report/); `train`: more --set
    items for every training stage (after SMALL's); `serve_env`: environment of predict, evaluate, report."""
    data, runs = tmp / "data", tmp / "runs"
    run("-m", "brats.phantom", str(data), "--cases", "5", "--val-cases", "1", "--shape", "48", "48", "40", "--seed", "3")
    common = ["--data", str(data), *sets(*SMALL, *train)]
    run("train.py", "--config", "configs/demo/teacher.yaml", "--out", str(runs / "teacher"), *common, *sets(TINY_MODEL))
    run("distill.py", "--config", "configs/demo/distill.yaml", "--teacher", str(runs / "teacher/best.pt"),
        "--width", "0.5", "--out", str(runs / "student"), *common)
    run("-m", "compress.slim", str(runs / "student/student.pt"), "--config", "configs/demo/slim.yaml",
        "--out", str(runs / "slim"), "--steps", "head,stem", *common,  # widths: the tiny decoder is at its floor
        *sets("slim.reference_input=[32,32,32]", "slim.refine_dim=6"))
    run("-m", "compress.lowrank", str(runs / "slim/slim.pt"), "--config", "configs/demo/lowrank.yaml",
        "--ratio", "0.5", "--out", str(runs / "lowrank"), *common)
    grow = run("-m", "compress.grow", str(runs / "lowrank/lowrank.pt"), "--config", "configs/demo/grow.yaml",
               "--out", str(runs / "grow"), *common, *sets("train.epochs=2", "grow.budget=null", "grow.patience=1"))
    (tmp / "grow.out").write_text(grow.stdout + grow.stderr)
    run("quantize.py", str(runs / "grow/grown.pt"), "--config", "configs/demo/quantize.yaml", "--out", str(runs / "int8"),
        *common, *sets("quant.decide=all", "quant.calib=1", "quant.input=[32,32,32]"))
    run("predict.py", str(runs / "int8/int8.pt"), "--input", str(data / "Brats17ValidationData"),
        "--output", str(tmp / "pred_val"), "--window", "32", "32", "32", env=serve_env)
    run("predict.py", str(runs / "grow/grown.pt"), "--input", str(data / "Brats17TrainingData"),
        "--output", str(tmp / "pred_train"), "--window", "32", "32", "32", env=serve_env)
    run("-m", "brats.evaluate", str(tmp / "pred_train"), str(data), "--out", str(tmp / "scores.csv"), env=serve_env)
    run("report.py", str(runs), "--data", str(data), "--out", str(tmp / "report"), "--quiet",
        *sets("report.input=[32,32,32]", "report.latency_runs=1", "report.window=[32,32,32]"), env=serve_env)
    return tmp


STAGES = ["teacher", "student", "slim", "lowrank", "grown", "int8"]


def test_every_artifact_loads_and_links_to_its_parent(pipeline):
    paths = {
        "teacher": "teacher/best.pt", "student": "student/student.pt", "slim": "slim/slim.pt",
        "lowrank": "lowrank/lowrank.pt",
        "grown": "grow/grown.pt", "int8": "int8/int8.pt",
    }
    for i, stage in enumerate(STAGES):
        art = Artifact.load(pipeline / "runs" / paths[stage])
        assert art.stage == stage
        assert [e["stage"] for e in art.lineage] == STAGES[:i]
        runtime = art.extra["runtime"]  # what the stage resolved, pinned here by train.amp=off / threads=1
        assert (runtime["train_precision"], runtime["eval_precision"], runtime["threads"]) == ("fp32", "fp32", 1)
        model = build_model(art).eval()
        import torch

        with torch.no_grad():
            out = model(torch.zeros(1, 4, 32, 32, 32))
        assert out.shape == (1, 3, 32, 32, 32) and torch.isfinite(out).all()
        rule = art.extra["et_rule"]  # every artifact, the teacher's included, records its calibrated ET rule
        assert rule["cases"] == 1 and rule["et_min_voxels"] in rule["grid"], stage
    slim = Artifact.load(pipeline / "runs/slim/slim.pt")  # the later stages keep the slimmed architecture
    assert slim.metrics["gmacs_after"] < slim.metrics["gmacs_before"]
    for path in ("slim/slim.pt", "lowrank/lowrank.pt", "grow/grown.pt"):
        spec = Artifact.load(pipeline / "runs" / path).spec
        assert (spec["head_at"], spec["patch_kernels"][0], spec["refine_dim"] >= 6) == ("half", 4, True), path
    lowrank = Artifact.load(pipeline / "runs/lowrank/lowrank.pt")
    assert lowrank.spec["ranks"], "low-rank stage factorised nothing"
    assert lowrank.metrics["params_after"] < lowrank.metrics["params_before"]


def test_growth_says_its_device_once_and_opens_each_phase_with_what_it_widened(pipeline):
    out = (pipeline / "grow.out").read_text()
    events = Artifact.load(pipeline / "runs/grow/grown.pt").extra["growth"]
    phases = [line for line in out.splitlines() if line.startswith("growth phase ")]
    assert out.count("grown: device ") == 1
    assert len(phases) == len(events) >= 1 and phases[0].startswith("growth phase 0: the source as it is")
    for k, line in enumerate(phases[1:], 1):
        assert line.startswith(f"growth phase {k}: widened ") and all(
            f"{g['unit']} {g['old']}->{g['new']}" in line for g in events[k - 1]["grown"])


def test_report_has_a_row_per_stage_with_finite_numbers(pipeline):
    rows = json.loads((pipeline / "report/report.json").read_text())
    assert [r["stage"] for r in rows] == STAGES
    for row in rows:
        for key in ("params", "gmacs", "size_mb", "dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt",
                    "hd95_tc", "hd95_et", "iou_mean", "latency_ms_window", "latency_s_case"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["stage"], key, row[key])
        assert 0.0 <= row["dice_mean"] <= 1.0
        assert row["trained_as"].startswith("fp32 / 1 thr / "), row["trained_as"]
    assert rows[1]["params"] < rows[0]["params"]  # the student is thinner than the teacher
    for name in ("report.md", "report.csv", "dice_vs_params.png", "dice_vs_latency.png"):
        assert (pipeline / "report" / name).stat().st_size > 0


def test_predictions_are_label_maps_on_the_input_grid(pipeline):
    data = pipeline / "data"
    for folder, source in (("pred_val", "Brats17ValidationData"), ("pred_train", "Brats17TrainingData")):
        outputs = sorted((pipeline / folder).glob("*.nii.gz"))
        cases = sorted(p.parent.name for p in (data / source).rglob("*_flair.nii.gz"))
        assert [p.name.removesuffix(".nii.gz") for p in outputs] == cases
        for out in outputs:
            flair = next((data / source).rglob(f"{out.name.removesuffix('.nii.gz')}_flair.nii.gz"))
            pred, ref = nib.load(out), nib.load(flair)
            assert pred.shape == ref.shape
            assert np.allclose(pred.affine, ref.affine)
            values = np.asarray(pred.dataobj)
            assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2, 4}
    scores = (pipeline / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("case,dice_wt,dice_tc,dice_et")
    assert len(scores) == 1 + 5
