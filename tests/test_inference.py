import math

import numpy as np
import pytest
import torch

from brats.inference import (MIN_WEIGHT, _window_plan, coarse_window, WindowCount, gaussian_importance, predict_case, sliding_window, to_full_grid, tumour_box,
                             window_starts)
from model.refineformer3d import ModelSpec, RefineFormer3D

WINDOW = (8, 8, 8)


def _linear_predict(weight: torch.Tensor, bias: torch.Tensor, window=WINDOW):
    """Per-voxel linear map C -> K; asserts the model only ever sees the window size."""
    calls = []

    def predict(x):
        assert tuple(x.shape[2:]) == tuple(window), x.shape
        calls.append(x.shape[0])
        return torch.einsum("kc,bc...->bk...", weight, x) + bias.view(1, -1, 1, 1, 1)

    return predict, calls


def _direct(weight, bias, image):
    return torch.einsum("kc,c...->k...", weight, image) + bias.view(-1, 1, 1, 1)


@pytest.mark.parametrize("shape", [(20, 14, 11), (5, 6, 7), (10, 5, 12), (8, 8, 8)])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("sw_batch", [1, 3, 7])
def test_linear_model_reproduced_exactly(shape, overlap, sw_batch):
    g = torch.Generator().manual_seed(hash((shape, overlap, sw_batch)) % 2**31)
    image = torch.randn((2, *shape), generator=g)
    weight, bias = torch.randn(3, 2, generator=g), torch.randn(3, generator=g)
    predict, calls = _linear_predict(weight, bias)
    for gaussian in (True, False):
        out = sliding_window(predict, image, WINDOW, overlap=overlap, sw_batch=sw_batch, gaussian=gaussian)
        assert out.shape == (3, *shape) and out.dtype == torch.float32
        torch.testing.assert_close(out, _direct(weight, bias, image), atol=1e-5, rtol=1e-5)
    n_windows = math.prod(len(window_starts(max(s, 8), 8, overlap)) for s in shape)
    assert sum(calls) == 2 * n_windows
    assert max(calls) <= sw_batch


def test_window_starts_cover_exactly():
    for size in range(1, 60):
        for window in (4, 8, 16):
            for overlap in (0.0, 0.25, 0.5, 0.75):
                starts = window_starts(size, window, overlap)
                assert starts[0] == 0 and starts == sorted(set(starts))
                if size <= window:
                    assert starts == [0]
                    continue
                assert starts[-1] == size - window  # last window flush with the end
                steps = np.diff(starts)
                assert steps.max() <= max(1, int(window * (1 - overlap)))
                covered = np.zeros(size, bool)
                for s in starts:
                    covered[s:s + window] = True
                assert covered.all()
    assert window_starts(240, 128, 0.5) == [0, 56, 112]
    assert window_starts(155, 128, 0.5) == [0, 27]
    assert window_starts(256, 128, 0.0) == [0, 128]


def test_gaussian_map_properties():
    w = gaussian_importance((9, 10, 7))
    assert w.shape == (9, 10, 7) and w.dtype == torch.float32
    assert w[4, 4, 3] == pytest.approx(1.0) and w[4, 5, 3] == pytest.approx(1.0)  # even axis: two centres
    assert float(w.max()) == pytest.approx(1.0)
    for axis in range(3):
        torch.testing.assert_close(w, torch.flip(w, dims=(axis,)))
    # strictly decreasing away from the centre along each axis
    assert torch.all(torch.diff(w[4, 5:, 3]) < 0) and torch.all(torch.diff(w[:5, 4, 3]) > 0)
    # sigma = sigma_scale * window: one sigma from the centre is exp(-1/2)
    w9 = gaussian_importance((9, 9, 9), sigma_scale=2 / 9)
    assert w9[4, 4, 6] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert w9[6, 2, 4] == pytest.approx(math.exp(-1.0), rel=1e-6)
    # floor keeps far corners of a large window away from zero
    big = gaussian_importance((128, 128, 128))
    assert float(big.min()) == pytest.approx(MIN_WEIGHT) and float(big[0, 0, 0]) > 0


