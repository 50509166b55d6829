import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from brats import metrics
from brats.metrics import HD95_EMPTY, dice, hd95, iou, region_masks, score_case, sensitivity, specificity


# ---- independent brute-force references -------------------------------------------------------

def _surface_ref(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (or outside the array)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask, dtype=bool)
    core = tuple(slice(1, -1) for _ in range(3))
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[core]
    return mask & ~inner


def _hd95_ref(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    sp = np.asarray(spacing, dtype=float)
    a = np.argwhere(_surface_ref(pred)) * sp
    b = np.argwhere(_surface_ref(truth)) * sp
    d = cdist(a, b)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def _dice_ref(pred: np.ndarray, truth: np.ndarray) -> float:
    p = set(map(tuple, np.argwhere(pred)))
    t = set(map(tuple, np.argwhere(truth)))
    return 2 * len(p & t) / (len(p) + len(t))


def _random_blob(rng, shape, threshold):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return noise > threshold * noise.std()


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.5, 3.0)])
@pytest.mark.parametrize("seed", range(6))
def test_dice_and_hd95_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (14, 11, 9)
    pred = _random_blob(rng, shape, 0.5)
    truth = _random_blob(rng, shape, 0.3) | (pred & (rng.random(shape) < 0.5))
    assert pred.any() and truth.any()
    assert dice(pred, truth) == pytest.approx(_dice_ref(pred, truth), abs=1e-12)
    assert hd95(pred, truth, spacing) == pytest.approx(_hd95_ref(pred, truth, spacing), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_sparse_random_voxels(seed):
    # scattered voxels: every voxel is surface, distances are voxel-to-voxel
    rng = np.random.default_rng(100 + seed)
    pred = rng.random((10, 12, 8)) < 0.03
    truth = rng.random((10, 12, 8)) < 0.05
    spacing = (0.8, 1.5, 3.0)
    assert hd95(pred, truth, spacing) == pytest.approx(_hd95_ref(pred, truth, spacing), abs=1e-9)


def test_surface_matches_reference_including_array_border():
    rng = np.random.default_rng(7)
    mask = _random_blob(rng, (9, 9, 9), 0.0)
    mask[0, :, :] = True  # touches the array border: those voxels are surface
    np.testing.assert_array_equal(metrics.surface(mask), _surface_ref(mask))


def test_crop_equals_uncropped():
    rng = np.random.default_rng(3)
    for touch_border in (False, True):
        pred = np.zeros((30, 26, 20), bool)
        truth = np.zeros_like(pred)
        pred[8:15, 6:14, 5:11] = _random_blob(rng, (7, 8, 6), -0.3)
        truth[10:18, 9:16, 7:12] = True
        if touch_border:
            truth[0:3, 0:4, 15:20] = True
        spacing = (1.0, 1.5, 3.0)
        cropped = np.sort(metrics.surface_distances(pred, truth, spacing, crop=True))
        full = np.sort(metrics.surface_distances(pred, truth, spacing, crop=False))
        np.testing.assert_allclose(cropped, full, atol=1e-12)
        assert cropped.size == np.count_nonzero(_surface_ref(pred)) + np.count_nonzero(_surface_ref(truth))


def test_offset_cubes_dice_iou():
    # 4^3 cubes shifted by k voxels along one axis overlap in (4 - k) * 16 voxels
    for k, expected in [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25), (4, 0.0)]:
        pred = np.zeros((12, 8, 8), bool)
        truth = np.zeros_like(pred)
        pred[2:6, 2:6, 2:6] = True
        truth[2 + k:6 + k, 2:6, 2:6] = True
        assert dice(pred, truth) == pytest.approx(expected)
        inter = (4 - k) * 16
        assert iou(pred, truth) == pytest.approx(inter / (128 - inter))


