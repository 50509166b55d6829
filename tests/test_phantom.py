import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats.cache import open_cache
from brats.labels import region_masks
from brats.layout import DataError, discover_cases
from brats.nifti import load_case
from brats.phantom import FAMILIES, main, make_case, training_plan, write_phantom_dataset
from brats.prepare import prepare
from brats.synthetic import ensure_synthetic, resolve_data
from common.config import DataConfig

SHAPE = (48, 48, 32)
NAME = re.compile(r"^Brats17_(TCIA_\d{3}|CBICA_[A-Z]{3}|2013_\d+)_1$")


@pytest.fixture(scope="module")
def hgg_cases():
    return [make_case(f"c{i}", "hgg", SHAPE, seed=0, index=i) for i in range(4)]


def _dilate_within(mask, brain):
    return ndimage.binary_dilation(mask) & brain


def test_regions_are_nested_with_margins(hgg_cases):
    for pc in hgg_cases:
        label = np.asarray(pc.label)
        brain = pc.images["flair"] != 0
        tc, wt, et = region_masks(label)
        ncr = label == 1
        assert et.sum() > 50 and ncr.sum() > 5 and (wt & ~tc).sum() > 100
        assert not (label > 0)[~brain].any()
        assert not (_dilate_within(tc, brain) & ~wt).any()  # edema surrounds the core
        assert not (_dilate_within(ncr, brain) & ~tc).any()  # necrosis lies inside the enhancing rim


def test_lgg_mostly_without_et():
    with_et = sum(bool((make_case("l", "lgg", (32, 32, 24), seed=0, index=i).label == 4).any()) for i in range(12))
    assert with_et <= 4


def test_modality_contrasts(hgg_cases):
    for pc in hgg_cases:
        label = np.asarray(pc.label)
        brain = pc.images["flair"] != 0
        normal = brain & (label == 0)
        mean = {m: {k: float(pc.images[m][mask].mean()) for k, mask in
                    (("normal", normal), ("edema", label == 2), ("et", label == 4), ("ncr", label == 1))}
                for m in pc.images}
        assert mean["flair"]["edema"] > 1.3 * mean["flair"]["normal"]
        assert mean["t2"]["edema"] > 1.3 * mean["t2"]["normal"]
        assert mean["t1ce"]["et"] > 1.3 * mean["t1ce"]["normal"]
        assert mean["t1ce"]["et"] > 1.5 * mean["t1ce"]["ncr"]
        assert mean["t1"]["ncr"] < 0.6 * mean["t1"]["normal"]
        assert (pc.images["t1"][brain] > 0).all()  # background exactly 0, brain never 0


def test_cli_layout_dtypes_affine_and_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        assert main([str(out), "--cases", "6", "--val-cases", "2", "--shape", "32", "32", "24", "--seed", str(seed)]) == 0
    hgg = sorted(p.name for p in (a / "Brats17TrainingData" / "HGG").iterdir())
    lgg = sorted(p.name for p in (a / "Brats17TrainingData" / "LGG").iterdir())
    val = sorted(p.name for p in (a / "Brats17ValidationData").iterdir())
    assert len(hgg) == 4 and len(lgg) == 2 and len(val) == 2
    assert all(NAME.match(n) for n in hgg + lgg + val)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 6 * 5 + 2 * 4
    assert sorted(p.name for p in (a / "Brats17TrainingData" / "HGG" / hgg[0]).iterdir()) == [
        f"{hgg[0]}_{k}.nii.gz" for k in ("flair", "seg", "t1", "t1ce", "t2")]
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # same seed, same bytes
    other = sorted(p.relative_to(c) for p in c.rglob("*.nii.gz"))
    assert other != files
    dtypes = set()
    for f in files:
        img = nib.load(str(a / f))
        dtypes.add(str(img.get_data_dtype()))
        np.testing.assert_allclose(np.diag(img.affine), [-1, -1, 1, 1])
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
    assert {"int16", "float32"} <= dtypes


