"""Report figures (PNG, matplotlib Agg): mean Dice against parameters and against latency, and
per region Dice against latency with the Pareto front.

The published SegFormer3D point was measured on other data (MSD Task01, its own split), so it is
drawn hollow and labelled as such: a reference, not a comparison. Stage labels are placed by
`place_labels`, so stages with equal numbers (a grown model that grew nothing, say) stay readable.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from common.atomic import atomic_write  # noqa: E402

# Perera et al., CVPR-W 2024, MSD Task01 (BraTS 2016/17 repackaged), their validation split
PUBLISHED = {
    "name": "SegFormer3D (published)",
    "params": 4.5e6,
    "dice_mean": 0.821,
    "dice_wt": 0.899,
    "dice_tc": 0.822,
    "dice_et": 0.742,
    "note": "published, other data (MSD Task01, its own split)",
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _points(rows: list[dict], x_key: str, y_key: str = "dice_mean") -> list[tuple[str, float, float]]:
    return [(r.get("name", r["stage"]), float(r[x_key]), float(r[y_key])) for r in rows
            if _finite(r.get(x_key)) and _finite(r.get(y_key)) and r[x_key] > 0]


# ----------------------------------------------------------------------------- label placement

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels
MARKER_PX = 5.0  # half the size of the box a point's marker keeps free of labels


def overlap(a: Box, b: Box) -> float:
    """Area shared by two boxes (0 when they only touch)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _candidates(px: float, py: float, w: float, h: float, d: float) -> list[tuple[float, float]]:
    """Lower-left corners of a w x h label at distance d around a point: E, NE, SE, N, S, W, NW, SW."""
    e = 0.7 * d
    return [(px + d, py - h / 2), (px + e, py + e), (px + e, py - h - e), (px - w / 2, py + d),
            (px - w / 2, py - h - d), (px - w - d, py - h / 2), (px - w - e, py + e), (px - w - e, py - h - e)]


def place_labels(points, sizes, bounds: Box | None = None, pad: float = 3.0, rings: int = 8) -> list[Box]:
    """A box per label (display pixels) next to its point, overlapping no other label and no point.

    points: [(x, y)]; sizes: [(w, h)] of each label's text. Labels are placed in order, each at the
    first free spot on rings of growing distance around its point (inside `bounds` when given); a
    label with no free spot takes the one it overlaps least.
    """
    points = [(float(x), float(y)) for x, y in points]
    obstacles = [(x - MARKER_PX, y - MARKER_PX, x + MARKER_PX, y + MARKER_PX) for x, y in points]
    placed: list[Box] = []
    for (px, py), (w, h) in zip(points, sizes):
        best, best_cost = None, math.inf
        for ring in range(rings):
            d = MARKER_PX + pad + ring * (h + pad)
            for x0, y0 in _candidates(px, py, w, h, d):
                box = (x0, y0, x0 + w, y0 + h)
                cost = sum(overlap(box, o) for o in placed + obstacles)
                if bounds is not None and not (box[0] >= bounds[0] and box[1] >= bounds[1]
                                               and box[2] <= bounds[2] and box[3] <= bounds[3]):
                    cost += 0.5 * w * h  # outside the axes: only when nothing inside is free
                if cost < best_cost:
                    best, best_cost = box, cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        placed.append(best)
    return placed


