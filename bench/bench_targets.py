"""Issue 14's targets, measured in one run: the chain's artifacts against the teacher they came from.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_targets.py [--runs-dir runs/demo] [--window 128 128 128]
        [--runs 5] [--case-shape 240 240 155] [--case-runs 3] [--coarse 2 3] [--threads N]

Per artifact found under --runs-dir (teacher/best.pt, student/student.pt, slim/slim.pt, lowrank/lowrank.pt,
grow/grown.pt, int8/int8.pt), served as predict.py serves it (`pipeline.predict.inference_model`,
PyTorch eager on CPU): one-window latency on a zero input of --window (all models interleaved
A B C ..., median of --runs after one warm-up round), G multiply-adds of that window (fvcore on the
FP32 inference graph; an INT8 artifact counts its FP32 base's), the achieved G multiply-adds/s, the
artifact's file size and its validation Dice (its own metrics: the cases and count it records).
Then the whole case: one demo-family phantom of --case-shape (the BraTS grid), brain-cropped as the
cache stores it, predicted whole by the teacher and by the last artifact of the chain (background
windows skipped), and by the last artifact coarse-to-fine (`--coarse F ...`, a row per factor: brats.inference; its coarse window
fitted to the pooled case, as predict.py does in PyTorch), interleaved,
median of --case-runs (windows counted, as predict.py counts them). Ratios are what to read; every figure says
its threads and OMP_WAIT_POLICY. Targets (issue 14): >= 25x per window, <= 0.6 G multiply-adds,
>= 40x per whole case, INT8 <= 0.3x the FP32 student's size and >= 50x smaller than the teacher.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_skip import phantom_image  # noqa: E402
from brats.inference import WindowCount, predict_case  # noqa: E402
from common.artifact import Artifact, build_model  # noqa: E402
from common.timing import interleaved_medians  # noqa: E402
from engine.runtime import resolve_runtime  # noqa: E402
from model.macs import count_macs  # noqa: E402
from pipeline.predict import artifact_scheme, base_spec, inference_model, predict_fn, shape_multiple  # noqa: E402
from model.refineformer3d import model_from_spec  # noqa: E402

CHAIN = (("teacher", "teacher/best.pt"), ("student", "student/student.pt"), ("slim", "slim/slim.pt"),
         ("lowrank", "lowrank/lowrank.pt"), ("grown", "grow/grown.pt"), ("int8", "int8/int8.pt"))


def fp32_macs(art: Artifact, window) -> float:
    """G multiply-adds of one window on the FP32 inference graph (an INT8 artifact: its base's)."""
    base = base_spec(art.spec)
    return count_macs(inference_model(Artifact(stage=art.stage, spec=base, state_dict={}),
                                      model_from_spec(base)), (1, 4, *window))


def dice_with_et_rule(art: Artifact) -> float:
    """Mean Dice of the artifact's validation cases with its calibrated ET rule: the rule relabels small
    predicted ET as NCR/NET, which leaves WT and TC as they are, so only the ET term changes (nan when the
    artifact records no rule or no per-region Dice)."""
    rule, m = art.extra.get("et_rule") or {}, art.metrics
    if not rule or "dice_wt" not in m or rule.get("et_min_voxels") not in rule.get("grid", []):
        return float("nan")
    et = rule["dice_et"][rule["grid"].index(rule["et_min_voxels"])]
    return (m["dice_wt"] + m["dice_tc"] + et) / 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "demo"),
                   help="a folder of stage folders, as make demo writes (default: this checkout's runs/demo)")
    p.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], help="window (default 128 128 128)")
    p.add_argument("--runs", type=int, default=5, help="timed rounds per window figure (default 5)")
    p.add_argument("--case-shape", type=int, nargs=3, default=[240, 240, 155], help="whole-case phantom grid")
    p.add_argument("--case-runs", type=int, default=3, help="timed rounds per whole case (default 3; 0: skip)")
    p.add_argument("--coarse", type=int, nargs="+", default=[2, 3],
                   help="pooling factors, a coarse-to-fine row each (default 2 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    args = p.parse_args(argv)
    if min(args.coarse) < 2:
        p.error(f"--coarse must be pooling factors >= 2, got {args.coarse}")
    rt = resolve_runtime("cpu", "off", args.threads)
    print(f"{rt.line('bench_targets', training=False)} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    root = Path(args.runs_dir)
    arts = {name: Artifact.load(root / rel) for name, rel in CHAIN if (root / rel).is_file()}
    if "teacher" not in arts or len(arts) < 2:
        sys.exit(f"{root}: needs teacher/best.pt and at least one later stage (run make demo first)")
    window = tuple(args.window)
    models = {name: inference_model(art) for name, art in arts.items()}
    x = torch.zeros(1, 4, *window)

    def forward(m):
        def call():
            with torch.inference_mode():
                m(x)
        return call

    ms = {k: 1e3 * v for k, v in interleaved_medians({n: forward(m) for n, m in models.items()}, args.runs).items()}
    print(f"\none {'x'.join(map(str, window))} window, PyTorch eager, median of {args.runs} interleaved rounds")
    print(f"{'stage':<9} {'ms':>8} {'x teacher':>10} {'G MACs':>8} {'G MAC/s':>8} {'MB':>7} {'val Dice':>9} {'ET rule':>8}")
    for name, art in arts.items():
        macs = fp32_macs(art, window)
        size = (root / dict(CHAIN)[name]).stat().st_size / 1e6
        print(f"{name:<9} {ms[name]:>8.1f} {ms['teacher'] / ms[name]:>10.1f} {macs:>8.3f} {macs / ms[name] * 1e3:>8.1f} "
              f"{size:>7.2f} {art.metrics.get('dice_mean', float('nan')):>9.4f} {dice_with_et_rule(art):>8.4f}")
    print("val Dice: the mean Dice the artifact recorded on its stage's validation cases; ET rule: the same with its "
          "calibrated ET rule (brats.scoring.calibrate_et_rule), as predict.py and report.py apply it")
    if "int8" in arts and "grown" in arts:
        sizes = {n: (root / dict(CHAIN)[n]).stat().st_size for n in ("teacher", "grown", "int8")}
        print(f"INT8 artifact: {sizes['int8'] / sizes['grown']:.2f}x its FP32 source's file (target <= 0.3), "
              f"{sizes['teacher'] / sizes['int8']:.1f}x smaller than the teacher's best.pt (target >= 50)")
    final = list(arts)[-1]
    if args.case_runs > 0:
        cropped, _, bbox = phantom_image(tuple(args.case_shape), 0)
        image = torch.from_numpy(cropped.astype("float32"))
        calls, counts = {}, {}
        for name, coarse in (("teacher", 0), (final, 0), *((f"{final} coarse {f}", f) for f in dict.fromkeys(args.coarse))):
            model = models[name.split()[0]]

            def call(predict=predict_fn(model), scheme=artifact_scheme(arts[name.split()[0]]), coarse=coarse,
                     fit=shape_multiple(arts[name.split()[0]], None) if coarse else 0, name=name):
                counts[name] = WindowCount()  # counted every round, as predict.py counts every case
                predict_case(predict, image, scheme, window, 0.5, 1, coarse=coarse, coarse_fit=fit, count=counts[name])
            calls[name] = call
        s = interleaved_medians(calls, args.case_runs)
        print(f"\nwhole case: grid {'x'.join(map(str, args.case_shape))}, brain box "
              f"{'x'.join(str(b - a) for a, b in bbox)}, {'x'.join(map(str, window))} windows at overlap 0.5, background "
              f"skipped; median of {args.case_runs}")
        for name, sec in s.items():
            print(f"  {name:<18} {sec:>7.2f} s {s['teacher'] / sec:>6.1f}x teacher   {counts[name].line()}")
        print(f"target >= 40x: {s['teacher'] / min(s[n] for n in s if n != 'teacher'):.1f}x at best (coarse-to-fine "
              f"does not give the full pass's label map: brats.inference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
