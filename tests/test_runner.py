"""engine.runner: guard rails, teacher lookup and source checks of the one stage runner."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from brats.layout import DataError
from brats.metrics import score_case
from brats.scoring import mean_rows, pooled_dice, voxel_counts
from common.artifact import Artifact, ArtifactError
from common.config import Config, ConfigError
from engine.runner import as_served, check_source, source_as_served, exit_code, find_teacher, guard, guard_lines


def _metrics(wt, tc, et, missed=0.0):
    return {"dice_wt": wt, "dice_tc": tc, "dice_et": et, "et_missed_cases": missed}


def test_guard_flags_each_region_that_drops_more_than_the_limit():
    cfg = Config()
    info = guard(_metrics(0.90, 0.70, 0.10, missed=3), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert info["drops"] == pytest.approx({"wt": 0.02, "tc": 0.15, "et": 0.70})
    assert info["violations"] == ["tc", "et"] and info["limit"] == 0.10
    lines = guard_lines(info, "student")
    assert "ET predicted empty on 3 case(s)" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["WARNING", "WARNING"]
    assert "TC Dice dropped 0.150" in lines[1] and "(--strict)" not in lines[1]
    art = Artifact(stage="student", spec={}, state_dict={}, extra={"guard": info})
    assert exit_code(art) == 0  # warnings only
    cfg.guard.strict = True
    art.extra["guard"] = guard(_metrics(0.90, 0.70, 0.10), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert exit_code(art) == 3 and "failing (--strict)" in guard_lines(art.extra["guard"], "student")[1]
    cfg.guard.max_region_drop = 0.8
    art.extra["guard"] = guard(_metrics(0.90, 0.70, 0.10), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert exit_code(art) == 0 and art.extra["guard"]["violations"] == []


def test_the_guard_compares_models_as_served_each_with_its_et_rule():
    """The demo's slim model: rule off it has a small false ET on the validation case without ET (ET 0.622
    against the student's 0.888, a "drop" of 0.27); its calibrated rule (< 200 voxels) removes it, and
    that is what predict.py serves. The guard compares served figures and names the rules."""
    rule = {"grid": [0, 10, 200], "dice_et": [0.622, 0.622, 0.872], "et_missed": [0, 0, 0], "et_min_voxels": 200,
            "cases": 4}
    slim = {**_metrics(0.959, 0.934, 0.622), "val_cases": 4.0}
    served, k = as_served(slim, rule)
    assert k == 200 and served["dice_et"] == 0.872 and served["dice_wt"] == 0.959 and slim["dice_et"] == 0.622
    assert as_served(slim, None) is None  # no record (an older artifact): rule off
    assert as_served(slim, {**rule, "cases": 3}) is None  # calibrated on other cases: not comparable
    assert as_served(slim, {**rule, "et_min_voxels": 25}) is None  # a threshold the record has no figure for
    assert as_served(slim, {k: v for k, v in rule.items() if k != "et_missed"}) is None  # an older record
    assert as_served(slim, {**rule, "dice_et": [0.622]}) is None  # lists of another length
    # the source: ET at its own rule from the same pass (score_cases' served_rule figures)
    src = {**_metrics(0.97, 0.94, 0.30, missed=1), "dice_et_served": 0.88, "et_missed_served_cases": 0.0}
    assert source_as_served(src)["dice_et"] == 0.88 and source_as_served(src)["et_missed_cases"] == 0.0
    assert source_as_served(_metrics(0.97, 0.94, 0.30)) == _metrics(0.97, 0.94, 0.30)  # scored without them
    student = _metrics(0.973, 0.943, 0.888)
    assert guard(slim, student, "student", Config())["violations"] == ["et"]  # rule off: a false alarm
    info = guard(served, student, "student", Config(), (0, k))
    assert info["violations"] == [] and info["et_rules"] == {"source": 0, "result": 200}
    assert "same cases (each with its ET rule: source off, slim < 200 voxels):" in guard_lines(info, "slim")[0]


def test_et_missed_cases_are_counted_not_averaged_away():
    rows = [{"case": "a", "dice_et": 1.0, "et_missed": 0.0}, {"case": "b", "dice_et": 0.0, "et_missed": 1.0},
            {"case": "c", "dice_et": 0.9, "et_missed": 0.0}, {"case": "d", "dice_et": 0.0, "et_missed": 1.0}]
    out = mean_rows(rows)
    assert out["et_missed_cases"] == 2.0 and out["et_missed"] == 0.5 and math.isclose(out["dice_et"], 0.475)


def test_teacher_lookup_and_source_checks(tmp_path):
    teacher = Artifact(stage="teacher", spec={}, state_dict={}, path=tmp_path / "t.pt")
    student = Artifact(stage="student", spec={"kind": "fp32"}, state_dict={}, lineage=teacher.child_lineage(),
                       config={"data": {"scheme": "seed3"}}, path=tmp_path / "s.pt")
    assert find_teacher(teacher) == str(tmp_path / "t.pt")  # a teacher is its own
    assert find_teacher(student) == str(tmp_path / "t.pt")  # the lineage's
    assert find_teacher(student, "other.pt") == "other.pt"  # explicit wins
    assert find_teacher(Artifact(stage="student", spec={}, state_dict={})) is None
    with pytest.raises(ConfigError, match="scheme 'seed3'"):
        check_source(student, Config(), ("fp32",), "lowrank")
    int8 = Artifact(stage="int8", spec={"kind": "int8-torch"}, state_dict={}, path=tmp_path / "q.pt")
    with pytest.raises(ArtifactError, match="needs a fp32 artifact, got kind 'int8-torch'"):
        check_source(int8, Config(), ("fp32",), "grown")


def test_et_rule_calibration_picks_the_threshold_that_helps_et_dice(monkeypatch):
    """Case a: true ET of 30 voxels, found. Case b: no ET, 12 false ET voxels. Thresholds up to 12
    keep b's false ET (Dice 0 there); 25 removes it and keeps a's; 50 and up also remove a's."""
    import numpy as np

    import brats.scoring as scoring
    from brats.dataset import ValCase

    truth_a = np.zeros((8, 8, 8), np.int64)
    truth_a.flat[:30] = 4
    pred_a = truth_a.astype(np.uint8)
    pred_b = np.zeros((8, 8, 8), np.uint8)
    pred_b.flat[100:112] = 4
    cases = [ValCase("a", torch.zeros(4, 8, 8, 8), torch.from_numpy(truth_a), None),
             ValCase("b", torch.zeros(4, 8, 8, 8), torch.zeros(8, 8, 8, dtype=torch.int64), None)]
    monkeypatch.setattr(scoring, "iter_cases", lambda cache, ids: iter(cases))
    preds = {id(cases[0].image): pred_a, id(cases[1].image): pred_b}
    monkeypatch.setattr(scoring, "predict_case", lambda predict, image, *a, **k: preds[id(image)])
    out = scoring.calibrate_et_rule(None, None, ["a", "b"], Config(), grid=(0, 10, 25, 50))
    assert out["dice_et"] == pytest.approx([0.5, 0.5, 1.0, 0.5]) and out["et_min_voxels"] == 25
    assert out["cases"] == 2


