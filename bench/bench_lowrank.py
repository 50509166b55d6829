"""Low-rank factorisation of the distilled width-0.25 student: parameters and Dice, before and after.

One run at demo scale (configs/demo/lowrank.yaml, synthetic cases): the student as it is, the
factorised student before its fine-tune, and after it, all scored on the same cases.
The claim under test: 30-40 % fewer parameters at almost no Dice cost. With --control the
unfactorised student gets the same fine-tune too, so that extra training is not mistaken for
recovery (it matters: the demo student is far from converged).

Two case sets are scored. "val" is the demo's held-out split (2 cases: the engine picks best.pt
on them, but one of them has no enhancing tumour, so dice_et there is 1 or 0 and swings
dice_mean by 0.33). "eval" is --eval-cases fresh synthetic cases (another seed, never trained
or validated on): the figures to trust.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_lowrank.py [--student runs/demo/student/student.pt]
        [--energy 0.9 | --ratio 0.5 | --params 210k | --params auto] [--epochs 4] [--control] [--eval-cases 16]

Without a student artifact at --student, a demo teacher (configs/demo/teacher.yaml, unless one is
at runs/demo/teacher/best.pt) and a demo student (configs/demo/distill.yaml) are trained first,
which takes a while on CPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.artifact import Artifact, build_model  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from compress.lowrank import factorise_, lowrank_stage  # noqa: E402
from brats.scoring import evaluate  # noqa: E402
from engine.loop import fit  # noqa: E402
from engine.runner import find_teacher, load_teacher  # noqa: E402
from student.distill import distill_setup  # noqa: E402
from engine.runtime import resolve_device  # noqa: E402
from engine.data import make_data  # noqa: E402
from engine.runtime import seed_everything  # noqa: E402
from model.refineformer3d import count_params  # noqa: E402

DEMO_TEACHER = Path("runs/demo/teacher/best.pt")
KEYS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


def demo_student(path: Path) -> Path:
    """Train what the benchmark needs at demo settings: a teacher (if absent), then the student."""
    from student.distill import distill_student
    from teacher.train import train_teacher

    if not DEMO_TEACHER.is_file():
        print(f"no teacher at {DEMO_TEACHER}: training a demo teacher (configs/demo/teacher.yaml)")
        t0 = time.time()
        train_teacher(load_config("configs/demo/teacher.yaml"), DEMO_TEACHER.parent)
        print(f"  teacher trained in {time.time() - t0:.0f} s")
    print(f"no student at {path}: distilling a width-0.25 demo student (configs/demo/distill.yaml)")
    t0 = time.time()
    art = distill_student(load_config("configs/demo/distill.yaml", [f"distill.teacher={DEMO_TEACHER}"]), path.parent)
    print(f"  student distilled in {time.time() - t0:.0f} s")
    return art.path


def eval_set(cfg: Config, folder: Path, cases: int, seed: int) -> SimpleNamespace:
    """`cases` fresh labelled synthetic cases (phantom seed `seed`), all of them to score on."""
    from brats.prepare import prepare
    from brats.synthetic import ensure_synthetic

    if seed == cfg.data.synthetic_seed and cfg.data.dir is None:
        raise SystemExit(f"--eval-seed {seed} is the training data's seed: pick another")
    root = ensure_synthetic(folder, cases, 0, tuple(cfg.data.synthetic_shape), seed)
    cache = prepare(root, root / ".cache", progress=False)
    # evaluate() reads .cache and .val_ids only
    return SimpleNamespace(cache=cache, val_ids=[case for case, _ in cache.grades()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/demo/student/student.pt")
    p.add_argument("--teacher", default=None, help="default: the teacher in the student's lineage")
    p.add_argument("--config", default="configs/demo/lowrank.yaml")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=float)
    rule.add_argument("--ratio", type=float)
    rule.add_argument("--params", help="a count (210k), a share (65%%) or auto (the config's default)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--control", action="store_true", help="also fine-tune the unfactorised student the same way")
    p.add_argument("--eval-cases", type=int, default=16, help="fresh synthetic cases to score on (0: val only)")
    p.add_argument("--eval-seed", type=int, default=1, help="phantom seed of the eval cases (not the training seed)")
    p.add_argument("--out", default="runs/bench/lowrank")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    student_path = Path(args.student)
    if not student_path.is_file():
        student_path = demo_student(student_path)
    overrides = list(args.overrides)
    for key in ("energy", "ratio", "params"):
        if getattr(args, key) is not None:
            overrides += [f"lowrank.{k}={getattr(args, key) if k == key else 'null'}" for k in ("energy", "ratio", "params")]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.teacher:
        overrides.append(f"lowrank.teacher={args.teacher}")
    cfg = load_config(args.config, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(args.out)

    student_art = Artifact.load(student_path)
    device = resolve_device(cfg.train.device)
    student = build_model(student_art).to(device)
    data = make_data(cfg)
    sets = {"val": data}
    if args.eval_cases > 0:
        sets["eval"] = eval_set(cfg, out / "eval_data", args.eval_cases, args.eval_seed)
    models: dict[str, torch.nn.Module] = {"student": student}
    control_seconds = None
    if args.control and cfg.train.epochs > 0:
        seed_everything(cfg.train.seed)
        teacher = load_teacher(find_teacher(student_art, cfg.lowrank.teacher))
        t0 = time.time()
        result = fit(*distill_setup(build_model(student_art), teacher, cfg, perturb=cfg.distill.perturb_input), cfg,
                     out / "control", stage_name="control", lineage=student_art.child_lineage(), data=data)
        control_seconds = time.time() - t0
        models["control"] = build_model(Artifact.load(result.best_path)).to(device)
    t0 = time.time()
    art = lowrank_stage(student_path, cfg, out)
    seconds = time.time() - t0
    m, info = art.metrics, art.extra["lowrank"]
    assert m["params_before"] == count_params(student)
    # The same deterministic surgery again, for the factorised model's scores on the eval set (a budget
    # chosen on validation, params auto, is redone at the count it chose; None: it left the model whole).
    if info["mode"] in ("energy", "ratio"):
        models["factorised"] = factorise_(build_model(student_art), cfg.lowrank)[0].to(device)
    elif info["params"] is None:
        models["factorised"] = build_model(student_art).to(device)
    else:
        rule = dataclasses.replace(cfg.lowrank, params=str(info["params"]))
        models["factorised"] = factorise_(build_model(student_art), rule)[0].to(device)
    models["fine-tuned"] = build_model(art).to(device)
    assert count_params(models["factorised"]) == count_params(models["fine-tuned"]) == m["params_after"]

    scores = {
        (name, where): evaluate(model, cases.cache, cases.val_ids, cfg, desc=f"{name} on {where}")
        for where, cases in sets.items() for name, model in models.items()
    }
    rule_text = ", ".join(f"{k}={info[k]}" for k in ("mode", "energy", "ratio", "params", "params_share") if k in info)
    print(f"\nlow-rank factorisation of {student_path} ({rule_text}; fine-tune {cfg.train.epochs} epochs x "
          f"{cfg.data.samples_per_epoch} crops, lr {cfg.train.lr:g}; {seconds:.0f} s incl. validation"
          + (f"; control {control_seconds:.0f} s" if control_seconds else "") + ")")
    done = sum(r["factorised"] for r in info["table"])
    print(f"  parameters     {m['params_before']:>10,} -> {m['params_after']:,} "
          f"({100 * (1 - m['params_after'] / m['params_before']):.1f}% fewer; {done}/{len(info['table'])} layers factorised)")
    names = [n for n in ("student", "factorised", "fine-tuned", "control") if n in models]
    for where, cases in sets.items():
        print(f"  on {where} ({len(cases.val_ids)} cases)".ljust(22) + "".join(f"{n:>12}" for n in names))
        for key in KEYS:
            print(f"    {key:18}" + "".join(f"{scores[(n, where)][key]:>12.4f}" for n in names))
        ref = "control" if "control" in models else "student"
        print(f"    dice_mean fine-tuned minus {ref}: "
              f"{scores[('fine-tuned', where)]['dice_mean'] - scores[(ref, where)]['dice_mean']:+.4f}; "
              f"factorised minus student: "
              f"{scores[('factorised', where)]['dice_mean'] - scores[('student', where)]['dice_mean']:+.4f}")


if __name__ == "__main__":
    main()
