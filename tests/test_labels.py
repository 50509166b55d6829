import itertools

import numpy as np
import pytest
import torch

from brats.labels import (REGIONS, SCHEMES, is_softmax, msd_to_brats, num_outputs, probs_to_brats,
                          suppress_small_et, to_target)
from brats.layout import DataError
from brats.metrics import region_masks

LABEL = torch.tensor([0, 1, 2, 4], dtype=torch.uint8).view(1, 1, 4)  # (D, H, W)


def test_scheme_api():
    assert REGIONS == ("tc", "wt", "et")
    assert SCHEMES == ("regions", "seed3")
    assert [num_outputs(s) for s in SCHEMES] == [3, 3]
    assert [is_softmax(s) for s in SCHEMES] == [False, True]
    with pytest.raises(ValueError, match="unknown label scheme"):
        num_outputs("clip3")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_regions_target_pins_every_label(dtype):
    target = to_target(LABEL.to(dtype), "regions")
    assert target.dtype == torch.float32 and target.shape == (3, 1, 1, 4)
    # columns: label 0, 1, 2, 4; rows: TC, WT, ET
    assert target[:, 0, 0].tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]


def test_regions_target_batched_and_numpy():
    batch = LABEL.expand(2, 1, 1, 4).clone()  # (B, D, H, W)
    target = to_target(batch, "regions")
    assert target.shape == (2, 3, 1, 1, 4)
    assert torch.equal(target[1], to_target(LABEL, "regions"))
    np_target = to_target(LABEL.numpy(), "regions")
    assert isinstance(np_target, np.ndarray) and np_target.dtype == np.float32
    np.testing.assert_array_equal(np_target, target[0].numpy())


def test_seed3_target_never_folds_et_into_edema():
    target = to_target(LABEL, "seed3")
    assert target.dtype == torch.int64 and target.shape == LABEL.shape
    assert target.flatten().tolist() == [0, 1, 2, 1]  # ET (4) is core (1), not edema (2)
    np.testing.assert_array_equal(to_target(LABEL.numpy(), "seed3").ravel(), [0, 1, 2, 1])
    # the bug this guards against: clipping to 0..2 would turn ET into edema
    assert np.clip(LABEL.numpy(), 0, 2).ravel().tolist() == [0, 1, 2, 2]


def test_probs_to_brats_regions_every_combination():
    # all 8 on/off combinations of (TC, WT, ET) -> nested rule ET > TC > WT
    combos = list(itertools.product([0.0, 1.0], repeat=3))
    probs = torch.tensor(combos, dtype=torch.float32).T.reshape(3, 1, 1, 8)
    out = probs_to_brats(probs, "regions")
    expected = [4 if et else 1 if tc else 2 if wt else 0 for tc, wt, et in combos]
    assert out.dtype == torch.uint8 and out.flatten().tolist() == expected
    # consistency: the output regions are nested ET <= TC <= WT
    tc, wt, et = to_target(out, "regions")
    assert bool((et <= tc).all()) and bool((tc <= wt).all())


def test_probs_to_brats_threshold_and_numpy():
    probs = np.array([0.6, 0.7, 0.55], dtype=np.float32).reshape(3, 1, 1, 1)
    assert probs_to_brats(probs, "regions").item() == 4
    assert probs_to_brats(probs, "regions", threshold=0.58).item() == 1  # ET 0.55 below
    assert probs_to_brats(probs, "regions", threshold=0.65).item() == 2
    assert probs_to_brats(probs, "regions", threshold=0.75).item() == 0
    assert probs_to_brats(probs, "regions").dtype == np.uint8


def test_regions_round_trip_is_exact():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 1, 2, 4], size=(2, 5, 6, 7)).astype(np.uint8)
    back = probs_to_brats(to_target(label, "regions"), "regions")
    np.testing.assert_array_equal(back, label)


def test_seed3_argmax_and_round_trip():
    logits = torch.tensor([[3.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 5.0], [0.0, 1.0, 4.0, 0.0]]).view(3, 1, 1, 4)
    assert probs_to_brats(logits, "seed3").flatten().tolist() == [0, 1, 2, 1]
    onehot = torch.nn.functional.one_hot(to_target(LABEL.long(), "seed3"), 3).movedim(-1, 0).float()
    assert probs_to_brats(onehot, "seed3").flatten().tolist() == [0, 1, 2, 1]  # 4 -> core 1


def test_msd_to_brats_mapping():
    msd = np.array([0, 1, 2, 3, 3, 1], dtype=np.int16)
    out = msd_to_brats(msd)
    assert out.dtype == np.uint8 and out.tolist() == [0, 2, 1, 4, 4, 2]
    with pytest.raises(DataError, match=r"\[4\]"):
        msd_to_brats(np.array([0, 4]))


def test_small_et_becomes_ncr_and_large_et_stays():
    label = np.zeros((6, 6, 6), np.uint8)
    label[1:5, 1:5, 1:5] = 2
    label[2:4, 2:4, 2:4] = 1
    label[2, 2, 2] = 4  # 1 ET voxel
    out = suppress_small_et(label, 2)
    assert (out == 4).sum() == 0 and out[2, 2, 2] == 1
    # WT and TC are unchanged: ET and NCR are both tumour core
    before, after = region_masks(label), region_masks(out)
    assert np.array_equal(before["wt"], after["wt"]) and np.array_equal(before["tc"], after["tc"])
    assert label[2, 2, 2] == 4  # input not modified
    assert np.array_equal(suppress_small_et(label, 1), label)  # 1 voxel is not fewer than 1
    assert np.array_equal(suppress_small_et(label, 0), label)  # off
