import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brats.dataset import CropDataset, crop_window, iter_cases
from brats.layout import DataError
from brats.phantom import write_phantom_dataset
from brats.prepare import prepare


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_phantom_dataset(root, cases=3, val_cases=1, shape=(32, 32, 24), seed=2)
    return prepare(root, root / ".cache", progress=False)


def test_crop_window_pads_outside():
    vol = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    out = crop_window(vol, (-1, 2, 3), (3, 3, 3))
    assert out.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(out[:, 1:, :2, :2], vol[:, 0:2, 2:4, 3:5])
    assert out[:, 0].sum() == 0 and out[:, :, 2:].sum() == 0 and out[:, :, :, 2].sum() == 0
    assert crop_window(vol, (10, 0, 0), (2, 2, 2)).sum() == 0


def test_crop_shapes_types_and_determinism(cache):
    ids = cache.labelled()
    ds = CropDataset(cache, ids, crop=(16, 16, 8), fg_ratio=0.5, samples=7, seed=3)
    assert len(ds) == 7
    item = ds[4]
    assert item["image"].shape == (4, 16, 16, 8) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16, 8) and item["label"].dtype == torch.int64
    assert item["case"] == ids[4 % 3]
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 4}
    again = CropDataset(cache, ids, crop=(16, 16, 8), fg_ratio=0.5, samples=7, seed=3)[4]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    ds.set_epoch(1)
    starts = {ds.crop_start(ids[0], np.random.default_rng((3, e, 0))) for e in range(6)}
    assert len(starts) > 1  # epochs draw different crops
    # workers see the same items as the main process (randomness keyed on seed, epoch, index)
    seq = [ds[i]["image"] for i in range(7)]
    loaded = [b["image"][0] for b in DataLoader(ds, batch_size=1, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(seq, loaded))


def test_image_crop_matches_cache(cache):
    case = cache.labelled()[0]
    ds = CropDataset(cache, [case], crop=(8, 8, 8), fg_ratio=0.0, seed=0)
    rng = np.random.default_rng((0, 0, 0))
    start = ds.crop_start(case, rng)
    sl = tuple(slice(s, s + 8) for s in start)
    np.testing.assert_array_equal(ds[0]["image"].numpy(), np.asarray(cache.image(case)[(slice(None), *sl)], np.float32))


def test_padding_when_volume_smaller_than_crop(cache):
    case = cache.labelled()[0]
    meta = cache.meta(case)
    crop = tuple(s + 6 for s in meta.shape)
    ds = CropDataset(cache, [case], crop=crop, fg_ratio=0.0, samples=4, seed=1)
    label = np.asarray(cache.label(case))
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (4, *crop)
        # the whole volume is inside the window: nothing lost, the rest is zero padding
        assert int((item["label"] > 0).sum()) == int((label > 0).sum())
        assert int((item["image"] != 0).sum()) == int((np.asarray(cache.image(case)) != 0).sum())


def test_fg_ratio_one_centres_every_crop_on_tumour(cache):
    ds = CropDataset(cache, cache.labelled(), crop=(9, 10, 7), fg_ratio=1.0, samples=30, seed=4)
    centres = [int(ds[i]["label"][4, 5, 3]) for i in range(30)]
    assert all(c in (1, 2, 4) for c in centres)
    uniform = CropDataset(cache, cache.labelled(), crop=(9, 10, 7), fg_ratio=0.0, samples=30, seed=4)
    assert sum(int(uniform[i]["label"][4, 5, 3]) > 0 for i in range(30)) < 20  # tumour is a small share


def test_unlabelled_cases_rejected_and_iter_cases(cache):
    unlabelled = [m.case for m in cache.cases if not m.has_label]
    with pytest.raises(DataError, match=unlabelled[0]):
        CropDataset(cache, unlabelled, crop=(8, 8, 8))
    seen = list(iter_cases(cache, [m.case for m in cache.cases]))
    assert [v.case for v in seen] == [m.case for m in cache.cases]
    for v in seen:
        assert v.image.dtype == torch.float32 and v.image.shape == (4, *v.meta.shape)
        if v.meta.has_label:
            assert v.label.dtype == torch.int64 and v.label.shape == v.meta.shape
            assert int(v.label.max()) == 4 or v.meta.grade == "lgg"
        else:
            assert v.label is None
