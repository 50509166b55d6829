import csv

import nibabel as nib
import numpy as np
import pytest

from brats.evaluate import EvaluationError, evaluate_dirs, find_truth, main
from brats.metrics import HD95_EMPTY, score_case

SHAPE = (12, 10, 8)


def _save(path, data, zooms=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))


def _truth_label(seed):
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    x0, y0 = rng.integers(1, 4, size=2)
    label[x0:x0 + 7, y0:y0 + 6, 1:7] = 2
    label[x0 + 1:x0 + 5, y0 + 1:y0 + 4, 2:6] = 1
    if seed % 2 == 0:  # odd cases have no ET, like many LGG
        label[x0 + 2:x0 + 4, y0 + 2:y0 + 3, 3:5] = 4
    return label


def _pred_label(seed):
    rng = np.random.default_rng(1000 + seed)
    label = _truth_label(seed)
    flip = rng.random(SHAPE) < 0.08
    label[flip] = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=int(flip.sum()))
    return label


CASES = {"Brats17_TCIA_105_1": 0, "Brats17_2013_10_1": 1, "Brats17_CBICA_AAB_1": 2}
ZOOMS = (1.0, 1.5, 2.0)


@pytest.fixture
def brats_layout(tmp_path):
    """Truth under Brats17TrainingData/{HGG,LGG}/<case>/<case>_seg.nii.gz; preds flat, mixed names."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    for i, (case, seed) in enumerate(CASES.items()):
        grade = "LGG" if seed % 2 else "HGG"
        _save(truth_dir / "Brats17TrainingData" / grade / case / f"{case}_seg.nii.gz", _truth_label(seed), ZOOMS)
        # the flair next to it must not be mistaken for a label map
        _save(truth_dir / "Brats17TrainingData" / grade / case / f"{case}_flair.nii.gz", np.ones(SHAPE, np.float32))
        name = f"{case}.nii.gz" if i % 2 == 0 else f"{case}_seg.nii.gz"
        _save(pred_dir / name, _pred_label(seed).astype(np.int16), ZOOMS)  # on the truth's grid
    return pred_dir, truth_dir


def test_evaluate_dirs_matches_score_case(brats_layout):
    pred_dir, truth_dir = brats_layout
    rows = evaluate_dirs(pred_dir, truth_dir)
    assert [r["case"] for r in rows] == sorted(CASES)
    for row in rows:
        seed = CASES[row["case"]]
        expected = score_case(_pred_label(seed), _truth_label(seed), ZOOMS)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-12), key
    # spacing came from the truth header: it changes HD95 against the isotropic default
    seed = CASES["Brats17_TCIA_105_1"]
    iso = score_case(_pred_label(seed), _truth_label(seed))
    row = next(r for r in rows if r["case"] == "Brats17_TCIA_105_1")
    assert row["hd95_wt"] != pytest.approx(iso["hd95_wt"])


def test_cli_writes_csv_and_summary(brats_layout, tmp_path, capsys):
    pred_dir, truth_dir = brats_layout
    out = tmp_path / "scores" / "scores.csv"
    assert main([str(pred_dir), str(truth_dir), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == sorted(CASES)
    for col in ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "iou_wt", "sens_tc", "spec_et"):
        assert col in rows[0]
    for row in rows:
        seed = CASES[row["case"]]
        expected = score_case(_pred_label(seed), _truth_label(seed), ZOOMS)
        for key in ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "iou_et", "sens_wt"):
            assert float(row[key]) == pytest.approx(expected[key], abs=1e-6), key
    printed = capsys.readouterr().out
    dice_wt = [score_case(_pred_label(s), _truth_label(s), ZOOMS)["dice_wt"] for s in CASES.values()]
    assert "3 case(s)" in printed
    wt_line = next(line for line in printed.splitlines() if line.startswith("wt "))
    assert float(wt_line.split()[1]) == pytest.approx(np.mean(dice_wt), abs=1e-4)
    assert float(wt_line.split()[3]) == pytest.approx(np.median(dice_wt), abs=1e-4)
    assert not list(out.parent.glob(".*.tmp"))
    # an existing CSV is kept unless --overwrite, and refused before any scoring; a folder is no CSV
    out.write_text("kept")
    with pytest.raises(SystemExit) as exit_:
        main([str(pred_dir), str(truth_dir), "--out", str(out)])
    assert exit_.value.code == 2 and out.read_text() == "kept"
    assert "already exists; replace it with --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(pred_dir), str(truth_dir), "--out", str(out.parent)])
    assert "is a folder" in capsys.readouterr().err
    assert main([str(pred_dir), str(truth_dir), "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("case,")


def test_flat_truth_folder_and_empty_et(tmp_path):
    truth = _truth_label(1)  # no ET
    pred = truth.copy()
    _save(tmp_path / "truth" / "caseA_seg.nii.gz", truth.astype(np.float32))  # float-stored labels
    _save(tmp_path / "pred" / "caseA.nii.gz", pred)
    (row,) = evaluate_dirs(tmp_path / "pred", tmp_path / "truth")
    assert row["dice_et"] == 1.0 and row["hd95_et"] == 0.0 and row["dice_wt"] == 1.0
    pred[0, 0, 0] = 4  # a false-positive ET voxel against an empty reference
    _save(tmp_path / "pred" / "caseA.nii.gz", pred)
    (row,) = evaluate_dirs(tmp_path / "pred", tmp_path / "truth")
    assert row["dice_et"] == 0.0 and row["hd95_et"] == HD95_EMPTY


def _flat(tmp_path, cases=("a", "b")):
    for case in cases:
        _save(tmp_path / "truth" / f"{case}_seg.nii.gz", _truth_label(0))
        _save(tmp_path / "pred" / f"{case}.nii.gz", _pred_label(0))
    return tmp_path / "pred", tmp_path / "truth"


def test_missing_cases_listed(tmp_path, capsys):
    pred_dir, truth_dir = _flat(tmp_path)
    _save(pred_dir / "extra1.nii.gz", _pred_label(0))
    _save(truth_dir / "lonely_seg.nii.gz", _truth_label(0))
    with pytest.raises(EvaluationError, match=r"prediction\(s\) without truth: extra1.*without prediction: lonely"):
        evaluate_dirs(pred_dir, truth_dir)
    assert main([str(pred_dir), str(truth_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "extra1" in err and "Traceback" not in err


def test_subset_scores_only_the_predicted_cases(tmp_path):
    pred_dir, truth_dir = _flat(tmp_path, cases=("a", "b", "c"))
    (pred_dir / "c.nii.gz").unlink()
    rows = evaluate_dirs(pred_dir, truth_dir, subset=True)
    assert [r["case"] for r in rows] == ["a", "b"]
    with pytest.raises(EvaluationError, match=r"without prediction: c \(to score only the predicted cases.*--subset\)"):
        evaluate_dirs(pred_dir, truth_dir)
    _save(pred_dir / "extra1.nii.gz", _pred_label(0))
    with pytest.raises(EvaluationError, match="without truth: extra1"):  # still an error in subset mode
        evaluate_dirs(pred_dir, truth_dir, subset=True)
    assert main([str(pred_dir), str(truth_dir), "--subset"]) == 2


def test_shape_mismatch_names_case_and_files(tmp_path):
    pred_dir, truth_dir = _flat(tmp_path)
    _save(pred_dir / "b.nii.gz", np.zeros((12, 10, 9), np.uint8))
    with pytest.raises(EvaluationError) as info:
        evaluate_dirs(pred_dir, truth_dir)
    msg = str(info.value)
    assert "case b" in msg and str(pred_dir / "b.nii.gz") in msg and str(truth_dir / "b_seg.nii.gz") in msg
    assert "(12, 10, 9)" in msg and "(12, 10, 8)" in msg


def test_bad_label_values_name_file(tmp_path, capsys):
    pred_dir, truth_dir = _flat(tmp_path)
    bad = _pred_label(0)
    bad[3, 3, 3] = 3
    _save(pred_dir / "a.nii.gz", bad)
    with pytest.raises(EvaluationError, match=r"^case a: .*a\.nii\.gz: label values \[3\] outside \{0, 1, 2, 4\}$"):
        evaluate_dirs(pred_dir, truth_dir)
    assert main([str(pred_dir), str(truth_dir)]) == 2
    assert "a.nii.gz" in capsys.readouterr().err


def test_unreadable_file_named(tmp_path):
    pred_dir, truth_dir = _flat(tmp_path)
    (truth_dir / "b_seg.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(EvaluationError, match=r"^case b: .*b_seg\.nii\.gz: unreadable or truncated NIfTI"):
        evaluate_dirs(pred_dir, truth_dir)


def test_duplicate_prediction_is_ambiguous(tmp_path):
    pred_dir, truth_dir = _flat(tmp_path)
    _save(pred_dir / "a_seg.nii.gz", _pred_label(0))
    with pytest.raises(EvaluationError, match="case a has two predictions"):
        evaluate_dirs(pred_dir, truth_dir)


def test_missing_folder(tmp_path):
    with pytest.raises(EvaluationError, match="prediction folder not found"):
        evaluate_dirs(tmp_path / "nope", tmp_path)


LPS = np.array([[-1.0, 0, 0, 11.0], [0, -1.5, 0, 13.5], [0, 0, 2.0, -3.0], [0, 0, 0, 1]])  # like the BraTS releases


def _save_image(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _reoriented(img, axcodes):
    """`img` with its voxels in `axcodes` order, the affine adjusted: the same image in space."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes))
    data = apply_orientation(np.asanyarray(img.dataobj), transform)
    return nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ inv_ornt_aff(transform, img.shape))


