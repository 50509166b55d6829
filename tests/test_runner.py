"""engine.runner: guard rails, teacher lookup and source checks of the one stage runner."""
import math

import pytest
import torch

from brats.scoring import mean_rows
from common.artifact import Artifact, ArtifactError
from common.config import Config, ConfigError
from engine.runner import check_source, exit_code, find_teacher, guard, guard_lines


def _metrics(wt, tc, et, missed=0.0):
    return {"dice_wt": wt, "dice_tc": tc, "dice_et": et, "et_missed_cases": missed}


def test_guard_flags_each_region_that_drops_more_than_the_limit():
    cfg = Config()
    info = guard(_metrics(0.90, 0.70, 0.10, missed=3), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert info["drops"] == pytest.approx({"wt": 0.02, "tc": 0.15, "et": 0.70})
    assert info["violations"] == ["tc", "et"] and info["limit"] == 0.10
    lines = guard_lines(info, "student")
    assert "ET predicted empty on 3 case(s)" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["WARNING", "WARNING"]
    assert "TC Dice dropped 0.150" in lines[1] and "(--strict)" not in lines[1]
    art = Artifact(stage="student", spec={}, state_dict={}, extra={"guard": info})
    assert exit_code(art) == 0  # warnings only
    cfg.guard.strict = True
    art.extra["guard"] = guard(_metrics(0.90, 0.70, 0.10), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert exit_code(art) == 3 and "failing (--strict)" in guard_lines(art.extra["guard"], "student")[1]
    cfg.guard.max_region_drop = 0.8
    art.extra["guard"] = guard(_metrics(0.90, 0.70, 0.10), _metrics(0.92, 0.85, 0.80), "teacher", cfg)
    assert exit_code(art) == 0 and art.extra["guard"]["violations"] == []


def test_et_missed_cases_are_counted_not_averaged_away():
    rows = [{"case": "a", "dice_et": 1.0, "et_missed": 0.0}, {"case": "b", "dice_et": 0.0, "et_missed": 1.0},
            {"case": "c", "dice_et": 0.9, "et_missed": 0.0}, {"case": "d", "dice_et": 0.0, "et_missed": 1.0}]
    out = mean_rows(rows)
    assert out["et_missed_cases"] == 2.0 and out["et_missed"] == 0.5 and math.isclose(out["dice_et"], 0.475)


def test_teacher_lookup_and_source_checks(tmp_path):
    teacher = Artifact(stage="teacher", spec={}, state_dict={}, path=tmp_path / "t.pt")
    student = Artifact(stage="student", spec={"kind": "fp32"}, state_dict={}, lineage=teacher.child_lineage(),
                       config={"data": {"scheme": "seed3"}}, path=tmp_path / "s.pt")
    assert find_teacher(teacher) == str(tmp_path / "t.pt")  # a teacher is its own
    assert find_teacher(student) == str(tmp_path / "t.pt")  # the lineage's
    assert find_teacher(student, "other.pt") == "other.pt"  # explicit wins
    assert find_teacher(Artifact(stage="student", spec={}, state_dict={})) is None
    with pytest.raises(ConfigError, match="scheme 'seed3'"):
        check_source(student, Config(), ("fp32",), "lowrank")
    int8 = Artifact(stage="int8", spec={"kind": "int8-torch"}, state_dict={}, path=tmp_path / "q.pt")
    with pytest.raises(ArtifactError, match="needs a fp32 artifact, got kind 'int8-torch'"):
        check_source(int8, Config(), ("fp32",), "grown")
