"""Whole-case time with and without skipping background windows, on a phantom of the real BraTS grid.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_skip.py [--config configs/demo/teacher.yaml] [--set model.width=0.25]
        [--artifact runs/demo/student/student.pt] [--shape 240 240 155] [--runs 3] [--threads N] [--full-grid]

One demo-family phantom (`brats.phantom.make_case`) of `--shape`, preprocessed as the cache stores it
(`brats.prepare.preprocess_case`: cropped to the brain's bounding box, z-scored, float16), predicted
whole by `brats.inference.predict_case` with the config's window, overlap and sw_batch: once with
`skip_background` and once without, interleaved (A B A B ...), median of --runs after one warm-up
round. The model is the config's (random weights, seeded; the time does not depend on them) or
--artifact's, served as predict serves it (`pipeline.predict.inference_model`). Prints the windows
skipped, both times, and whether the two label maps are identical. --full-grid also times the
uncropped grid (a case whose background was not cropped away, where skipping has more to skip).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from brats.inference import WindowCount, predict_case  # noqa: E402
from brats.nifti import LoadedCase  # noqa: E402
from brats.phantom import make_case  # noqa: E402
from brats.prepare import preprocess_case, zscore  # noqa: E402
from common.artifact import Artifact  # noqa: E402
from common.config import load_config  # noqa: E402
from common.paths import project_path  # noqa: E402
from common.timing import interleaved_medians  # noqa: E402
from engine.runtime import resolve_runtime  # noqa: E402
from model.refineformer3d import build_from_config, count_params  # noqa: E402
from model.rewrites import inference_graph  # noqa: E402
from pipeline.predict import artifact_scheme, check_window, inference_model, predict_fn  # noqa: E402


def phantom_image(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(brain-cropped image float16 (4, d, h, w) as the cache stores it, uncropped z-scored image, bbox)."""
    pc = make_case("bench_skip", "hgg", shape=shape, seed=seed)
    image = np.stack([pc.images[m].astype(np.float32) for m in ("flair", "t1", "t1ce", "t2")])
    loaded = LoadedCase("bench_skip", "hgg", image, None, pc.affine, (1.0, 1.0, 1.0), nib.Nifti1Header())
    cropped, _, bbox = preprocess_case(loaded)
    return cropped, zscore(image).astype(np.float16), bbox


def bench_case(predict, image: np.ndarray, scheme: str, window, overlap: float, sw_batch: int, runs: int) -> dict:
    x = torch.from_numpy(image.astype(np.float32))
    count, labels = WindowCount(), {}

    def run(skip: bool):
        def call():
            labels[skip] = predict_case(predict, x, scheme, window, overlap, sw_batch, skip_background=skip)
        return call

    predict_case(predict, x, scheme, window, overlap, sw_batch, count=count)  # counted once, untimed
    times = interleaved_medians({"skip": run(True), "all": run(False)}, runs, warmup=1)
    return {"count": count, "skip_s": times["skip"], "all_s": times["all"],
            "identical": bool(np.array_equal(labels[True], labels[False]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(project_path("configs/demo/teacher.yaml")))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifact", default=None, help="time this artifact's model instead of the config's")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="phantom grid (BraTS: 240 240 155)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-grid", action="store_true", help="also time the uncropped grid")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    rt = resolve_runtime("cpu", "off", args.threads)
    print(f"{rt.line('bench_skip', training=False)} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if args.artifact:
        art = Artifact.load(args.artifact)
        model, scheme, source = inference_model(art), artifact_scheme(art), args.artifact
        spec = art.spec
    else:
        torch.manual_seed(args.seed)
        built = build_from_config(cfg.model)
        model, scheme, spec = inference_graph(built), cfg.data.scheme, built.spec.to_dict()
        source = f"{args.config} (model {cfg.model.preset} width {cfg.model.width:g}, random weights)"
        print(f"model: {source}, {count_params(built):,} parameters")
    t = cfg.train
    window = check_window(t.window, spec)
    print(f"sliding window {'x'.join(map(str, window))}, overlap {t.overlap}, sw_batch {t.sw_batch}; "
          f"median of {args.runs} interleaved runs after one warm-up round")
    cropped, full, bbox = phantom_image(tuple(args.shape), args.seed)
    print(f"phantom: demo family, grid {'x'.join(map(str, args.shape))}, brain bounding box "
          f"{'x'.join(str(b - a) for a, b in bbox)}")
    predict = predict_fn(model)
    cases = [("brain-cropped", cropped)] + ([("full grid", full)] if args.full_grid else [])
    for name, image in cases:
        r = bench_case(predict, image, scheme, window, t.overlap, t.sw_batch, args.runs)
        print(f"{name:<14} {'x'.join(map(str, image.shape[1:]))}: {r['count'].line()}; whole case "
              f"{r['skip_s']:.2f} s skipping, {r['all_s']:.2f} s every window ({r['all_s'] / r['skip_s']:.2f}x); "
              f"label maps identical: {'yes' if r['identical'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