def test_overlap_average_weighted_by_gaussian():
    # two windows along axis 0 (size 12, window 8: starts 0 and 4); each window outputs its own id
    image = torch.zeros((1, 12, 8, 8))
    seen = []

    def predict(x):
        ids = torch.arange(len(seen), len(seen) + x.shape[0], dtype=torch.float32) + 1.0
        seen.extend(ids.tolist())
        return ids.view(-1, 1, 1, 1, 1).expand(-1, 1, *x.shape[2:])

    out = sliding_window(predict, image, WINDOW, overlap=0.5, sw_batch=1, skip_background=False)  # zeros: run anyway
    g = gaussian_importance(WINDOW)
    assert seen == [1.0, 2.0]
    # voxel z=5: index 5 in window 1 (weight g[5]) and index 1 in window 2 (weight g[1])
    expected = (1.0 * g[5, 3, 3] + 2.0 * g[1, 3, 3]) / (g[5, 3, 3] + g[1, 3, 3])
    assert float(out[0, 5, 3, 3]) == pytest.approx(float(expected), rel=1e-6)
    assert float(out[0, 2, 0, 0]) == pytest.approx(1.0) and float(out[0, 10, 7, 7]) == pytest.approx(2.0)


def test_every_voxel_weighted():
    # a constant output averages to the constant everywhere: no voxel is left with 0 / 0
    image = torch.zeros((1, 33, 9, 17))
    out = sliding_window(lambda x: torch.full((x.shape[0], 2, *x.shape[2:]), 3.0), image, (16, 8, 8), overlap=0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((2, 33, 9, 17), 3.0))


def test_bad_predict_output_and_args():
    image = torch.zeros((1, 8, 8, 8))
    with pytest.raises(ValueError, match="predict returned shape"):
        sliding_window(lambda x: x[:, :, :4], image, WINDOW)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(lambda x: x, image, WINDOW, overlap=1.0)
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        sliding_window(lambda x: x, image[0], WINDOW)


def _label_logits(label: np.ndarray, scheme: str) -> torch.Tensor:
    lab = torch.as_tensor(label.astype(np.int64))
    if scheme == "regions":
        chans = [(lab == 1) | (lab == 4), lab > 0, lab == 4]  # [TC, WT, ET]
    else:
        chans = [lab == 0, (lab == 1) | (lab == 4), lab == 2]
    return torch.stack(chans).float() * 12.0 - 6.0


@pytest.mark.parametrize("scheme", ["regions", "seed3"])
def test_predict_case_recovers_labels(scheme):
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 1, 2, 4]), size=(13, 9, 10), p=[0.5, 0.2, 0.2, 0.1])
    image = torch.as_tensor(label, dtype=torch.float32)[None]  # (1, D, H, W): the label itself

    def predict(x):  # per-voxel "model": logits from the label values in the input channel
        return torch.stack([_label_logits(v[0].numpy(), scheme) for v in x])

    out = predict_case(predict, image, scheme, window=WINDOW, overlap=0.5, sw_batch=2)
    assert out.dtype == np.uint8 and out.shape == label.shape
    expected = label.copy()
    if scheme == "seed3":
        expected[expected == 4] = 1  # seed3 cannot express ET: core comes back as 1, never edema
    np.testing.assert_array_equal(out, expected)


def test_to_full_grid():
    crop = np.arange(1, 25, dtype=np.uint8).reshape(2, 3, 4)
    full = to_full_grid(crop, [[1, 3], [0, 3], [4, 8]], (5, 4, 9))
    assert full.shape == (5, 4, 9) and full.dtype == np.uint8
    np.testing.assert_array_equal(full[1:3, 0:3, 4:8], crop)
    assert full.sum() == crop.sum()
    with pytest.raises(ValueError, match="spans"):
        to_full_grid(crop, [[1, 4], [0, 3], [4, 8]], (5, 4, 9))  # inclusive-end mistake
    with pytest.raises(ValueError, match="outside"):
        to_full_grid(crop, [[4, 6], [0, 3], [4, 8]], (5, 4, 9))


def test_predict_case_suppresses_small_et():
    # A predictor that fires TC, WT and ET on exactly 3 voxels and nothing else.
    image = torch.zeros(4, 8, 8, 8)
    image[0, 1, 1, 1:4] = 1.0

    def predict(x):
        on = x[:, :1] * 20 - 10  # logit +10 on the marked voxels, -10 elsewhere
        return on.repeat(1, 3, 1, 1, 1)

    kept = predict_case(predict, image, "regions", window=(8, 8, 8), overlap=0.0)
    assert (kept == 4).sum() == 3
    relabelled = predict_case(predict, image, "regions", window=(8, 8, 8), overlap=0.0, et_min_voxels=4)
    assert (relabelled == 4).sum() == 0 and (relabelled == 1).sum() == 3


TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=8, fuse_dim=8,
            refine_dim=4)


def _tiny_predict(seed: int = 0):
    """A tiny RefineFormer3D whose logits on an all-zero window are far from constant background
    (random weights), so a skipped window's contribution is only right if it is the model's own."""
    torch.manual_seed(seed)
    model = RefineFormer3D(ModelSpec(**TINY)).eval()
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        with torch.no_grad():
            return model(x)

    return predict, calls


BOX = (slice(30, 50), slice(20, 44), slice(10, 30))


def _brain_in_zeros(shape=(4, 96, 80, 48), brain=BOX, seed=0):
    """(C, D, H, W): z-scored noise in a box, exactly 0 outside it (as the cache stores background)."""
    image = torch.zeros(shape)
    g = torch.Generator().manual_seed(seed)
    image[(slice(None), *brain)] = torch.randn((shape[0], *[s.stop - s.start for s in brain]), generator=g)
    return image


@pytest.mark.parametrize("sw_batch", [1, 3])
def test_skipping_zero_windows_keeps_the_segmentation(sw_batch):
    image = _brain_in_zeros()
    window = (32, 32, 32)
    predict, calls = _tiny_predict()
    full = sliding_window(predict, image, window, 0.5, sw_batch, skip_background=False)
    n_full = sum(calls)
    calls.clear()
    count = WindowCount()
    skipped = sliding_window(predict, image, window, 0.5, sw_batch, count=count)
    starts = [window_starts(s, w, 0.5) for s, w in zip(image.shape[1:], window)]
    n_windows = math.prod(map(len, starts))
    # windows reaching into the brain box [30, 50) x [20, 44) x [10, 30): 4 of 5, 3 of 4, 2 of 2 along the axes
    assert [sum(a < b.stop and a + w > b.start for a in st) for st, w, b in zip(starts, window, BOX)] == [4, 3, 2]
    assert count.windows == n_windows == n_full == 40 and count.skipped == 40 - 4 * 3 * 2
    assert sum(calls) == n_windows - count.skipped + 1  # one all-zero window stands in for every skipped one
    if sw_batch == 1:  # same windows, same order, same batches: bit for bit
        assert torch.equal(skipped, full)
    else:  # the computed windows are batched differently: float rounding only
        torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    for scheme in ("regions", "seed3"):
        a = predict_case(predict, image, scheme, window, 0.5, sw_batch)
        b = predict_case(predict, image, scheme, window, 0.5, sw_batch, skip_background=False)
        np.testing.assert_array_equal(a, b)


def test_no_window_skipped_where_every_window_holds_brain():
    image = torch.randn((4, 48, 40, 40), generator=torch.Generator().manual_seed(1))
    image[:, :8] = 0.0  # a zero slab thinner than a window
    predict, calls = _tiny_predict()
    count = WindowCount()
    out = sliding_window(predict, image, (32, 32, 32), 0.5, 1, count=count)
    assert count.skipped == 0 and count.windows == sum(calls) == 2 * 2 * 2
    assert torch.equal(out, sliding_window(predict, image, (32, 32, 32), 0.5, 1, skip_background=False))


def test_window_plan_marks_exactly_the_windows_that_hold_a_brain_voxel():
    """The axis-by-axis box test agrees with looking at every window's voxels for a brain of one voxel at
    every place of a small grid (an off-by-one at any window edge, on any axis, shows somewhere)."""
    spatial, window = (11, 9, 7), (4, 4, 3)
    for voxel in np.ndindex(*spatial):
        brain = torch.zeros(spatial, dtype=torch.bool)
        brain[voxel] = True
        slices, run = _window_plan(spatial, window, 0.5, brain)
        assert run == [bool(brain[s].any()) for s in slices], voxel
    assert _window_plan(spatial, window, 0.5, None)[1] == [True] * len(slices)


