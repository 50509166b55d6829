"""INT8: LSQ quantisation-aware fine-tuning and a real INT8 CPU model.

    python quantize.py runs/student/student.pt --out runs/int8
    python quantize.py runs/demo/grow/grown.pt --config configs/demo/quantize.yaml --out runs/demo/int8
    python quantize.py student.pt --backend onnxruntime        # int8.onnx + fp32.onnx, artifact kind "onnx"
    python quantize.py student.pt --set quant.decide=all --set quant.force='{decoder.head: fp32}'
    python quantize.py runs/grow/grown.pt --out runs/int8 --resume   # continue runs/int8/qat/last.pt

BatchNorm is folded and the decoder's fusion re-associated (both exact); each Linear/Conv3d is timed
in FP32 and INT8 at its real input shape on this CPU and runs INT8 only where that is faster
(quant.decide: measure | all | none | table; quant.force overrides); the chosen layers get LSQ fake
quantisation, calibrated, then a few epochs of distillation from the lineage's teacher; finally
real INT8 layers (PyTorch quantized kernels) or a QDQ ONNX graph with the learned scales.
Writes <out>/int8.pt with the per-layer decision table in extra["int8"] (shown by report.py, and
here with --verbose) and the INT8 model's validation Dice in its metrics; the QAT fine-tune's checkpoint <out>/qat/last.pt (kind "int8-qat",
resumable with --resume) carries its best epoch (engine.loop.best_epoch rebuilds it).
"""
from __future__ import annotations

import os

# Spin-waiting OpenMP threads make torch several times slower on a shared machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common.cli import add_strict, config_from_args, data_given, out_dir, run_main, stage_parser  # noqa: E402


def main() -> int:
    p = stage_parser("quantize.py", __doc__, default_config="configs/quantize.yaml", default_out="runs/int8")
    p.add_argument("artifact", help="FP32 artifact to quantize (student, lowrank or grown)")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs (default: train.epochs; 0: calibration only)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default=None,
                   help="torch: real INT8 layers run by PyTorch (int8.pt); onnxruntime: a QDQ ONNX graph for ONNX "
                        "Runtime (int8.onnx and fp32.onnx beside int8.pt) (default: quant.backend, torch)")
    p.add_argument("--calib", type=int, default=None, help="calibration crops (default: quant.calib)")
    p.add_argument("--resume", action="store_true", help="continue the QAT fine-tune from <out>/qat/last.pt")
    p.add_argument("--verbose", action="store_true",
                   help="also print the per-layer INT8/FP32 decision table (always stored in the artifact and report)")
    add_strict(p, "FP32 model's")
    args = p.parse_args()
    cfg = config_from_args(args)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.calib is not None:
        cfg.quant.calib = args.calib
    backend = args.backend or cfg.quant.backend
    out = out_dir(args)

    # deferred: torch loads only once the command line and config are good
    from common.artifact import Artifact
    from compress.quant.stage import run_quantize
    from engine.runner import exit_code

    path = run_quantize(args.artifact, cfg, out, backend=backend, resume=args.resume, data_given=data_given(args),
                        verbose=args.verbose)
    return exit_code(Artifact.load(path))


def cli() -> None:
    """The `rf3d-quantize` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
