"""The official BraTS metrics (optional `brats-evaluation` package) beside ours: each convention
difference pinned on small cases, with values computed by the real package.

Tests that need the package are skipped when it is not installed (`pip install brats-evaluation`);
the missing-package error is tested either way.
"""
import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from brats import evaluate as evaluate_cli
from brats import official
from brats.metrics import HD95_EMPTY, score_case, summarize

try:
    official.require()
    HAVE_PACKAGE = True
except official.OfficialMetricsError:
    HAVE_PACKAGE = False
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="optional brats-evaluation not installed "
                                                            "(pip install brats-evaluation)")
SHAPE = (24, 24, 20)


def tumour(shift=(0, 0, 0), et=True) -> np.ndarray:
    """Edema box, NCR/NET core inside, an ET block inside the core (BraTS 2017 labels)."""
    label = np.zeros(SHAPE, np.uint8)
    x, y, z = 5 + shift[0], 5 + shift[1], 4 + shift[2]
    label[x:x + 10, y:y + 10, z:z + 9] = 2
    label[x + 2:x + 8, y + 2:y + 8, z + 2:z + 7] = 1
    if et:
        label[x + 3:x + 6, y + 3:y + 7, z + 3:z + 6] = 4
    return label


def test_labels_map_et_to_the_packages_et():
    label = np.array([0, 1, 2, 4], np.uint8)
    assert official.to_official_labels(label).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not BraTS 2017 labels: \\[3\\]"):
        official.to_official_labels(np.array([0, 3]))


def test_missing_package_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "brats_evaluation", None)  # import fails
    official._package.cache_clear()
    try:
        with pytest.raises(official.OfficialMetricsError, match="pip install -r requirements-official.txt"):
            official.require()
        assert evaluate_cli.main([str(tmp_path), str(tmp_path), "--metrics", "official"]) == 2
        assert "pip install -r requirements-official.txt" in capsys.readouterr().err
        assert evaluate_cli.csv_columns("legacy") == evaluate_cli.CSV_COLUMNS  # legacy needs nothing
    finally:
        official._package.cache_clear()


@needs_package
def test_same_region_same_global_dice_where_both_have_it():
    # ET overlaps partly, the core is shifted: overlap Dice and both regions as ours
    truth, pred = tumour(), tumour(shift=(1, 0, 1))
    ours, theirs = score_case(pred, truth), official.score_case_official(pred, truth)
    for region in ("wt", "tc", "et"):
        assert 0.2 < ours[f"dice_{region}"] < 1.0
        assert theirs[f"global_dsc_{region}"] == pytest.approx(ours[f"dice_{region}"], abs=1e-12)
    # unmapped, the package takes our ET (4) for resection cavity: ET leaves WT and TC
    package, evaluator = official._package()
    with official._quiet():
        raw = package.evaluate_single_exam(nib.Nifti1Image(pred, np.eye(4)), nib.Nifti1Image(truth, np.eye(4)),
                                           "raw", evaluator)
    assert raw["tc"]["global_bin_dsc"] != pytest.approx(ours["dice_tc"])
    assert raw["rc"]["global_bin_dsc"] == pytest.approx(ours["dice_et"])


@needs_package
def test_both_empty_is_nan_and_left_out_of_the_mean(tmp_path):
    with_et, without_et = (tumour(shift=(1, 0, 0)), tumour()), (tumour(et=False), tumour(et=False))
    rows = []
    for case, (pred, truth) in {"a": with_et, "b": without_et}.items():
        rows.append({"case": case, **score_case(pred, truth), **official.score_case_official(pred, truth, case=case)})
    assert rows[1]["dice_et"] == 1.0 and rows[1]["hd95_et"] == 0.0  # ours: a right "no ET"
    for metric in official.METRICS:
        assert math.isnan(rows[1][f"{metric}_et"]), metric
    summary = summarize(rows)
    assert summary["global_dsc_et"]["n"] == 1 and summary["global_dsc_et"]["mean"] == rows[0]["global_dsc_et"]
    assert summary["dice_et"]["mean"] == pytest.approx((rows[0]["dice_et"] + 1.0) / 2)
    # the package's own parser averages the same way (its "mean" row)
    package, _ = official._package()
    raws = [official.evaluate_official(c, p, t) for c, (p, t) in {"a": with_et, "b": without_et}.items()]
    assert [r["case"] for r in official.parse_official(raws)] == ["a", "b"]
    summary_json, table = tmp_path / "summary.json", tmp_path / "summary.csv"
    summary_json.write_text(json.dumps({"metrics": raws, "missings": []}, default=official._jsonable))
    with official._quiet():
        package.parse_seg_results(str(summary_json), str(table))
    mean = next(r for r in csv.DictReader(open(table)) if r["subject_id"] == "mean")
    assert float(mean["global_dsc_et"]) == pytest.approx(summary["global_dsc_et"]["mean"])


@needs_package
def test_no_shared_voxel_is_373_even_when_both_are_non_empty():
    truth = np.zeros(SHAPE, np.uint8)
    truth[2:7, 2:7, 2:7] = 2
    pred = np.zeros(SHAPE, np.uint8)
    pred[12:17, 2:7, 2:7] = 2  # 10 voxels further along x, no voxel in common
    ours, theirs = score_case(pred, truth), official.score_case_official(pred, truth)
    assert ours["hd95_wt"] == pytest.approx(10.0) and ours["dice_wt"] == 0.0
    assert theirs["global_hd95_wt"] == 373.0 and theirs["global_dsc_wt"] == 0.0
    assert theirs["lesionwise_dsc_mean_wt"] == 0.0 and theirs["lesionwise_hd95_mean_wt"] == math.inf
    # one side empty: both penalise, ours with the 240x240x155 diagonal, theirs with 373
    ours, theirs = score_case(np.zeros_like(truth), truth), official.score_case_official(np.zeros_like(truth), truth)
    assert ours["hd95_wt"] == HD95_EMPTY and theirs["global_hd95_wt"] == 373.0


