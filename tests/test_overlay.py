"""Case figures: one column per stage, contours of the right regions, a PNG of the right size."""
import matplotlib.image as mpimg
import numpy as np
import pytest

from brats.overlay import FIGURE_DPI, PANEL_INCHES, _crop_box, case_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _slices():
    flair = np.zeros((40, 30), np.float32)
    flair[5:35, 4:26] = np.linspace(0.2, 1.0, 22)[None, :]  # the brain; background exactly 0
    truth = np.zeros((40, 30), np.uint8)
    truth[12:24, 8:20], truth[14:22, 10:18], truth[16:20, 12:16] = 2, 1, 4
    return flair, 1.0 - flair * 0.5, truth


def test_one_column_per_stage_and_the_truth(tmp_path):
    flair, t1ce, truth = _slices()
    lost_core = np.where(truth == 1, 2, truth).astype(np.uint8)
    panels = [("teacher\nWT 1.00", truth), ("student", lost_core), ("int8", np.zeros_like(truth))]
    widths = {}
    for n in (1, 3):
        path = tmp_path / f"case{n}.png"
        titles = case_figure(path, flair, t1ce, panels[:n], truth=truth, title="Brats17_X_1: median")
        assert titles == ["truth", *[name for name, _ in panels[:n]]]
        assert path.read_bytes().startswith(PNG_MAGIC)
        image = mpimg.imread(path)
        widths[n] = image.shape[1]
        assert image.shape[0] > 2 * PANEL_INCHES * FIGURE_DPI  # two rows: FLAIR and T1ce
    # the figure is PANEL_INCHES wide per column: truth + 1 stage, truth + 3 stages
    assert widths == {1: round(2 * PANEL_INCHES * FIGURE_DPI), 3: round(4 * PANEL_INCHES * FIGURE_DPI)}


def test_contours_in_region_colours(tmp_path):
    flair, t1ce, truth = _slices()
    path = tmp_path / "truth_only.png"
    assert case_figure(path, flair, t1ce, [], truth=truth) == ["truth"]
    rgb = mpimg.imread(path)[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.2) & (rgb[..., 2] < 0.2)
    green = (rgb[..., 1] > 0.9) & (rgb[..., 0] < 0.2) & (rgb[..., 2] < 0.2)
    half, legend = rgb.shape[0] // 2, rgb.shape[0] - 50  # rows: FLAIR above, T1ce below, then the legend
    assert green[:half].sum() > 20 and green[half:legend].sum() == 0  # WT only over FLAIR
    assert red[half:legend].sum() > 20 and red[:half].sum() == 0  # ET only over T1ce
    with pytest.raises(ValueError, match="needs a truth or at least one prediction"):
        case_figure(tmp_path / "none.png", flair, t1ce, [])


def test_crop_to_brain_and_labels():
    flair, _, truth = _slices()
    rows, cols = _crop_box([flair, truth], margin=2)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (3, 37, 2, 28)
    empty = np.zeros((5, 5))
    assert _crop_box([empty]) == (slice(None), slice(None))