@pytest.mark.parametrize("axcodes", ["RAS", "ASL", "SRP"])
def test_reoriented_identical_prediction_scores_one(tmp_path, axcodes):
    truth = nib.Nifti1Image(_truth_label(0), LPS)
    _save_image(truth, tmp_path / "truth" / "Brats17_TCIA_105_1" / "Brats17_TCIA_105_1_seg.nii.gz")
    pred = nib.as_closest_canonical(truth) if axcodes == "RAS" else _reoriented(truth, tuple(axcodes))
    assert nib.aff2axcodes(pred.affine) == tuple(axcodes)
    _save_image(pred, tmp_path / "pred" / "Brats17_TCIA_105_1.nii.gz")
    raw = np.asanyarray(pred.dataobj)
    if raw.shape == SHAPE:  # compared voxel by voxel as stored (the old shape-only check), Dice is wrong
        assert score_case(raw, _truth_label(0))["dice_wt"] < 0.9
    (row,) = evaluate_dirs(tmp_path / "pred", tmp_path / "truth")
    assert row["dice_wt"] == row["dice_tc"] == row["dice_et"] == 1.0 and row["hd95_wt"] == 0.0


@pytest.mark.parametrize("change", ["shift", "scale"])
def test_prediction_on_another_grid_fails_naming_both_files(tmp_path, capsys, change):
    truth_path, pred_path = tmp_path / "truth" / "a_seg.nii.gz", tmp_path / "pred" / "a.nii.gz"
    _save(truth_path, _truth_label(0))
    affine = np.eye(4)
    if change == "shift":
        affine[0, 3] = 2.0
    else:
        affine[2, 2] = 2.0
    _save_image(nib.Nifti1Image(_truth_label(0), affine), pred_path)
    with pytest.raises(EvaluationError, match="affine differs") as info:
        evaluate_dirs(tmp_path / "pred", tmp_path / "truth")
    assert str(pred_path) in str(info.value) and str(truth_path) in str(info.value)
    assert main([str(tmp_path / "pred"), str(tmp_path / "truth")]) == 2
    assert str(pred_path) in capsys.readouterr().err


