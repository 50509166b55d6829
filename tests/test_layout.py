import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from brats.layout import DataError, discover_cases
from brats.nifti import load_case, write_nifti
from brats.phantom import write_phantom_dataset

SHAPE = (32, 32, 24)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    write_phantom_dataset(root, cases=3, val_cases=1, shape=SHAPE, seed=1)
    return root


def test_release_layout_grades_and_labels(release):
    refs = discover_cases(release)
    by = {(r.layout, r.grade, r.has_label) for r in refs}
    assert by == {("brats17-training", "hgg", True), ("brats17-training", "lgg", True),
                  ("brats17-validation", None, False)}
    assert sum(r.grade == "hgg" for r in refs) == 2 and sum(r.grade == "lgg" for r in refs) == 1
    hgg = next(r for r in refs if r.grade == "hgg")
    assert hgg.files["t1ce"] == release / "Brats17TrainingData" / "HGG" / hgg.case / f"{hgg.case}_t1ce.nii.gz"
    assert set(hgg.files) == {"flair", "t1", "t1ce", "t2", "seg"}
    val = next(r for r in refs if r.grade is None)
    assert set(val.files) == {"flair", "t1", "t1ce", "t2"}


def test_grades_flat_and_single_case_layouts(release):
    grades = discover_cases(release / "Brats17TrainingData")
    assert [r.layout for r in grades] == ["grades"] * 3
    assert sorted(r.grade for r in grades) == ["hgg", "hgg", "lgg"]
    flat = discover_cases(release / "Brats17ValidationData")
    assert [(r.layout, r.grade, r.has_label) for r in flat] == [("flat", None, False)]
    case_dir = release / "Brats17TrainingData" / "LGG" / grades[-1].case
    single = discover_cases(case_dir)
    assert len(single) == 1 and single[0].layout == "case" and single[0].grade == "lgg"
    assert single[0].has_label


def test_uncompressed_nii_and_hidden_folders(release, tmp_path):
    src = next(p for p in (release / "Brats17ValidationData").iterdir())
    dst = tmp_path / "flat" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name[: -len(".gz")]).write_bytes(gzip.decompress(f.read_bytes()))
    (tmp_path / "flat" / ".cache").mkdir()  # a cache next to the data is not a case
    refs = discover_cases(tmp_path / "flat")
    assert len(refs) == 1 and refs[0].files["flair"].name == f"{src.name}_flair.nii"
    loaded = load_case(refs[0])
    assert loaded.image.dtype == np.float32 and loaded.image.shape == (4, *SHAPE)


def test_empty_and_unrecognised_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.*empty"):
        discover_cases(empty)
    odd = tmp_path / "odd"
    (odd / "notes").mkdir(parents=True)
    (odd / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=f"no BraTS layout recognised in {odd}"):
        discover_cases(odd)
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "missing")


def test_duplicate_case_names_rejected(release, tmp_path):
    for grade in ("HGG", "LGG"):
        shutil.copytree(release / "Brats17ValidationData", tmp_path / grade)
    with pytest.raises(DataError, match="appears twice"):
        discover_cases(tmp_path)


def _msd(root, rng):
    """Two training cases and one test case in Decathlon Task01 form."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    images = {}
    for name, folder in (("BRATS_001", "imagesTr"), ("BRATS_002", "imagesTr"), ("BRATS_485", "imagesTs")):
        image = rng.uniform(1, 100, (8, 9, 10, 4)).astype(np.float32)
        images[name] = image
        write_nifti(root / folder / f"{name}.nii.gz", image, affine)
    label = np.zeros((8, 9, 10), dtype=np.uint8)
    label[1, 1, 1], label[2, 2, 2], label[3, 3, 3] = 1, 2, 3
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", label, affine)
    write_nifti(root / "labelsTr" / "BRATS_002.nii.gz", label * 2, affine)  # values 2, 4, 6: bad
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    return images


def test_msd_layout_and_label_mapping(tmp_path):
    images = _msd(tmp_path, np.random.default_rng(0))
    refs = discover_cases(tmp_path)
    assert [(r.case, r.layout, r.has_label) for r in refs] == [
        ("BRATS_001", "msd", True), ("BRATS_002", "msd", True), ("BRATS_485", "msd", False)]
    loaded = load_case(refs[0])
    # channels FLAIR, T1w, T1gd, T2w -> flair, t1, t1ce, t2, moved first
    np.testing.assert_array_equal(loaded.image, np.moveaxis(images["BRATS_001"], -1, 0))
    assert loaded.label.dtype == np.uint8
    assert (loaded.label[1, 1, 1], loaded.label[2, 2, 2], loaded.label[3, 3, 3]) == (2, 1, 4)
    assert np.bincount(loaded.label.ravel(), minlength=5).tolist() == [8 * 9 * 10 - 3, 1, 1, 0, 1]
    with pytest.raises(DataError, match=r"BRATS_002.*labelsTr.*\[4, 6\]"):
        load_case(refs[1])
    assert load_case(refs[2]).label is None
    assert isinstance(loaded.header, nib.Nifti1Header)
