"""The INT8 stage: FP32 artifact -> exact rewrites -> per-layer decision -> LSQ QAT -> INT8 artifact.

    prepare_float   BatchNorm folding + decoder re-association + channels-last tail (exact; model.rewrites)
    decide          which layers run INT8 (measured on this CPU, or forced)
    quantize_       LSQ fake quantisation of exactly those layers, calibrated; the other layers quantize their
                    weights only (they run FP32 on the int8 weights the artifact stores)
    distill         a few epochs of distillation from the lineage's teacher (engine); its checkpoint
                    <out>/qat/last.pt is kind "int8-qat" (compress.quant.qat), so it rebuilds with
                    build_model and the fine-tune resumes (`resume=True`)
    convert         real INT8 layers (PyTorch) or a QDQ ONNX graph (ONNX Runtime)
"""
from __future__ import annotations

import copy
import dataclasses
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from brats.scoring import evaluate
from common.artifact import Artifact, ArtifactError, build_model
from common.atomic import atomic_write
from common.config import Config, ConfigError, to_dict
from compress.quant.convert import convert, int8_spec, int8_weight_layers, prepare_float, set_engine
from compress.quant.decide import BACKENDS, check_settings, decide, format_table, int8_layers
from compress.quant.lsq import LSQConfig, calibrate, quantize_, quantizable
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from compress.quant.qat import KIND as QAT_KIND, as_qat_model
from engine.loop import LAST, Stage, SupervisedStage, check_size
from engine.runner import StageContext, StageDef, run_stage
from model.refineformer3d import total_stride
from model.rewrites import final_layer
from student.distill import distill_trainer

STAGE = "int8"
STEM = "encoder.stages.0.patch_embed.proj"  # the input layer: FP32 unless forced (compress.quant.decide)
QAT_DIR = "qat"  # the QAT fine-tune's last.pt (resumable, carries the best epoch), under <out>


def input_shape(cfg: Config) -> tuple[int, ...]:
    size = cfg.quant.input or cfg.train.window
    if len(size) != 3:
        raise ConfigError(f"quant.input must be three sizes, got {size}")
    return (1, 4, *map(int, size))


def quantize_step(model: nn.Module, cfg: Config, calib: Iterable[torch.Tensor], *, progress: bool = False,
                  shape: tuple[int, ...] | None = None) -> tuple[nn.Module, list[dict]]:
    """Pure model surgery: (float model) -> (calibrated fake-quant model, decision rows)."""
    q = cfg.quant
    model = prepare_float(as_qat_model(model), reassoc=q.reassoc)  # a rewritten copy that describes itself
    rows = decide(model, shape or input_shape(cfg), q.decide, q.force, runs=q.bench_runs, min_speedup=q.min_speedup,
                  progress=progress, final={final_layer(model)}, first=STEM, backend=q.backend,
                  threads=q.threads)
    chosen, every = set(int8_layers(rows)), {r["layer"] for r in rows}
    lsq = LSQConfig(act_qmax=q.act_qmax, percentile=q.percentile, final={final_layer(model)},
                    weight_only=every - chosen)  # FP32 on int8-stored weights
    quantize_(model, lsq, lambda name, m: name in every)
    calibrate(model, calib)
    return model, rows


@torch.no_grad()
def calib_images(data, n: int) -> list[torch.Tensor]:
    if n < 1:
        raise ConfigError(f"quant.calib must be >= 1, got {n}")
    return [data.train_set[i % len(data.train_set)]["image"][None] for i in range(n)]


