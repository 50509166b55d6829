"""Per-window latency of a teacher and a student in every runtime, measured in one run.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_runtimes.py [--config configs/demo/teacher.yaml] [--width 0.25]
        [--input 128 128 128] [--runs 5] [--threads N] [--no-int8] [--teacher T.pt] [--student S.pt]

Models: the artifacts given, else built from --config's model section with random weights (latency does
not depend on the weights) and the scratch student at --width (distill.py's thinning rule, the same shape
as `distill.py --init scratch`). Each model runs as `pipeline.runtimes` serves it: PyTorch eager on the
exact rewrites (`inference_graph`), and their ONNX export in ONNX Runtime and OpenVINO (f32). Unless
--no-int8, the student's QDQ INT8 graph too (post-training: every Conv3d/Linear but the logits layer,
calibrated on random windows; quantize.py's QAT writes the same kind of graph) in both ONNX runtimes.

All runtimes of one model are interleaved (A B C A B C ...), median of --runs after one warm-up;
OMP_WAIT_POLICY=PASSIVE (set here before torch loads) and ORT allow_spinning=0; every runtime gets the
same --threads. Prints the CPU (lscpu's model name), ISA class, library versions, this CPU's fp32 GEMM
peak, then per model and runtime: ms per window and achieved G multiply-adds/s (fvcore count of the
un-rewritten model over the time), and the teacher-to-student ratios. A runtime that is not installed or
fails is listed with its reason.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.artifact import Artifact, build_model  # noqa: E402
from common.config import load_config  # noqa: E402
from common.paths import project_path  # noqa: E402
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec  # noqa: E402
from compress.quant.stage import quantize_step  # noqa: E402
from engine.runtime import probe_cpu  # noqa: E402
from model.macs import count_macs  # noqa: E402
from model.refineformer3d import count_params, build_from_config  # noqa: E402
from pipeline.predict import fp32_model, inference_model  # noqa: E402
from pipeline.profile import gemm_peak  # noqa: E402
from pipeline.runtimes import RUNTIMES, measure_runtimes  # noqa: E402
from student.thin import scratch_student  # noqa: E402


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def int8_qdq(model: torch.nn.Module, shape: tuple[int, ...], calib: int) -> Artifact:
    """An ONNX (kind onnx) artifact of `model`'s QDQ graph: every layer INT8 but the logits, calibrated only."""
    cfg = load_config()
    cfg.quant.decide = "all"
    gen = torch.Generator().manual_seed(0)
    qat, _ = quantize_step(model, cfg, [torch.randn(shape, generator=gen) for _ in range(calib)], shape=shape)
    data = export_onnx(qat, shape)
    return Artifact("int8", onnx_spec(list(shape), len(data), model.spec.to_dict(), "int8"),
                    OrtModel.from_bytes(data, list(shape)).state_dict())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(project_path("configs/demo/teacher.yaml")),
                   help="config whose model section builds the teacher (without --teacher)")
    p.add_argument("--width", type=float, default=0.25, help="scratch student width (without --student)")
    p.add_argument("--teacher", default=None, help="teacher artifact instead of a random-weight model")
    p.add_argument("--student", default=None, help="student artifact (any FP32 stage) instead of the scratch one")
    p.add_argument("--input", type=int, nargs=3, default=[128, 128, 128], metavar=("D", "H", "W"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: torch's (OMP_NUM_THREADS, else the CPUs)")
    p.add_argument("--calib", type=int, default=2, help="random windows calibrating the INT8 graph")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the student's INT8 QDQ graph")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    size, shape = tuple(args.input), (1, 4, *args.input)

    cpu = probe_cpu()
    peak = gemm_peak()
    print(f"CPU: {cpu.model} ({cpu.kind}, ATen {cpu.capability}); {threads} thread(s) per runtime, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"torch {torch.__version__}, onnxruntime {version('onnxruntime')}, openvino {version('openvino')}")
    print(f"fp32 GEMM peak: {peak['gmacs_per_s']:.1f} G multiply-adds/s ({peak['n']}x{peak['n']} torch.mm, "
          f"median of {peak['runs']})")
    print(f"per {'x'.join(map(str, size))} window, batch 1: median of {args.runs}, runtimes interleaved per model")

    if args.teacher:
        teacher_art = Artifact.load(args.teacher)
    else:
        model = build_from_config(load_config(args.config).model)
        teacher_art = Artifact("teacher", model.spec.to_dict(), model.state_dict())
    if args.student:
        student_art = Artifact.load(args.student)
    else:
        model = scratch_student(fp32_model(teacher_art).spec, args.width)
        student_art = Artifact("student", model.spec.to_dict(), model.state_dict())
    arts = {"teacher": teacher_art, "student": student_art}
    if args.int8:
        arts["student int8"] = int8_qdq(build_model(student_art).eval(), shape, args.calib)

    header = f"{'model':<14} {'params':>10} {'G MACs':>7}  " + "  ".join(f"{r:>22}" for r in RUNTIMES)
    print(header)
    best: dict[str, tuple[str, float]] = {}
    for name, art in arts.items():
        plain = fp32_model(art) if art.spec.get("kind", "fp32") != "fp32" else build_model(art)
        gmacs = count_macs(plain, shape)
        _, ms, notes = measure_runtimes(art, inference_model(art), size, args.runs, warmup=1, threads=threads)
        cells = [f"{ms[r]:9.1f} ms {gmacs / (ms[r] / 1e3):5.1f} G/s" if r in ms else f"{'-':>22}" for r in RUNTIMES]
        print(f"{name:<14} {count_params(plain):>10,} {gmacs:>7.2f}  " + "  ".join(cells))
        for runtime, why in notes.items():
            print(f"{'':<14} {runtime}: {why}")
        if ms:
            fastest = min(ms, key=ms.get)
            best[name] = (fastest, ms[fastest])
            if "torch" in ms:
                best[f"{name} torch"] = ("torch", ms["torch"])
    if "teacher torch" in best:
        base = best["teacher torch"][1]
        for name in arts:
            if name in best:
                runtime, ms = best[name]
                print(f"teacher (torch) / {name} ({runtime}, its fastest): {base / ms:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
