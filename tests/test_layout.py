import dataclasses
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from brats.layout import DataError, discover_cases, find_label
from brats.nifti import load_case, write_nifti
from brats.phantom import write_phantom_dataset
from brats.prepare import run_prepare

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


def _label_of(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("label_name", ["W39_1998.09.19_Segm.nii", "{case}_label.nii.gz", "{case}Segm.nii.gz",
                                        "{case}_SEG.nii.gz", "truth-labels.nii"])
def test_alternative_label_names_recognised(write_tiny_case, tmp_path, label_name):
    # BraTS 2020's BraTS20_Training_355 ships its label as W39_1998.09.19_Segm.nii
    folder = tmp_path / "HGG" / "BraTS20_Training_355"
    paths = write_tiny_case(folder, label_name=label_name)
    (ref,) = discover_cases(tmp_path)
    assert ref.has_label and ref.files["seg"] == paths["seg"] and ref.extra == ()
    loaded = load_case(ref)
    assert loaded.label.dtype == np.uint8
    np.testing.assert_array_equal(loaded.label, _label_of(paths["seg"]))
    assert find_label(folder) == paths["seg"]


def test_exact_seg_name_wins_and_the_other_label_like_file_is_a_warning(write_tiny_case, tmp_path, capsys):
    folder = tmp_path / "HGG" / "BraTS20_Training_355"
    paths = write_tiny_case(folder)
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.uint8), np.eye(4)), str(folder / "W39_1998.09.19_Segm.nii"))
    (ref,) = discover_cases(tmp_path)
    assert ref.files["seg"] == paths["seg"] and ref.extra == (folder / "W39_1998.09.19_Segm.nii",)
    assert f"warning: case BraTS20_Training_355: {folder / 'W39_1998.09.19_Segm.nii'}: NIfTI file not recognised" \
        in capsys.readouterr().err


def test_two_label_candidates_are_an_error_naming_both(write_tiny_case, tmp_path):
    folder = tmp_path / "HGG" / "BraTS20_Training_355"
    write_tiny_case(folder, label_name="W39_1998.09.19_Segm.nii")
    write_tiny_case(folder, label_name="{case}_label.nii.gz")
    (ref,) = discover_cases(tmp_path)  # discovery goes on: one ambiguous case must not stop the others
    assert ref.has_label
    pattern = r"BraTS20_Training_355_label\.nii\.gz and W39_1998\.09\.19_Segm\.nii"
    with pytest.raises(DataError, match=f"case BraTS20_Training_355: {folder}: 2 files could be the label.*{pattern}"):
        load_case(ref)
    with pytest.raises(DataError, match=pattern):
        find_label(folder)
    assert load_case(dataclasses.replace(ref, has_label=False)).label is None  # prediction never reads labels


def test_unrecognised_nifti_warned_and_listed_when_a_modality_is_missing(write_tiny_case, tmp_path, capsys):
    case = tmp_path / "Brats17_TCIA_105_1"
    paths = write_tiny_case(case, skip=("t1ce",))
    odd = case / "Brats17_TCIA_105_1_T1c.nii.gz"  # BraTS 2023 spelling, not ours
    nib.save(nib.Nifti1Image(np.ones((12, 10, 8), np.float32), np.eye(4)), str(odd))
    (ref,) = discover_cases(tmp_path)
    assert ref.extra == (odd,) and ref.files["seg"] == paths["seg"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(odd) in err and "not recognised" in err
    with pytest.raises(DataError, match=r"missing t1ce modality .*unrecognised NIfTI in the folder: "
                                        r"Brats17_TCIA_105_1_T1c\.nii\.gz"):
        load_case(ref)


@pytest.mark.parametrize("where", ["HGG", "Brats17TrainingData/LGG", "Brats17TrainingData", "flat"])
def test_case_without_label_in_a_labelled_set_is_an_error(write_tiny_case, tmp_path, where):
    parent = tmp_path if where == "flat" else tmp_path / where
    for name in ("Brats17_TCIA_105_1", "Brats17_TCIA_222_1"):
        write_tiny_case(parent / name)
    lonely = parent / "Brats17_CBICA_AAB_1"
    write_tiny_case(lonely, label_name=None)
    refs = {r.case: r for r in discover_cases(tmp_path)}
    assert all(r.has_label for r in refs.values())
    with pytest.raises(DataError, match=f"case Brats17_CBICA_AAB_1: {lonely}: no label file .*in a labelled set"):
        load_case(refs["Brats17_CBICA_AAB_1"])
    report = run_prepare(tmp_path, tmp_path / ".cache", progress=False)
    assert list(report.bad) == ["Brats17_CBICA_AAB_1"] and str(lonely) in report.bad["Brats17_CBICA_AAB_1"]
    assert sorted(report.built) == ["Brats17_TCIA_105_1", "Brats17_TCIA_222_1"]


def test_unlabelled_sets_stay_unlabelled(write_tiny_case, tmp_path):
    for name in ("Brats17_TCIA_105_1", "Brats17_TCIA_222_1"):
        write_tiny_case(tmp_path / "Brats17ValidationData" / name, label_name=None)
    write_tiny_case(tmp_path / "flat" / "Brats17_2013_10_1")  # one labelled of two: not a labelled set
    write_tiny_case(tmp_path / "flat" / "Brats17_2013_11_1", label_name=None)
    for root in (tmp_path, tmp_path / "flat"):
        refs = discover_cases(root)
        report = run_prepare(root, root / ".cache", progress=False)
        assert report.bad == {} and len(report.built) == 2
        assert sum(r.has_label for r in refs) == (0 if root == tmp_path else 1)


def test_phantom_release_passes_every_check_silently(release, capsys):
    refs = discover_cases(release)
    assert all(r.extra == () and r.label_problem is None for r in refs)
    for ref in refs:
        assert load_case(ref).constant == ()
    assert capsys.readouterr().err == ""