def test_a_given_brain_mask_is_used_and_checked():
    image = _brain_in_zeros()
    predict, _ = _tiny_predict()
    count = WindowCount()
    no_brain = torch.zeros(image.shape[1:], dtype=torch.bool)  # a caller's mask wins: every window is background
    sliding_window(predict, image, (32, 32, 32), 0.5, 1, count=count, brain=no_brain)
    assert count.skipped == count.windows == 40
    for bad in (no_brain[:-1], no_brain.float()):
        with pytest.raises(ValueError, match="brain mask must be bool of the image's spatial shape"):
            sliding_window(predict, image, (32, 32, 32), 0.5, 1, brain=bad)
    for coarse in (0, 2):  # through predict_case too, with or without the coarse pass (which pools the image)
        count = WindowCount()
        predict_case(predict, image, "regions", (32, 32, 32), 0.5, 1, coarse=coarse, count=count, brain=no_brain)
        assert count.windows == count.skipped > 0


def test_window_count_adds_up_over_cases_and_says_it():
    count = WindowCount()
    predict = lambda x: torch.zeros((x.shape[0], 3, *x.shape[2:]))  # noqa: E731
    for brain in ((slice(0, 4), slice(0, 4), slice(0, 4)), (slice(20, 22), slice(20, 22), slice(20, 22))):
        predict_case(predict, _brain_in_zeros((4, 24, 24, 24), brain), "regions", (8, 8, 8), 0.0, count=count)
    assert (count.windows, count.skipped) == (2 * 27, 2 * 26)
    assert count.line() == "skipped 52 of 54 windows (background)"
    empty = WindowCount()
    sliding_window(predict, torch.zeros((4, 8, 8, 8)), (8, 8, 8), 0.0, count=empty)  # all background: one window
    assert (empty.windows, empty.skipped) == (1, 1)


def _pointwise_predict(calls: list[int]):
    """Logits [TC, WT, ET] that depend on each voxel alone (no context): WT where modality 0 > 1, ET where > 2."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        t = x[:, :1]
        return torch.cat([8 * (t - 1.5), 8 * (t - 1.0), 8 * (t - 2.0)], dim=1)
    return predict


def test_coarse_to_fine_predicts_the_tumour_box_only_and_counts_what_it_saved():
    """A pointwise model gives the same labels inside the box as the full pass, so the label maps agree
    exactly; the full pass's other windows are not run; the box keeps a margin and one window per axis."""
    image = torch.zeros((4, 96, 80, 64))
    image[:, 4:92, 4:76, 4:60] = 0.5  # brain
    image[0, 60:72, 50:62, 40:52] = 1.6  # tumour: WT
    image[0, 64:68, 54:58, 44:48] = 3.0  # its ET
    window = (32, 32, 32)
    calls: list[int] = []
    predict = _pointwise_predict(calls)
    full = predict_case(predict, image, "regions", window, 0.5, 1)
    n_full = len(calls)
    calls.clear()
    count = WindowCount()
    fine = predict_case(predict, image, "regions", window, 0.5, 1, coarse=2, count=count)
    np.testing.assert_array_equal(fine, full)
    assert (fine == 4).sum() == 4 ** 3 and (fine > 0).sum() == 12 ** 3
    # pooled 48x40x32: 2 x 2 x 1 coarse windows; then the box's 2 x 2 x 2 instead of the full pass's 5 x 4 x 3
    assert (count.coarse, count.windows, count.skipped) == (4, 8, 0) and len(calls) == 4 + 8
    assert n_full == 5 * 4 * 3 and count.saved == 5 * 4 * 3 - 8
    assert "4 coarse window(s) run, 52 full-resolution window(s) saved" in count.line()
    calls.clear()  # uncounted (only the box's brain mask is made): the same labels and windows
    np.testing.assert_array_equal(predict_case(predict, image, "regions", window, 0.5, 1, coarse=2), full)
    assert len(calls) == 4 + 8
    box = tumour_box(predict, image, "regions", window, 2)
    assert [(s.start, s.stop) for s in box] == [(44, 88), (34, 78), (24, 64)]  # tumour +- 16 voxels, inside the image
    with pytest.raises(ValueError, match="pooling factor >= 2"):
        predict_case(predict, image, "regions", window, 0.5, 1, coarse=1)