def resume_qat(fp32: nn.Module, out: Path, cfg: Config) -> tuple[nn.Module, list[dict]]:
    """The fake-quant model and decision rows of an interrupted QAT run in <out>/qat/last.pt. ArtifactError
    when the run decided its layers for another backend or input size than `cfg` asks for (its decisions
    were timed with those kernels at those shapes)."""
    path = out / QAT_DIR / LAST
    last = Artifact.load(path)
    if last.spec.get("kind") != QAT_KIND or "decisions" not in last.extra.get("int8", {}):
        raise ArtifactError(f"{path}: not a resumable QAT checkpoint (kind {last.spec.get('kind')!r}; written by an "
                            "older quantize.py?); start again without --resume")
    if last.spec["base"] != fp32.spec.to_dict():
        raise ArtifactError(f"{path}: fine-tunes another architecture than the given FP32 artifact; pass the same one")
    stored = last.config or {}  # read raw: a key removed since would stop a whole-config parse
    quant, train = stored.get("quant") or {}, stored.get("train") or {}
    size = tuple(int(n) for n in quant.get("input") or train.get("window") or ())
    for what, then, now in (("backend", quant.get("backend", "torch"), cfg.quant.backend),  # older runs: PyTorch's
                            ("input (quant.input, else train.window)", size or None, input_shape(cfg)[2:])):
        if then is not None and then != now:
            raise ArtifactError(f"{path}: its INT8 layers were decided for {what} {then}, not {now}; resume with "
                                f"the same, or start again with --overwrite")
    return build_model(last), list(last.extra["int8"]["decisions"])


def qat_step(fp32: nn.Module, ctx: StageContext, verbose: bool = False) -> nn.Module:
    """Step of the INT8 stage: exact rewrites, per-layer decisions, LSQ fake quantisation, calibrated
    on training crops (or, resuming, the fake-quant model of `<out>/qat/last.pt`). The decision rows
    go into ctx.extra["int8"] (and, `verbose`, to the console as a table)."""
    cfg = ctx.cfg
    if ctx.resume:
        qat, rows = resume_qat(fp32.eval(), ctx.out, cfg)
    else:
        qat, rows = quantize_step(fp32.eval(), cfg, calib_images(ctx.data, cfg.quant.calib),
                                  progress=ctx.dist.main, shape=input_shape(cfg))
    if verbose and ctx.dist.main:
        print(format_table(rows))
    ctx.extra["int8"] = {"decisions": rows}
    return qat


def qat_trainer(qat: nn.Module, ctx: StageContext) -> tuple[nn.Module, Stage]:
    """Distillation from the lineage's teacher (supervised when there is none), for a fake-quant model."""
    cfg = ctx.cfg
    if ctx.teacher_path:
        return distill_trainer(qat, ctx)
    if ctx.dist.main:
        print("no teacher in the lineage (quant.teacher unset): supervised QAT fine-tune")
    return qat, SupervisedStage(cfg.data.scheme, cfg.train.dice_weight, cfg.train.ce_weight)


def to_int8(backend: str):
    """Finish of the INT8 stage: the (best) fake-quant model -> real INT8 layers or a QDQ ONNX graph,
    scored on the same validation cases."""
    def finish(qat: nn.Module, art: Artifact, ctx: StageContext) -> Artifact:
        cfg, source, out = ctx.cfg, ctx.source, ctx.out
        rows = art.extra["int8"]["decisions"]
        layers, shape = int8_layers(rows), input_shape(cfg)
        engine = set_engine()
        extra = {"int8": {"decisions": rows, "int8_layers": layers, "backend": backend, "engine": engine,
                          "input_shape": list(shape), "act_qmax": cfg.quant.act_qmax,
                          "qat_metrics": dict(art.metrics) if ctx.fit is not None else {},
                          "qat_checkpoint": str(out / QAT_DIR / LAST) if ctx.fit is not None else None,
                          "cpu_threads": torch.get_num_threads(), "val_cases": len(ctx.data.val_ids)},
                 "runtime": art.extra.get("runtime"), "val_cases": list(ctx.data.val_ids),
                 **({"rising": art.extra["rising"]} if "rising" in art.extra else {})}  # engine.loop.ended_rising
        if backend == "torch":
            model = convert(copy.deepcopy(qat))
            spec = int8_spec(source.spec, layers, cfg.quant.reassoc, engine, int8_weight_layers(model))
        else:
            fp32 = build_model(source).eval()
            fp32_bytes = export_onnx(prepare_float(fp32, reassoc=cfg.quant.reassoc), shape)
            int8_bytes = export_onnx(qat, shape)
            if ctx.dist.main:
                _write(out / "fp32.onnx", fp32_bytes)
                _write(out / "int8.onnx", int8_bytes)
            model = OrtModel.from_bytes(int8_bytes, list(shape), cfg.quant.threads)
            spec = onnx_spec(list(shape), len(int8_bytes), source.spec, "int8", cfg.quant.threads)
            extra["int8"]["onnx_bytes"] = {"fp32": len(fp32_bytes), "int8": len(int8_bytes)}
        metrics = evaluate(model, ctx.data.cache, ctx.data.val_ids, cfg, desc="int8 validation")
        metrics["fp32_dice_mean"] = float(ctx.source_metrics["dice_mean"])  # this run, the same cases
        return Artifact(stage=STAGE, spec=spec, state_dict=model.state_dict(), config=to_dict(cfg), metrics=metrics,
                        lineage=source.child_lineage(), extra=extra)
    return finish


