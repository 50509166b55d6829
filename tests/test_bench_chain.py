"""bench/bench_chain.py's plan and reuse rules (the bench itself takes an hour: not run here)."""
import argparse
import json
import sys

import pytest
import torch

from bench.bench_chain import ARMS, family_steps, unreadable_artifact
from common.artifact import Artifact
from model.refineformer3d import ModelSpec, RefineFormer3D


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(out=str(tmp_path), cases=24, val_cases=8, shape=[96, 96, 64], seed=0, teacher_epochs=40,
                slim_epochs=40, student_epochs=None, arms=list(ARMS), threads=2, quick=False, set=[])
    return argparse.Namespace(**{**base, **kw})


def _sets(step) -> list[str]:
    return [step.argv[i + 1] for i, a in enumerate(step.argv) if a == "--set"]


def test_student_epochs_reach_the_student_and_its_arms_only_and_arms_can_be_left_out(tmp_path):
    steps = {s.name: s for s in family_steps("demo", _args(tmp_path, student_epochs=30, slim_epochs=35,
                                                                 arms=["student-labels"]))}
    assert "train.epochs=30" in _sets(steps["student"]) and "train.epochs=30" in _sets(steps["student-labels"])
    assert "train.epochs=35" in _sets(steps["slim"]) and not any("train.epochs=30" in _sets(steps[n])
                                                                 for n in ("slim", "lowrank", "grow", "int8"))
    assert "train.epochs=40" in _sets(steps["teacher"])  # --teacher-epochs
    assert {"student-scratch", "student-gated", "score-student-scratch"}.isdisjoint(steps)
    quick = {s.name: s for s in family_steps("demo", _args(tmp_path, quick=True, student_epochs=3))}
    assert _sets(quick["student"])[-1] == "train.epochs=3" and "train.epochs=1" in _sets(quick["slim"])
    assert "student-gated" in quick  # every arm by default


def test_set_reaches_every_stage_after_the_teacher_and_an_arms_own_setting_wins(tmp_path):
    steps = {s.name: s for s in family_steps("demo", _args(tmp_path, set=["distill.kd_region_weights=adaptive"]))}
    adaptive = "distill.kd_region_weights=adaptive"
    assert adaptive not in _sets(steps["teacher"])
    assert all(adaptive in _sets(steps[n]) for n in ("student", "slim", "lowrank", "grow", "int8", "student-labels"))
    weighted = _sets(steps["student-weighted"])  # the arm's own value is given after --set's, so it wins
    assert weighted.index("distill.kd_region_weights=teacher") > weighted.index(adaptive)


def test_a_finished_step_whose_artifact_no_longer_loads_is_made_again(tmp_path):
    model = RefineFormer3D(ModelSpec(embed_dims=[8, 8, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1]))
    path = Artifact("teacher", model.spec.to_dict(), model.state_dict()).save(tmp_path / "best.pt")
    assert unreadable_artifact(path) is None
    path.write_bytes(path.read_bytes()[:-100])  # damaged after its step finished
    assert "best.pt" in unreadable_artifact(path)
    (tmp_path / "scores.csv").write_text("case\n")
    assert unreadable_artifact(tmp_path / "scores.csv") is None  # not an artifact: the stamp decides
    torch.save([1], tmp_path / "x.pt")
    assert "not a refineformer3d-artifact" in unreadable_artifact(tmp_path / "x.pt")


def test_a_step_key_follows_its_configs_content_not_just_its_command(tmp_path, monkeypatch):
    import bench.bench_chain as bc

    steps = {s.name: s for s in family_steps("demo", _args(tmp_path))}
    slim = steps["slim"]
    made = {name: "run-1" for name in slim.needs}
    before = bc._key(slim, tmp_path, made)
    assert bc._key(slim, tmp_path, made) == before  # stable
    assert bc._key(slim, tmp_path, {n: "run-2" for n in slim.needs}) != before  # an input made again
    score = steps["score-slim"]  # two commands, each naming the interpreter: another venv's is the same step
    here = bc._key(score, tmp_path, {"slim": "run-1"})
    other = "/elsewhere/.venv/bin/python"
    moved = bc.Step(score.name, score.folder, [other if a == bc.sys.executable else a for a in score.argv],
                    score.output, score.needs)
    assert moved.argv.count(other) == 2
    monkeypatch.setattr(bc.sys, "executable", other)  # the bench run again from that venv
    assert bc._key(moved, tmp_path, {"slim": "run-1"}) == here
    monkeypatch.undo()
    base = (bc.ROOT / "configs/demo/slim.yaml").read_text()
    root = tmp_path / "checkout"  # the same configs, one value edited in the base YAML the demo's inherits
    (root / "configs/demo").mkdir(parents=True)
    for rel in ("configs/slim.yaml", "configs/demo/slim.yaml"):
        (root / rel).write_text((bc.ROOT / rel).read_text())
    monkeypatch.setattr(bc, "ROOT", root)
    assert bc._key(slim, tmp_path, made) == before  # paths differ, contents do not
    (root / "configs/slim.yaml").write_text((bc.ROOT / "configs/slim.yaml").read_text().replace(
        "stem_kernel: 4", "stem_kernel: 5"))
    assert "base: ../slim.yaml" in base and bc._key(slim, tmp_path, made) != before


def test_a_step_whose_resume_fails_too_keeps_the_state_it_failed_from(tmp_path):
    """A training step that stopped (say on a NaN loss) is resumed on the next bench run; when that fails
    as well it is started afresh, and its folder (last.pt: the reproducer) is kept as <step>.failed."""
    import bench.bench_chain as bc

    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"the state it failed from")
    (folder / bc.STARTED).write_text(json.dumps({"key": "k1"}))
    step = bc.Step("student", folder, [sys.executable, "-c", "import sys; sys.exit(1)"], folder / "student.pt",
                   resume=folder / "last.pt")
    with pytest.raises(bc.StepFailed):
        bc.run_step(step, "k1", env=None, log=tmp_path / "logs" / "student.log", force=False)
    assert (tmp_path / "student.failed" / "last.pt").read_bytes() == b"the state it failed from"
    assert not (folder / "last.pt").exists()  # the fresh attempt started from nothing
    log = (tmp_path / "logs" / "student.prev.log").read_text()
    assert "--resume" in log and "[exit code 1]" in log
