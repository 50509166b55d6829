"""INT8 vs FP32 on this CPU, measured in one run: latency, size on disk, validation Dice.

    OMP_NUM_THREADS=2 python bench/bench_int8.py runs/student/student.pt [--int8 runs/int8/int8.pt] [--dice]

Variants, per input size (default 128^3 and the demo's 96x96x64), all with the same threads:
  torch-fp32        PyTorch eager, the artifact as stored
  torch-fp32-exact  PyTorch eager after the exact rewrites (BatchNorm folded, decoder re-associated)
  ort-fp32          ONNX Runtime FP32 of the rewritten model
  torch-int8        PyTorch quantized kernels, layers chosen by measurement on this CPU (or --int8's model)
  ort-int8          ONNX Runtime QDQ, every Conv3d/Linear INT8 except the stem and the logits layer
Runs are interleaved (A B C ... A B C ...), medians of --runs; OMP_WAIT_POLICY=PASSIVE and ORT
allow_spinning=0. Without --int8 the INT8 models are calibrated but not fine-tuned (latency and size
only; Dice needs the fine-tuned artifact).
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

from common.artifact import Artifact, build_model  # noqa: E402
from common.config import Config, from_dict  # noqa: E402
from compress.quant.convert import convert, prepare_float, set_engine  # noqa: E402
from compress.quant.decide import decide, format_table, int8_layers  # noqa: E402
from compress.quant.lsq import LSQConfig, calibrate, quantize_  # noqa: E402
from compress.quant.onnx_export import OrtModel, export_onnx  # noqa: E402
from compress.quant.reassoc import final_layer  # noqa: E402


def state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def qat_model(fp32: torch.nn.Module, layers: set[str], calib: list[torch.Tensor]) -> torch.nn.Module:
    model = prepare_float(copy.deepcopy(fp32))
    quantize_(model, LSQConfig(final={final_layer(model)}), lambda name, m: name in layers)
    calibrate(model, calib)
    return model


def bench_size(fp32: torch.nn.Module, size: list[int], runs: int, threads: int, int8_art: Artifact | None) -> dict:
    shape = (1, 4, *size)
    x = torch.randn(shape)
    calib = [torch.randn(shape)]
    exact = prepare_float(copy.deepcopy(fp32))
    rows = decide(exact, shape, "measure", runs=3, progress=True, final={final_layer(exact)})
    print(format_table(rows))
    chosen = set(int8_layers(rows))
    if int8_art is not None:
        torch_int8 = build_model(int8_art).eval()
    else:
        torch_int8 = convert(qat_model(fp32, chosen, calib))
    everything = {r["layer"] for r in rows} - {"encoder.stages.0.patch_embed.proj", final_layer(exact)}
    ort_fp32 = OrtModel.from_bytes(export_onnx(exact, shape), list(shape), threads)
    ort_int8 = OrtModel.from_bytes(export_onnx(qat_model(fp32, everything, calib), shape), list(shape), threads)
    variants = {"torch-fp32": fp32, "torch-fp32-exact": exact, "ort-fp32": ort_fp32, "torch-int8": torch_int8,
                "ort-int8": ort_int8}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():
            m(x)  # warm-up: packing, session initialisation
        for _ in range(runs):
            for name, m in variants.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    sizes = {"torch-fp32": state_bytes(fp32), "torch-fp32-exact": state_bytes(exact), "ort-fp32": ort_fp32.onnx.numel(),
             "torch-int8": state_bytes(torch_int8), "ort-int8": ort_int8.onnx.numel()}
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "bytes": sizes, "variants": variants,
            "int8_layers": sorted(chosen)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="FP32 artifact (student / lowrank / grown)")
    p.add_argument("--int8", default=None, help="fine-tuned INT8 artifact from quantize.py (torch backend)")
    p.add_argument("--sizes", nargs="+", default=["128,128,128", "96,96,64"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dice", action="store_true", help="also validation Dice (the artifact's config and cases)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = set_engine()
    art = Artifact.load(args.artifact)
    fp32 = build_model(art).eval()
    int8_art = Artifact.load(args.int8) if args.int8 else None
    print(f"threads {args.threads}, quantized engine {engine}, torch {torch.__version__}, runs {args.runs} (interleaved)")
    for size_text in args.sizes:
        size = [int(v) for v in size_text.split(",")]
        if int8_art is not None and int8_art.extra.get("int8", {}).get("input_shape", [0, 0, *size])[2:] != size:
            print(f"note: {args.int8} was decided at {int8_art.extra['int8']['input_shape']}; timing it at {size}")
        r = bench_size(fp32, size, args.runs, args.threads, int8_art)
        med = r["median_s"]
        best_fp32 = min(med["torch-fp32"], med["torch-fp32-exact"], med["ort-fp32"])
        print(f"\ninput 1x4x{'x'.join(map(str, size))}: {len(r['int8_layers'])} layers INT8 in torch-int8")
        print(f"{'variant':<18} {'median ms':>10} {'vs best fp32':>13} {'size MB':>8} {'vs fp32 size':>13}")
        for name, t in med.items():
            print(f"{name:<18} {1000 * t:>10.1f} {best_fp32 / t:>12.2f}x {r['bytes'][name] / 1e6:>8.3f} "
                  f"{r['bytes'][name] / r['bytes']['torch-fp32']:>12.2f}x")
        if args.dice:
            from compress.quant.stage import evaluate
            from teacher.engine import make_data

            cfg = from_dict(art.config) if art.config else Config()
            cfg.train.window = size
            data = make_data(cfg)
            for name, m in r["variants"].items():
                if int8_art is None and "int8" in name:
                    continue  # not fine-tuned: its Dice would say nothing about QAT
                print(f"{name:<18} dice_mean {evaluate(m, data, cfg, desc=name)['dice_mean']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
