"""The whole chain on each phantom family: does the student keep its Dice on data it was not tuned on?

The demo recipe (configs/demo/*.yaml) was tuned on the `demo` phantom family. This benchmark runs
the same recipe, unchanged, on each family of `brats.phantom` (default: `demo` and `lgg-rich`, the
family with 45 % LGG, a third of the cases without ET, thin ET rims and small foci, lower contrast
and other anatomy), through the real command lines, as scripts/demo.sh chains them:

    python -m brats.phantom   DATA --family F --cases N --val-cases 0 --shape X Y Z
    train.py                  teacher (up to --teacher-epochs)      -> teacher/best.pt
    distill.py                student, distilled (the recipe)       -> student/student.pt
    python -m compress.slim   head at 1/4, patchifying stem, ...    -> slim/slim.pt
    python -m compress.lowrank                                      -> lowrank/lowrank.pt
    python -m compress.grow                                         -> grow/grown.pt
    quantize.py               INT8                                  -> int8/int8.pt
    distill.py --set distill.kd_weight=0 --set distill.kd_dice_weight=0     labels only
    distill.py --init scratch                                       student from random weights
    distill.py --set distill.kd_gate=correct                        KD only where the teacher is right
    distill.py --set distill.kd_region_weights=teacher              KD per region weighted by the teacher's Dice
    distill.py --set distill.kd_region_weights=adaptive             KD per region until the student beats the teacher
    predict.py ART --split DATA/.cache/splits.json, then python -m brats.evaluate --subset   per stage

One change to the demo recipe, the same for every family: the teacher trains up to --teacher-epochs
(default 40) with `train.patience=3` instead of the demo's fixed 15 epochs, which on the lgg-rich
family stop while its validation Dice is still rising (pooled Dice 0.643 at epoch 15, 0.658 at 25 on
one run). The bench measures what compression keeps of a teacher, so the teacher should be trained.

Every stage gets `--set data.val_fraction=V/N --set data.max_val_cases=null`, so the split file the
teacher draws (DATA/.cache/splits.json, read by every later stage) holds out exactly --val-cases
cases, and all of them are scored. Those held-out cases choose each stage's best checkpoint, as in
the demo; no case is ever trained on.

"labels only" zeroes both distillation terms of distill.py's loss (kd_weight, the logit KL, and
kd_dice_weight, the soft Dice against the teacher's probabilities): kd_weight=0 alone would still
distil through the second. It keeps the pruned initialisation from the teacher; "scratch" keeps
the distillation loss and starts from random weights.

Prints, per family and stage, the Dice per region (WT, TC, ET, mean over the three) with a 95 %
bootstrap interval (cases resampled with replacement, --resamples times, seeded), the gap to the
teacher (teacher minus stage, as distill.py reports it; paired bootstrap: the same resampled cases
for both), the number of held-out cases whose truth has ET but whose prediction has none ("ET
missed"), and whose prediction has ET where the truth has none ("ET false"). Then the distilled
student minus each other student arm, paired. Tables go to <out>/bench_chain.md, every number
(per case too) and each step's command and seconds to <out>/bench_chain.json.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_chain.py [--out runs/bench_chain]
        [--families demo lgg-rich] [--cases 24] [--val-cases 8] [--shape 96 96 64] [--seed 0]
        [--slim-epochs 40] [--student-epochs N] [--arms [labels scratch gated weighted adaptive]]
        [--set KEY=VALUE ...] [--threads 2] [--resamples 2000] [--quick] [--force]

Each step writes a stamp (bench_step.json: its command and the stamps of its inputs) when it
succeeds, and is skipped while the stamp matches and its artifact still loads (one damaged, or in a
format this code refuses, is made again); a step killed half-way is resumed (--resume)
where its command can, else rerun (a step whose resume fails too is kept as <step>.failed, its
last.pt the state it failed from); a changed setting reruns that step and everything after it.
--force reruns everything. A failed step is reported with the end of its log
(<out>/<family>/logs/<step>.log); the steps that need it are skipped, the others still run, and
the exit code is 1.

--quick: 8 cases (4 held out) at 64x64x48, one epoch of 4 crops per stage, 2 calibration crops:
a smoke test of the plumbing; its Dice figures mean nothing. Measured once on this project's 2-core
VM while other jobs shared it (load average 4-6), 2 threads, OMP_WAIT_POLICY=PASSIVE, from scratch:
    time .venv/bin/python bench/bench_chain.py --quick --out runs/bench_chain_quick     4 min 37 s
The default run (2 families, 24 cases, 8 held out, 96x96x64) was not measured; the plan line's
estimate for it is about 32 min (from the optimizer steps of each command and the step times of
the --quick run).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from brats.evaluate import find_predictions, find_truth  # noqa: E402
from brats.nifti import load_label  # noqa: E402
from brats.phantom import FAMILIES  # noqa: E402
from common.artifact import Artifact, ArtifactError  # noqa: E402
from common.machine import usable_cpus  # noqa: E402

REGIONS = ("wt", "tc", "et", "mean")
STAMP = "bench_step.json"
STARTED = "bench_started.json"
# stage -> (label in the tables, artifact inside the stage folder)
STAGES = {
    "teacher": ("teacher", "best.pt"),
    "student": ("student (distilled)", "student.pt"),
    "slim": ("slim", "slim.pt"),
    "lowrank": ("low-rank", "lowrank.pt"),
    "grow": ("grown", "grown.pt"),
    "int8": ("INT8", "int8.pt"),
    "student-labels": ("student, labels only", "student.pt"),
    "student-scratch": ("student, from scratch", "student.pt"),
    "student-gated": ("student, KD where the teacher is right", "student.pt"),
    "student-weighted": ("student, KD weighted by the teacher's Dice", "student.pt"),
    "student-adaptive": ("student, KD until it beats the teacher", "student.pt"),
}
ARMS = ("student-labels", "student-scratch", "student-gated", "student-weighted", "student-adaptive")
ARM_NAMES = tuple(a.removeprefix("student-") for a in ARMS)  # as --arms takes them
# For the plan line's estimate, on 2 unshared cores (from the --quick run's step times and the
# demo chain's 7.5 min): seconds per optimizer step (2 crops of 64^3, any stage), a training
# command's start-up and validations, a scoring step's start-up, and per held-out case scored.
EST_STEP, EST_STAGE, EST_SCORE, EST_CASE = 1.1, 12.0, 8.0, 0.5


@dataclass
class Step:
    name: str
    folder: Path  # the step's own folder: wiped before a fresh run
    argv: list[str]
    output: Path  # what the step produces (file or folder)
    needs: list[str] = field(default_factory=list)
    resume: Path | None = None  # checkpoint that makes `--resume` possible
    config: tuple[str, list[str]] | None = None  # (YAML, --set overrides) of a training command


def quick_overrides(stage: str) -> list[str]:
    sets = ["train.epochs=1", "data.samples_per_epoch=4", "train.val_every=1", "train.warmup_epochs=0",
            "data.crop=[64,64,64]"]
    if stage == "grow":
        sets.append("grow.window=2")
    if stage == "int8":
        sets += ["quant.calib=2", "quant.bench_runs=1"]
    return sets


def window_for(shape: list[int]) -> list[int]:
    """Sliding window covering a whole case: each size rounded up to a multiple of 32."""
    return [int(math.ceil(s / 32) * 32) for s in shape]


def family_steps(family: str, args: argparse.Namespace) -> list[Step]:
    """The family's steps in run order: data, then each model followed by its scoring."""
    fam = Path(args.out) / family
    data = fam / "data"
    py = sys.executable
    window = window_for(args.shape)
    # the teacher draws the split with these; later stages read its file and hold out the same cases
    base = [f"data.val_fraction={args.val_cases / args.cases!r}", "data.max_val_cases=null",
            f"train.window=[{','.join(map(str, window))}]"]

    def stage(name: str, needs: str, command: list[str], config: str, extra: tuple[str, ...] = (),
              resume: str | None = "last.pt") -> Step:
        after_teacher = [] if name == "teacher" else list(args.set)  # an arm's own settings come last: they win
        overrides = base + (quick_overrides(name) if args.quick else []) + after_teacher + list(extra)
        folder = fam / name
        argv = [py, *command, "--config", config, "--data", str(data),
                *(a for o in overrides for a in ("--set", o)), "--out", str(folder)]
        return Step(name, folder, argv, folder / STAGES[name][1], [needs], folder / resume if resume else None,
                    (config, overrides))

    def art(name: str) -> str:
        return str(fam / name / STAGES[name][1])

    distill = ["distill.py", "--teacher", art("teacher"), "--width", "0.25"]
    student_budget = () if args.student_epochs is None else (f"train.epochs={args.student_epochs}",)
    steps = [
        Step("data", data, [py, "-m", "brats.phantom", str(data), "--family", family, "--cases", str(args.cases),
                            "--val-cases", "0", "--shape", *map(str, args.shape), "--seed", str(args.seed)],
             data / "Brats17TrainingData"),
        stage("teacher", "data", ["train.py"], "configs/demo/teacher.yaml",
              extra=() if args.quick else (f"train.epochs={args.teacher_epochs}", "train.patience=3")),
        stage("student", "teacher", distill, "configs/demo/distill.yaml", extra=student_budget),
        stage("slim", "student", ["-m", "compress.slim", art("student")], "configs/demo/slim.yaml",
              extra=() if args.quick else (f"train.epochs={args.slim_epochs}", "train.patience=3")),
        stage("lowrank", "slim", ["-m", "compress.lowrank", art("slim")], "configs/demo/lowrank.yaml",
              resume=None),
        stage("grow", "lowrank", ["-m", "compress.grow", art("lowrank")], "configs/demo/grow.yaml"),
        stage("int8", "grow", ["quantize.py", art("grow")], "configs/demo/quantize.yaml", resume="qat/last.pt"),
        stage("student-labels", "teacher", distill, "configs/demo/distill.yaml",
              extra=student_budget + ("distill.kd_weight=0", "distill.kd_dice_weight=0")),
        stage("student-scratch", "teacher", distill + ["--init", "scratch"], "configs/demo/distill.yaml",
              extra=student_budget),
        stage("student-gated", "teacher", distill, "configs/demo/distill.yaml",
              extra=student_budget + ("distill.kd_gate=correct",)),
        stage("student-weighted", "teacher", distill, "configs/demo/distill.yaml",
              extra=student_budget + ("distill.kd_region_weights=teacher",)),
        stage("student-adaptive", "teacher", distill, "configs/demo/distill.yaml",
              extra=student_budget + ("distill.kd_region_weights=adaptive",)),
    ]
    steps = [s for s in steps if s.name not in ARMS or s.name in args.arms]
    ordered: list[Step] = []  # each model is scored right after it is made: a long run shows numbers early
    for step in steps:
        ordered.append(step)
        if step.name in STAGES:
            ordered.append(score_step(step.name, Path(art(step.name)), fam, data, window, args.threads))
    return ordered