def test_every_scoring_pass_runs_in_ieee_fp32_on_cuda(monkeypatch):
    """score_cases and calibrate_et_rule predict with TF32 off (faked CUDA: the switches exist on a CPU
    build), and leave the switches as they found them."""
    import brats.scoring as scoring
    from brats.dataset import ValCase

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    seen = []

    def predict_case(predict, image, *a, **k):
        seen.append((conv.fp32_precision, matmul.fp32_precision))
        return np.zeros((4, 4, 4), np.uint8)

    meta = type("Meta", (), {"spacing": (1.0, 1.0, 1.0)})()
    case = ValCase("a", torch.zeros(4, 4, 4, 4), torch.zeros(4, 4, 4, dtype=torch.int64), meta)
    monkeypatch.setattr(scoring, "iter_cases", lambda cache, ids: iter([case]))
    monkeypatch.setattr(scoring, "predict_case", predict_case)
    monkeypatch.setattr(scoring, "score_case", lambda pred, truth, spacing: {"dice_wt": 1.0})
    scoring.score_cases(None, None, ["a"], Config())
    scoring.calibrate_et_rule(None, None, ["a"], Config(), grid=(0,))
    assert seen == [("ieee", "ieee")] * 2
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_a_stage_takes_its_sources_data_and_split_unless_told(tmp_path):
    from engine.runner import inherit_data

    data = tmp_path / "brats17"
    data.mkdir()
    stored = {"dir": str(data), "fold": 1, "folds": 5, "val_fraction": 0.2, "split_seed": 3,
              "crop": [128, 128, 128], "max_val_cases": None}
    art = Artifact(stage="teacher", spec={}, state_dict={}, config={"data": stored}, path=tmp_path / "best.pt")
    cfg = Config()
    cfg.data.crop = [64, 64, 64]  # how crops are drawn stays the stage's own
    line = inherit_data(art, cfg, given=False)
    assert (cfg.data.dir, cfg.data.fold, cfg.data.folds, cfg.data.split_seed) == (str(data), 1, 5, 3)
    assert cfg.data.crop == [64, 64, 64] and "from the source artifact" in line and str(data) in line
    other = Config()
    other.data.dir = "/data/other"
    line = inherit_data(art, other, given=True)
    assert other.data.dir == "/data/other" and line.startswith("WARNING: data differs from the source's (dir, fold")
    same = Config()
    same.data.dir, same.data.fold, same.data.folds, same.data.split_seed = str(data), 1, 5, 3
    assert inherit_data(art, same, given=True) == f"data: {data} (as the source's)"
    own_cache = Config()
    own_cache.data.cache = str(tmp_path / "my-cache")  # --set data.cache alone: the source's data, this cache
    inherit_data(art, own_cache, given=False)
    assert (own_cache.data.dir, own_cache.data.cache) == (str(data), str(tmp_path / "my-cache"))
    data.rename(tmp_path / "moved")  # the data set moved since: say where to point
    with pytest.raises(DataError, match=f"data folder {data}, recorded in .*best.pt .* does not exist: pass --data DIR"):
        inherit_data(art, Config(), given=False)


