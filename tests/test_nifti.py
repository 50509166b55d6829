"""One reader for prepare, predict and evaluate: the same file is accepted or rejected alike."""
import re

import nibabel as nib
import numpy as np
import pytest

from brats.evaluate import EvaluationError, evaluate_dirs
from brats.layout import DataError, discover_cases
from brats.nifti import align_to_grid, load_case, load_label
from brats.prepare import run_prepare

CASE = "Brats17_TCIA_105_1"


def _break(kind, path):
    """Spoil the label file at `path` in one of the ways issue #11 lists."""
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    data = np.where(data == 1, 3, data).astype(np.uint8) if kind == "value 3" else data.astype(np.float32) * 0.5
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


@pytest.mark.parametrize("kind,pattern", [("value 3", r"label values \[3\] outside"),
                                          ("non-integer", "labels are not integers"),
                                          ("truncated", "unreadable or truncated NIfTI")])
def test_prepare_and_evaluate_reject_a_bad_label_with_the_same_message(write_tiny_case, tmp_path, kind, pattern):
    data = tmp_path / "data"
    paths = write_tiny_case(data / "HGG" / CASE)
    good = tmp_path / "good" / f"{CASE}.nii.gz"
    good.parent.mkdir()
    good.write_bytes(paths["seg"].read_bytes())
    _break(kind, paths["seg"])

    report = run_prepare(data, tmp_path / "cache", progress=False)
    message = report.bad[CASE]
    assert message.startswith(f"case {CASE}: {paths['seg']}: ")
    assert re.search(pattern, message), message
    # the bad file as truth
    with pytest.raises(EvaluationError) as err:
        evaluate_dirs(tmp_path / "good", data)
    assert str(err.value) == message
    # the bad file as a prediction: the same words about the same problem
    pred = tmp_path / "pred" / f"{CASE}.nii.gz"
    pred.parent.mkdir()
    pred.write_bytes(paths["seg"].read_bytes())
    (data / "HGG" / CASE / f"{CASE}_seg.nii.gz").write_bytes(good.read_bytes())
    with pytest.raises(EvaluationError) as err:
        evaluate_dirs(tmp_path / "pred", data)
    assert str(err.value) == message.replace(str(paths["seg"]), str(pred))


def test_load_label_squeezes_a_trailing_axis_and_checks_values(write_tiny_case, tmp_path):
    paths = write_tiny_case(tmp_path / CASE)
    label = write_tiny_case.label()
    nib.save(nib.Nifti1Image(label[..., None].astype(np.int16), np.eye(4)), str(tmp_path / "x.nii.gz"))
    found = load_label(tmp_path / "x.nii.gz", CASE)
    assert found.label.dtype == np.uint8 and found.label.shape == (12, 10, 8) and found.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(found.label, label)
    nib.save(nib.Nifti1Image(np.stack([label, label], -1), np.eye(4)), str(tmp_path / "y.nii.gz"))
    with pytest.raises(DataError, match=r"y\.nii\.gz: expected a 3D volume, got shape \(12, 10, 8, 2\)"):
        load_label(tmp_path / "y.nii.gz", CASE)
    assert load_label(paths["seg"], CASE).affine[1, 1] == -1.0


def test_modality_in_another_voxel_order_is_reoriented_onto_the_flair(write_tiny_case, tmp_path):
    plain = write_tiny_case(tmp_path / "plain" / CASE)
    moved = write_tiny_case(tmp_path / "moved" / CASE)
    for key in ("t1", "seg"):  # saved RAS by another tool: other voxel order, same place in space
        nib.save(nib.as_closest_canonical(nib.load(str(plain[key]))), str(moved[key]))
    assert not np.array_equal(np.asanyarray(nib.load(str(moved["t1"])).dataobj),
                              np.asanyarray(nib.load(str(plain["t1"])).dataobj))
    a, b = (load_case(discover_cases(tmp_path / name)[0]) for name in ("plain", "moved"))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_grid_mismatch_names_both_files(write_tiny_case, tmp_path):
    paths = write_tiny_case(tmp_path / CASE)
    img = nib.load(str(paths["t2"]))
    shifted = img.affine.copy()
    shifted[:3, 3] += 1.5
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), str(paths["t2"]))
    with pytest.raises(DataError, match=f"case {CASE}: {paths['t2']}: affine differs from {paths['flair']} "
                                        r"\(max difference 1\.5\)"):
        load_case(discover_cases(tmp_path / CASE)[0])
    data = np.zeros((12, 10, 8))
    with pytest.raises(DataError, match="shape .* does not match b .* even after reorienting"):
        align_to_grid(data.transpose(1, 0, 2)[:, :, :7], np.eye(4)[[1, 0, 2, 3]], "a", data.shape, np.eye(4), "b", CASE)
    np.testing.assert_array_equal(align_to_grid(data, np.eye(4), "a", data.shape, np.eye(4) + 1e-4, "b", CASE), data)