def score_step(stage: str, artifact: Path, fam: Path, data: Path, window: list[int], threads: int) -> Step:
    """predict.py on the held-out split, then python -m brats.evaluate (two commands, one step)."""
    folder = fam / "scores" / stage
    predict = [sys.executable, "predict.py", str(artifact), "--input", str(data / "Brats17TrainingData"),
               "--split", str(data / ".cache" / "splits.json"), "--output", str(folder),
               "--window", *map(str, window), "--threads", str(threads), "--quiet"]
    evaluate = [sys.executable, "-m", "brats.evaluate", str(folder), str(data / "Brats17TrainingData"), "--subset",
                "--out", str(folder / "scores.csv")]
    return Step(f"score-{stage}", folder, predict + ["&&"] + evaluate, folder / "scores.csv", [stage])


def _key(step: Step, out: Path, made: dict[str, str]) -> str:
    """The step's command (paths relative to --out and the interpreter left out, so a moved work folder
    or another checkout's virtual environment reuses it; --set overrides are in it), the values of its
    YAML merged over its `base:` chain (an edited value makes the step stale; a changed default of a
    config section the YAML does not name does not), and the run ids of its inputs: an input made again
    makes this step stale even when its command is the same."""
    from common.config import read_yaml_chain

    argv = ["python" if a == sys.executable else a.replace(str(out) + os.sep, "") for a in step.argv[1:]]
    yaml_values = read_yaml_chain(ROOT / step.config[0]) if step.config is not None else None
    text = json.dumps({"argv": argv, "yaml": yaml_values, "needs": [made[n] for n in step.needs]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unreadable_artifact(output: Path) -> str | None:
    """Why a finished step's artifact (*.pt) no longer loads (damaged, or written in a format this code
    refuses), or None: the output is not an artifact, or it loads."""
    if output.suffix != ".pt":
        return None
    try:
        Artifact.load(output)
    except ArtifactError as e:
        return str(e)
    return None


def run_step(step: Step, key: str, env: dict, log: Path, force: bool) -> tuple[str, float, str]:
    """Run (or reuse) one step; returns (how: reused | ran | resumed, seconds, run id). Raises StepFailed."""
    stamp = _read_json(step.folder / STAMP)
    if not force and stamp and stamp.get("key") == key and stamp.get("made") and step.output.exists():
        broken = unreadable_artifact(step.output)
        if broken is None:
            return "reused", float(stamp.get("seconds", 0.0)), str(stamp["made"])
        print(f" its artifact does not load ({broken}): made again ...", end="", flush=True)
    started = _read_json(step.folder / STARTED)
    resume = (not force and step.resume is not None and step.resume.is_file() and started is not None
              and started.get("key") == key)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for attempt in ([True, False] if resume else [False]):
        if not attempt:
            if log.exists():  # a fresh run gets a fresh log; the last one is kept beside it
                log.replace(log.with_suffix(".prev.log"))
            if step.name == "data":
                tmp = step.folder.with_name(f".{step.folder.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
            if resume:  # its resume failed too: the state it failed from is kept beside it, to reproduce it
                failed = step.folder.with_name(f"{step.folder.name}.failed")
                shutil.rmtree(failed, ignore_errors=True)
                step.folder.replace(failed)
            shutil.rmtree(step.folder, ignore_errors=True)
        step.folder.parent.mkdir(parents=True, exist_ok=True)
        ok = _run(step, key, attempt, env, log)
        if ok and step.output.exists():
            seconds = time.time() - t0
            made = f"{time.time():.6f}"
            (step.folder / STAMP).write_text(json.dumps({"key": key, "made": made, "seconds": round(seconds, 1),
                                                         "argv": step.argv}, indent=1) + "\n")
            (step.folder / STARTED).unlink(missing_ok=True)
            return ("resumed" if attempt else "ran"), seconds, made
        if attempt:
            print(f"      resume failed (see {log}); starting the step afresh", flush=True)
    raise StepFailed(step.name, log)


def _run(step: Step, key: str, resume: bool, env: dict, log: Path) -> bool:
    """Run the step's command(s) ("&&" separates two), output appended to `log`."""
    commands, current = [], []
    for a in step.argv:
        if a == "&&":
            commands.append(current)
            current = []
        else:
            current.append(a)
    commands.append(current)
    target = step.folder
    if step.name == "data":  # written aside, renamed into place when complete
        target = step.folder.with_name(f".{step.folder.name}.tmp")
        commands = [[str(target) if a == str(step.folder) else a for a in c] for c in commands]
    else:
        target.mkdir(parents=True, exist_ok=True)
        (target / STARTED).write_text(json.dumps({"key": key}) + "\n")  # a killed run may --resume
    with open(log, "a") as fh:
        for cmd in commands:
            if resume:
                cmd = cmd + ["--resume"]
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            try:
                code = proc.wait()
            except BaseException:  # interrupted or terminated: the step goes with the benchmark
                proc.terminate()
                proc.wait()
                raise
            if code != 0:
                fh.write(f"[exit code {code}]\n")
                return False
    if step.name == "data":
        target.rename(step.folder)
    return True


class StepFailed(RuntimeError):
    def __init__(self, step: str, log: Path):
        super().__init__(step)
        self.step, self.log = step, log


def tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log, progress bars reduced to their final state."""
    try:
        text = path.read_text(errors="replace").split("\n")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text]
    return "\n".join([line for line in shown if line.strip()][-lines:])


# ---- scores ---------------------------------------------------------------------------------------

def read_scores(folder: Path, data: Path) -> dict:
    """Per-case Dice of one stage (from brats.evaluate's CSV) and ET voxel counts of prediction and truth."""
    with open(folder / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    truths, preds = find_truth(data / "Brats17TrainingData"), find_predictions(folder)
    out = {"cases": [], "dice": [], "truth_et": [], "pred_et": []}
    for row in sorted(rows, key=lambda r: r["case"]):
        case = row["case"]
        out["cases"].append(case)
        out["dice"].append([float(row[f"dice_{r}"]) for r in REGIONS])
        out["truth_et"].append(int((load_label(truths[case], case).label == 4).sum()))
        out["pred_et"].append(int((load_label(preds[case], case).label == 4).sum()))
    return out


def bootstrap(values: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean of `values` (n,) over resampled case indices `idx` (B, n)."""
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(lo), float(hi)


def summarise(scores: dict[str, dict], resamples: int, seed: int) -> dict:
    """Dice and gap-to-teacher intervals per stage and region; paired differences of the student arms."""
    cases = next(iter(scores.values()))["cases"]
    for stage, s in scores.items():
        if s["cases"] != cases:
            raise SystemExit(f"stage {stage} scored other cases than {next(iter(scores))}: {s['cases']} vs {cases}")
    n = len(cases)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    dice = {stage: np.asarray(s["dice"], dtype=np.float64) for stage, s in scores.items()}  # (n, 4)
    out: dict = {"cases": cases, "resamples": resamples, "seed": seed, "stages": {}, "arms": {}}
    for stage, d in dice.items():
        s = scores[stage]
        truth_et, pred_et = np.asarray(s["truth_et"]) > 0, np.asarray(s["pred_et"]) > 0
        row = {"dice": {r: bootstrap(d[:, i], idx) for i, r in enumerate(REGIONS)},
               "et_missed": int((truth_et & ~pred_et).sum()), "et_false": int((~truth_et & pred_et).sum()),
               "per_case": {c: dict(zip(REGIONS, v)) for c, v in zip(cases, d.tolist())},
               "pred_et_voxels": dict(zip(cases, s["pred_et"]))}
        if "teacher" in dice:
            row["gap"] = {r: bootstrap(dice["teacher"][:, i] - d[:, i], idx) for i, r in enumerate(REGIONS)}
        out["stages"][stage] = row
    out["truth_et_voxels"] = dict(zip(cases, next(iter(scores.values()))["truth_et"]))
    for arm in ARMS:
        if "student" in dice and arm in dice:
            out["arms"][arm] = {r: bootstrap(dice["student"][:, i] - dice[arm][:, i], idx)
                                for i, r in enumerate(REGIONS)}
    return out


def _ci(v: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"


def family_table(family: str, summary: dict, args: argparse.Namespace, failed: list[str]) -> str:
    n = len(summary["cases"])
    with_et = sum(v > 0 for v in summary["truth_et_voxels"].values())
    lines = [f"### {family}: {args.cases} cases, {n} held out ({with_et} with ET, {n - with_et} without), "
             f"{'x'.join(map(str, args.shape))}{', --quick' if args.quick else ''}", "",
             f"Dice, mean over the held-out cases [95 % bootstrap interval, {summary['resamples']} resamples of "
             f"the cases, seed {summary['seed']}]; gap = teacher minus stage (paired); ET missed: truth has ET, "
             "prediction none; ET false: prediction has ET, truth none.", "",
             "| stage | Dice WT | Dice TC | Dice ET | Dice mean | gap WT | gap TC | gap ET | gap mean "
             "| ET missed | ET false |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, (label, _) in STAGES.items():
        if stage in ARMS and stage not in args.arms:
            continue
        row = summary["stages"].get(stage)
        if row is None:
            lines.append(f"| {label} | " + " | ".join(["failed" if stage in failed else "n/a"] * 10) + " |")
            continue
        gaps = [("-" if stage == "teacher" else _ci(row["gap"][r], signed=True)) if "gap" in row else "n/a"
                for r in REGIONS]
        lines.append(f"| {label} | " + " | ".join(_ci(row["dice"][r]) for r in REGIONS) + " | "
                     + " | ".join(gaps) + f" | {row['et_missed']}/{with_et} | {row['et_false']}/{n - with_et} |")
    if summary["arms"]:
        lines += ["", "Distilled student minus the other student arms (paired, 95 % bootstrap interval):", "",
                  "| comparison | WT | TC | ET | mean |", "|---|---|---|---|---|"]
        for arm, diff in summary["arms"].items():
            lines.append(f"| distilled - {STAGES[arm][0].split(', ')[1]} | "
                         + " | ".join(_ci(diff[r], signed=True) for r in REGIONS) + " |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------

def estimate_seconds(plan: dict[str, list[Step]], args: argparse.Namespace) -> float:
    """Rough wall time from scratch, from each training command's optimizer steps (its config with the
    bench's overrides: loading them also rejects an unknown key before anything runs)."""
    from common.config import load_config

    seconds = 0.0
    for steps in plan.values():
        for step in steps:
            if step.config is None:
                seconds += EST_SCORE + EST_CASE * args.val_cases if step.name.startswith("score-") else 5.0
                continue
            cfg = load_config(ROOT / step.config[0], step.config[1])  # the steps run in ROOT, whatever the cwd
            per_epoch = cfg.data.samples_per_epoch or (args.cases - args.val_cases)
            seconds += EST_STAGE + EST_STEP * cfg.train.epochs * math.ceil(per_epoch / cfg.train.batch_size)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: this checkout's runs/bench_chain)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--cases", type=int, default=None, help="labelled cases per family (default 24; --quick 8)")
    p.add_argument("--val-cases", type=int, default=None, help="of them held out and scored (default 8; --quick 4)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="phantom volume (default 96 96 64; --quick 64 64 48)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--teacher-epochs", type=int, default=40,
                   help="the teacher's maximum epochs, with train.patience=3 (default 40; the demo recipe's is 15)")
    p.add_argument("--slim-epochs", type=int, default=40,
                   help="compress.slim's maximum epochs, with train.patience=3 (default 40, as configs/slim.yaml; the "
                        "demo recipe's is 20: on the 40-epoch students 40 epochs kept more Dice on the demo family, "
                        "0.933 -> 0.940, and on lgg-rich WT 0.796 -> 0.818, TC 0.600 -> 0.690, but ET 0.341 -> 0.217; "
                        "not used with --quick, whose one epoch wins)")
    p.add_argument("--student-epochs", type=int, default=None, metavar="N",
                   help="the student's and its arms' maximum epochs (default: the recipe's, configs/demo/distill.yaml; "
                        "its early stopping stays; given with --quick, it wins over --quick's one epoch)")
    p.add_argument("--arms", nargs="*", default=list(ARM_NAMES), choices=ARM_NAMES,
                   help="the student arms to run besides the distilled one (default: all; --arms with no value: "
                        "just the chain)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every stage after the teacher (student, slim, low-rank, growth, INT8 "
                        "and the arms, whose own settings win), e.g. distill.kd_region_weights=adaptive; repeatable")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every step (default: CPUs usable)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the plumbing")
    p.add_argument("--force", action="store_true", help="rerun every step, even where its stamp matches")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill PID: end the running step too
    args.cases = args.cases if args.cases is not None else (8 if args.quick else 24)
    args.val_cases = args.val_cases if args.val_cases is not None else (4 if args.quick else 8)
    args.shape = args.shape or ([64, 64, 48] if args.quick else [96, 96, 64])
    args.threads = args.threads or usable_cpus()
    args.arms = [f"student-{a}" for a in dict.fromkeys(args.arms)]
    if args.student_epochs is not None and args.student_epochs < 1:
        p.error("--student-epochs must be >= 1")
    if args.slim_epochs < 1:
        p.error("--slim-epochs must be >= 1")
    if not 1 <= args.val_cases < args.cases:
        p.error("need 1 <= --val-cases < --cases")
    if min(args.shape) < 32:
        p.error("every --shape size must be >= 32")
    if args.val_cases < 8 and not args.quick:
        print(f"note: {args.val_cases} held-out case(s); intervals on fewer than 8 cases say little", flush=True)
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / "bench_chain"  # a given one: from the cwd
    args.out = str(out)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    families = list(dict.fromkeys(args.families))
    plan = {f: family_steps(f, args) for f in families}
    try:
        est = estimate_seconds(plan, args)
    except ValueError as e:  # ConfigError: a --set key the configs no longer have
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"bench_chain: families {', '.join(families)}; {args.cases} cases per family ({args.val_cases} held out), "
          f"{'x'.join(map(str, args.shape))}, phantom seed {args.seed}{'; --quick' if args.quick else ''}; "
          f"{sum(len(s) for s in plan.values())} steps into {out}; {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; expected about {est / 60:.0f} min from scratch "
          "(rough; finished steps are reused)", flush=True)

    t_start = time.time()
    results: dict = {"settings": {k: getattr(args, k) for k in ("families", "cases", "val_cases", "shape", "seed",
                                                                "teacher_epochs", "slim_epochs", "student_epochs",
                                                                "arms", "threads", "resamples", "quick")},
                     "families": {}}
    tables = []
    any_failed = False
    for family, steps in plan.items():
        keys: dict[str, str] = {}
        made: dict[str, str] = {}  # step -> run id of what it made
        failed: list[str] = []
        timings: dict[str, dict] = {}
        fam = out / family
        for i, step in enumerate(steps, 1):
            prefix = f"[{time.time() - t_start:6.0f}s] {family} {i:2}/{len(steps)} {step.name:<22}"
            blocked = [n for n in step.needs if n in failed or n not in made]
            if blocked:
                failed.append(step.name)
                print(f"{prefix} skipped: needs {', '.join(blocked)}", flush=True)
                continue
            keys[step.name] = _key(step, out, made)
            print(f"{prefix} ...", end="", flush=True)
            try:
                how, seconds, made[step.name] = run_step(step, keys[step.name], env, fam / "logs" / f"{step.name}.log",
                                                         args.force)
            except StepFailed as e:
                failed.append(step.name)
                print(f" FAILED; end of {e.log}:\n" + "\n".join(f"      {line}" for line in tail(e.log).splitlines()),
                      flush=True)
                continue
            timings[step.name] = {"how": how, "seconds": round(seconds, 1), "argv": step.argv}
            print(f" {how} ({seconds:.0f} s{' when made' if how == 'reused' else ''})", flush=True)
            if step.name == "teacher":
                check_split(out / family / "data", args.val_cases)
        any_failed |= bool(failed)
        data = fam / "data"
        scores = {stage: read_scores(fam / "scores" / stage, data) for stage in STAGES
                  if f"score-{stage}" in made}
        entry = {"failed": failed, "steps": timings}
        if scores:
            summary = summarise(scores, args.resamples, args.bootstrap_seed)
            entry["summary"] = summary
            tables.append(family_table(family, summary, args, failed))
        else:
            tables.append(f"### {family}\n\nno stage was scored (failed: {', '.join(failed)})")
        results["families"][family] = entry
    seconds = time.time() - t_start
    results["seconds"] = round(seconds, 1)
    text = (f"# bench_chain\n\n{' '.join(sys.argv)}\n\n" + "\n\n".join(tables)
            + f"\n\n{seconds:.0f} s wall, {args.threads} thread(s), OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}\n")
    (out / "bench_chain.md").write_text(text)
    (out / "bench_chain.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + "\n\n".join(tables))
    print(f"\nfinished in {seconds:.0f} s; tables: {out / 'bench_chain.md'}; raw numbers: {out / 'bench_chain.json'}")
    for family, entry in results["families"].items():
        if entry["failed"]:
            print(f"{family}: failed or skipped steps: {', '.join(entry['failed'])} (logs in {out / family / 'logs'})")
    return 1 if any_failed else 0


def check_split(data: Path, val_cases: int) -> None:
    """The teacher drew the split: it must hold out exactly `val_cases` cases."""
    split = _read_json(data / ".cache" / "splits.json") or {}
    held = len((split.get("folds") or [{}])[0].get("val", []))
    if held != val_cases:
        print(f"      warning: {data}/.cache/splits.json holds out {held} case(s), not {val_cases}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