def _label_points(ax, points: list[tuple[str, float, float]], fontsize: float = 8, **text) -> list:
    """Annotate each (name, x, y) of `ax` without overlaps; call once the axes' limits are final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.set_xlim(ax.get_xlim())  # freeze autoscaling: placement is in display pixels
    ax.set_ylim(ax.get_ylim())
    xy = ax.transData.transform([(x, y) for _, x, y in points]) if points else []
    sizes = []
    for name, _, _ in points:
        probe = ax.text(0, 0, name, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    boxes = place_labels(xy, sizes, bounds=tuple(ax.bbox.extents))
    notes = []
    to_points = 72.0 / fig.dpi  # offsets in points: they scale with the dpi the file is saved at
    for (name, x, y), (px, py), box in zip(points, xy, boxes):
        gap = math.hypot(max(box[0] - px, 0.0, px - box[2]), max(box[1] - py, 0.0, py - box[3]))
        far = gap > 1.5 * (MARKER_PX + 3.0)  # pushed off its first ring: a leader line says whose it is
        notes.append(ax.annotate(
            name, (x, y), xytext=((box[0] - px) * to_points, (box[1] - py) * to_points), textcoords="offset points",
            ha="left", va="bottom", fontsize=fontsize,
            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6) if far else None, **text))
    return notes


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _scatter(ax, points) -> None:
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    ax.plot(xs, ys, "-", color="0.75", zorder=1)  # pipeline order
    ax.scatter(xs, ys, s=40, color="tab:blue", zorder=2, label="this pipeline (held-out cases)")
    ax.margins(x=0.15, y=0.1)


def _count_label(x: float, _pos=None) -> str:
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def dice_vs_params(rows: list[dict], path: str | Path) -> Path:
    """Mean Dice against parameter count (log x), with the published SegFormer3D point hollow."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _scatter(ax, _points(rows, "params"))
    ax.scatter([PUBLISHED["params"]], [PUBLISHED["dice_mean"]], s=60, facecolors="none",
               edgecolors="tab:red", zorder=3, label=PUBLISHED["note"])
    ax.annotate(PUBLISHED["name"], (PUBLISHED["params"], PUBLISHED["dice_mean"]),
                textcoords="offset points", xytext=(-6, -12), ha="right", fontsize=8, color="tab:red")
    ax.set_xscale("log")
    # ticks at 1-2-5 steps read as 200k, 500k, 1M, ... (default minor labels overlap)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_count_label))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("mean Dice (WT, TC, ET)")
    ax.set_title("Mean Dice vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _label_points(ax, _points(rows, "params"))
    return _save(fig, Path(path))


def dice_vs_latency(rows: list[dict], path: str | Path, key: str = "latency_ms_window",
                    label: str = "CPU latency per window (ms)") -> Path:
    """Mean Dice against CPU latency; the published Dice is a dashed line (no latency published here)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _scatter(ax, _points(rows, key))
    ax.axhline(PUBLISHED["dice_mean"], linestyle="--", color="tab:red", linewidth=1,
               label=f"{PUBLISHED['name']} mean Dice, {PUBLISHED['note']}")
    ax.set_xlabel(label)
    ax.set_ylabel("mean Dice (WT, TC, ET)")
    ax.set_title("Mean Dice vs CPU latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _label_points(ax, _points(rows, key))
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- per-region Pareto plot

PARETO_REGIONS = (("wt", "WT"), ("tc", "TC"), ("et", "ET"), ("mean", "mean of WT, TC, ET"))


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats: none is at least as fast and strictly better, or
    strictly faster and at least as good (x: latency, lower is better; y: Dice, higher)."""
    front = []
    for name, x, y in points:
        if not any((ox <= x and oy > y) or (ox < x and oy >= y) for _, ox, oy in points):
            front.append(name)
    return front


def _log_ticks(lo: float, hi: float) -> list[float]:
    """At least three readable ticks between lo and hi on a log axis (1-2-5 steps, finer if needed)."""
    for subs in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), tuple(range(1, 10)), tuple(x / 4 for x in range(4, 40))):
        ticks = [s * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for s in subs]
        ticks = sorted({float(f"{t:.6g}") for t in ticks if lo <= t <= hi})
        if len(ticks) >= 3:
            return ticks
    return [lo, hi]


def _pareto_panel(ax, points: list[tuple[str, float, float]], title: str) -> list:
    """One region: every stage, the front as a step line, readable labels; returns the labels."""
    front = set(pareto_front(points))
    on = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if on:
        ax.step([p[1] for p in on], [p[2] for p in on], where="post", color="tab:blue", lw=1, zorder=1)
    ax.scatter([p[1] for p in points if p[0] in front], [p[2] for p in points if p[0] in front],
               s=36, color="tab:blue", zorder=2, label="Pareto front (no stage faster and better)")
    ax.scatter([p[1] for p in points if p[0] not in front], [p[2] for p in points if p[0] not in front],
               s=36, facecolors="none", edgecolors="0.45", zorder=2, label="beaten by another stage")
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)
    if points:
        lo, hi = ax.get_xlim()
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(_log_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _pos: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    return _label_points(ax, points, fontsize=7)


def dice_vs_latency_regions(rows: list[dict], path: str | Path, key: str = "latency_ms_window",
                            label: str = "CPU latency per window (ms)") -> Path:
    """Dice per region (WT, TC, ET, mean) against CPU latency on a log axis, one panel each, with
    the stages on each region's Pareto front joined: where a compressed stage stops paying."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    fig.subplots_adjust(hspace=0.35, wspace=0.25, bottom=0.13)
    for ax, (region, title) in zip(axes.flat, PARETO_REGIONS):
        ax.set_ylabel(f"Dice {region.upper() if region != 'mean' else 'mean'}")
        ax.set_xlabel(f"{label}, log scale", fontsize=8)
        _pareto_panel(ax, _points(rows, key, f"dice_{region}"), title)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Dice vs CPU latency per region (held-out cases)", fontsize=10)
    return _save(fig, Path(path))
