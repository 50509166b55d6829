"""The INT8 stage: FP32 artifact -> exact rewrites -> per-layer decision -> LSQ QAT -> INT8 artifact.

    prepare_float   BatchNorm folding + decoder re-association (exact)
    decide          which layers run INT8 (measured on this CPU, or forced)
    quantize_       LSQ fake quantisation of exactly those layers, calibrated
    distill         a few epochs of distillation from the lineage's teacher (engine); its checkpoints
                    <out>/qat/best.pt, last.pt are kind "int8-qat" (compress.quant.qat), so they
                    rebuild with build_model and the fine-tune resumes (`resume=True`)
    convert         real INT8 layers (PyTorch) or a QDQ ONNX graph (ONNX Runtime)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from common.artifact import Artifact, ArtifactError, build_model
from common.config import Config, ConfigError, to_dict
from engine.runtime import resolve_runtime
from compress.quant.convert import convert, int8_spec, prepare_float
from compress.quant.decide import decide, format_table, int8_layers
from compress.quant.lsq import LSQConfig, calibrate, quantize_
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from compress.quant.qat import KIND as QAT_KIND, QATHooks
from compress.quant.reassoc import final_layer
from student.distill import DistillStage
from brats.scoring import evaluate
from engine.data import make_data
from engine.loop import LAST, SupervisedStage, fit

BACKENDS = ("torch", "onnxruntime")
QAT_DIR = "qat"  # the engine's best.pt / last.pt of the QAT fine-tune, under <out>


class QATDistillStage(QATHooks, DistillStage):
    """Distillation from the lineage's teacher, for a fake-quant student."""

    name = "int8-qat-distill"


class QATSupervisedStage(QATHooks, SupervisedStage):
    """Supervised fine-tune of a fake-quant model (no teacher in the lineage)."""

    name = "int8-qat"


def input_shape(cfg: Config) -> tuple[int, ...]:
    size = cfg.quant.input or cfg.train.window
    if len(size) != 3:
        raise ConfigError(f"quant.input must be three sizes, got {size}")
    return (1, 4, *map(int, size))


def quantize_step(model: nn.Module, cfg: Config, calib: Iterable[torch.Tensor], *, progress: bool = False,
                  shape: tuple[int, ...] | None = None) -> tuple[nn.Module, list[dict]]:
    """Pure model surgery: (float model) -> (calibrated fake-quant model, decision rows)."""
    q = cfg.quant
    model = prepare_float(copy.deepcopy(model), reassoc=q.reassoc)
    rows = decide(model, shape or input_shape(cfg), q.decide, q.force, runs=q.bench_runs, min_speedup=q.min_speedup,
                  progress=progress, final={final_layer(model)})
    chosen = set(int8_layers(rows))
    lsq = LSQConfig(act_qmax=q.act_qmax, percentile=q.percentile, final={final_layer(model)})
    quantize_(model, lsq, lambda name, m: name in chosen)
    calibrate(model, calib)
    return model, rows


@torch.no_grad()
def calib_images(data, n: int) -> list[torch.Tensor]:
    if n < 1:
        raise ConfigError(f"quant.calib must be >= 1, got {n}")
    return [data.train_set[i % len(data.train_set)]["image"][None] for i in range(n)]


def _finetune(qat: nn.Module, art: Artifact, cfg: Config, out: Path, data, rows: list[dict],
              resume: bool = False) -> tuple[dict, Path]:
    """Distillation from the lineage's teacher (supervised when there is none); loads the best epoch
    into `qat` and returns (its metrics, best.pt path)."""
    teacher_path = cfg.quant.teacher or art.ancestor("teacher")
    if teacher_path:
        from student.distill import load_teacher

        stage = QATDistillStage(load_teacher(teacher_path), cfg, perturb=cfg.distill.perturb_input)
    else:
        print("no teacher in the lineage (quant.teacher unset): supervised QAT fine-tune")
        stage = QATSupervisedStage(cfg.data.scheme, cfg.train.dice_weight, cfg.train.ce_weight)
    result = fit(qat, stage, cfg, out / QAT_DIR, stage_name="int8-qat", lineage=art.child_lineage(),
                 extra={"int8": {"decisions": rows}}, data=data, resume=resume)
    best = Artifact.load(result.best_path)
    qat.load_state_dict(best.state_dict)  # the engine's best epoch, not the last one
    return dict(result.best_metrics), result.best_path


