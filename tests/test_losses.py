import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import SMOOTH, segmentation_loss, soft_dice


def _label() -> torch.Tensor:
    """(1, 2, 2, 2) BraTS map: background, NCR, edema and ET voxels."""
    return torch.tensor([0, 1, 2, 4, 0, 0, 2, 0]).reshape(1, 2, 2, 2)


def test_soft_dice_hand_values():
    # one channel, probs 0.5 everywhere, target 1 of 4 voxels:
    # inter 0.5, sum p 2, sum t 1 -> 1 - (1 + s) / (3 + s)
    probs = torch.full((1, 1, 1, 2, 2), 0.5)
    target = torch.tensor([1.0, 0, 0, 0]).reshape(1, 1, 1, 2, 2)
    assert soft_dice(probs, target).item() == pytest.approx(1 - (1 + SMOOTH) / (3 + SMOOTH), abs=1e-7)
    # channel mean: a perfect channel (0) and a disjoint one (1 - s / (2 + s))
    probs2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)
    target2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    assert soft_dice(probs2, target2).item() == pytest.approx(0.5 * (1 - SMOOTH / (2 + SMOOTH)), abs=1e-7)


def test_soft_dice_sums_over_batch():
    # batch Dice: an empty-target sample does not get its own 0/0 term
    probs = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1, 1)
    target = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1, 1)
    assert soft_dice(probs, target).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="target"):
        soft_dice(probs, target[:1])


def test_regions_perfect_logits_give_zero_dice():
    label = _label()
    # regions channels [TC, WT, ET]
    tc = torch.tensor([0, 1, 0, 1, 0, 0, 0, 0.0])
    wt = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0.0])
    et = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0.0])
    target = torch.stack([tc, wt, et]).reshape(1, 3, 2, 2, 2)
    logits = (target * 2 - 1) * 30
    loss, logs = segmentation_loss(logits, label, "regions")
    assert logs["dice"] < 1e-5 and logs["ce"] < 1e-10
    assert loss.item() == pytest.approx(logs["dice"] + logs["ce"], abs=1e-7)
    # the exact opposite is the worst case: Dice ~1, BCE ~30 per voxel
    _, bad = segmentation_loss(-logits, label, "regions")
    assert bad["dice"] > 0.999 and bad["ce"] == pytest.approx(30.0, abs=1e-3)


def test_regions_zero_logits_hand_values():
    label = _label()
    _, logs = segmentation_loss(torch.zeros(1, 3, 2, 2, 2), label, "regions", dice_weight=0.5, ce_weight=2.0)
    assert logs["ce"] == pytest.approx(math.log(2), abs=1e-6)
    # p = 0.5 on 8 voxels; |TC| 2, |WT| 4, |ET| 1: 1 - (2 * 0.5 * n + s) / (4 + n + s)
    per = [1 - (n + SMOOTH) / (4 + n + SMOOTH) for n in (2, 4, 1)]
    assert logs["dice"] == pytest.approx(sum(per) / 3, abs=1e-6)
    assert logs["loss"] == pytest.approx(0.5 * logs["dice"] + 2.0 * logs["ce"], abs=1e-6)


def test_seed3_softmax_values_and_et_is_core():
    label = _label()
    _, logs = segmentation_loss(torch.zeros(1, 3, 2, 2, 2), label, "seed3")
    assert logs["ce"] == pytest.approx(math.log(3), abs=1e-6)
    # p = 1/3; core = {1, 4} (2 voxels), edema = 2 voxels: 1 - (2 * n / 3 + s) / (8/3 + n + s)
    per = [1 - (2 * n / 3 + SMOOTH) / (8 / 3 + n + SMOOTH) for n in (2, 2)]
    assert logs["dice"] == pytest.approx(sum(per) / 2, abs=1e-6)
    # logits that call ET (4) core and NCR core are perfect; calling ET edema is not
    classes = torch.tensor([0, 1, 2, 1, 0, 0, 2, 0])
    good = F.one_hot(classes, 3).T.reshape(1, 3, 2, 2, 2).float() * 40 - 20
    _, ok = segmentation_loss(good, label, "seed3")
    assert ok["dice"] < 1e-5 and ok["ce"] < 1e-10
    wrong = F.one_hot(torch.tensor([0, 1, 2, 2, 0, 0, 2, 0]), 3).T.reshape(1, 3, 2, 2, 2).float() * 40 - 20
    _, bad = segmentation_loss(wrong, label, "seed3")
    assert bad["ce"] == pytest.approx(40.0 / 8, abs=1e-3)  # one voxel of eight off by a 40 margin


def test_gradient_flows_in_the_right_direction():
    label = _label()
    for scheme in ("regions", "seed3"):
        logits = torch.zeros(1, 3, 2, 2, 2, requires_grad=True)
        loss, _ = segmentation_loss(logits, label, scheme)
        loss.backward()
        g = logits.grad
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        # raising the WT channel (regions) / edema class (seed3) at an edema voxel lowers the loss
        channel = 1 if scheme == "regions" else 2
        assert g[0, channel, 0, 1, 0] < 0  # voxel index 2 holds label 2
        assert g[0, channel, 0, 0, 0] > 0  # voxel 0 is background


def test_half_precision_logits_are_scored_in_float32():
    label = _label()
    loss, _ = segmentation_loss(torch.zeros(1, 3, 2, 2, 2, dtype=torch.bfloat16), label, "regions")
    assert loss.dtype == torch.float32


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits"):
        segmentation_loss(torch.zeros(1, 2, 2, 2, 2), _label(), "regions")
