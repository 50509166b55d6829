import copy
import csv
import dataclasses
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
from common.config import Config, ConfigError, DataConfig, to_dict
import brats.inference
import brats.scoring
from brats.overlay import FIGURE_DPI, PANEL_INCHES
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from model.rewrites import inference_graph
from pipeline.runtimes import RUNTIMES
from pipeline.report import (ROW_KEYS, RUNTIME_KEYS, choose_cases, et_min_voxels, evaluate_artifact, find_artifacts,
                             growth_section, held_out_cases, int8_section, lowrank_section, make_report,
                             name_rows, profile_arch, rising_section, Found, guard_summary, rule_note,
                             few_cases_note)
from model.macs import count_macs
from pipeline.report import _num
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params, preset_spec

SHAPE = (40, 40, 32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# extra["lowrank"], extra["growth"], extra["int8"] as compress.lowrank / compress.grow / quantize.py write them
LOWRANK = {
    "mode": "energy", "energy": 0.9, "min_saving": 0.0, "params_before": 1000, "params_after": 900,
    "dice_mean_before_finetune": 0.70271, "metrics_before_finetune": {"dice_wt": 0.85, "hd95_wt": 12.9},
    "teacher": "runs/t/best.pt",
    "table": [
        {"layer": "encoder.stages.0.patch_embed.proj", "kind": "conv3d", "shape": [8, 4, 7, 7, 7], "rank": 7,
         "full_rank": 8, "energy_kept": 0.92346, "params_before": 10984, "params_after": 9668, "factorised": True},
        {"layer": "encoder.stages.0.blocks.0.attn.q", "kind": "linear", "shape": [8, 8], "rank": None,
         "full_rank": 8, "energy_kept": 1.0, "params_before": 72, "params_after": 72, "factorised": False},
    ],
}
GROWTH = [
    {"event": 0, "epoch": 2, "action": "grow", "reason": "loss plateau, Dice rose", "dice": 0.69279, "loss": 0.35,
     "params": 291259, "grown": [{"unit": "refine_dim", "old": 4, "new": 8, "score": 3.8e-4},
                                 {"unit": "ranks.decoder.projections.0.proj", "old": 7, "new": 8, "score": 8.3e-5}],
     "scores": {"refine_dim": 3.8e-4, "fuse_dim": 4.4e-6}, "params_after": 291919},
    {"event": 1, "epoch": 4, "action": "stop", "reason": "2 growth events done", "dice": 0.70775, "loss": 0.31,
     "params": 293215, "grown": []},
]
INT8 = {
    "decisions": [
        {"layer": "encoder.stages.0.patch_embed.proj.down", "type": "Conv3d", "shape": [1, 4, 96, 96, 64],
         "fp32_ms": 4.0, "int8_ms": 16.0, "choice": "fp32", "why": "measured"},
        {"layer": "encoder.stages.0.blocks.0.mlp.dwconv", "type": "Conv3d", "shape": [1, 32, 24, 24, 16],
         "fp32_ms": 1.5, "int8_ms": 1.2, "choice": "int8", "why": "measured"},
        {"layer": "decoder.head", "type": "Conv3d", "shape": [1, 16, 96, 96, 64],
         "fp32_ms": 80.0, "int8_ms": 200.0, "choice": "fp32", "why": "logits stay float"},
    ],
    "int8_layers": ["encoder.stages.0.blocks.0.mlp.dwconv"], "backend": "torch", "engine": "x86",
    "input_shape": [1, 4, 96, 96, 64], "act_qmax": 127, "qat_metrics": {"dice_mean": 0.70886, "val_cases": 2.0},
    "cpu_threads": 2,
}
LOWRANK_ROWS = [
    "| encoder.stages.0.patch_embed.proj | conv3d | 8x4x7x7x7 | 7 | 8 | 0.923 | 10,984 | 9,668 |",
    "| encoder.stages.0.blocks.0.attn.q | linear | 8x8 | – | 8 | 1.000 | 72 | 72 |",
]
GROWTH_ROWS = [
    # events count epochs from 0; the table from 1, as the grow log's "phase 0 (to epoch 3)"
    "| 0 | 3 | grow | loss plateau, Dice rose | 0.6928 (dice_mean) | 291,259 -> 291,919 "
    "| refine_dim 4->8, ranks.decoder.projections.0.proj 7->8 |",
    "| 1 | 5 | stop | 2 growth events done | 0.7077 (dice_mean) | 293,215 | – |",
]
INT8_ROWS = [
    "| encoder.stages.0.patch_embed.proj.down | Conv3d | 1x4x96x96x64 | 4.000 | 16.000 | 0.25x | fp32 |",
    "| encoder.stages.0.blocks.0.mlp.dwconv | Conv3d | 1x32x24x24x16 | 1.500 | 1.200 | 1.25x | int8 |",
    "| decoder.head | Conv3d | 1x16x96x96x64 | 80.000 | 200.000 | 0.40x | fp32 (logits stay float) |",
]


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
    # a stage folder: its one artifact, and the engine's resumable last.pt (not a row)
    Artifact("teacher", teacher.spec.to_dict(), teacher.state_dict(), config=stored).save(runs / "teacher" / "best.pt")
    Artifact("teacher", teacher.spec.to_dict(), teacher.state_dict(), config=stored).save(runs / "teacher" / "last.pt")
    extra = {"lowrank": LOWRANK, "growth": GROWTH, "int8": INT8}
    Artifact("student", student.spec.to_dict(), student.state_dict(), config=stored,
             extra=extra).save(runs / "student" / "student.pt")
    Artifact("student", student.spec.to_dict(), student.state_dict(), config=stored).save(
        runs / "student" / "qat" / "last.pt")  # a fine-tune's checkpoint below the stage's artifact
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
    assert rows[0]["artifact"].endswith("teacher/best.pt")
    assert rows[1]["artifact"].endswith("student/student.pt")
    assert rows[2]["artifact"] == str(broken) and str(broken) in rows[2]["error"]
    assert rows[2]["dice_mean"] is None and rows[0]["error"] is None and rows[1]["error"] is None
    assert [r["stage"] for r in result.failed] == ["lowrank"]
    md = (root / "out" / "report.md").read_text()
    assert str(broken) in md and "could not be reported" in md
    # only unusable artifacts: an error naming them before anything is written (the report above stays)
    with pytest.raises(ArtifactError, match=f"no usable artifact: {broken}: not a readable artifact"):
        make_report([broken], Config(report=cfg.report, train=cfg.train), root / "out", progress=False)
    assert (root / "out" / "report.md").read_text() == md


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
    assert t["size_mb"] == pytest.approx((root / "runs" / "teacher" / "best.pt").stat().st_size / 1e6)
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
    # ET predicted empty: every held-out case whose truth has ET, for the all-background student
    from brats.cache import open_cache

    cache = open_cache(root / "cache")
    with_et = sum(bool((np.asarray(cache.label(c)) == 4).any()) for c in result.cases)
    assert s["et_missed_cases"] == with_et and (s["dice_et"] == 0.0) == (with_et == len(result.cases))
    md = (root / "out" / "report.md").read_text()
    # "ET predicted empty" of the cases with ET, then "ET false" of those without (none: it predicts nothing)
    assert f"| student | {t['dice_wt'] - s['dice_wt']:+.3f} |" in md
    assert f"| {with_et} of {with_et} | 0 of {s['cases'] - with_et} |" in md
    assert s["truth_et_cases"] == with_et and s["et_false_cases"] == 0


def test_background_windows_counted_and_case_timed_both_ways(built):
    root, cfg, result, *_ = built
    from brats.cache import open_cache
    from brats.inference import window_starts

    cache = open_cache(root / "cache")
    expected = sum(np.prod([len(window_starts(max(n, 32), 32, 0.5)) for n in cache.meta(c).shape])
                   for c in result.cases)
    for row in result.rows[:2]:
        assert row["windows"] == expected and 0 <= row["windows_skipped"] < row["windows"]
        assert row["latency_s_case_noskip"] > 0 and row["latency_s_case"] > 0
    md = (root / "out" / "report.md").read_text()
    t = result.rows[0]
    assert "| stage | windows skipped | s / case | s / case, every window |" in md
    assert f"| teacher | {t['windows_skipped']} of {t['windows']} | {t['latency_s_case']:.2f} |" in md


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
    for title, rows in (("low-rank layers", LOWRANK_ROWS), ("growth history", GROWTH_ROWS),
                        ("INT8 decisions", INT8_ROWS)):
        section = md.split(f"## student: {title}\n")[1].split("\n## ")[0]
        assert "From `" + str(root / "runs" / "student" / "student.pt") + "`." in section
        assert all(row in section.splitlines() for row in rows), title
    assert "metrics_before_finetune" not in md and "fuse_dim" not in md  # no raw dumps of nested data
    assert "the BraTS ET rule per artifact" in md and "| off |" in md  # no rule recorded: train's 0
    assert f"| teacher | {result.rows[0]['params']:,} |" in md


def test_every_runtime_timed_and_the_fastest_used(built):
    root, cfg, result, *_ = built
    md = (root / "out" / "report.md").read_text()
    stored = json.loads((root / "out" / "report.json").read_text())
    runtimes = md.split("## Runtimes\n")[1].split("\n## ")[0]
    for row, saved in zip(result.rows[:2], stored):
        timed = {name: row[key] for name, key in RUNTIME_KEYS.items() if row[key] is not None}
        assert {"torch", "onnxruntime"} <= set(timed)  # FP32 always exports; openvino where installed
        assert set(timed) | set(row["runtime_notes"]) == set(RUNTIMES)
        assert row["runtime"] == min(timed, key=timed.get) and row["latency_ms_window"] == timed[row["runtime"]]
        assert saved["runtime"] == row["runtime"] and saved["runtime_notes"] == row["runtime_notes"]
        for name in RUNTIMES:
            ms = row[RUNTIME_KEYS[name]]
            cells = f"| {row['stage']} | {name} | " + ("–" if ms is None else f"{ms:.1f} | {ms / timed[row['runtime']]:.2f}x")
            assert cells in runtimes, cells
        assert f"| {row['stage']} | {row['runtime']} | {timed[row['runtime']]:.1f} | 1.00x | used |" in runtimes
    assert "lowrank" not in runtimes  # the broken artifact has no runtime rows


def test_profile_per_stage_and_an_onnx_artifact_says_why_not(built, tmp_path):
    root, cfg, _, _, student, _ = built
    shape = (1, 4, *cfg.report.input)
    data = export_onnx(inference_graph(student), shape)
    onnx = Artifact("int8", onnx_spec(list(shape), len(data), student.spec.to_dict(), "fp32"),
                    OrtModel.from_bytes(data, list(shape)).state_dict(), config=to_dict(cfg)).save(tmp_path / "int8.pt")
    rep = dataclasses.replace(cfg.report, profile=True, profile_top=4, plots=False, case_latency=False, max_cases=1,
                              runtime="torch")
    result = make_report([root / "runs" / "teacher" / "best.pt", onnx], Config(report=rep, train=cfg.train),
                         tmp_path / "out", progress=False)
    teacher, int8 = result.rows
    assert teacher["runtime"] == "torch" and not teacher["runtime_notes"]  # as asked
    assert int8["runtime"] in ("onnxruntime", "openvino")  # torch cannot run it: the fastest, and why
    assert "torch asked for, not usable" in int8["runtime_notes"][int8["runtime"]]
    assert (teacher["runtime_asked"], int8["runtime_asked"]) == (None, "torch")
    prof = teacher["profile"]
    assert len(prof["ops"]) == 4 and len(prof["modules"]) == 4 and prof["peak_gmacs_per_s"] > 0
    assert 0 < sum(o["share"] for o in prof["ops"]) <= 1 and 0 < sum(m["self_share"] for m in prof["modules"]) <= 1
    assert prof["gmacs"] == pytest.approx(teacher["gmacs"], rel=0.2)  # rewritten graph: fewer at most
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## teacher: where the time goes\n")[1].split("\n## ")[0]
    assert f"{prof['peak_gmacs_per_s']:.1f} G multiply-adds/s, measured on a 2048x2048 fp32 torch.mm" in section
    op = prof["ops"][0]
    assert f"| {op['op']} | {op['calls']} | {op['total_ms']:.2f} | {100 * op['share']:.1f} % |" in section
    assert f"| {prof['modules'][0]['module']} | {prof['modules'][0]['type']} |" in section
    assert "## int8: where the time goes\n\nNot profiled: an ONNX artifact runs inside ONNX Runtime" in md
    assert f"| {int8['runtime']} (torch cannot run it) |" in md  # the results table says it was not the one asked
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved[0]["profile"]["ops"][0]["op"] == op["op"] and "error" in saved[1]["profile"]


def test_an_onnx_graph_of_another_input_size_is_timed_at_its_own_and_not_compared(built, tmp_path):
    """A fixed-shape ONNX artifact (exported for its stage's window) takes no other input: its G MACs and
    window latency are measured at its own shape, marked so, left out of the ratios and the latency plots;
    a report window it cannot slide is refused before any work, naming the file and the fix."""
    root, cfg, _, _, student, _ = built
    shape = (1, 4, 32, 32, 32)  # the report window (train.window); report.input below is another size
    data = export_onnx(inference_graph(student), shape)
    onnx = Artifact("int8", onnx_spec(list(shape), len(data), student.spec.to_dict(), "fp32"),
                    OrtModel.from_bytes(data, list(shape)).state_dict(), config=to_dict(cfg)).save(tmp_path / "int8.pt")
    rep = dataclasses.replace(cfg.report, input=[64, 32, 32], plots=False, case_latency=False, max_cases=1)
    teacher = root / "runs" / "teacher" / "best.pt"
    result = make_report([teacher, onnx], Config(report=rep, train=cfg.train), tmp_path / "out", progress=False)
    ref, int8 = result.rows
    assert int8["error"] is None and int8["dice_mean"] is not None and _num(int8["latency_ms_window"])
    assert (ref["input"], int8["input"]) == ([64, 32, 32], [32, 32, 32])
    assert int8["gmacs"] == pytest.approx(count_macs(student, shape), rel=1e-6)  # its shape, not report.input
    assert int8["gmacs_ratio"] is None and int8["latency_ratio"] is None  # measured at another input
    assert int8["params_ratio"] == pytest.approx(count_params(student) / ref["params"])  # input-free: kept
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| {int8['latency_ms_window']:.1f} (at 32x32x32) |" in md and f"{int8['gmacs']:.2f} (at 32x32x32)" in md
    assert f"| {ref['latency_ms_window']:.1f} |" in md  # the report's own input: no mark
    assert '"(at DxHxW)": an ONNX graph takes only the input it was exported for' in md  # and why, once
    other = dataclasses.replace(cfg.train, window=[64, 32, 32])
    with pytest.raises(ConfigError, match=rf"^{onnx}: an ONNX graph exported for 32x32x32 windows cannot slide a "
                                          r"report window \(report.window, else train.window\) of 64x32x32; "
                                          r"pass --set report.window=\[32,32,32\]"):
        make_report([teacher, onnx], Config(report=rep, train=other), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    # two ONNX graphs of different sizes share no window: said as such (each one's hint named the other's size)
    shape2 = (1, 4, 64, 32, 32)
    data2 = export_onnx(inference_graph(student), shape2)
    onnx2 = Artifact("int8", onnx_spec(list(shape2), len(data2), student.spec.to_dict(), "fp32"),
                     OrtModel.from_bytes(data2, list(shape2)).state_dict()).save(tmp_path / "b" / "int8.pt")
    with pytest.raises(ConfigError, match=r"ONNX graphs exported for different window sizes cannot share one report "
                                          r"window \(.*\); report them separately") as refused:
        make_report([onnx, onnx2], Config(report=rep, train=cfg.train), tmp_path / "refused", progress=False)
    assert f"{onnx}: 32x32x32" in str(refused.value) and f"{onnx2}: 64x32x32" in str(refused.value)
    assert not (tmp_path / "refused").exists()


def test_discovery_skips_only_resumable_checkpoints(built):
    root, *_ = built
    found = find_artifacts([root / "runs"])
    names = [str(f.path.relative_to(root / "runs")) for f in found]
    assert names == ["teacher/best.pt", "student/student.pt", "lowrank/lowrank.pt"]
    # a checkpoint named on the command line is kept, under its folder's stage
    explicit = root / "runs" / "student" / "qat" / "last.pt"
    found = find_artifacts([root / "runs", explicit])
    assert [f.stage for f in found] == ["teacher", "student", "student", "lowrank"]
    assert explicit in [f.path for f in found] and all(f.error is None for f in found[:3])
    assert [f.path.name for f in find_artifacts([root / "runs" / "teacher"])] == ["best.pt"]
    # a missing file named on the command line is a row with its name, not a crash
    missing = find_artifacts([root / "nope" / "grown.pt"])
    assert missing[0].stage == "grown" and "no such artifact file" in missing[0].error
    with pytest.raises(ArtifactError, match="no such runs folder"):
        find_artifacts([root / "no-runs-here"])


def test_a_folder_of_training_states_only_says_so(tmp_path):
    (tmp_path / "run" / "slim").mkdir(parents=True)
    (tmp_path / "run" / "slim" / "last.pt").write_bytes(b"state")
    with pytest.raises(ArtifactError, match=r"no artifact \(\*\.pt\) found in .*run \(only training states, which "
                                            r"are not artifacts: .*slim/last.pt; finish the run, or --resume it"):
        make_report([tmp_path / "run"], Config(), tmp_path / "report", progress=False)
    assert not (tmp_path / "report").exists()


def test_rows_sharing_a_stage_are_told_apart_by_their_path(built, tmp_path):
    """Two chains in one runs folder: each shared stage's rows are named with their artifact's path under
    the shared folder, in the tables too; a stage of its own keeps its bare name."""
    rows = [{"stage": "teacher", "artifact": str(tmp_path / "demo" / "teacher" / "best.pt")},
            {"stage": "teacher", "artifact": str(tmp_path / "bench" / "teacher" / "best.pt")},
            {"stage": "int8", "artifact": str(tmp_path / "demo" / "int8" / "int8.pt")}]
    name_rows(rows)
    assert [r["name"] for r in rows] == ["teacher (demo/teacher/best.pt)", "teacher (bench/teacher/best.pt)", "int8"]
    root, cfg, result, *_ = built
    assert [r["name"] for r in result.rows] == [r["stage"] for r in result.rows]  # no shared stage there
    other = tmp_path / "other" / "teacher" / "best.pt"  # a second chain's teacher beside the fixture's runs
    other.parent.mkdir(parents=True)
    other.write_bytes((root / "runs" / "teacher" / "best.pt").read_bytes())
    cfg = copy.deepcopy(cfg)
    cfg.report.plots = False
    both = make_report([root / "runs", other], cfg, tmp_path / "out", progress=False)
    names = [r["name"] for r in both.rows if r["stage"] == "teacher"]
    assert len(names) == 2 and len(set(names)) == 2 and all(n.startswith("teacher (") for n in names)
    md = both.files["md"].read_text()
    assert all(f"| {n} |" in md for n in names)


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


def test_lowrank_section_rule_line_and_layer_table():
    lines = lowrank_section(LOWRANK)
    assert lines[0] == (
        "Rule: keep 90% of each layer's spectral energy; a layer is factorised only when it saves more than 0% "
        "of its parameters. Parameters 1,000 -> 900 (-10.0%); 1 of 2 candidate layers factorised; Dice mean "
        "before fine-tune 0.703; fine-tune teacher `runs/t/best.pt`. Rank – : the layer stays unfactorised."
    )
    table = lines[2].splitlines()
    assert table[0] == "| layer | kind | shape | rank | full rank | energy kept | params before | params after |"
    assert table[2:] == LOWRANK_ROWS
    # other rules, and a bare per-layer list
    ratio = lowrank_section({**LOWRANK, "mode": "ratio", "ratio": 0.5, "min_saving": 0.25, "table": []})
    assert ratio[0].startswith("Rule: rank = 0.5 x full rank; a layer is factorised only when it saves more than 25%")
    assert len(ratio) == 1 and "unfactorised" not in ratio[0]
    assert lowrank_section(LOWRANK["table"])[2].splitlines()[2:] == LOWRANK_ROWS


def test_lowrank_section_of_an_auto_budget_shows_the_search():
    search = [{"share": 0.25, "params_after": 250, "metrics": {"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.6},
               "drop": 0.05, "within": False},
              {"share": 0.35, "params_after": 340, "metrics": {"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.69},
               "drop": -0.001, "within": True}]
    info = {**LOWRANK, "mode": "auto", "shares": [0.1, 0.25, 0.35, 0.5], "tolerance": 0.005, "params": 350,
            "params_share": 0.35, "search": search, "unreachable": [0.1], "cases": 8,
            "reference": {"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.65}}
    lines = lowrank_section(info)
    assert lines[0].startswith("Rule: parameter budget chosen on validation: 35% of the model (350), the smallest "
                               "of 25%, 35%, 50% whose factorised model kept every region's Dice within 0.005 of the "
                               "source's on the stage's 8 validation cases (ET rule off), before fine-tune (10% below "
                               "what factorisation can reach: not tried)")
    searched = lines[2].splitlines()
    assert searched[0] == ("| share tried | params after | Dice WT | Dice TC | Dice ET | largest region drop | within "
                           "| kept |")
    assert searched[2:] == ["| source | 1,000 | 0.900 | 0.800 | 0.650 | – | – |  |",
                            "| 25% | 250 | 0.900 | 0.800 | 0.600 | +0.050 | no |  |",
                            "| 35% | 340 | 0.900 | 0.800 | 0.690 | -0.001 | yes | yes |"]
    assert lines[4].splitlines()[2:] == LOWRANK_ROWS
    # no share within the tolerance: the report says so instead of claiming it
    over = [{**search[0], "drop": 0.0004, "within": False}, {**search[1], "drop": 0.02, "within": False}]
    lines = lowrank_section({**info, "tolerance": 0.0, "params_share": None, "params": None, "search": over})
    assert "no share of 25%, 35%, 50% kept every region's Dice within 0.000" in lines[0]
    assert "the model was left unfactorised" in lines[0] and "whose factorised model kept" not in lines[0]
    assert lines[2].splitlines()[3] == "| 25% | 250 | 0.900 | 0.800 | 0.600 | +0.000 | no |  |"


def test_growth_section_events_and_units():
    (table,) = growth_section(GROWTH)
    lines = table.splitlines()
    assert lines[0] == "| phase | last epoch | action | reason | best validation Dice (train.select) | params | units grown (old->new) |"
    assert lines[2:] == GROWTH_ROWS
    # a run that records which phase it kept gets a column for it
    (table,) = growth_section([{**GROWTH[0], "kept": True}, {**GROWTH[1], "kept": False}])
    lines = table.splitlines()
    assert lines[0].endswith("| units grown (old->new) | kept |")
    assert lines[2] == GROWTH_ROWS[0] + " yes |" and lines[3] == GROWTH_ROWS[1] + "  |"


def test_int8_section_summary_and_per_layer_choice():
    lines = int8_section(INT8)
    assert lines[0] == (
        "1 of 3 layers run in INT8 (backend torch, engine x86, layers timed in a 1x4x96x96x64 forward pass, "
        "2 thread(s), activations 0..127). Sum of per-layer times: 85.5 ms all FP32, 85.2 ms as chosen. "
        "Dice mean after quantisation-aware fine-tune: 0.709."
    )
    table = lines[2].splitlines()
    assert table[0] == "| layer | type | input shape | FP32 ms | INT8 ms | INT8 speed-up | choice |"
    assert table[2:] == INT8_ROWS


def test_et_min_voxels_reaches_the_scoring_loop(built, monkeypatch):
    root, cfg, *_ = built
    seen = []
    real = brats.scoring.suppress_small_et

    def spy(label, min_voxels):
        seen.append(min_voxels)
        return real(label, min_voxels)

    monkeypatch.setattr(brats.scoring, "suppress_small_et", spy)  # the one scoring loop applies the rule
    cfg = copy.deepcopy(cfg)
    cfg.report.case_latency, cfg.train.et_min_voxels = False, 7
    (found,) = find_artifacts([root / "runs" / "teacher" / "best.pt"])
    cache, cases, _ = held_out_cases(cfg, cfg.data, 1)
    assert et_min_voxels(cfg) == 7  # report.et_min_voxels None: the training setting
    evaluate_artifact(found, cfg, cache, cases, "regions", progress=False)
    cfg.report.et_min_voxels = 0  # the report's own setting wins, 0 included
    evaluate_artifact(found, cfg, cache, cases, "regions", progress=False)
    found.artifact.extra["et_rule"] = {"et_min_voxels": 25}  # calibrated for the artifact by its stage
    cfg.report.et_min_voxels = None
    row = evaluate_artifact(found, cfg, cache, cases, "regions", progress=False)
    assert seen == [7, 0, 25] and row["et_min_voxels"] == 25


def test_bad_report_settings_are_refused_before_any_work(built):
    root, cfg, *_ = built
    for key, value, why in (("et_min_voxels", -5, "report.et_min_voxels must be >= 0"),
                            ("latency_runs", 0, "report.latency_runs=0: must be >= 1"),
                            ("warmup_runs", -1, "report.warmup_runs=-1: must be >= 0"),
                            ("profile_top", 0, "report.profile_top=0: must be >= 1"),
                            ("window", [48, 48, 48], r"report window \(48, 48, 48\) must be three multiples"),
                            ("input", [40, 32, 32], r"report\.input \(40, 32, 32\) must be three multiples")):
        bad = copy.deepcopy(cfg)
        setattr(bad.report, key, value)
        with pytest.raises(ConfigError, match=why):
            make_report([root / "runs"], bad, root / "never", progress=False)
        assert not (root / "never").exists()


def test_case_figures_median_and_worst_one_column_per_stage(built):
    root, cfg, result, *_ = built
    out = root / "out"
    figures = {k: p for k, p in result.files.items() if k.startswith("case_")}
    assert sorted(figures) == ["case_median", "case_worst"]  # 2 held-out cases: two different ones
    good = [r for r in result.rows if not r["error"]]
    for path in figures.values():
        assert path.parent == out and path.read_bytes().startswith(PNG_MAGIC)
        # the truth, then teacher and student (the broken lowrank has no column)
        assert mpimg.imread(path).shape[1] == round((1 + len(good)) * PANEL_INCHES * FIGURE_DPI)
    md = (out / "report.md").read_text()
    assert "## Cases to look at" in md and "![" in md and "(case_median.png)" in md and "(case_worst.png)" in md
    assert "(dice_vs_latency_regions.png)" in md and (out / "dice_vs_latency_regions.png").exists()
    assert "Official BraTS metrics" not in md  # legacy only unless asked
    # median: the upper one of an even count; worst: the lowest; ties by name; one case is both
    scores = [{"case": "b", "dice_mean": 0.5}, {"case": "a", "dice_mean": 0.9}, {"case": "c", "dice_mean": 0.5},
              {"case": "d", "dice_mean": 0.7}]
    assert choose_cases(scores) == {"median": "d", "worst": "b"}
    assert choose_cases(scores[:1]) == {"median": "b", "worst": "b"} and choose_cases([]) == {}


def test_the_reference_is_the_teacher_the_others_descend_from(tmp_path):
    from pipeline.report import Found, pick_reference

    def art(stage, path, lineage=()):
        a = Artifact(stage=stage, spec={}, state_dict={}, lineage=list(lineage), path=path)
        return Found(path, stage, artifact=a)

    t1, t2 = art("teacher", tmp_path / "a" / "best.pt"), art("teacher", tmp_path / "b" / "best.pt")
    child = art("student", tmp_path / "s.pt", [{"stage": "teacher", "path": str(tmp_path / "b" / "best.pt")}])
    assert pick_reference([t1, t2, child]) is t2  # runs/ holding a second, unrelated teacher
    assert pick_reference([t1, t2]) is t1 and pick_reference([child]) is child and pick_reference([]) is None


def test_the_report_names_the_stages_whose_epochs_ran_out_while_improving(tmp_path):
    def found(stage, rising=None):
        art = Artifact(stage=stage, spec={}, state_dict={}, extra={"epoch": 20, **({"rising": rising} if rising else {})})
        return Found(tmp_path / f"{stage}.pt", stage, art)
    rec = {"epoch": 20, "epochs": 20, "select": "pooled_dice_mean", "earlier": 0.559, "last": 0.674}
    lines = rising_section([found("teacher"), found("student", rec), found("slim", {**rec, "last": 0.6}),
                            Found(tmp_path / "bad.pt", "bad", error="unreadable")])
    assert lines[0].startswith("Still improving when their epochs ran out (best at the last validation, the end of "
                               "their learning-rate schedule): student (epoch 20 of 20, pooled_dice_mean 0.559 -> "
                               "0.674), slim (epoch 20 of 20, pooled_dice_mean 0.559 -> 0.600). A longer run")
    assert rising_section([found("teacher")]) == []


def test_guard_verdicts_and_differing_et_rules_are_spelled_out():
    """report.md shows each stage's guard verdict (it was only a log line), and warns when the rows' ET
    rules differ: a foreign data set's report showed ET 0.176 -> 0.476 between teacher and INT8 from their
    rules alone (one case without ET flipping)."""
    info = {"source": "teacher", "limit": 0.1, "strict": False, "violations": ["tc"],
            "drops": {"wt": 0.05, "tc": 0.157, "et": 0.066}}
    assert guard_summary(info) == "TC -0.157 vs teacher (limit 0.1)"
    assert guard_summary({**info, "strict": True}) == "TC -0.157 vs teacher (limit 0.1) strict"
    assert guard_summary({**info, "violations": []}) == "ok"
    assert guard_summary(None) is None and guard_summary({"drops": "?"}) is None
    rows = [{"name": "teacher", "et_min_voxels": 0, "dice_et": 0.176, "dice_et_norule": 0.176},
            {"name": "int8", "et_min_voxels": 100, "dice_et": 0.476, "dice_et_norule": 0.143},
            {"name": "bad", "error": "unreadable", "et_min_voxels": None}]
    (line, blank) = rule_note(rows)
    assert line.startswith("**The rows' ET rules differ** (each calibrated on its artifact's validation cases); "
                           "it moves int8's ET Dice 0.143 -> 0.476: compare models by \"Dice ET, rule off\"")
    assert rule_note(rows[:1] + [{**rows[1], "et_min_voxels": 0}]) == []  # one rule: nothing to say


def test_a_report_on_few_held_out_cases_says_how_far_one_case_moves_a_mean():
    (line,) = few_cases_note(3)
    assert line.startswith("**Only 3 held-out case(s)**: one case moves a region's mean Dice by up to 0.33")
    assert line.endswith("capped by report.max_cases and data.max_val_cases.")
    assert few_cases_note(8) == [] and few_cases_note(0) == []
