"""INT8 vs FP32 on this CPU, measured in one run: latency, size on disk, validation Dice.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_int8.py runs/student/student.pt --dice
    python bench/bench_int8.py runs/grow/grown.pt --int8 runs/int8/int8.pt --qat runs/int8/qat/last.pt --dice

Variants, per input size (default 128^3 and the demo's 96x96x64), all with the same threads:
  torch-fp32        PyTorch eager, the artifact as stored
  torch-fp32-exact  PyTorch eager after the exact rewrites (BatchNorm folded, decoder re-associated, decoder
                    tail in channels_last_3d: `prepare_float`'s defaults, which the INT8 models get too)
  torch-fp32-exact-ncdhw  the same without the channels_last_3d tail (the default layout throughout)
  ort-fp32          ONNX Runtime FP32 of the rewritten model
  torch-int8        PyTorch quantized kernels: --int8's model (QAT), else the --qat checkpoint converted,
                    else layers chosen by measurement on this CPU, calibrated only (PTQ)
  ort-int8          ONNX Runtime QDQ of the --qat checkpoint (its layers, fine-tuned), else PTQ of the
                    measured layers
  ort-int8-all      ONNX Runtime QDQ, every Conv3d/Linear INT8 except the stem and the logits layer (PTQ)
"source" says where an INT8 model's scales come from: qat (quantize.py's fine-tune) or ptq
(calibrated on a few training crops, no fine-tune). Runs are interleaved (A B C ... A B C ...), the
median of --runs is reported, after one warm-up; OMP_WAIT_POLICY=PASSIVE and ORT allow_spinning=0.
Speed-ups are against the fastest FP32 variant. Dice: the artifact's config and validation cases,
sliding window of the timed input size.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.artifact import Artifact, ArtifactError, build_model  # noqa: E402
from common.config import Config, from_dict  # noqa: E402
from compress.quant.convert import convert, prepare_float, set_engine  # noqa: E402
from compress.quant.decide import decide, int8_layers  # noqa: E402
from compress.quant.lsq import LSQConfig, calibrate, quant_layer_names, quantize_  # noqa: E402
from compress.quant.onnx_export import OrtModel, export_onnx  # noqa: E402
from compress.quant.qat import KIND as QAT_KIND  # noqa: E402
from engine.loop import best_epoch  # noqa: E402
from compress.quant.reassoc import final_layer  # noqa: E402

FP32 = ("torch-fp32", "torch-fp32-exact", "torch-fp32-exact-ncdhw", "ort-fp32")


def state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def ptq_model(fp32: torch.nn.Module, layers: set[str], calib: list[torch.Tensor]) -> torch.nn.Module:
    """Fake-quant model of `layers`, calibrated only."""
    model = prepare_float(copy.deepcopy(fp32))
    quantize_(model, LSQConfig(final={final_layer(model)}), lambda name, m: name in layers)
    calibrate(model, calib)
    return model


def build_variants(fp32, size, threads, calib, int8_art, qat) -> tuple[dict, dict, dict]:
    """(name -> model, name -> bytes on disk, name -> source) at one input size."""
    shape = (1, 4, *size)
    exact = prepare_float(copy.deepcopy(fp32))
    rows = decide(exact, shape, "measure", runs=3, progress=True, final={final_layer(exact)})
    measured = set(int8_layers(rows))
    if int8_art is not None:
        torch_int8, torch_src = build_model(int8_art).eval(), "qat"
    elif qat is not None:
        torch_int8, torch_src = convert(copy.deepcopy(qat)), "qat"
    else:
        torch_int8, torch_src = convert(ptq_model(fp32, measured, calib)), "ptq"
    ort_q, ort_src = (qat, "qat") if qat is not None else (ptq_model(fp32, measured, calib), "ptq")
    everything = {r["layer"] for r in rows} - {"encoder.stages.0.patch_embed.proj", final_layer(exact)}
    models = {
        "torch-fp32": fp32, "torch-fp32-exact": exact,
        "torch-fp32-exact-ncdhw": prepare_float(copy.deepcopy(fp32), channels_last=False),
        "ort-fp32": OrtModel.from_bytes(export_onnx(exact, shape), list(shape), threads),
        "torch-int8": torch_int8,
        "ort-int8": OrtModel.from_bytes(export_onnx(ort_q, shape), list(shape), threads),
        "ort-int8-all": OrtModel.from_bytes(export_onnx(ptq_model(fp32, everything, calib), shape), list(shape),
                                            threads),
    }
    sizes = {k: (m.onnx.numel() if isinstance(m, OrtModel) else state_bytes(m)) for k, m in models.items()}
    n_torch = len(int8_art.spec["int8_layers"]) if int8_art is not None else len(
        quant_layer_names(qat) if qat is not None else measured)
    sources = {"torch-int8": f"{torch_src}, {n_torch} layers",
               "ort-int8": f"{ort_src}, {len(quant_layer_names(ort_q))} layers",
               "ort-int8-all": f"ptq, {len(everything)} layers"}
    return models, sizes, sources


def time_interleaved(models: dict, shape: tuple[int, ...], runs: int) -> dict[str, float]:
    x = torch.randn(shape)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm-up: packing, session initialisation
        for _ in range(runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="FP32 artifact (student / lowrank / grown)")
    p.add_argument("--int8", default=None, help="fine-tuned INT8 artifact of this model (quantize.py, torch backend)")
    p.add_argument("--qat", default=None, help="QAT checkpoint of this model (quantize.py's <out>/qat/last.pt: its best epoch)")
    p.add_argument("--sizes", nargs="+", default=["128,128,128", "96,96,64"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=4, help="training crops calibrating the PTQ variants")
    p.add_argument("--dice", action="store_true", help="also validation Dice (the artifact's config and cases)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = set_engine()
    art = Artifact.load(args.artifact)
    fp32 = build_model(art).eval()
    int8_art = Artifact.load(args.int8) if args.int8 else None
    qat = None
    if args.qat:
        qat_art = best_epoch(Artifact.load(args.qat))
        if qat_art.spec.get("kind") != QAT_KIND:
            raise ArtifactError(f"{args.qat}: kind {qat_art.spec.get('kind')!r}, not a self-describing QAT checkpoint "
                                f"({QAT_KIND!r}); re-run quantize.py to write one")
        qat = build_model(qat_art).eval()

    from compress.quant.stage import calib_images
    from brats.scoring import evaluate
    from engine.data import make_data

    cfg = from_dict(art.config) if art.config else Config()
    data = make_data(cfg)
    calib = calib_images(data, args.calib)
    print(f"{args.artifact}: threads {args.threads}, quantized engine {engine}, torch {torch.__version__}, "
          f"median of {args.runs} interleaved runs, {len(data.val_ids)} validation cases")
    for size_text in args.sizes:
        size = [int(v) for v in size_text.split(",")]
        if int8_art is not None and int8_art.extra.get("int8", {}).get("input_shape", [0, 0, *size])[2:] != size:
            print(f"note: {args.int8} was decided at {int8_art.extra['int8']['input_shape']}; timing it at {size}")
        models, sizes, sources = build_variants(fp32, size, args.threads, calib, int8_art, qat)
        med = time_interleaved(models, (1, 4, *size), args.runs)
        dice = {}
        if args.dice:
            cfg.train.window = size
            dice = {name: evaluate(m, data.cache, data.val_ids, cfg, desc=name)["dice_mean"] for name, m in models.items()}
        best = min(med[k] for k in FP32)
        print(f"\ninput 1x4x{'x'.join(map(str, size))}")
        print("| variant | source | median ms | speed-up vs best FP32 | size MB | dice_mean |")
        print("|---|---|---:|---:|---:|---:|")
        for name, t in med.items():
            d = f"{dice[name]:.4f}" if name in dice else "-"
            print(f"| {name} | {sources.get(name, 'fp32')} | {1000 * t:.1f} | {best / t:.2f}x | "
                  f"{sizes[name] / 1e6:.3f} | {d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
