"""bench/bench_targets.py's Dice column (the bench itself times models: not run here)."""
import math

import pytest

from bench.bench_targets import dice_with_et_rule
from common.artifact import Artifact


def test_dice_with_the_et_rule_changes_only_the_et_term():
    metrics = {"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.3, "dice_mean": 2.0 / 3}
    rule = {"grid": [0, 50, 100], "dice_et": [0.3, 0.6, 0.45], "et_min_voxels": 50, "cases": 4}
    art = Artifact("slim", {}, {}, metrics=metrics, extra={"et_rule": rule})
    assert dice_with_et_rule(art) == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    off = Artifact("slim", {}, {}, metrics=metrics, extra={"et_rule": {**rule, "et_min_voxels": 0}})
    assert dice_with_et_rule(off) == pytest.approx(metrics["dice_mean"])  # rule off: the recorded mean
    assert math.isnan(dice_with_et_rule(Artifact("int8", {}, {}, metrics=metrics)))  # no rule recorded
    assert math.isnan(dice_with_et_rule(Artifact("int8", {}, {}, extra={"et_rule": rule})))  # no per-region Dice