def resume_qat(fp32: nn.Module, out: Path) -> tuple[nn.Module, list[dict]]:
    """The fake-quant model and decision rows of an interrupted QAT run in <out>/qat/last.pt."""
    path = out / QAT_DIR / LAST
    last = Artifact.load(path)
    if last.spec.get("kind") != QAT_KIND or "decisions" not in last.extra.get("int8", {}):
        raise ArtifactError(f"{path}: not a resumable QAT checkpoint (kind {last.spec.get('kind')!r}; written by an "
                            "older quantize.py?); start again without --resume")
    if last.spec["base"] != fp32.spec.to_dict():
        raise ArtifactError(f"{path}: fine-tunes another architecture than the given FP32 artifact; pass the same one")
    return build_model(last), list(last.extra["int8"]["decisions"])


def run_quantize(artifact_path: str | Path, cfg: Config, out: Path, backend: str = "torch",
                 resume: bool = False) -> Path:
    """The `quantize.py` command: writes <out>/int8.pt (and int8.onnx / fp32.onnx for onnxruntime).

    resume: continue the QAT fine-tune from <out>/qat/last.pt (same layers, scales and schedule)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    art = Artifact.load(artifact_path)
    if art.spec.get("kind", "fp32") != "fp32":
        raise ConfigError(f"{artifact_path}: quantize.py needs an FP32 artifact, got kind {art.spec.get('kind')!r}")
    rt = resolve_runtime(cfg.train.device, cfg.train.amp, cfg.train.threads)
    print(rt.line("quantize"))
    engine = rt.int8_engine
    fp32 = build_model(art).eval()
    shape = input_shape(cfg)
    if resume:  # checked before any data preparation
        if cfg.train.epochs < 1:
            raise ConfigError("--resume continues a QAT fine-tune: train.epochs must be >= 1")
        qat, rows = resume_qat(fp32, out)
    data = make_data(cfg)
    if not resume:
        qat, rows = quantize_step(fp32, cfg, calib_images(data, cfg.quant.calib), progress=True, shape=shape)
    print(format_table(rows))
    qat_metrics, qat_path = _finetune(qat, art, cfg, out, data, rows, resume) if cfg.train.epochs > 0 else ({}, None)
    layers = int8_layers(rows)
    extra = {"int8": {"decisions": rows, "int8_layers": layers, "backend": backend, "engine": engine,
                      "input_shape": list(shape), "act_qmax": cfg.quant.act_qmax, "qat_metrics": qat_metrics,
                      "qat_checkpoint": str(qat_path) if qat_path else None,
                      "cpu_threads": torch.get_num_threads()}, "runtime": rt.to_dict()}
    if backend == "torch":
        model = convert(copy.deepcopy(qat))
        spec = int8_spec(art.spec, layers, cfg.quant.reassoc, engine)
    else:
        fp32_bytes = export_onnx(prepare_float(copy.deepcopy(fp32), reassoc=cfg.quant.reassoc), shape)
        int8_bytes = export_onnx(qat, shape)
        _write(out / "fp32.onnx", fp32_bytes)
        _write(out / "int8.onnx", int8_bytes)
        model = OrtModel.from_bytes(int8_bytes, list(shape), cfg.quant.threads)
        spec = onnx_spec(list(shape), len(int8_bytes), art.spec, "int8", cfg.quant.threads)
        extra["int8"]["onnx_bytes"] = {"fp32": len(fp32_bytes), "int8": len(int8_bytes)}
    metrics = evaluate(model, data.cache, data.val_ids, cfg, desc="int8 validation")
    metrics["fp32_dice_mean"] = float(art.metrics.get("dice_mean", float("nan")))
    result = Artifact(stage="int8", spec=spec, state_dict=model.state_dict(), config=to_dict(cfg), metrics=metrics,
                      lineage=art.child_lineage(), extra=extra)
    path = result.save(out / "int8.pt")
    print(f"INT8 ({backend}): {len(layers)} of {len(rows)} layers INT8; dice_mean {metrics['dice_mean']:.4f} "
          f"(FP32 {metrics['fp32_dice_mean']:.4f}); wrote {path}")
    return path


def _write(path: Path, data: bytes) -> None:
    from common.atomic import atomic_write

    atomic_write(path, lambda tmp: tmp.write_bytes(data))
