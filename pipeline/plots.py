"""Report figures (PNG, matplotlib Agg): mean Dice against parameters and against latency.

The published SegFormer3D point was measured on other data (MSD Task01, its own split), so it is
drawn hollow and labelled as such: a reference, not a comparison.
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


def _points(rows: list[dict], x_key: str) -> list[tuple[str, float, float]]:
    return [(r["stage"], float(r[x_key]), float(r["dice_mean"])) for r in rows
            if _finite(r.get(x_key)) and _finite(r.get("dice_mean")) and r[x_key] > 0]


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
    for stage, x, y in points:
        ax.annotate(stage, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


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
    return _save(fig, Path(path))