def test_offset_cubes_hd95_one_axis():
    # cube shifted by 3 voxels along axis 0 at 2 mm: hand-derived pooled distances
    pred = np.zeros((16, 8, 8), bool)
    truth = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = True
    truth[5:9, 2:6, 2:6] = True
    value = hd95(pred, truth, spacing=(2.0, 1.0, 1.0))
    assert value == pytest.approx(_hd95_ref(pred, truth, (2.0, 1.0, 1.0)))
    # the far face of each cube lies 3 voxels (6 mm) from the other's nearest surface voxel
    assert value == pytest.approx(6.0)


@pytest.mark.parametrize(
    "offset,spacing,expected",
    [((0, 0, 3), (1.0, 1.0, 2.0), 6.0), ((3, 4, 0), (1.0, 1.0, 1.0), 5.0), ((1, 1, 1), (1.0, 1.5, 3.0), math.sqrt(1 + 2.25 + 9))],
)
def test_single_voxels_hd95_is_their_distance(offset, spacing, expected):
    pred = np.zeros((10, 10, 10), bool)
    truth = np.zeros_like(pred)
    pred[2, 2, 2] = True
    truth[2 + offset[0], 2 + offset[1], 2 + offset[2]] = True
    assert hd95(pred, truth, spacing) == pytest.approx(expected)
    assert hd95(pred, pred, spacing) == 0.0


def test_empty_conventions():
    empty = np.zeros((5, 5, 5), bool)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = True
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    for a, b in [(empty, blob), (blob, empty)]:
        assert dice(a, b) == 0.0 and iou(a, b) == 0.0 and hd95(a, b) == HD95_EMPTY
    assert HD95_EMPTY == pytest.approx(math.sqrt(240**2 + 240**2 + 155**2), abs=0.005)
    assert sensitivity(empty, empty) == 1.0
    assert sensitivity(blob, empty) == 0.0  # false positive against an empty reference
    assert sensitivity(empty, blob) == 0.0
    full = np.ones((5, 5, 5), bool)
    assert specificity(full, full) == 1.0
    assert specificity(blob, full) == 0.0


def test_sensitivity_specificity_counts():
    truth = np.zeros((4, 5, 5), bool)
    truth[0, :, :] = True  # 25 positives, 75 negatives
    pred = np.zeros_like(truth)
    pred[0, :2, :] = True  # 10 TP
    pred[1, :, :3] = True  # 15 FP
    assert sensitivity(pred, truth) == pytest.approx(10 / 25)
    assert specificity(pred, truth) == pytest.approx(60 / 75)