def test_coarse_window_fits_the_pooled_image_in_multiples_of_coarse_fit():
    assert coarse_window((99, 99, 66), (128, 128, 128), 32) == (128, 128, 96)  # a BraTS brain box pooled by 2
    assert coarse_window((66, 66, 44), (128, 128, 128), 32) == (96, 96, 64)  # pooled by 3
    assert coarse_window((200, 5, 64), (128, 128, 128), 32) == (128, 32, 64)  # never above the window
    assert coarse_window((99, 99, 66), (128, 128, 128), 0) == (128, 128, 128)
    with pytest.raises(ValueError, match="coarse_fit must be >= 0"):
        coarse_window((99, 99, 66), (128, 128, 128), -32)
    image = torch.zeros((4, 96, 80, 64))
    image[:, 4:92, 4:76, 4:60] = 0.5
    image[0, 60:72, 50:62, 40:52] = 1.6
    shapes: list[tuple[int, ...]] = []
    pointwise = _pointwise_predict([])

    def predict(x):
        shapes.append(tuple(x.shape[2:]))
        return pointwise(x)
    full = predict_case(predict, image, "regions", (64, 64, 64), 0.5, 1)
    shapes.clear()
    fitted = predict_case(predict, image, "regions", (64, 64, 64), 0.5, 1, coarse=2, coarse_fit=16)
    np.testing.assert_array_equal(fitted, full)  # pointwise: the box's labels are the full pass's
    assert shapes[0] == (48, 48, 32) and all(s == (64, 64, 64) for s in shapes[1:])  # pooled 48x40x32


def test_coarse_pass_that_finds_nothing_falls_back_to_the_full_pass():
    image = torch.zeros((4, 64, 64, 48))
    image[:, 8:56, 8:56, 8:40] = 0.5  # brain, no tumour
    image[0, 30, 30, 30] = 1.6  # one tumour voxel: pooled by 2 it falls under the threshold's reach
    calls: list[int] = []
    predict = _pointwise_predict(calls)
    count = WindowCount()
    label = predict_case(predict, image, "regions", (32, 32, 32), 0.5, 1, coarse=4, count=count)
    np.testing.assert_array_equal(label, predict_case(predict, image, "regions", (32, 32, 32), 0.5, 1))
    assert count.coarse == 1 and count.saved == 0 and (label > 0).sum() == 1 and count.full_pass == 1
    predict_case(predict, image[:, :32, :32, :32], "regions", (32, 32, 32), 0.5, 1, coarse=2, count=count)
    assert count.full_pass == 2 and count.coarse == 1  # within one window: no coarse pass at all
    assert "2 case(s) got the full pass (within one window" in count.line()


def test_coarse_pass_skipped_where_it_cannot_pay_or_cannot_pool_and_sees_every_region():
    calls: list[int] = []
    predict = _pointwise_predict(calls)
    small = torch.zeros((4, 30, 30, 20))
    small[0, 10:14, 10:14, 8:12] = 1.6
    count = WindowCount()  # a case within one window: no coarse pass, the full pass's labels
    label = predict_case(predict, small, "regions", (32, 32, 32), 0.5, 1, coarse=2, count=count)
    np.testing.assert_array_equal(label, predict_case(predict, small, "regions", (32, 32, 32), 0.5, 1))
    assert count.coarse == 0 and len(calls) == 2
    thin_slab = torch.zeros((4, 1, 64, 64))
    thin_slab[0, 0, 30:34, 30:34] = 1.6
    count = WindowCount()  # an axis shorter than the factor: no pooling error, the full pass
    label = predict_case(predict, thin_slab, "regions", (32, 32, 32), 0.5, 1, coarse=2, count=count)
    assert count.coarse == 0 and (label > 0).sum() == 16

    def tc_only(x: torch.Tensor) -> torch.Tensor:  # TC fires where WT does not: still a tumour to find
        t = x[:, :1]
        return torch.cat([8 * (t - 1.0), torch.full_like(t, -8.0), torch.full_like(t, -8.0)], dim=1)

    image = torch.zeros((4, 96, 80, 64))
    image[0, 60:72, 50:62, 40:52] = 1.6
    box = tumour_box(tc_only, image, "regions", (32, 32, 32), 2)
    assert box is not None and box[0].start <= 60 and box[0].stop >= 72
