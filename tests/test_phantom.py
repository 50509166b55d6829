import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats.cache import open_cache
from brats.labels import region_masks
from brats.phantom import main, make_case
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