def test_a_source_validated_on_other_cases_is_a_warning():
    from engine.runner import changed_cases

    art = Artifact(stage="teacher", spec={}, state_dict={}, extra={"val_cases": ["a", "b"]}, path=Path("best.pt"))
    assert changed_cases(art, ["b", "a"]) is None
    assert changed_cases(Artifact(stage="teacher", spec={}, state_dict={}), ["x"]) is None  # older artifacts: no record
    line = changed_cases(art, ["b", "c", "d"])
    assert line.startswith("WARNING: best.pt was validated on 2 case(s), 1 of them among today's 3")


def test_data_paths_are_recorded_absolute_and_old_relative_ones_found_from_any_folder(tmp_path, monkeypatch):
    from common.cli import config_from_args, stage_parser
    from common.paths import project_path
    from engine.runner import inherit_data

    monkeypatch.chdir(tmp_path)
    args = stage_parser("x", "x").parse_args(["--data", "mydata", "--set", "data.cache=c"])
    cfg = config_from_args(args)
    assert (cfg.data.dir, cfg.data.cache) == (str(tmp_path / "mydata"), str(tmp_path / "c"))
    # an artifact written by an older version from the project folder (the demo's data/synthetic)
    art = Artifact(stage="teacher", spec={}, state_dict={}, config={"data": {"dir": "configs"}}, path=tmp_path / "b.pt")
    fresh = Config()
    inherit_data(art, fresh, given=False)
    assert fresh.data.dir == str(project_path("configs"))


def test_pooled_dice_gives_no_free_score_for_never_predicting_et():
    """Two cases, one with ET. Never predicting ET: per-case ET Dice 0.5 (the case without ET scores 1),
    pooled 0. Finding 12 of the 20 ET voxels with a 10-voxel false blob on the other case: per-case
    0.375, pooled 0.571."""
    truth_et, truth_none = np.zeros((10, 10, 10), np.uint8), np.zeros((10, 10, 10), np.uint8)
    truth_et[2:6, 2:6, 2:6], truth_none[2:6, 2:6, 2:6] = 2, 2  # edema 4^3 in both
    truth_et[3:5, 3:5, 2:7] = 4  # 20 ET voxels
    never = [truth_et.copy(), truth_none.copy()]
    never[0][never[0] == 4] = 1
    finds = [truth_et.copy(), truth_none.copy()]
    finds[0][3:5, 3:5, 2:4] = 1  # 8 of the 20 ET voxels missed: 12 found
    finds[1][3:5, 3:5, 2:5] = 4  # 12 false ET voxels...
    finds[1][3, 3, 2:4] = 2  # ...10 after this
    rows = {}
    for name, preds in (("never", never), ("finds", finds)):
        rows[name] = mean_rows([{"case": str(i), **score_case(p, t), **voxel_counts(p, t)}
                                for i, (p, t) in enumerate(zip(preds, (truth_et, truth_none)))])
    assert math.isclose(rows["never"]["dice_et"], 0.5) and rows["never"]["pooled_dice_et"] == 0.0
    assert math.isclose(rows["finds"]["dice_et"], 2 * 12 / (12 + 20) / 2)  # 0.375: below "never"
    assert math.isclose(rows["finds"]["pooled_dice_et"], 2 * 12 / (2 * 12 + 10 + 8))  # 0.571: above it
    assert rows["never"]["pooled_dice_wt"] == rows["finds"]["pooled_dice_wt"] == 1.0
    assert math.isclose(rows["finds"]["pooled_dice_mean"],
                        np.mean([rows["finds"][f"pooled_dice_{r}"] for r in ("wt", "tc", "et")]))
    assert pooled_dice({"dice_mean": 0.5}) == {}  # rows scored without voxel counts


