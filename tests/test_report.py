import csv
import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import report as report_cli
from brats.metrics import HD95_EMPTY
from brats.phantom import write_phantom_dataset
from brats.splits import read_splits
from common.artifact import Artifact, ArtifactError
from common.config import Config, DataConfig, to_dict
from pipeline.report import ROW_KEYS, find_artifacts, make_report, profile_arch
from teacher.flops import count_macs
from teacher.model import ModelSpec, RefineFormer3D, count_params, preset_spec

SHAPE = (40, 40, 32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(embed, seed: int) -> RefineFormer3D:
    torch.manual_seed(seed)
    spec = ModelSpec(embed_dims=embed, num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                     decoder_dim=8, fuse_dim=8, refine_dim=4)
    return RefineFormer3D(spec).eval()


def config(root) -> Config:
    cfg = Config()
    cfg.data = DataConfig(dir=str(root / "data"), cache=str(root / "cache"), val_fraction=0.5, crop=[32, 32, 32])
    cfg.train.window, cfg.train.overlap = [32, 32, 32], 0.5
    cfg.report.input, cfg.report.latency_runs, cfg.report.warmup_runs = [32, 32, 32], 1, 0
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_phantom_dataset(root / "data", cases=4, val_cases=1, shape=SHAPE, seed=1)
    cfg = config(root)
    runs = root / "runs"
    teacher = tiny([16, 16, 32, 32], 0)
    student = tiny([8, 8, 16, 16], 1)
    with torch.no_grad():  # the student predicts "no tumour" everywhere: scores known in advance
        student.decoder.head.weight.zero_()
        student.decoder.head.bias.fill_(-50.0)
    stored = to_dict(cfg)
    Artifact("teacher", teacher.spec.to_dict(), teacher.state_dict(), config=stored).save(runs / "teacher" / "teacher.pt")
    # the engine's checkpoints next to the stage's own artifact: not a second row
    Artifact("teacher", teacher.spec.to_dict(), teacher.state_dict(), config=stored).save(runs / "teacher" / "best.pt")
    Artifact("teacher", teacher.spec.to_dict(), teacher.state_dict(), config=stored).save(runs / "teacher" / "last.pt")
    extra = {"lowrank": [{"layer": "encoder.stages.0.blocks.0.mlp.fc1", "rank": 3, "energy": 0.91}],
             "growth": [{"epoch": 2, "units": ["decoder.fuse"], "params": 1234}]}
    Artifact("student", student.spec.to_dict(), student.state_dict(), config=stored,
             extra=extra).save(runs / "student" / "train" / "best.pt")  # only the engine's file here
    broken = runs / "lowrank" / "lowrank.pt"
    Artifact("lowrank", student.spec.to_dict(), student.state_dict()).save(broken)
    broken.write_bytes(broken.read_bytes()[:300])
    # no --data: the held-out cases come from the teacher artifact's stored data config
    result = make_report([runs], Config(report=cfg.report, train=cfg.train), root / "out", data=None, progress=False)
    return root, cfg, result, teacher, student, broken


def test_rows_in_pipeline_order_with_errors_named(built):
    root, cfg, result, *_ , broken = built
    rows = result.rows
    assert [r["stage"] for r in rows] == ["teacher", "student", "lowrank"]
    assert rows[0]["artifact"].endswith("teacher/teacher.pt")
    assert rows[1]["artifact"].endswith("student/train/best.pt")
    assert rows[2]["artifact"] == str(broken) and str(broken) in rows[2]["error"]
    assert rows[2]["dice_mean"] is None and rows[0]["error"] is None and rows[1]["error"] is None
    assert [r["stage"] for r in result.failed] == ["lowrank"]
    md = (root / "out" / "report.md").read_text()
    assert str(broken) in md and "could not be reported" in md


def test_same_held_out_cases_from_the_split(built):
    root, cfg, result, *_ = built
    (fold,) = read_splits(root / "cache" / "splits.json")
    assert result.cases == sorted(fold.val) and len(result.cases) == 2
    assert all(r["cases"] == 2 for r in result.rows[:2])


def test_numbers_and_ratios(built):
    root, cfg, result, teacher, student, _ = built
    t, s = result.rows[0], result.rows[1]
    for row in (t, s):
        for key in ("params", "gmacs", "size_mb", "dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt",
                    "hd95_tc", "hd95_et", "iou_mean", "latency_ms_window", "latency_s_case"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), key
        assert row["dice_mean"] == pytest.approx(np.mean([row["dice_wt"], row["dice_tc"], row["dice_et"]]))
        assert row["threads"] == torch.get_num_threads()
    assert t["params"] == count_params(teacher) and s["params"] == count_params(student)
    assert t["gmacs"] == pytest.approx(count_macs(teacher, (1, 4, 32, 32, 32)))
    assert t["size_mb"] == pytest.approx((root / "runs" / "teacher" / "teacher.pt").stat().st_size / 1e6)
    for key in ("params_ratio", "gmacs_ratio", "size_ratio", "latency_ratio", "latency_case_ratio"):
        assert t[key] == 1.0
    assert s["params_ratio"] == pytest.approx(s["params"] / t["params"]) and s["params_ratio"] < 0.6
    assert s["gmacs_ratio"] == pytest.approx(s["gmacs"] / t["gmacs"])
    assert s["latency_ratio"] == pytest.approx(s["latency_ms_window"] / t["latency_ms_window"])
    # the all-background student: every case has a tumour and a core, so WT/TC Dice 0 and HD95 at
    # the empty-mask maximum; ET Dice 1 exactly on the cases without ET
    assert s["dice_wt"] == 0.0 and s["dice_tc"] == 0.0 and s["iou_mean"] <= s["dice_et"] / 3 + 1e-9
    assert s["hd95_wt"] == pytest.approx(HD95_EMPTY) and s["hd95_tc"] == pytest.approx(HD95_EMPTY)
    assert s["dice_et"] in (0.0, 0.5, 1.0)


def test_files_written(built):
    root, cfg, result, *_ = built
    out = root / "out"
    rows = json.loads((out / "report.json").read_text())
    assert isinstance(rows, list) and len(rows) == 3
    required = {"stage", "artifact", "params", "gmacs", "size_mb", "dice_wt", "dice_tc", "dice_et", "dice_mean",
                "hd95_wt", "hd95_tc", "hd95_et", "iou_mean", "latency_ms_window", "latency_s_case",
                "params_ratio", "gmacs_ratio", "size_ratio", "latency_ratio"}
    assert all(required <= set(r) for r in rows)
    assert rows[1]["params"] == result.rows[1]["params"]
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["stage"] for r in table] == ["teacher", "student", "lowrank"] and tuple(table[0]) == ROW_KEYS
    assert int(table[1]["params"]) == result.rows[1]["params"]
    for name in ("dice_vs_params.png", "dice_vs_latency.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = mpimg.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    md = (out / "report.md").read_text()
    assert "fvcore, 1 multiply-add = 1; attention and trilinear upsampling included" in md
    assert "INT8 alone does not make a 3D network fast" in md
    assert "published, other data" in md or "other data" in md
    assert f"{torch.get_num_threads()} thread(s)" in md and "OMP_WAIT_POLICY=" in md
    assert "## student: low-rank layers" in md and "encoder.stages.0.blocks.0.mlp.fc1" in md
    assert "## student: growth history" in md
    assert f"| teacher | {result.rows[0]['params']:,} |" in md


def test_discovery_prefers_stage_file(built):
    root, *_ = built
    found = find_artifacts([root / "runs"])
    names = [str(f.path.relative_to(root / "runs")) for f in found]
    assert names == ["teacher/teacher.pt", "student/train/best.pt", "lowrank/lowrank.pt"]
    # a missing file named on the command line is a row with its name, not a crash
    missing = find_artifacts([root / "nope" / "grown.pt"])
    assert missing[0].stage == "grown" and "no such artifact file" in missing[0].error
    with pytest.raises(ArtifactError, match="no such runs folder"):
        find_artifacts([root / "no-runs-here"])


def test_arch_profile_matches_count_macs(capsys):
    # small inputs keep the fvcore traces cheap; 128^3 figures are in REFERENCE.md
    full = profile_arch("segformer3d", 1.0, (32, 32, 32))
    assert full["params"] == 4_525_251
    model = RefineFormer3D(preset_spec("segformer3d", 0.25))
    thin = profile_arch("segformer3d", 0.25, (64, 32, 32))
    assert thin["params"] == 318_003 and thin["input"] == [64, 32, 32]
    assert thin["gmacs"] == pytest.approx(count_macs(model, (1, 4, 64, 32, 32)))
    assert thin["gmacs_no_upsample"] == pytest.approx(count_macs(model, (1, 4, 64, 32, 32), upsample=False))
    assert thin["gmacs_no_upsample"] < thin["gmacs"]
    assert full["gmacs"] > thin["gmacs"]  # at half the voxels, 14x the parameters
    assert report_cli.main(["--arch", "segformer3d", "--width", "0.25", "--input", "32", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "318,003" in out and "1x4x32x32x32" in out
