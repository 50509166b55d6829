"""Report plots: labels that never overlap, the Pareto front, readable log ticks, PNGs written."""
import itertools

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest

from pipeline import plots
from pipeline.plots import MARKER_PX, overlap, pareto_front, place_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a chain where compression changes little: lowrank, grown and int8 sit on one spot
ROWS = [
    dict(stage="teacher", params=4.5e6, latency_ms_window=1500.0, dice_wt=0.90, dice_tc=0.82, dice_et=0.74),
    dict(stage="student", params=3.2e5, latency_ms_window=600.0, dice_wt=0.88, dice_tc=0.78, dice_et=0.70),
    dict(stage="lowrank", params=2.9e5, latency_ms_window=560.0, dice_wt=0.875, dice_tc=0.77, dice_et=0.69),
    dict(stage="grown", params=2.9e5, latency_ms_window=560.0, dice_wt=0.875, dice_tc=0.77, dice_et=0.69),
    dict(stage="int8", params=2.9e5, latency_ms_window=561.0, dice_wt=0.875, dice_tc=0.77, dice_et=0.69),
    dict(stage="student-labels", params=3.2e5, latency_ms_window=610.0, dice_wt=0.86, dice_tc=0.75, dice_et=0.72),
]
for _row in ROWS:
    _row["dice_mean"] = (_row["dice_wt"] + _row["dice_tc"] + _row["dice_et"]) / 3


def _disjoint(boxes):
    return all(overlap(a, b) == 0 for a, b in itertools.combinations(boxes, 2))


def test_labels_on_one_spot_do_not_overlap_each_other_or_points():
    points = [(100, 100)] * 4 + [(104, 101), (300, 50)]
    sizes = [(60, 12), (30, 12), (45, 12), (80, 12), (40, 12), (50, 12)]
    boxes = place_labels(points, sizes, bounds=(0, 0, 400, 300))
    assert _disjoint(boxes)
    for box, (w, h) in zip(boxes, sizes):
        assert box[2] - box[0] == w and box[3] - box[1] == h
        assert 0 <= box[0] and box[2] <= 400 and 0 <= box[1] and box[3] <= 300
        for x, y in points:  # no label hides a marker
            assert overlap(box, (x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX)) == 0
    # a lone point's label sits right beside it
    (box,) = place_labels([(10, 10)], [(20, 8)], bounds=(0, 0, 200, 200))
    assert box[0] - 10 < 10 and abs((box[1] + box[3]) / 2 - 10) < 1


def test_labels_drawn_in_a_real_panel_do_not_overlap():
    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = plots._points(ROWS, "latency_ms_window", "dice_tc")
    notes = plots._pareto_panel(ax, points, "TC")
    fig.canvas.draw()
    boxes = [tuple(n.get_window_extent().extents) for n in notes]
    plt.close(fig)
    assert [n.get_text() for n in notes] == [r["stage"] for r in ROWS]
    assert _disjoint(boxes)


def test_pareto_front():
    points = plots._points(ROWS, "latency_ms_window", "dice_et")
    # teacher: best ET; student-labels: beats the student on ET but not lowrank/grown on speed
    assert pareto_front(points) == ["teacher", "student", "lowrank", "grown", "student-labels"]
    assert pareto_front([("a", 1.0, 0.5), ("b", 1.0, 0.5), ("c", 2.0, 0.5)]) == ["a", "b"]


@pytest.mark.parametrize("lo, hi", [(430.0, 1900.0), (52.0, 61.0), (0.8, 2000.0)])
def test_log_ticks_are_few_and_inside(lo, hi):
    ticks = plots._log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 12 and all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks)


def test_plots_written(tmp_path):
    for name, draw in (("regions", plots.dice_vs_latency_regions), ("latency", plots.dice_vs_latency),
                       ("params", plots.dice_vs_params)):
        path = draw(ROWS, tmp_path / f"{name}.png")
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert mpimg.imread(path).shape[1] > 300