def test_ensure_synthetic_and_resolve_data(tmp_path):
    root = tmp_path / "synthetic"
    out = ensure_synthetic(root, cases=3, val_cases=1, shape=(32, 32, 24), seed=0)
    assert out == root and (root / "phantom.json").is_file()
    flair = next(root.rglob("*_flair.nii.gz"))
    mtime = flair.stat().st_mtime_ns
    ensure_synthetic(root, cases=3, val_cases=1, shape=(32, 32, 24), seed=0)
    assert flair.stat().st_mtime_ns == mtime  # same parameters: reused
    ensure_synthetic(root, cases=2, val_cases=1, shape=(32, 32, 24), seed=0)
    assert len(list(root.rglob("*_seg.nii.gz"))) == 2  # new parameters: regenerated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    cfg = DataConfig(synthetic_cases=2, synthetic_val_cases=1, synthetic_shape=[32, 32, 24])
    data_dir, cache_dir = resolve_data(cfg, synthetic_root=root, progress=False)
    assert data_dir == root and cache_dir == root / ".cache"
    cache = open_cache(cache_dir)
    assert len(cache.cases) == 3 and len(cache.labelled()) == 2
    cfg = DataConfig(dir=str(root), cache=str(tmp_path / "elsewhere"))
    assert resolve_data(cfg, progress=False) == (root, tmp_path / "elsewhere")
    assert len(open_cache(tmp_path / "elsewhere").labelled()) == 2


# Decoded arrays of the demo family as the code wrote them before families existed (shape, dtype,
# values, affine of every file); a change of numpy's or scipy's numerics would also move them.
DEMO_DATASET_SHA256 = "9bb742614d2782dd7f0fe9077c16d25470c48ea1a66e1823f9ca6bfc69ddf40c"
DEMO_CASE_SHA256 = "0d5e0f5501fc2fa038eef0d0c00255a94df4500597c6f1f652d239953951b9c8"
FAMILY_SHAPE = (64, 64, 40)


def _dataset_digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.nii.gz")):
        img = nib.load(str(f))
        data = np.ascontiguousarray(np.asanyarray(img.dataobj))
        for part in (str(f.relative_to(root)), str(data.dtype), str(data.shape)):
            h.update(part.encode())
        h.update(data.tobytes())
        h.update(np.asarray(img.affine, np.float64).tobytes())
    return h.hexdigest()


def test_demo_family_output_unchanged(tmp_path):
    write_phantom_dataset(tmp_path / "default", cases=4, val_cases=2, shape=(32, 32, 24), seed=3)
    assert _dataset_digest(tmp_path / "default") == DEMO_DATASET_SHA256
    assert main([str(tmp_path / "cli"), "--cases", "4", "--val-cases", "2", "--shape", "32", "32", "24",
                 "--seed", "3", "--family", "demo"]) == 0
    assert _dataset_digest(tmp_path / "cli") == DEMO_DATASET_SHA256
    pc = make_case("x", "lgg", (40, 36, 28), seed=1, index=5, as_int16=False, family="demo")
    h = hashlib.sha256()
    for m in ("flair", "t1", "t1ce", "t2"):
        h.update(pc.images[m].tobytes())
    h.update(np.asarray(pc.label).tobytes())
    assert h.hexdigest() == DEMO_CASE_SHA256


@pytest.mark.parametrize("family", FAMILIES)
def test_has_et_decides_et_and_nothing_else(family):
    shape = (40, 40, 28)
    without = make_case("c", "lgg", shape, seed=0, index=2, family=family, has_et=False)
    with_et = make_case("c", "lgg", shape, seed=0, index=2, family=family, has_et=True)
    assert not (without.label == 4).any() and (with_et.label == 4).sum() >= 6
    np.testing.assert_array_equal(without.label > 0, with_et.label > 0)  # same tumour, same draws
    np.testing.assert_array_equal(without.images["flair"] != 0, with_et.images["flair"] != 0)


def _family_cases(family, n=20):
    return [make_case(f"c{i}", grade, FAMILY_SHAPE, seed=0, index=i, family=family, has_et=has_et)
            for i, (grade, has_et) in enumerate(training_plan(n, family, seed=0))]


@pytest.fixture(scope="module")
def families():
    return {family: _family_cases(family) for family in FAMILIES}


def _stats(cases):
    out = {"no_et": 0.0, "et_share": [], "flair_edema": [], "t1ce_et": [], "brain": [], "wt": []}
    for pc in cases:
        label = np.asarray(pc.label)
        brain = pc.images["flair"] != 0
        wt, et, edema = label > 0, label == 4, label == 2
        normal = brain & ~wt
        out["no_et"] += (not et.any()) / len(cases)
        out["brain"].append(brain.mean())
        out["wt"].append(wt.sum())
        flair, t1ce = (pc.images[m].astype(np.float64) for m in ("flair", "t1ce"))
        out["flair_edema"].append(flair[edema].mean() / flair[normal].mean())
        if et.any():
            out["et_share"].append(et.sum() / wt.sum())
            out["t1ce_et"].append(t1ce[et].mean() / t1ce[normal].mean())
    return {k: (v if k == "no_et" else float(np.mean(v))) for k, v in out.items()}