def three_et_cases(monkeypatch, c_found: int) -> None:
    """brats.scoring sees cases a (30 true ET voxels, predicted exactly), b (no ET; 12 false ET voxels
    predicted) and c (40 true ET voxels, the first `c_found` of them predicted), 8^3 grids, 1 mm."""
    from types import SimpleNamespace

    import numpy as np

    import brats.scoring as scoring
    from brats.dataset import ValCase

    truth_a, truth_c = np.zeros((8, 8, 8), np.int64), np.zeros((8, 8, 8), np.int64)
    truth_a.flat[:30], truth_c.flat[:40] = 4, 4
    pred_a, pred_b, pred_c = truth_a.astype(np.uint8), np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    pred_b.flat[100:112] = 4
    pred_c.flat[:c_found] = 4
    images = [torch.zeros(4, 8, 8, 8) for _ in range(3)]
    meta = SimpleNamespace(spacing=(1.0, 1.0, 1.0))
    cases = [ValCase("a", images[0], torch.from_numpy(truth_a), meta),
             ValCase("b", images[1], torch.zeros(8, 8, 8, dtype=torch.int64), meta),
             ValCase("c", images[2], torch.from_numpy(truth_c), meta)]
    preds = {id(images[0]): pred_a, id(images[1]): pred_b, id(images[2]): pred_c}
    monkeypatch.setattr(scoring, "iter_cases", lambda cache, ids: iter(cases))
    monkeypatch.setattr(scoring, "predict_case", lambda predict, image, *a, **k: preds[id(image)])


def test_et_rule_calibration_never_empties_a_case_that_has_et(monkeypatch):
    """a: 30 true ET voxels, found; b: no ET, 12 false ET voxels; c: 40 true ET voxels, 20 of them
    found. The per-case mean is highest at 25 (b cleaned, c emptied: 0.667 against 0.556), but 25 empties
    c, so the rule stays off (the smallest of the thresholds that miss no more than off does)."""
    import brats.scoring as scoring

    three_et_cases(monkeypatch, c_found=20)
    out = scoring.calibrate_et_rule(None, None, ["a", "b", "c"], Config(), grid=(0, 10, 25, 50))
    assert out["et_missed"] == [0, 0, 1, 2]
    assert out["dice_et"][2] > out["dice_et"][0]  # what the unconstrained rule would have taken
    assert out["et_min_voxels"] == 0


def test_score_cases_counts_missed_and_false_et_and_keeps_et_dice_before_the_rule(monkeypatch):
    """a: 30 true ET voxels, found; b: no ET, 12 false ET voxels; c: 40 true ET voxels, none predicted. With
    the rule at 25, b's false ET becomes NCR/NET (ET Dice 1, no false ET) while "dice_et_norule" keeps what
    the model predicted (0 on b)."""
    import brats.scoring as scoring

    three_et_cases(monkeypatch, c_found=0)
    for rule, et_false, dice_b in ((0, 1.0, 0.0), (25, 0.0, 1.0)):
        cfg = Config()
        cfg.train.et_min_voxels = rule
        rows = {r["case"]: r for r in scoring.score_cases(None, None, ["a", "b", "c"], cfg)}
        assert [rows[c]["truth_et"] for c in "abc"] == [1.0, 0.0, 1.0]
        assert [rows[c]["et_missed"] for c in "abc"] == [0.0, 0.0, 1.0]
        assert rows["b"]["et_false"] == et_false and rows["b"]["dice_et"] == dice_b
        assert [rows[c]["dice_et_norule"] for c in "abc"] == [1.0, 0.0, 0.0]  # the model's own ET, rule or not
        means = scoring.mean_rows(list(rows.values()))
        assert (means["et_missed_cases"], means["et_false_cases"], means["truth_et_cases"]) == (1.0, et_false, 2.0)
    # the ET rule the artifact is served with, from the same prediction, beside the run's own (off here)
    cfg = Config()
    rows = {r["case"]: r for r in scoring.score_cases(None, None, ["a", "b", "c"], cfg, served_rule=25)}
    assert [rows[c]["dice_et"] for c in "abc"] == [1.0, 0.0, 0.0]
    assert [rows[c]["dice_et_served"] for c in "abc"] == [1.0, 1.0, 0.0]
    assert scoring.mean_rows(list(rows.values()))["et_missed_served_cases"] == 1.0