def _check(art: Artifact, cfg: Config) -> None:
    """The quant section, before any work: input size, calibration count, decision mode, and that
    quant.force names layers of this model's INT8 graph (built here on the CPU: a student takes well
    under a second)."""
    q = cfg.quant
    size = input_shape(cfg)[2:]
    if q.input:
        check_size("quant.input", list(q.input), total_stride(art.spec))
    if q.backend == "onnxruntime" and list(size) != list(cfg.train.window):
        raise ConfigError(f"quant.input={list(size)} differs from train.window={list(cfg.train.window)}: the ONNX "
                          "graph takes only quant.input, and the stage scores it with train.window; set both to "
                          f"one size (e.g. --set train.window=[{','.join(map(str, size))}])")
    if q.calib < 1:
        raise ConfigError(f"quant.calib must be >= 1, got {q.calib}")
    try:
        check_settings(q.decide, q.force)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if q.force:
        graph = prepare_float(as_qat_model(build_model(art)), reassoc=q.reassoc)
        layers = {name for name, m in graph.named_modules() if quantizable(m)}
        unknown = sorted(set(q.force) - layers)
        if unknown:
            raise ConfigError(f"quant.force names layers this model does not have: {unknown} (its Linear/Conv3d "
                              f"layers: {', '.join(sorted(layers)[:6])}, ...; quantize.py --verbose lists them all)")


def run_quantize(artifact_path: str | Path, cfg: Config, out: Path, backend: str = "torch",
                 resume: bool = False, data_given: bool = True, verbose: bool = False) -> Path:
    """The `quantize.py` command: writes <out>/int8.pt (and int8.onnx / fp32.onnx for onnxruntime) and
    prints a short summary; the per-layer decision table goes to the console only when `verbose`.

    resume: continue the QAT fine-tune from <out>/qat/last.pt (same layers, scales and schedule)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend / quant.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # the per-layer decisions time this backend's kernels (quantize_step reads quant.backend)
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, backend=backend))
    if resume and cfg.train.epochs < 1:
        raise ConfigError("--resume continues a QAT fine-tune: train.epochs must be >= 1")
    stage = StageDef(STAGE, step=partial(qat_step, verbose=verbose), finetune=qat_trainer, finish=to_int8(backend),
                     checkpoint_dir=QAT_DIR, check=_check)
    art = run_stage(artifact_path, stage, cfg, out, teacher=cfg.quant.teacher, resume=resume, data_given=data_given)
    for line in summary_lines(art, Path(artifact_path)):
        print(line)
    return art.path


def summary_lines(art: Artifact, source: Path) -> list[str]:
    """What quantize.py says at the end: layers INT8 vs FP32, Dice INT8 vs FP32 on the same cases,
    size, where the artifact and its per-layer decisions are."""
    info, m = art.extra["int8"], art.metrics
    rows = info["decisions"]
    n_int8 = len(info["int8_layers"])
    where = f"{info['backend']} backend" + (f", {info['engine']} engine" if info["backend"] == "torch" else "")
    size = _mb(art.path) + (f" (FP32 source {_mb(source)})" if source.is_file() else "")
    return [
        f"{STAGE}: {n_int8} of {len(rows)} layers INT8, {len(rows) - n_int8} FP32 ({where})",
        f"{STAGE}: dice_mean {m['dice_mean']:.4f} INT8 vs {m['fp32_dice_mean']:.4f} FP32, on the same "
        f"{info['val_cases']} validation case(s)",
        f"{STAGE}: wrote {Path(art.path).resolve()}, {size}; per-layer decisions in its extra['int8']['decisions'], in report.md "
        "(report.py), or on the console with --verbose",
    ]


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB" if Path(path).is_file() else "size unknown"


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
