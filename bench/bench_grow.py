"""Progressive growth of the low-rank student: parameters, G multiply-adds and Dice, grown vs. fixed width.

One run at demo scale (configs/demo/grow.yaml, synthetic cases), all scored on the same validation
cases: the low-rank student as it is; after a distillation fine-tune that grows it (compress.grow,
cost-aware: units ranked by gradient score per multiply-add, within grow.macs_budget); optionally
(--params-arm) after the same growth ranked by gradient score alone with no MACs budget; and after
a plain distillation fit at fixed width for as many epochs as the grown arm trained (same data,
same seed). The claim under test: growth buys Dice where the gradients ask for width, for a modest
increase in parameters and, with cost "macs", in multiply-adds at grow.reference_input.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_grow.py [--model runs/demo/lowrank/lowrank.pt]
        [--teacher PATH] [--epochs 6] [--params-arm] [--set grow.top_k=3]

Without an artifact at --model, one is made from a demo student (runs/demo/student/student.pt, made
by bench/bench_lowrank.py or distill.py with configs/demo/distill.yaml) with configs/demo/lowrank.yaml.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.artifact import Artifact, build_model  # noqa: E402
from common.config import load_config  # noqa: E402
from compress.grow import format_history, grow_stage  # noqa: E402
from model.macs import spec_macs  # noqa: E402
from brats.scoring import evaluate  # noqa: E402
from engine.loop import fit  # noqa: E402
from student.distill import distill_setup, load_teacher  # noqa: E402
from engine.runtime import resolve_device  # noqa: E402
from engine.data import make_data  # noqa: E402
from engine.runtime import seed_everything  # noqa: E402
from model.refineformer3d import ModelSpec, count_params  # noqa: E402

DEMO_STUDENT = Path("runs/demo/student/student.pt")
KEYS = ("dice_wt", "dice_tc", "dice_et", "dice_mean")


def demo_lowrank(path: Path) -> Path:
    from compress.lowrank import lowrank_stage

    if not DEMO_STUDENT.is_file():
        sys.exit(f"no artifact at {path} and no demo student at {DEMO_STUDENT}: run bench/bench_lowrank.py first "
                 "(it trains the demo teacher and student), or pass --model")
    print(f"no artifact at {path}: factorising {DEMO_STUDENT} with configs/demo/lowrank.yaml")
    return lowrank_stage(DEMO_STUDENT, load_config("configs/demo/lowrank.yaml"), path.parent).path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/lowrank/lowrank.pt", help="low-rank student artifact")
    p.add_argument("--teacher", default=None, help="default: the teacher in the model's lineage")
    p.add_argument("--config", default="configs/demo/grow.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="runs/bench/grow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--params-arm", action="store_true",
                   help="also grow ranked by gradient score alone (grow.cost=params, no MACs budget)")
    args = p.parse_args()

    model_path = Path(args.model)
    if not model_path.is_file():
        model_path = demo_lowrank(model_path)
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    cfg = load_config(args.config, overrides)
    art = Artifact.load(model_path)
    teacher_path = args.teacher or cfg.grow.teacher or art.ancestor("teacher")
    if teacher_path is None:
        sys.exit(f"{model_path}: no teacher in its lineage; pass --teacher")
    teacher = load_teacher(teacher_path)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = make_data(cfg)
    start = build_model(art).to(device)
    start_params = count_params(start)
    start_dice = evaluate(start, data.cache, data.val_ids, cfg, desc="start")
    size = cfg.grow.reference_input

    def gmacs(spec: dict) -> float:
        return spec_macs(ModelSpec.from_dict(spec), size) / 1e9

    out = Path(args.out)

    results, histories = {}, {}
    arms = {"grown": cfg}
    if args.params_arm:
        arms["grown params"] = load_config(args.config, overrides + ["grow.cost=params", "grow.macs_budget=null"])
    for arm, arm_cfg in arms.items():
        t0 = time.time()
        seed_everything(arm_cfg.train.seed)
        grown = grow_stage(model_path, arm_cfg, out / arm.replace(" ", "_"), teacher=teacher_path)
        events = grown.extra["growth"]
        epochs = sum(e["epochs"] for e in events)
        results[arm] = (count_params(build_model(grown)), gmacs(grown.spec), grown.metrics, time.time() - t0, epochs)
        histories[arm] = (events, epochs)
    epochs_run = histories["grown"][1]

    t0 = time.time()
    fixed_cfg = load_config(args.config, overrides + [f"train.epochs={epochs_run}", "train.patience=null"])
    seed_everything(cfg.train.seed)
    res_fixed = fit(*distill_setup(build_model(art), teacher, fixed_cfg, perturb=cfg.distill.perturb_input), fixed_cfg,
                    out / "fixed", stage_name="fixed", lineage=art.child_lineage(), data=data)
    best_fixed = Artifact.load(res_fixed.best_path)
    results["fixed width"] = (start_params, gmacs(art.spec), best_fixed.metrics, time.time() - t0, epochs_run)

    g = cfg.grow
    print(f"\nprogressive growth of {model_path} (teacher {teacher_path}; {epochs_run}/{cfg.train.epochs} epochs, "
          f"top_k {g.top_k}, factor {g.factor}, cost {g.cost}, budget {g.budget}, MACs budget {g.macs_budget})")
    for arm, (history, _) in histories.items():
        print(f"{arm}:\n{format_history(history)}")
    size_text = "x".join(map(str, size))
    print(f"  {'':12} {'params':>10} {'GMACs':>8} {'epochs':>6} {'seconds':>8} " + " ".join(f"{k:>10}" for k in KEYS))
    print(f"  {'start':12} {start_params:>10,} {gmacs(art.spec):>8.3f} {0:>6} {0:>8} "
          + " ".join(f"{start_dice[k]:>10.4f}" for k in KEYS))
    for arm, (params, arm_gmacs, metrics, seconds, epochs) in results.items():
        print(f"  {arm:12} {params:>10,} {arm_gmacs:>8.3f} {epochs:>6} {seconds:>8.0f} "
              + " ".join(f"{metrics.get(k, float('nan')):>10.4f}" for k in KEYS))
    print(f"  (GMACs: G multiply-adds of one forward pass at {size_text}, grow.reference_input)")
    for arm in histories:
        a, f = results[arm], results["fixed width"]
        print(f"  {arm} vs fixed width: {a[0] - f[0]:+,} parameters ({100 * (a[0] / f[0] - 1):+.1f}%), "
              f"{a[1] - f[1]:+.3f} GMACs ({100 * (a[1] / f[1] - 1):+.1f}%), "
              f"Dice mean {a[2]['dice_mean'] - f[2]['dice_mean']:+.4f}")


if __name__ == "__main__":
    main()