def test_two_runs_never_write_one_output_folder(tmp_path):
    """A second process claiming a folder another one holds fails at once, naming the holder; once the
    holder exits (here: killed), the folder is free again."""
    import os
    import subprocess
    import sys

    import argparse

    from common.atomic import claim_folder, folder_holder
    from common.cli import out_dir
    from common.errors import UserInputError
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.atomic import claim_folder; "
                               f"claim_folder({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match=rf"{out}: another run is writing this folder \(pid {holder.pid}\)"):
            claim_folder(out)
        assert folder_holder(out) == f"pid {holder.pid}"
        (out / "last.pt").write_text("x")  # a run in the folder: without flags that would be the message
        for flags in ([], ["--resume"], ["--overwrite"]):  # the command's first check says so, whatever the flags
            with pytest.raises(UserInputError, match="another run is writing this folder"):
                out_dir(argparse.Namespace(out=str(out), resume="--resume" in flags, overwrite="--overwrite" in flags))
    finally:
        holder.kill()
        holder.wait()
    assert folder_holder(out) is None
    claim_folder(out)  # free after the holder died
    claim_folder(out)  # this process holds it already: no-op
    assert (out / ".lock").read_text() == f"pid {os.getpid()}"


def test_a_teacher_that_is_not_a_teacher_is_said(tmp_path, capsys):
    from engine.runner import StageContext
    from engine.runtime import DistInfo

    for stage in ("teacher", "student"):
        path = Artifact(stage=stage, spec={}, state_dict={}).save(tmp_path / f"{stage}.pt")
        ctx = StageContext(Config(), Artifact(stage="student", spec={}, state_dict={}), tmp_path, None, DistInfo(),
                           str(path))
        assert ctx.teacher_artifact().stage == stage and ctx.teacher_artifact() is ctx.teacher_artifact()
        said = capsys.readouterr().out
        assert ("a 'student' artifact, not a teacher" in said) == (stage == "student") and said.count("note:") <= 1


def test_a_config_built_in_code_is_held_to_the_ranges_before_any_work(tmp_path):
    """Commands check their config when they load it; run_stage checks a Config built in code (or given
    by another program) the same way, before any data, model or output folder is touched."""
    from compress.lowrank import lowrank_stage
    from model.refineformer3d import RefineFormer3D, ModelSpec

    model = RefineFormer3D(ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], decoder_dim=8, fuse_dim=8,
                                     refine_dim=4))
    src = Artifact(stage="student", spec=model.spec.to_dict(), state_dict=model.state_dict()).save(tmp_path / "s.pt")
    for key, value, why in (("train.epochs", -1, r"train\.epochs=-1: the epochs to train"),
                            ("train.sw_batch", 0, r"train\.sw_batch=0: must be >= 1")):
        cfg = Config()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=why):
            lowrank_stage(src, cfg, tmp_path / "out", data_given=False)
        assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_only_onnx_graphs_is_a_run_too(tmp_path):
    """quantize.py --backend onnxruntime writes int8.onnx / fp32.onnx beside int8.pt: a folder left with only
    those (an interrupted run, files copied in) was written over without --overwrite."""
    import argparse

    from common.cli import out_dir
    from common.errors import UserInputError

    out = tmp_path / "int8"
    out.mkdir()
    (out / "int8.onnx").write_bytes(b"graph")
    with pytest.raises(UserInputError, match=r"int8 already holds a run \(int8.onnx\); replace it with --overwrite"):
        out_dir(argparse.Namespace(out=str(out), resume=False, overwrite=False))  # no last.pt: nothing to resume
    assert out_dir(argparse.Namespace(out=str(out), resume=False, overwrite=True)) == out
    assert (out / "int8.onnx").read_bytes() == b"graph"  # the check writes nothing