def test_truth_under_an_alternative_label_name(tmp_path, write_tiny_case):
    # BraTS 2020's BraTS20_Training_355 ships its label as W39_1998.09.19_Segm.nii
    paths = write_tiny_case(tmp_path / "truth" / "HGG" / "BraTS20_Training_355", label_name="W39_1998.09.19_Segm.nii")
    write_tiny_case(tmp_path / "truth" / "HGG" / "BraTS20_Training_001")
    assert find_truth(tmp_path / "truth")["BraTS20_Training_355"] == paths["seg"]
    img = nib.load(str(paths["seg"]))  # both truths hold the same map
    for case in ("BraTS20_Training_355", "BraTS20_Training_001"):
        _save_image(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), tmp_path / "pred" / f"{case}.nii.gz")
    rows = evaluate_dirs(tmp_path / "pred", tmp_path / "truth")
    assert [r["case"] for r in rows] == ["BraTS20_Training_001", "BraTS20_Training_355"]
    assert all(r["dice_wt"] == 1.0 for r in rows)
    write_tiny_case(tmp_path / "truth" / "HGG" / "BraTS20_Training_355", label_name="{case}_label.nii.gz")
    with pytest.raises(EvaluationError, match="2 files could be the label"):
        find_truth(tmp_path / "truth")


def test_an_empty_side_is_named_not_both(tmp_path):
    """`--subset` on an empty prediction folder said 'no prediction or truth files found' though the truth was there."""
    _save(tmp_path / "truth" / "a_seg.nii.gz", _truth_label(0))
    (tmp_path / "pred").mkdir()
    with pytest.raises(EvaluationError, match=f"^{tmp_path / 'pred'}: no prediction .* file found$"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "truth", subset=True)
    _save(tmp_path / "pred" / "a.nii.gz", _truth_label(0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=f"^{tmp_path / 'empty'}: no truth .* file found$"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "empty")