def test_lgg_rich_differs_from_demo(families):
    demo, rich = _stats(families["demo"]), _stats(families["lgg-rich"])
    assert 0.30 <= rich["no_et"] <= 0.40 and demo["no_et"] < 0.30
    assert rich["et_share"] < 0.6 * demo["et_share"]  # thin rims and small foci
    assert rich["wt"] < 0.6 * demo["wt"]  # smaller tumours in a smaller brain
    assert rich["brain"] < 0.8 * demo["brain"]
    assert 1.15 < rich["flair_edema"] < demo["flair_edema"] - 0.2  # lower contrast, still visible
    assert 1.15 < rich["t1ce_et"] < demo["t1ce_et"] - 0.1


def test_lgg_rich_labels_and_images(families):
    for pc in families["lgg-rich"]:
        label = np.asarray(pc.label)
        brain = pc.images["flair"] != 0
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4} and (label == 1).any() and (label == 2).any()
        assert not (label > 0)[~brain].any()
        if pc.grade == "hgg":
            assert (label == 4).any()
        for m, img in pc.images.items():
            assert (img[brain] > 0).all() and not (img[~brain]).any()
            assert img[brain].std() > 0.05 * img[brain].mean(), m  # never constant inside the brain


def test_lgg_rich_validation_draws():
    no_et = [not (make_case("v", None, (24, 24, 20), seed=0, index=i, family="lgg-rich").label == 4).any()
             for i in range(40)]
    assert 0.2 <= np.mean(no_et) <= 0.5  # P(no ET) = 0.35 per validation case


def test_lgg_rich_cli_layout_loads_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main([str(out), "--cases", "6", "--val-cases", "2", "--shape", "40", "40", "28",
                     "--family", "lgg-rich"]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    refs = discover_cases(a)
    train = [r for r in refs if r.layout == "brats17-training"]
    assert len(train) == 6 and len(refs) == 8 and all(NAME.match(r.case) for r in refs)
    assert sorted(r.grade for r in train) == ["hgg"] * 3 + ["lgg"] * 3  # round(6 * 0.45) LGG
    no_et = 0
    for ref in refs:
        loaded = load_case(ref)  # refuses a modality constant inside the brain, a label outside 0/1/2/4
        assert loaded.image.shape == (4, 40, 40, 28) and not loaded.constant
        if ref.has_label:
            no_et += not (loaded.label == 4).any()
    assert no_et == 2  # round(6 * 0.35)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lgg-rich"):
        make_case("c", "hgg", (24, 24, 20), family="nope")
    with pytest.raises(ValueError, match="unknown phantom family"):
        write_phantom_dataset(tmp_path, cases=2, val_cases=0, shape=(24, 24, 20), family="nope")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--family", "nope"])


def test_the_phantom_command_replaces_a_phantom_folder_whole_and_refuses_other_data(tmp_path, capsys):
    """`make demo` after a run that generated other synthetic cases in the same folder: the two sets
    must not mix (the same case name would appear under HGG and LGG)."""
    root = tmp_path / "synthetic"
    ensure_synthetic(root, cases=3, val_cases=1, shape=(32, 32, 24), seed=0)
    (root / ".cache").mkdir()
    assert main([str(root), "--cases", "5", "--val-cases", "1", "--shape", "32", "32", "24"]) == 0
    assert len(list(root.rglob("*_seg.nii.gz"))) == 5 and not (root / ".cache").exists()  # replaced whole
    prepare(root, root / ".cache", progress=False)  # one case per name: the layout check passes
    assert main([str(root), "--cases", "2", "--family", "lgg-rich", "--shape", "32", "32", "24"]) == 0
    assert json.loads((root / "phantom.json").read_text())["family"] == "lgg-rich"
    assert len(list(root.rglob("*_seg.nii.gz"))) == 2
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not synthetic cases written here"):
        main([str(other), "--cases", "2"])
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # a user's file inside a phantom folder: refused too, nothing lost (settings differ, so it would be replaced)
    (root / "Brats17TrainingData" / "README").write_text("mine")
    with pytest.raises(DataError, match=r"Brats17TrainingData/README"):
        main([str(root), "--cases", "3", "--shape", "32", "32", "24"])
    assert (root / "Brats17TrainingData" / "README").read_text() == "mine"
    with pytest.raises(DataError, match="is a file"):
        main([str(other / "notes.txt"), "--cases", "2"])