def test_region_masks():
    label = np.array([0, 1, 2, 4, 4, 2], dtype=np.uint8).reshape(1, 2, 3)
    masks = region_masks(label)
    np.testing.assert_array_equal(masks["wt"].ravel(), [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(masks["tc"].ravel(), [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(masks["et"].ravel(), [0, 0, 0, 1, 1, 0])


def test_score_case_values():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 2  # edema shell
    truth[3:7, 3:7, 3:7] = 1  # core
    truth[4:6, 4:6, 4:6] = 4  # enhancing
    pred = truth.copy()
    pred[truth == 4] = 1  # enhancing missed, called necrotic core
    spacing = (1.0, 1.0, 2.0)
    s = score_case(pred, truth, spacing)
    assert s["dice_wt"] == 1.0 and s["dice_tc"] == 1.0 and s["dice_et"] == 0.0
    assert s["hd95_wt"] == 0.0 and s["hd95_tc"] == 0.0 and s["hd95_et"] == HD95_EMPTY
    assert s["dice_mean"] == pytest.approx(2 / 3)
    assert s["hd95_mean"] == pytest.approx(HD95_EMPTY / 3)
    assert s["iou_mean"] == pytest.approx(2 / 3)
    assert s["sens_et"] == 0.0 and s["spec_et"] == pytest.approx(1.0)
    assert list(s)[:6] == ["dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"]
    for key in ("iou", "sens", "spec"):
        assert {f"{key}_{r}" for r in ("wt", "tc", "et")} <= set(s)
    # edema grown by one slice: WT changes, TC/ET do not
    pred2 = truth.copy()
    pred2[8, 2:8, 2:8] = 2
    s2 = score_case(pred2, truth, spacing)
    wt_t, wt_p = np.count_nonzero(truth), np.count_nonzero(pred2)
    assert s2["dice_wt"] == pytest.approx(2 * wt_t / (wt_t + wt_p))
    assert s2["hd95_wt"] == pytest.approx(_hd95_ref(pred2 > 0, truth > 0, spacing))
    assert s2["dice_tc"] == 1.0 and s2["dice_et"] == 1.0


def test_score_case_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        score_case(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_score_classes():
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:5, 1:5, 1:5] = 2
    truth[2:4, 2:4, 2:4] = 1
    pred = truth.copy()
    pred[2, 2, 2] = 2  # one core voxel called edema
    s = metrics.score_classes(pred, truth, classes=(1, 2))
    assert s["dice_c1"] == pytest.approx(2 * 7 / (7 + 8))
    assert s["dice_c2"] == pytest.approx(2 * 56 / (57 + 56))
    assert s["dice_mean"] == pytest.approx((s["dice_c1"] + s["dice_c2"]) / 2)
    assert set(s) >= {"hd95_c1", "iou_c2", "sens_c1", "spec_c2"}


def test_summarize():
    rows = [
        {"case": "a", "dice_wt": 0.5, "hd95_wt": 2.0},
        {"case": "b", "dice_wt": 0.7, "hd95_wt": float("nan")},
        {"case": "c", "dice_wt": 0.9, "hd95_wt": 4.0},
    ]
    s = metrics.summarize(rows)
    assert "case" not in s
    assert s["dice_wt"]["mean"] == pytest.approx(0.7)
    assert s["dice_wt"]["std"] == pytest.approx(math.sqrt((0.04 + 0 + 0.04) / 3))
    assert s["dice_wt"]["median"] == pytest.approx(0.7)
    assert s["hd95_wt"] == pytest.approx({"mean": 3.0, "std": 1.0, "median": 3.0, "n": 2})


# ---- other libraries' HD95 (optional; skipped when not installed) -------------------------------

def _sphere_with_spurious_cube() -> tuple[np.ndarray, np.ndarray]:
    """Truth: a ball of radius 9. Prediction: the same ball and a 4^3 cube 11 voxels away, whose
    surface is 6.6 % of the prediction's surface but 3.4 % of both surfaces pooled."""
    g = np.indices((48, 48, 48)) - 16
    truth = (g ** 2).sum(0) <= 81
    pred = truth.copy()
    pred[36:40, 14:18, 14:18] = True
    return pred, truth


def test_medpy_hd95_is_ours():
    binary = pytest.importorskip("medpy.metric.binary", reason="optional medpy not installed")
    pred, truth = _sphere_with_spurious_cube()
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.5, 2.0)):
        assert binary.hd95(pred, truth, voxelspacing=spacing) == pytest.approx(hd95(pred, truth, spacing), abs=1e-9)
    with pytest.raises(RuntimeError):  # medpy has no convention for an empty mask; ours is HD95_EMPTY
        binary.hd95(np.zeros_like(truth), truth)


def test_monai_hd95_takes_the_larger_directed_percentile():
    pytest.importorskip("monai", reason="optional monai not installed")
    import torch
    from monai.metrics import compute_hausdorff_distance

    def monai_hd95(p, t):
        return compute_hausdorff_distance(torch.as_tensor(p)[None, None], torch.as_tensor(t)[None, None],
                                          percentile=95).item()

    pred, truth = _sphere_with_spurious_cube()
    distances = metrics.surface_distances(pred, truth)
    n_pred = int(metrics.surface(pred).sum())  # pred -> truth first, then truth -> pred
    directed = (np.percentile(distances[:n_pred], 95), np.percentile(distances[n_pred:], 95))
    assert monai_hd95(pred, truth) == pytest.approx(max(directed))
    assert hd95(pred, truth) == 0.0 < directed[0]  # pooled: the cube is under 5 % of the distances
    with pytest.warns(UserWarning):
        assert math.isnan(monai_hd95(np.zeros_like(truth), truth))
