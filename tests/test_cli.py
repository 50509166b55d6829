"""The commands as a user types them, from a folder outside the project: checks before any work,
nothing overwritten, project defaults found from anywhere."""
import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact
from model.refineformer3d import RefineFormer3D, preset_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=8, fuse_dim=8,
            refine_dim=4)


def run(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    return folder


def tiny_artifact(path: Path, stage: str = "teacher", data: dict | None = None, **overrides) -> Path:
    """A seeded tiny RefineFormer3D artifact (untrained) whose stored config names `data`."""
    torch.manual_seed(0)
    model = RefineFormer3D(preset_spec("refineformer3d", **{**TINY, **overrides}))
    Artifact(stage=stage, spec=model.spec.to_dict(), state_dict=model.state_dict(),
             config={"data": {"scheme": "regions", **(data or {})}}, metrics={"dice_mean": 0.5}).save(path)
    return path


def test_project_config_is_found_from_any_folder(elsewhere):
    out = run(elsewhere, "distill.py", "--help")
    assert out.returncode == 0 and "the project's configs/distill.yaml" in " ".join(out.stdout.split())
    out = run(elsewhere, "distill.py", "--teacher", "missing.pt", "--out", "student")
    assert out.returncode == 2 and "missing.pt: no such artifact file" in out.stderr
    assert "config file not found" not in out.stderr and not (elsewhere / "student").exists()


def test_a_finished_run_is_not_overwritten_without_a_word(elsewhere):
    run_dir = elsewhere / "teacher"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes(b"a six-epoch teacher")
    out = run(elsewhere, "train.py", "--out", "teacher")  # no last.pt: nothing --resume could continue
    assert out.returncode == 2 and "--resume" not in out.stderr and "--overwrite" in out.stderr
    assert "teacher already holds a run (best.pt)" in out.stderr
    (run_dir / "last.pt").write_bytes(b"its training state")
    out = run(elsewhere, "train.py", "--out", "teacher")
    assert out.returncode == 2 and "continue it with --resume" in out.stderr and "--overwrite" in out.stderr
    assert "teacher already holds a run (best.pt, last.pt)" in out.stderr
    assert (run_dir / "best.pt").read_bytes() == b"a six-epoch teacher"


def test_checks_fail_before_any_work(elsewhere):
    teacher = tiny_artifact(elsewhere / "best.pt")
    out = run(elsewhere, "distill.py", "--teacher", str(teacher), "--width", "0", "--out", "student")
    assert out.returncode == 2 and "distill.width=0.0: must be in (0, 1]" in out.stderr
    assert not (elsewhere / "student").exists()  # no empty folder left behind
    for bad, why in (("distill.kd_gate=maybe", "distill.kd_gate must be one of all, correct, got 'maybe'"),
                     ("distill.kd_weight=-1", "distill.kd_weight must be >= 0")):
        out = run(elsewhere, "distill.py", "--teacher", str(teacher), "--out", "student", "--set", bad,
                  "--set", "train.epochs=0")  # checked even where no fine-tune would run
        assert out.returncode == 2 and why in out.stderr and "data:" not in out.stderr + out.stdout, bad
        assert not (elsewhere / "student").exists()
    (elsewhere / "afile").write_text("x")
    out = run(elsewhere, "distill.py", "--teacher", str(teacher), "--out", "afile/student")
    assert out.returncode == 2 and "afile is a file" in out.stderr
    out = run(elsewhere, "train.py", "--out", "t", "--set", "train.window=[100,100,100]",
              "--set", "model.overrides={embed_dims: [8, 16, 16, 16]}", "--data", str(elsewhere / "nodata"))
    assert out.returncode == 2 and "stage 2 attention dim 16 is not divisible by 5 heads" in out.stderr
    tiny = "model.overrides={" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    out = run(elsewhere, "train.py", "--out", "t", "--set", "train.window=[100,100,100]", "--set", tiny,
              "--data", str(elsewhere / "nodata"))
    assert out.returncode == 2 and "train.window=[100, 100, 100]" in out.stderr and not (elsewhere / "t").exists()
    out = run(elsewhere, "report.py", "--arch", "segformer3d", "--width", "0")
    assert out.returncode == 2 and "--width 0.0: must be in (0, 1]" in out.stderr
    int8 = Artifact(stage="int8", spec={"kind": "int8-torch"}, state_dict={}).save(elsewhere / "int8.pt")
    out = run(elsewhere, "distill.py", "--teacher", str(int8), "--out", "s2")
    assert out.returncode == 2 and "needs a fp32 artifact, got kind 'int8-torch'" in out.stderr
    # output folders that are files, and batch sizes of 0: refused on the command line, before torch loads
    for script, args, why in (("predict.py", ("--input", "x", "--output", "afile"), "afile is a file"),
                              ("predict.py", ("--input", "x", "--output", "p", "--overlay", "afile"),
                               "afile is a file"),
                              ("predict.py", ("--input", "x", "--output", "p", "--sw-batch", "0"), "--sw-batch"),
                              ("report.py", ("--out", "afile"), "afile is a file")):
        out = run(elsewhere, script, str(teacher), *args)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, (script, args)
    assert not (elsewhere / "p").exists()
    out = run(elsewhere, "distill.py", "--teacher", str(teacher), "--out", ".", "--overwrite")  # the teacher's folder
    assert out.returncode == 2 and "the folder of the source artifact" in out.stderr and teacher.exists()
    for args, why in ((("--set", "quant.decide=bogus"), "quant.decide must be one of measure, all, none, table, "
                                                         "got 'bogus'"),
                      (("--set", "quant.force={decoder.nothere: fp32}"), "layers this model does not have: "
                                                                         "['decoder.nothere']"),
                      (("--set", "train.epochs=-2"), "train.epochs=-2: the epochs to train (a maximum with train.patience), >= 0")):
        out = run(elsewhere, "quantize.py", str(teacher), "--out", "q", *args)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, args
        assert not (elsewhere / "q").exists()
    out = run(elsewhere, "train.py", "--out", "t", "--resume", "--overwrite")
    assert out.returncode == 2 and "give one of them" in out.stderr


def test_predict_refuses_to_replace_label_maps(elsewhere):
    write_phantom_dataset(elsewhere / "data", cases=1, val_cases=0, shape=(32, 32, 32), seed=0)
    art = tiny_artifact(elsewhere / "best.pt")
    case = next((elsewhere / "data").rglob("*_flair.nii.gz")).parent.name
    preds = elsewhere / "preds"
    preds.mkdir()
    (preds / f"{case}.nii.gz").write_bytes(b"someone else's segmentation")
    args = ("predict.py", str(art), "--input", "data", "--output", "preds", "--window", "32", "32", "32", "--quiet")
    out = run(elsewhere, *args)
    assert out.returncode == 2 and "--overwrite" in out.stderr and f"{case}.nii.gz" in out.stderr
    assert (preds / f"{case}.nii.gz").read_bytes() == b"someone else's segmentation"
    out = run(elsewhere, *args, "--overwrite")
    assert out.returncode == 0 and (preds / f"{case}.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # a gzip NIfTI now


def test_without_data_a_stage_uses_the_data_its_source_was_trained_on(elsewhere):
    data = elsewhere / "brats"
    write_phantom_dataset(data, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    tiny_artifact(elsewhere / "best.pt", data={"dir": str(data), "val_fraction": 0.5})
    small = ["data.crop=[32,32,32]", "train.window=[32,32,32]", "train.sw_batch=1", "train.threads=1",
             "train.amp=off", "train.epochs=0", "distill.width=0.5"]
    out = run(elsewhere, "distill.py", "--teacher", "best.pt", "--out", "student", *[a for s in small for a in ("--set", s)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"student: data: {data}, fold 0, from the source artifact best.pt (lineage)" in out.stdout + out.stderr
    student = Artifact.load(elsewhere / "student" / "student.pt")
    assert student.config["data"]["dir"] == str(data) and student.config["data"]["val_fraction"] == 0.5
    assert student.extra["et_rule"]["cases"] == 2  # scored on the teacher's split: half of the 4 cases held out


def test_only_naming_data_switches_a_commands_data():
    from argparse import Namespace

    from common.cli import data_given

    assert not data_given(Namespace(data=None, overrides=["report.max_cases=2"], config="report.yaml"))
    assert data_given(Namespace(data="brats", overrides=[]))
    assert data_given(Namespace(data=None, overrides=["data.dir=/x"]))
    assert not data_given(Namespace(data=None, overrides=["data.crop=[64,64,64]"]))  # how, not which
    assert not data_given(Namespace(data=None, overrides=["data.cache=/elsewhere"]))  # where the cache goes, not which


def test_module_commands_run_from_any_folder(elsewhere):
    """`make setup` installs the project editable, so `python -m ...` needs no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "brats.phantom", "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: python -m brats.phantom" in out.stdout


def test_quantize_prints_a_summary_and_keeps_the_layer_table_in_the_artifact(elsewhere):
    data = elsewhere / "brats"
    write_phantom_dataset(data, cases=2, val_cases=0, shape=(40, 40, 32), seed=0)
    tiny_artifact(elsewhere / "student.pt", stage="student", data={"dir": str(data), "val_fraction": 0.5})
    small = ["data.crop=[32,32,32]", "train.window=[32,32,32]", "train.sw_batch=1", "train.threads=1", "train.amp=off",
             "train.epochs=0", "quant.decide=all", "quant.calib=1", "quant.input=[32,32,32]"]
    args = ("quantize.py", "student.pt", "--out", "int8", *[a for s in small for a in ("--set", s)])
    out = run(elsewhere, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    art = Artifact.load(elsewhere / "int8" / "int8.pt")
    rows = art.extra["int8"]["decisions"]
    n_int8 = len(art.extra["int8"]["int8_layers"])
    assert len(rows) > n_int8 > 0 and {"layer", "fp32_ms", "int8_ms", "choice", "why"} <= set(rows[0])
    assert f"int8: {n_int8} of {len(rows)} layers INT8, {len(rows) - n_int8} FP32 (torch backend" in out.stdout
    dice, fp32 = art.metrics["dice_mean"], art.metrics["fp32_dice_mean"]
    assert f"int8: dice_mean {dice:.4f} INT8 vs {fp32:.4f} FP32, on the same 1 validation case(s)" in out.stdout
    assert f"int8: wrote {(elsewhere / 'int8' / 'int8.pt').resolve()}, " in out.stdout and "MB (FP32 source " in out.stdout
    assert "fp32 ms" not in out.stdout + out.stderr  # the table's header
    assert not any(r["layer"] in out.stdout + out.stderr for r in rows)
    out = run(elsewhere, *args, "--overwrite", "--verbose")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fp32 ms" in out.stdout and all(r["layer"] in out.stdout for r in rows)


def console_scripts() -> dict[str, str]:
    """name -> "module:function" from pyproject.toml's [project.scripts]."""
    return pyproject()["project"]["scripts"]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_command_has_a_console_script_that_resolves(tmp_path):
    scripts = console_scripts()
    setuptools = pyproject()["tool"]["setuptools"]
    installed = set(setuptools["packages"]) | set(setuptools["py-modules"])
    commands = {str(p.relative_to(ROOT).with_suffix("")).replace(os.sep, ".") for p in ROOT.rglob("*.py")
                if p.relative_to(ROOT).parts[0] not in ("bench", "scripts", "tests")
                and not p.relative_to(ROOT).parts[0].startswith(".")  # .venv and other hidden, untracked folders
                and 'if __name__ == "__main__":' in p.read_text()}
    targets = {}
    for name, target in scripts.items():
        assert name.startswith("rf3d-"), name
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        assert module in installed or module.rpartition(".")[0] in installed, f"{module} is not installed"
        targets[module] = name
    assert set(targets) == commands and len(commands) == 12  # one script per command, none left out
    # each as its console script calls it (sys.exit(function())), with --help, from a folder outside the project
    probe = """import contextlib, importlib, io, sys
for name, target in [arg.split("=") for arg in sys.argv[1:]]:
    module, function = target.split(":")
    sys.argv, out = [name, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = getattr(importlib.import_module(module), function)()
        except SystemExit as e:
            code = e.code
    assert code in (0, None) and out.getvalue().startswith("usage: "), (name, code, out.getvalue()[:200])
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe, *(f"{k}={v}" for k, v in scripts.items())], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


class _Parsed(Exception):
    """Raised instead of parsing, carrying the parser a command built."""


def command_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """console script name -> the argument parser its function builds (stopped before it parses)."""
    def stop(parser, args=None, namespace=None):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    parsers = {}
    for name, target in console_scripts().items():
        module, _, function = target.partition(":")
        monkeypatch.setattr(sys, "argv", [name])
        with pytest.raises(_Parsed) as parsed:
            getattr(importlib.import_module(module), function)()
        parsers[name] = parsed.value.args[0]
    return parsers


def test_every_option_says_what_it_does_and_its_default(monkeypatch):
    checked = 0
    for name, parser in command_parsers(monkeypatch).items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help.split()) >= 3, f"{what}: no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS):  # a value the user should know about
                assert "default" in action.help, f"{what}: help does not say the default ({default!r})"
            checked += 1
    assert checked > 80
    parsers = command_parsers(monkeypatch)
    out = {a.dest: a.help for a in parsers["rf3d-report"]._actions}["out"]
    assert out.startswith("report folder") and "default: the project's report/" in out
    out = {a.dest: a for a in parsers["rf3d-distill"]._actions}["out"]
    assert "(default: the project's runs/student)" in out.help and out.default.endswith(os.path.join("runs", "student"))


def test_an_output_folder_that_cannot_be_made_is_named_before_work(tmp_path, monkeypatch):
    """Permission bits said yes where mkdir says no (/proc, read-only mounts): a bare '[Errno 2]' came later."""
    import tempfile

    from common.cli import writable_folder
    from common.errors import UserInputError

    writable_folder(tmp_path / "new" / "run")  # fine, and nothing is left behind
    assert list(tmp_path.iterdir()) == []

    def refuse(**kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(UserInputError, match=f"{tmp_path}/run: cannot create the output folder in {tmp_path}: "
                                             "Read-only file system"):
        writable_folder(tmp_path / "run")