@needs_package
def test_global_hd95_ignores_spacing_lesion_wise_honours_it():
    truth = tumour()
    pred = truth.copy()
    pred[5:15, 5:15, 13:15] = 2  # WT grown by 2 voxels along z only: every distance is along z
    for spacing, ours_mm, global_hd95, lesion_hd95 in (((1.0, 1.0, 1.0), 2.0, 2.0, 2.0),
                                                       ((1.0, 1.0, 2.5), 5.0, 2.0, 5.0)):
        ours, theirs = score_case(pred, truth, spacing), official.score_case_official(pred, truth, spacing)
        assert ours["hd95_wt"] == pytest.approx(ours_mm)
        assert theirs["global_hd95_wt"] == pytest.approx(global_hd95)  # voxels, whatever the spacing
        assert theirs["lesionwise_hd95_mean_wt"] == pytest.approx(lesion_hd95)


@needs_package
def test_an_extra_lesion_lowers_detection_not_lesion_wise_dice():
    truth = tumour()
    pred = truth.copy()
    pred[19:22, 19:22, 15:18] = 2  # a spurious WT component far from the tumour
    ours, theirs = score_case(pred, truth), official.score_case_official(pred, truth)
    assert ours["dice_wt"] < 1.0 and theirs["global_dsc_wt"] == pytest.approx(ours["dice_wt"])
    assert theirs["lesionwise_dsc_mean_wt"] == 1.0 and theirs["all_instance_f1_wt"] == pytest.approx(2 / 3)
    assert theirs["global_hd95_wt"] == 0.0 and ours["hd95_wt"] == 0.0  # both: fewer than 5 % of the surface


def _save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


@needs_package
def test_evaluate_both_side_by_side(tmp_path, capsys):
    cases = {"Brats17_TCIA_105_1": (tumour(shift=(1, 0, 0)), tumour()),
             "Brats17_2013_10_1": (tumour(et=False), tumour(et=False))}
    for case, (pred, truth) in cases.items():
        _save(tmp_path / "pred" / f"{case}.nii.gz", pred)
        _save(tmp_path / "truth" / case / f"{case}_seg.nii.gz", truth)
    out = tmp_path / "scores.csv"
    assert evaluate_cli.main([str(tmp_path / "pred"), str(tmp_path / "truth"), "--metrics", "both",
                              "--out", str(out)]) == 0
    table = list(csv.DictReader(open(out)))
    assert list(table[0]) == evaluate_cli.CSV_COLUMNS + official.COLUMNS
    by_case = {r["case"]: r for r in table}
    lgg = by_case["Brats17_2013_10_1"]
    assert float(lgg["dice_et"]) == 1.0 and lgg["global_dsc_et"] == "nan"
    hgg = by_case["Brats17_TCIA_105_1"]
    expected = official.score_case_official(*cases["Brats17_TCIA_105_1"], spacing=(1.0, 1.0, 2.0))
    assert float(hgg["lesionwise_hd95_mean_wt"]) == pytest.approx(expected["lesionwise_hd95_mean_wt"], abs=1e-6)
    text = capsys.readouterr().out
    assert "legacy (brats.metrics" in text and "official (brats-evaluation" in text
    assert evaluate_cli.main([str(tmp_path / "pred"), str(tmp_path / "truth"), "--metrics", "official",
                              "--out", str(out)]) == 0
    assert list(next(csv.DictReader(open(out)))) == ["case"] + official.COLUMNS


@needs_package
def test_report_puts_the_official_figures_beside_ours(tmp_path):
    import torch

    from brats.phantom import write_phantom_dataset
    from common.artifact import Artifact
    from common.config import Config, DataConfig, to_dict
    from model.refineformer3d import ModelSpec, RefineFormer3D
    from pipeline.report import OFFICIAL_ROW_KEYS, ROW_KEYS, make_report

    write_phantom_dataset(tmp_path / "data", cases=2, val_cases=0, shape=(32, 32, 32), seed=2)
    cfg = Config()
    cfg.data = DataConfig(dir=str(tmp_path / "data"), cache=str(tmp_path / "cache"), val_fraction=0.5,
                          crop=[32, 32, 32])
    cfg.train.window, cfg.train.overlap = [32, 32, 32], 0.0
    cfg.report.input, cfg.report.latency_runs, cfg.report.warmup_runs = [32, 32, 32], 1, 0
    cfg.report.plots, cfg.report.case_latency = False, False
    torch.manual_seed(0)
    model = RefineFormer3D(ModelSpec(embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                                     decoder_dim=8, fuse_dim=8, refine_dim=4)).eval()
    Artifact("teacher", model.spec.to_dict(), model.state_dict(), config=to_dict(cfg)).save(tmp_path / "t.pt")
    result = make_report([tmp_path / "t.pt"], cfg, tmp_path / "out", progress=False, metrics="both")
    (row,) = result.rows
    assert row["error"] is None and row["cases"] == 1
    assert row["official_cases_wt"] == 1 and 0.0 <= row["global_dsc_wt"] <= 1.0
    assert row["global_dsc_wt"] == pytest.approx(row["dice_wt"], abs=1e-9)  # WT: both non-empty, same Dice
    table = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert tuple(table[0]) == ROW_KEYS + OFFICIAL_ROW_KEYS
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Official BraTS metrics" in md and "brats-evaluation 0." in md and "panoptica" in md
    assert "| stage | n | global Dice WT |" in md
