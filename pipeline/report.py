"""One table for the whole pipeline: every stage's artifact scored and timed on the same cases.

Per artifact (teacher, student, lowrank, grown, int8, then any other stage): parameters, G
multiply-adds (fvcore convention), size on disk, Dice / HD95 / IoU on held-out cases by
sliding window over whole cases, CPU latency per window and per case, and ratios to the teacher.
With `train.skip_background` (the default) windows without a brain voxel are skipped when scoring
and timing (`brats.inference`: the same label maps); the whole-case time is then also measured with
every window run, interleaved, and the skipped windows are counted over the held-out cases.
Writes report.md, report.csv, report.json and PNG plots into one folder, all atomically.

Every artifact is timed in each runtime that can run it (`pipeline.runtimes`: PyTorch eager, ONNX
Runtime, OpenVINO; interleaved, one row per runtime in report.md) and scored in one of them:
`report.runtime` (auto: the fastest measured). `report.profile` adds, per stage, where the window's
time goes (`pipeline.profile`: top operators and modules by time, their multiply-adds and achieved
G multiply-adds/s against this CPU's fp32 GEMM peak, measured once per report).

`metrics="official"` or `"both"` adds the official BraTS metrics (the optional `brats-evaluation`
package, `brats.official`) per stage beside ours; ours stay in the main table (ratios, gaps and
plots use them). Two held-out cases are drawn (`case_figure`): the median and the worst by the
reference row's per-case mean Dice, one column per stage; only one axial slice per case and stage
is kept while scoring, so this costs no second prediction and little memory.

A missing or broken artifact becomes a row with its error; the rest of the table is still made.
"""
from __future__ import annotations

import copy
import dataclasses
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from brats import official
from brats.inference import WindowCount, predict_case
from brats.layout import MODALITIES
from brats.metrics import DICE_KEYS, REGIONS, summarize
from brats.overlay import axial_slice, case_figure
from brats.scoring import artifact_et_rule, case_counts, score_cases
from common.artifact import Artifact, ArtifactError, build_model
from common.atomic import atomic_write_text
from common.config import Config, ConfigError, DataConfig, check_values, from_dict
from common.progress import bar_off
from common.timing import interleaved_medians
from engine.data import make_data
from compress.grow import START as GROWTH_START
from engine.loop import LAST, LEGACY_SELECT, ended_rising
from engine.runtime import resolve_runtime, runtime_summary
from model.macs import count_macs
from model.refineformer3d import RefineFormer3D, count_params, preset_spec
from pipeline import plots
from pipeline.latency import runtime_note
from pipeline.predict import (FP32_KINDS, artifact_scheme, check_fixed_window, check_window,
                              fixed_window, fp32_model, inference_model, predict_fn)
from pipeline.profile import gemm_peak, profile_artifact
from pipeline.runtimes import CHOICES as RUNTIME_CHOICES, RUNTIMES, measure_runtimes, pick_runtime

STAGE_ORDER = ("teacher", "student", "slim", "lowrank", "grown", "int8")
ENGINE_FILES = ("best", "last")  # the engine's file names: the stage is the folder's name
MACS_CONVENTION = "fvcore, 1 multiply-add = 1; attention and trilinear upsampling included"
METRIC_KEYS = ("dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt", "hd95_tc", "hd95_et", "iou_mean")
RATIO_KEYS = {  # ratio key -> measured key, each row divided by the reference (teacher) row
    "params_ratio": "params",
    "gmacs_ratio": "gmacs",
    "size_ratio": "size_mb",
    "latency_ratio": "latency_ms_window",
    "latency_case_ratio": "latency_s_case",
}
PER_INPUT_KEYS = ("gmacs", "latency_ms_window")  # measured at the row's "input": a ratio only between equal inputs
RUNTIME_KEYS = {name: f"latency_ms_{name}" for name in RUNTIMES}  # runtime -> its ms / window column
ROW_KEYS = ("stage", "name", "artifact", "kind", "params", "gmacs", "size_mb", *METRIC_KEYS,
            "latency_ms_window", "runtime", *RUNTIME_KEYS.values(), "latency_s_case", *RATIO_KEYS, "cases",
            "et_missed_cases", "et_false_cases", "truth_et_cases", "dice_et_norule", "guard", "threads",
            "omp_wait_policy", "trained_as", "et_min_voxels", "windows", "windows_skipped", "latency_s_case_noskip",
            "input", "error")
OFFICIAL_N_KEYS = tuple(f"official_cases_{r}" for r in official.REGIONS)  # cases with an official number
OFFICIAL_ROW_KEYS = (*official.COLUMNS, *OFFICIAL_N_KEYS)
METRIC_CHOICES = ("legacy", "official", "both")
GAP_REGIONS = (*REGIONS, "mean")
HONEST_NOTE = (
    "On this CPU, INT8 alone does not make a 3D network fast: the stem and spatial-reduction "
    "convolutions, softmax and trilinear upsampling are as slow or slower in INT8, and the cost of "
    "the first stage is attention over many tokens, not the weights. Speed comes from width, rank, "
    "exact graph re-association, the runtime (e.g. ONNX Runtime), and INT8 only on the layers where "
    "it measures faster."
)


@dataclass
class Found:
    """One artifact file the report will show: loaded, or the error that stopped it."""

    path: Path
    stage: str
    artifact: Artifact | None = None
    error: str | None = None


@dataclass
class ReportResult:
    rows: list[dict]
    files: dict[str, Path] = field(default_factory=dict)  # "md" | "csv" | "json" | plot name -> path
    cases: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("error")]


# ----------------------------------------------------------------------------- discovery


def stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _load(path: Path, fallback_stage: str) -> Found:
    try:
        art = Artifact.load(path)
    except ArtifactError as e:
        return Found(path, fallback_stage, error=str(e))
    return Found(path, str(art.stage), artifact=art)


def _guess_stage(path: Path) -> str:
    return path.parent.name if path.stem in ENGINE_FILES else path.stem


def _scan(root: Path) -> list[Found]:
    """Artifacts under a runs folder, one row each: every `*.pt` but the resumable checkpoints
    (the engine's `last.pt`, a growth phase's `start.pt`). Each stage folder holds its one artifact
    (`<stage>.pt`, the teacher's `best.pt`) next to its checkpoints."""
    paths = sorted(p for p in root.rglob("*.pt")
                   if p.is_file() and p.name not in (LAST, GROWTH_START)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [_load(p, _guess_stage(p)) for p in paths]


def find_artifacts(sources: Sequence[str | Path]) -> list[Found]:
    """Artifacts named directly or found under folders, in pipeline order (then by path)."""
    found: list[Found] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found += _scan(source)
        elif not source.exists() and source.suffix != ".pt":
            raise ArtifactError(f"{source}: no such runs folder or artifact file")
        else:
            found.append(_load(source, _guess_stage(source)))
    unique = {f.path.resolve(): f for f in found}
    return sorted(unique.values(), key=lambda f: (stage_rank(f.stage), str(f.path)))


# ----------------------------------------------------------------------------- data


def held_out_cases(cfg: Config, data: DataConfig | None, max_cases: int | None,
                   reference: Artifact | None = None):
    """(cache, case ids): the validation split of the data's cache, the same for every row.

    `data` None: the data section stored in the reference (teacher) artifact, so the report scores
    the split the pipeline held out; `cfg.data` when the artifact has none.
    """

    run_cfg = copy.deepcopy(cfg)
    if data is not None:
        run_cfg.data = copy.deepcopy(data)
    elif reference is not None and reference.config.get("data"):
        try:
            run_cfg.data = from_dict({"data": reference.config["data"]}).data
        except ConfigError:
            pass  # an artifact from an older schema: fall back to cfg.data
    train_data = make_data(run_cfg)
    cases = sorted(c for c in train_data.val_ids if train_data.cache.meta(c).has_label)
    if max_cases is not None:
        cases = cases[:max_cases]
    if not cases:
        raise ConfigError("no labelled held-out case to score the artifacts on")
    return train_data.cache, cases, run_cfg.data


# ----------------------------------------------------------------------------- measuring


def profile_arch(arch: str, width: float = 1.0, input_size: Sequence[int] = (128, 128, 128)) -> dict:
    """Parameters and G multiply-adds of a preset architecture, without weights."""

    model = RefineFormer3D(preset_spec(arch, width))
    shape = (1, model.spec.in_chans, *[int(s) for s in input_size])
    return {
        "arch": arch,
        "width": float(width),
        "input": [int(s) for s in input_size],
        "params": count_params(model),
        "gmacs": count_macs(model, shape),
        "gmacs_no_upsample": count_macs(model, shape, upsample=False),
        "convention": MACS_CONVENTION,
    }


def _empty_row(found: Found) -> dict:
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(stage=found.stage, artifact=str(found.path), error=found.error)
    if found.artifact is not None:
        row["kind"] = found.artifact.spec.get("kind", "fp32")
        row["trained_as"] = runtime_summary(found.artifact.extra.get("runtime"))
        row["guard"] = guard_summary(found.artifact.extra.get("guard"))
    return row


def guard_summary(info: Any) -> str | None:
    """The guard rail's verdict recorded by a compression stage (`engine.runner.guard`), for the report:
    "ok" or its violations ("TC -0.157 vs teacher"); None for an artifact made without one (a teacher)."""
    if not isinstance(info, dict) or not isinstance(info.get("drops"), dict):
        return None
    bad = [f"{r.upper()} {-float(info['drops'][r]):+.3f}" for r in info.get("violations") or [] if r in info["drops"]]
    limit = info.get("limit")
    return (f"{', '.join(bad)} vs {info.get('source')} (limit {limit})" if bad else "ok") + \
        (" strict" if bad and info.get("strict") else "")


def evaluate_artifact(found: Found, cfg: Config, cache, cases: list[str], default_scheme: str,
                      progress: bool = True, **options) -> dict:
    """One table row: size, compute, accuracy on `cases`, latency. Raises on any failure."""
    return score_artifact(found, cfg, cache, cases, default_scheme, progress, **options)[0]


def score_artifact(found: Found, cfg: Config, cache, cases: list[str], default_scheme: str,
                   progress: bool = True, *, metrics: str = "legacy", on_case=None,
                   peak: dict | None = None) -> tuple[dict, list[dict]]:
    """(table row, per-case score rows) of one artifact; see `evaluate_artifact`.

    `metrics` official / both: each case also goes to the official package (the cache's spacing);
    the row gets the means of its columns over the cases where it gives a number. `on_case` sees
    every case as `brats.scoring.score_cases` passes it. Every runtime that can run the artifact is
    timed per window (row[RUNTIME_KEYS[...]], row["runtime_notes"] for the others); the row's window
    latency, scores and case times are `report.runtime`'s (auto: the fastest). With `peak`
    (`gemm_peak`), row["profile"] is where the window's time goes in PyTorch (`profile_artifact`).
    """

    art, rep = found.artifact, cfg.report
    assert art is not None
    row = _empty_row(found)
    row["size_mb"] = found.path.stat().st_size / 1e6
    window = check_window(rep.window or cfg.train.window, art.spec, "report window")
    overlap = cfg.train.overlap if rep.overlap is None else rep.overlap
    et_min = et_min_voxels(cfg, art)
    row["et_min_voxels"] = et_min
    # An ONNX graph takes only the shape it was exported for: its G MACs and window latency are measured
    # there (row["input"]; no ratio against a row measured at another size, `add_ratios`)
    size = fixed_window(art) or check_window(rep.input, art.spec, "report.input")
    row["input"] = list(size)
    scheme = artifact_scheme(art, default_scheme)

    model = build_model(art)
    # INT8 / ONNX: parameters = weights of the float model they quantise, MACs counted on it too
    counted = model if row["kind"] in FP32_KINDS else fp32_model(art)
    row["params"] = count_params(counted)
    row["gmacs"] = count_macs(counted, (1, 4, *size))
    del counted
    model = inference_model(art, model)  # FP32: timed and scored as served (model.rewrites); INT8 has it built in

    models, ms, notes = measure_runtimes(art, model, size, rep.latency_runs, rep.warmup_runs)
    runtime, why = pick_runtime(ms, rep.runtime, notes)
    row["runtime"], row["latency_ms_window"] = runtime, ms[runtime]
    row.update({key: ms.get(name) for name, key in RUNTIME_KEYS.items()})
    row["runtime_notes"] = {**notes, **({runtime: why} if why else {})}
    row["runtime_asked"] = None if rep.runtime in ("auto", runtime) else rep.runtime  # shown next to the one used
    if peak is not None:
        row["profile"] = profile_artifact(art, model, (1, 4, *size), peak["gmacs_per_s"], rep.profile_top)
    model = models[runtime]

    predict = predict_fn(model)
    scoring = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scheme=scheme), train=dataclasses.replace(
        cfg.train, window=list(window), overlap=overlap, sw_batch=rep.sw_batch, et_min_voxels=et_min))
    first: list[torch.Tensor] = []
    raw_official: list[dict] = []

    def seen(case: str, image: torch.Tensor, truth: np.ndarray, pred: np.ndarray) -> None:
        if not first:
            first.append(image)
        if metrics != "legacy":
            raw_official.append(official.evaluate_official(case, pred, truth, cache.meta(case).spacing))
        if on_case is not None:
            on_case(case, image, truth, pred)

    count = WindowCount()
    scores = score_cases(predict, cache, cases, scoring, desc=f"  {found.stage} cases" if progress else None,
                         on_case=seen, count=count)
    row["windows"], row["windows_skipped"] = count.windows, count.skipped
    first_image = first[0] if first else None
    if raw_official:
        by_case = {r["case"]: r for r in official.parse_official(raw_official)}
        for score in scores:
            score.update({k: v for k, v in by_case[score["case"]].items() if k != "case"})
    with np.errstate(invalid="ignore"):  # an inf official lesion-wise HD95 has no std
        summary = summarize(scores)
    for key in METRIC_KEYS:
        row[key] = summary[key]["mean"]
    if raw_official:
        for key in official.COLUMNS:
            row[key] = summary[key]["mean"] if key in summary else None
        for region, key in zip(official.REGIONS, OFFICIAL_N_KEYS):
            row[key] = summary.get(f"global_dsc_{region}", {"n": 0})["n"]
    row["cases"] = len(scores)
    row.update({k: int(v) for k, v in case_counts(scores, ("et_missed", "et_false", "truth_et")).items()})
    row["dice_et_norule"] = float(np.mean([r["dice_et_norule"] for r in scores])) if scores else None

    if rep.case_latency and first_image is not None:
        def run(skip: bool):
            return lambda: predict_case(predict, first_image, scheme, window, overlap, rep.sw_batch, et_min,
                                        skip_background=skip)

        skip = scoring.train.skip_background
        ways = {"skip": run(True), "all": run(False)} if skip else {"all": run(False)}
        times = interleaved_medians(ways, rep.latency_runs, warmup=0)
        row["latency_s_case"] = times["skip" if skip else "all"]
        row["latency_s_case_noskip"] = times["all"] if skip else None
    return row, scores


def name_rows(rows: list[dict]) -> None:
    """Each row's `name` in the tables and plots: its stage, followed by its artifact's path relative to
    the shared folder where several rows have that stage (two chains in one runs folder)."""
    paths = {r["artifact"]: Path(r["artifact"]).resolve() for r in rows}
    groups: dict[str, list[Path]] = {}
    for r in rows:
        groups.setdefault(r["stage"], []).append(paths[r["artifact"]])
    for r in rows:
        group = groups[r["stage"]]
        root = Path(os.path.commonpath(group))
        r["name"] = f"{r['stage']} ({paths[r['artifact']].relative_to(root)})" if len(group) > 1 else r["stage"]


def add_ratios(rows: list[dict], reference: dict | None) -> None:
    """Each row's params/gmacs/size/latency divided by the reference row's (None when unknown, and for
    G MACs and window latency when the two rows were measured at different inputs: `fixed_window`)."""
    for row in rows:
        for ratio, key in RATIO_KEYS.items():
            a, b = row.get(key), None if reference is None else reference.get(key)
            if key in PER_INPUT_KEYS and reference is not None and row.get("input") != reference.get("input"):
                b = None
            row[ratio] = float(a) / float(b) if _num(a) and _num(b) and b != 0 else None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pick_reference(found: list[Found]) -> Found | None:
    """The row the ratios and gaps are measured against: the teacher that the other artifacts descend
    from (most often named in their lineages), else the first teacher, else the first artifact."""
    teachers = [f for f in found if f.stage == "teacher"]
    if len(teachers) > 1:
        named = [str(Path(e["path"]).resolve()) for f in found if f.stage != "teacher"
                 for e in f.artifact.lineage if e.get("stage") == "teacher" and e.get("path")]
        return max(teachers, key=lambda t: named.count(str(t.path.resolve())))  # ties: the first
    return teachers[0] if teachers else (found[0] if found else None)


def make_report(sources: Sequence[str | Path], cfg: Config, out_dir: str | Path, *,
                data: DataConfig | None = None, progress: bool = True, metrics: str = "legacy") -> ReportResult:
    """Find, score and time every artifact; write report.md/.csv/.json and plots into `out_dir`.

    `data` None: score the validation split of the data the teacher artifact was trained on
    (its stored config), falling back to `cfg.data`. `metrics`: "legacy" (ours only), "official"
    or "both" (ours, and the official package's beside them; `OfficialMetricsError` before any
    scoring when the package is missing).
    """
    if metrics not in METRIC_CHOICES:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_CHOICES)}, got {metrics!r}")
    if metrics != "legacy":
        official.require()
    if cfg.report.runtime not in RUNTIME_CHOICES:
        raise ConfigError(f"report.runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {cfg.report.runtime!r}")
    check_values(cfg)  # the ranges every command's config is held to (a Config built in code comes here unchecked)
    if cfg.report.et_min_voxels is not None and cfg.report.et_min_voxels < 0:
        raise ConfigError(f"report.et_min_voxels must be >= 0 (0: off) or null (each artifact's own rule), "
                          f"got {cfg.report.et_min_voxels}")
    found = find_artifacts(sources)
    if not found:
        states = sorted(str(p) for source in map(Path, sources) if source.is_dir()
                        for name in (LAST, GROWTH_START) for p in source.rglob(name))
        shown = ", ".join(states[:3]) + (f" (+{len(states) - 3} more)" if len(states) > 3 else "")
        why = (f" (only training states, which are not artifacts: {shown}; finish the run, "
               "or --resume it, to get its artifact)" if states else "")
        raise ArtifactError(f"no artifact (*.pt) found in {', '.join(map(str, sources))}{why}")
    good = [f for f in found if f.artifact is not None]
    if not good:  # nothing to score: say why before anything is written (an existing report stays as it is)
        raise ArtifactError("no usable artifact: " + "; ".join(f.error or str(f.path) for f in found))
    # sizes every artifact can take, before any work (the whole report: every row is scored with one window)
    onnx_windows = {f.path: w for f in good if (w := fixed_window(f.artifact)) is not None}
    if len(set(onnx_windows.values())) > 1:
        raise ConfigError("ONNX graphs exported for different window sizes cannot share one report window ("
                          + ", ".join(f"{p}: {_shape(w)}" for p, w in onnx_windows.items())
                          + "); report them separately")
    for f in good:
        try:
            window = check_window(rep_window(cfg), f.artifact.spec, "report window")
            check_window(cfg.report.input, f.artifact.spec, "report.input")
        except ValueError as e:
            raise ConfigError(f"{f.path}: {e}") from None
        try:
            check_fixed_window(f.artifact, window, f.path, "a report window (report.window, else train.window)",
                               "--set report.window=[{}] to score every artifact with its window", ",")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    reference = pick_reference(good)

    cache, cases, data_used = None, [], data or cfg.data
    if good:
        cache, cases, data_used = held_out_cases(
            cfg, data, cfg.report.max_cases, reference.artifact if reference else None
        )
        if progress:
            origin = "as named" if data is not None else f"the data {reference.path} was trained on"
            print(f"report: data: {data_used.dir or 'built-in synthetic cases'} ({origin}); "
                  f"{len(cases)} held-out case(s); reference row {reference.path}", file=sys.stderr)
    rt = resolve_runtime("cpu", "off", cfg.train.threads)  # latency and Dice: fp32 on this CPU
    if progress:
        print(rt.line("report", training=False), file=sys.stderr)
    note = {**runtime_note(), "resolved": rt.to_dict()}
    peak = gemm_peak() if cfg.report.profile else None
    if peak is not None and progress:
        print(f"report: fp32 GEMM peak {peak['gmacs_per_s']:.1f} G multiply-adds/s ({peak['n']}x{peak['n']} "
              f"torch.mm, median of {peak['runs']}, {peak['threads']} thread(s))", file=sys.stderr)
    rows, per_case, slices = [], {}, {}
    for i, f in enumerate(tqdm(found, desc="report", unit="artifact", disable=bar_off(progress), file=sys.stderr), 1):
        started = time.time()
        if f.artifact is None:
            rows.append(_empty_row(f))
            if progress:
                tqdm.write(f"report: [{i}/{len(found)}] {f.error}", file=sys.stderr)  # the error names the file
            continue
        try:
            row, scores = score_artifact(f, cfg, cache, cases, data_used.scheme, progress, metrics=metrics,
                                         on_case=slice_keeper(slices, str(f.path)) if cfg.report.plots else None,
                                         peak=peak)
            per_case[str(f.path)] = {s["case"]: s for s in scores}
        except Exception as e:  # one bad artifact must not cost the others their row
            row = _empty_row(f)
            row["error"] = f"{f.path}: {type(e).__name__}: {e}"
        row["threads"], row["omp_wait_policy"] = note["threads"], note["omp_wait_policy"]
        rows.append(row)
        if progress:  # a line per artifact: a redirected log has no bar
            done = (row["error"] if row["error"] else  # the error names the file
                    f"{f.stage} {f.path}: Dice mean {_fmt(row['dice_mean'], '.3f')} on {row['cases']} case(s), "
                    f"{_fmt(row['latency_ms_window'], '.1f')} ms per window ({row['runtime']})")
            tqdm.write(f"report: [{i}/{len(found)}] {done}, {time.time() - started:.0f} s", file=sys.stderr)
    ref_row = next((r for r in rows if reference and r["artifact"] == str(reference.path) and not r["error"]), None)
    add_ratios(rows, ref_row)
    name_rows(rows)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ReportResult(rows, cases=cases)
    if cfg.report.plots:
        result.files["dice_vs_params"] = plots.dice_vs_params(rows, out_dir / "dice_vs_params.png")
        size = "x".join(map(str, cfg.report.input))
        latency_label = f"CPU latency per {size} window (ms, {note['threads']} thread(s))"
        at_input = [r for r in rows if r.get("input") in (None, list(cfg.report.input))]  # one window size per axis
        result.files["dice_vs_latency"] = plots.dice_vs_latency(at_input, out_dir / "dice_vs_latency.png",
                                                                label=latency_label)
        result.files["dice_vs_latency_regions"] = plots.dice_vs_latency_regions(
            at_input, out_dir / "dice_vs_latency_regions.png", label=latency_label)
    figures = []
    if cfg.report.plots and ref_row is not None:
        figures = write_case_figures(out_dir, rows, ref_row, per_case, slices)
        result.files.update({f"case_{fig['role']}": fig["path"] for fig in figures})
    meta = {
        "cases": cases,
        "data": data_used,
        "cache": str(cache.root) if cache is not None else None,
        "window": rep_window(cfg),
        "overlap": cfg.train.overlap if cfg.report.overlap is None else cfg.report.overlap,
        "et_min_voxels": None if cfg.report.et_min_voxels is None else int(cfg.report.et_min_voxels),
        "input": list(cfg.report.input),
        "runtime": note,
        "reference": ref_row,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "metrics": metrics,
        "official": official.versions() if metrics != "legacy" else None,
        "case_figures": figures,
        "gemm_peak": peak,
    }
    keys = ROW_KEYS + (OFFICIAL_ROW_KEYS if metrics != "legacy" else ())
    result.files["json"] = atomic_write_text(out_dir / "report.json", json.dumps(_json_rows(rows), indent=1) + "\n")
    result.files["csv"] = atomic_write_text(out_dir / "report.csv", rows_to_csv(rows, keys))
    result.files["md"] = atomic_write_text(
        out_dir / "report.md", render_markdown(rows, found, meta, cfg, [p.name for k, p in result.files.items()
                                                                    if k.startswith("dice_vs")])
    )
    return result


# ----------------------------------------------------------------------------- case figures


@dataclass
class CaseSlices:
    """One axial slice (through the truth's tumour) of a held-out case, and every artifact's on it."""

    z: int
    flair: np.ndarray  # (X, Y) of the cached (cropped, normalised) image
    t1ce: np.ndarray
    truth: np.ndarray  # (X, Y) BraTS labels
    preds: dict[str, np.ndarray] = field(default_factory=dict)  # artifact path -> (X, Y) labels


def slice_keeper(slices: dict[str, CaseSlices], key: str):
    """An `on_case` for `score_cases` that keeps in `slices` one axial slice per case (the first
    artifact's call picks it from the truth) and the prediction `key` makes on it: a few kB per
    case and artifact, whichever cases are drawn in the end."""
    flair, t1ce = MODALITIES.index("flair"), MODALITIES.index("t1ce")

    def keep(case: str, image, truth: np.ndarray, pred: np.ndarray) -> None:
        kept = slices.get(case)
        if kept is None:
            z = axial_slice(truth)
            plane = torch.as_tensor(image[..., z]).float().numpy()  # (4, X, Y)
            kept = slices[case] = CaseSlices(z, plane[flair].copy(), plane[t1ce].copy(), np.array(truth[:, :, z]))
        kept.preds[key] = np.array(pred[:, :, kept.z])

    return keep


def choose_cases(scores: list[dict], key: str = "dice_mean") -> dict[str, str]:
    """{"median": case, "worst": case} by per-case `key` (ties: by case name; an even count: the
    upper median); {} without scores. One case is both."""
    ranked = sorted((r for r in scores if _num(r.get(key))), key=lambda r: (r[key], r["case"]))
    if not ranked:
        return {}
    return {"median": ranked[len(ranked) // 2]["case"], "worst": ranked[0]["case"]}


def _panel_title(row: dict, score: dict | None) -> str:
    name = row["name"]
    if not score:
        return name
    return name + "\n" + " ".join(f"{r.upper()} {score[f'dice_{r}']:.2f}" for r in ("wt", "tc", "et"))


def write_case_figures(out_dir: Path, rows: list[dict], ref_row: dict, per_case: dict[str, dict],
                       slices: dict[str, CaseSlices]) -> list[dict]:
    """case_median.png and case_worst.png (one file when they are the same case), chosen by the
    reference row's per-case mean Dice; one column per scored artifact. Returns what the Markdown
    needs: [{"role", "case", "dice_mean", "z", "path"}]."""
    reference = per_case.get(ref_row["artifact"], {})
    chosen = choose_cases(list(reference.values()))
    figures: list[dict] = []
    for role, case in chosen.items():
        if case not in slices:
            continue
        same = next((f for f in figures if f["case"] == case), None)
        if same is not None:
            same["role"] = f"{same['role']}_and_{role}"
            continue
        kept = slices[case]
        panels = [(_panel_title(r, per_case.get(r["artifact"], {}).get(case)),
                   kept.preds[r["artifact"]]) for r in rows if not r.get("error") and r["artifact"] in kept.preds]
        figures.append({"role": role, "case": case, "dice_mean": reference[case]["dice_mean"], "z": kept.z,
                        "panels": panels})
    for fig in figures:
        fig["path"] = out_dir / f"case_{fig['role']}.png"
        kept = slices[fig["case"]]
        title = (f"{fig['case']}: {fig['role'].replace('_', ' ')} held-out case by the {ref_row['name']}'s "
                 f"mean Dice ({fig['dice_mean']:.3f}); axial slice {kept.z} of the cropped grid")
        case_figure(fig["path"], kept.flair, kept.t1ce, fig.pop("panels"), truth=kept.truth, title=title)
    return figures


def rep_window(cfg: Config) -> list[int]:
    return list(cfg.report.window or cfg.train.window)


def et_min_voxels(cfg: Config, art: Artifact | None = None) -> int:
    """ET post-processing threshold for an artifact's row: report.et_min_voxels when set, else the
    threshold calibrated for the artifact on its validation cases (extra["et_rule"]), else the
    training one (train.et_min_voxels)."""
    if cfg.report.et_min_voxels is not None:
        return int(cfg.report.et_min_voxels)
    if art is not None and art.extra.get("et_rule"):
        return artifact_et_rule(art)
    return int(cfg.train.et_min_voxels)


# ----------------------------------------------------------------------------- output


def _json_rows(rows: list[dict]) -> list[dict]:
    """NaN/inf are not JSON: they become null."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]


def rows_to_csv(rows: list[dict], keys: Sequence[str] = ROW_KEYS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)  # a stage's extra may hold anything
    return format(v, spec)


def _ratio(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}x"


def markdown_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    return "\n".join(out)


def dict_table(items: Any) -> str:
    """Markdown table of a list of dicts (or a {name: dict/value} mapping); union of keys as columns."""
    if isinstance(items, dict):
        items = [{"layer": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in items.items()]
    items = [i if isinstance(i, dict) else {"value": i} for i in items]
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return markdown_table(keys, ([cell(i.get(k, "")) for k in keys] for i in items))


def _shape(v: Any) -> str:
    return "x".join(str(s) for s in v) if isinstance(v, (list, tuple)) else ("–" if v is None else str(v))


def _count(v: Any) -> str:
    return f"{v:,}" if _num(v) else "–"


def _lowrank_rule(info: dict) -> str:
    mode = info.get("mode")
    if mode == "energy" and _num(info.get("energy")):
        rule = f"keep {info['energy']:.0%} of each layer's spectral energy"
    elif mode == "ratio" and _num(info.get("ratio")):
        rule = f"rank = {info['ratio']:g} x full rank"
    elif mode == "params" and info.get("params") is not None:
        rule = f"parameter budget {_count(info['params']) if _num(info['params']) else info['params']}"
    elif mode == "auto" and _num(info.get("tolerance")):
        skipped = [v for v in info.get("unreachable") or [] if _num(v)]
        shares = ", ".join(f"{100 * v:g}%" for v in info.get("shares") or [] if _num(v) and v not in skipped)
        kept = next((r for r in info.get("search") or [] if isinstance(r, dict) and r.get("share") == info.get("params_share")), {})
        cases = (f" on the stage's {info['cases']} validation cases (ET rule off)" if _num(info.get("cases"))
                 else "")
        if not _num(info.get("params_share")):
            rule = (f"parameter budget chosen on validation: no share of {shares or 'those tried'} kept every region's "
                    f"Dice within {info['tolerance']:.3f} of the source's{cases}, so the model was left unfactorised")
        elif kept.get("within", True):
            rule = (f"parameter budget chosen on validation: {100 * info['params_share']:g}% of the model "
                    f"({_count(info.get('params'))}), the smallest of {shares or 'the shares tried'} whose factorised "
                    f"model kept every region's Dice within {info['tolerance']:.3f} of the source's{cases}, before "
                    "fine-tune")
        else:
            rule = (f"parameter budget chosen on validation: no share of {shares or 'those tried'} kept every region's "
                    f"Dice within {info['tolerance']:.3f} of the source's{cases}; {100 * info['params_share']:g}% "
                    f"({_count(info.get('params'))}) dropped least")
        if skipped:
            rule += f" ({', '.join(f'{100 * v:g}%' for v in skipped)} below what factorisation can reach: not tried)"
    else:
        rule = f"mode {mode}"
    saving = info.get("min_saving")
    if _num(saving):
        rule += f"; a layer is factorised only when it saves more than {saving:.0%} of its parameters"
    return rule


def lowrank_section(info: Any) -> list[str]:
    """extra["lowrank"]: the rule and its outcome in two lines, then one row per candidate layer."""
    if isinstance(info, list):  # a bare per-layer table
        info = {"table": info}
    if not isinstance(info, dict):
        return [dict_table(info)]
    table = [r for r in info.get("table") or [] if isinstance(r, dict)]
    outcome = []
    before, after = info.get("params_before"), info.get("params_after")
    if _num(before) and _num(after):
        change = f" ({(after - before) / before:+.1%})" if before else ""
        outcome.append(f"parameters {_count(before)} -> {_count(after)}{change}")
    if table:
        done = sum(1 for r in table if r.get("factorised", r.get("rank") is not None))
        outcome.append(f"{done} of {len(table)} candidate layers factorised")
    if _num(info.get("dice_mean_before_finetune")):
        outcome.append(f"Dice mean before fine-tune {info['dice_mean_before_finetune']:.3f}")
    if info.get("teacher"):
        outcome.append(f"fine-tune teacher `{info['teacher']}`")
    text = [f"Rule: {_lowrank_rule(info)}."] if "mode" in info else []
    if outcome:
        sentence = "; ".join(outcome)
        text.append(sentence[0].upper() + sentence[1:] + ".")
    if table:
        text.append("Rank – : the layer stays unfactorised.")
    lines = [" ".join(text)] if text else []
    search = [r for r in info.get("search") or [] if isinstance(r, dict) and isinstance(r.get("metrics"), dict)]
    if search:
        ref = info.get("reference") if isinstance(info.get("reference"), dict) else None
        source = [["source", _count(info.get("params_before")), *(_fmt(ref.get(k), ".3f") for k in DICE_KEYS),
                   "–", "–", ""]] if ref else []
        lines += ["", markdown_table(
            ["share tried", "params after", "Dice WT", "Dice TC", "Dice ET", "largest region drop", "within", "kept"],
            source + [[f"{100 * r['share']:g}%" if _num(r.get("share")) else "–", _count(r.get("params_after")),
                       *(_fmt(r["metrics"].get(k), ".3f") for k in DICE_KEYS),
                       _fmt(round(r["drop"], 3) + 0.0 if _num(r.get("drop")) else None, "+.3f"),
                       "yes" if r.get("within") else "no",
                       "yes" if _num(r.get("share")) and r.get("share") == info.get("params_share") else ""]
                      for r in search],
        )]
    if table:
        lines += ["", markdown_table(
            ["layer", "kind", "shape", "rank", "full rank", "energy kept", "params before", "params after"],
            ([r.get("layer", "–"), r.get("kind", "–"), _shape(r.get("shape")),
              "–" if r.get("rank") is None else str(r["rank"]), _count(r.get("full_rank")),
              _fmt(r.get("energy_kept"), ".3f"), _count(r.get("params_before")), _count(r.get("params_after"))]
             for r in table),
        )]
    return lines


def _grown_units(grown: Any) -> str:
    if not isinstance(grown, list) or not grown:
        return "–"
    return ", ".join(f"{g.get('unit')} {g.get('old')}->{g.get('new')}" if isinstance(g, dict) else str(g)
                     for g in grown)


def growth_section(events: Any) -> list[str]:
    """extra["growth"]: one row per phase (a fit that ended when Dice stopped rising) with its decision
    (grow or stop), its best Dice and the units grown after it."""
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return [dict_table(events)]

    def params(e: dict) -> str:
        after = e.get("params_after")
        return _count(e.get("params")) + (f" -> {_count(after)}" if _num(after) else "")

    marked = any("kept" in e for e in events)  # recorded since growth asks a grown phase for grow.min_delta
    return [markdown_table(
        ["phase", "last epoch", "action", "reason", "best validation Dice (train.select)", "params",
         "units grown (old->new)"] + (["kept"] if marked else []),
        # the event's "epoch" is 0-based (`compress.grow`); the logs count epochs from 1, as here
        ([str(e.get("event", i)), str(e["epoch"] + 1) if isinstance(e.get("epoch"), int) else "–",
          str(e.get("action", "–")), str(e.get("reason", "–")),
          f"{_fmt(e.get('dice'), '.4f')} ({e.get('select', LEGACY_SELECT)})", params(e), _grown_units(e.get("grown"))]
         + (["yes" if e.get("kept") else ""] if marked else [])
         for i, e in enumerate(events)),
    )]


def int8_section(info: Any) -> list[str]:
    """extra["int8"]: how layers were timed, then per layer FP32 vs INT8 time and the choice made."""
    if not isinstance(info, dict):
        return [dict_table(info)]
    decisions = [d for d in info.get("decisions") or [] if isinstance(d, dict)]
    chosen = info.get("int8_layers")
    n_int8 = len(chosen) if isinstance(chosen, list) else sum(d.get("choice") == "int8" for d in decisions)
    setup = [f"backend {info['backend']}" if info.get("backend") else "",
             f"engine {info['engine']}" if info.get("engine") and info.get("backend") != "onnxruntime" else "",
             f"layers timed in a {_shape(info['input_shape'])} forward pass" if info.get("input_shape") else "",
             f"{info['cpu_threads']} thread(s)" if info.get("cpu_threads") else "",
             f"activations 0..{info['act_qmax']}" if info.get("act_qmax") is not None else ""]
    summary = f"{n_int8} of {len(decisions)} layers run in INT8" if decisions else f"{n_int8} layers run in INT8"
    setup_text = ", ".join(s for s in setup if s)
    lines = [f"{summary}{' (' + setup_text + ')' if setup_text else ''}."]
    timed = [d for d in decisions if _num(d.get("fp32_ms")) and _num(d.get("int8_ms"))]
    if timed:
        fp32 = sum(d["fp32_ms"] for d in timed)
        mixed = sum(d["int8_ms"] if d.get("choice") == "int8" else d["fp32_ms"] for d in timed)
        lines[0] += f" Sum of per-layer times: {fp32:.1f} ms all FP32, {mixed:.1f} ms as chosen."
    qat = info.get("qat_metrics")
    if isinstance(qat, dict) and _num(qat.get("dice_mean")):
        lines[0] += f" Dice mean after quantisation-aware fine-tune: {qat['dice_mean']:.3f}."
    if decisions:
        def speedup(d: dict) -> str:
            a, b = d.get("fp32_ms"), d.get("int8_ms")
            return f"{a / b:.2f}x" if _num(a) and _num(b) and b > 0 else "–"

        def choice(d: dict) -> str:
            why = d.get("why")
            return str(d.get("choice", "–")) + (f" ({why})" if why and why != "measured" else "")

        lines += ["", markdown_table(
            ["layer", "type", "input shape", "FP32 ms", "INT8 ms", "INT8 speed-up", "choice"],
            ([d.get("layer", "–"), str(d.get("type", d.get("kind", "–"))), _shape(d.get("shape")),
              _fmt(d.get("fp32_ms"), ".3f"), _fmt(d.get("int8_ms"), ".3f"), speedup(d), choice(d)]
             for d in decisions),
        )]
    return lines


# extra key -> (section title, renderer returning Markdown lines)
EXTRA_SECTIONS = {
    "lowrank": ("low-rank layers", lowrank_section),
    "growth": ("growth history", growth_section),
    "int8": ("INT8 decisions", int8_section),
}


def _et_rule(min_voxels: int | None) -> str:
    if min_voxels is None:
        return ("the BraTS ET rule per artifact (column \"ET rule\": a predicted ET of fewer voxels in a case is "
                "relabelled NCR/NET; calibrated on the validation cases, so slightly optimistic there)")
    if min_voxels > 0:
        return f"a predicted ET of fewer than {min_voxels} voxels in a case is relabelled NCR/NET"
    return "no ET post-processing"


def _gap(ref: dict | None, row: dict, region: str) -> str:
    a, b = (ref or {}).get(f"dice_{region}"), row.get(f"dice_{region}")
    return f"{a - b:+.3f}" if _num(a) and _num(b) else "-"


def _cpu(note: dict) -> str:
    r = note.get("resolved") or {}
    return f"{r.get('cpu', '?')} [{r.get('cpu_kind', '?')}, ATen {r.get('capability', '?')}]"


def render_markdown(rows: list[dict], found: list[Found], meta: dict, cfg: Config, plot_files: list[str]) -> str:
    rt, data = meta["runtime"], meta["data"]
    size = "x".join(map(str, meta["input"]))
    src = data.dir or f"synthetic cases (data.synthetic_cases={data.synthetic_cases})"
    ref = meta["reference"]
    lines = [
        "# RefineFormer3D pipeline report",
        "",
        f"Created {meta['created']}. Held-out cases: {len(meta['cases'])} from the validation split of "
        f"{src} (cache {meta['cache']}): {', '.join(meta['cases']) or 'none'}.",
        f"Whole-case sliding window {'x'.join(map(str, meta['window']))}, overlap {meta['overlap']}, "
        f"Gaussian weighting; {_et_rule(meta.get('et_min_voxels'))}; metrics on the cropped brain grid, "
        "averaged over cases (empty-region "
        "conventions of brats.metrics: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.13 mm; "
        "HD95 as medpy, in mm)." + (" The official BraTS metrics are in their own section below."
                                    if meta.get("official") else ""),
        *few_cases_note(len(meta["cases"])),
        f"G MACs at 1x4x{size} ({MACS_CONVENTION}); INT8/ONNX rows are counted on their float base "
        "model, and their parameters are the count of weights.",
        f"CPU latency: median of {cfg.report.latency_runs} runs after {cfg.report.warmup_runs} warm-up, "
        f"per {size} window (batch 1) and per whole case (sliding window over the first held-out case, "
        f"preprocessed, no file I/O); {rt['threads']} thread(s) (torch.get_num_threads()), "
        f"OMP_WAIT_POLICY={rt['omp_wait_policy']}, torch {rt['torch']}, CPU {_cpu(rt)}. Timings on a shared "
        "machine are noisy: compare ratios. \"trained as\": the training precision / threads / CPU kind each "
        "stage resolved (engine.runtime); every Dice here is measured in fp32.",
        "",
        "## Results",
        "",
        markdown_table(
            ["stage", "params", "G MACs", "size MB", "Dice WT", "Dice TC", "Dice ET", "Dice mean",
             "HD95 WT", "HD95 TC", "HD95 ET", "IoU mean", f"ms / {size}", "runtime", "s / case", "trained as"],
            ([r["name"], _fmt(r["params"], ","), _at(r, _fmt(r["gmacs"], ".2f"), meta), _fmt(r["size_mb"], ".2f"),
              *[_fmt(r[k], ".3f") for k in ("dice_wt", "dice_tc", "dice_et", "dice_mean")],
              *[_fmt(r[k], ".2f") for k in ("hd95_wt", "hd95_tc", "hd95_et")], _fmt(r["iou_mean"], ".3f"),
              _at(r, _fmt(r["latency_ms_window"], ".1f"), meta),
              (r.get("runtime") or "–") + (f" ({r['runtime_asked']} cannot run it)" if r.get("runtime_asked") else ""),
              _fmt(r["latency_s_case"], ".2f"),
              r.get("trained_as") or "-"]
             for r in rows),
        ),
        "",
        *([f"\"(at DxHxW)\": an ONNX graph takes only the input it was exported for, so its G MACs and window "
           f"latency are measured there, not at {size}: no ratio against the other rows, and not in the latency "
           "plots.", ""] if any(r.get("input") not in (None, list(meta["input"])) for r in rows) else []),
        f"Reference row for ratios: {ref['stage'] + ' (' + ref['artifact'] + ')' if ref else 'none (no usable artifact)'}.",
        "",
        markdown_table(
            ["stage", "artifact", "params", "G MACs", "size", "latency / window", "latency / case"],
            ([r["name"], f"`{r['artifact']}`", *[_ratio(r[k]) for k in RATIO_KEYS]] for r in rows),
        ),
        "",
        "Dice gap to the reference row per region (reference minus stage, same cases; positive: lost); the "
        "held-out cases whose truth has ET but whose prediction has none, and those with ET predicted where the "
        "truth has none (a mean over cases hides both); ET Dice before the ET rule; the guard rail's verdict "
        "when the stage was made (`guard.max_region_drop` against its source, on the validation cases):",
        "",
        markdown_table(
            ["stage", "gap WT", "gap TC", "gap ET", "gap mean", "ET predicted empty", "ET false", "ET rule",
             "Dice ET, rule off", "guard"],
            ([r["name"], *[_gap(ref, r, g) for g in GAP_REGIONS],
              _of(r.get("et_missed_cases"), r.get("truth_et_cases")),
              _of(r.get("et_false_cases"), None if r.get("truth_et_cases") is None or r.get("cases") is None
                  else r["cases"] - r["truth_et_cases"]),
              "-" if r.get("et_min_voxels") is None else "off" if r["et_min_voxels"] == 0
              else f"< {r['et_min_voxels']} voxels", _fmt(r.get("dice_et_norule"), ".3f"),
              r.get("guard") or "-"] for r in rows),
        ),
        "",
        *rule_note(rows),
        *rising_section(found),
        *skip_section(rows, cfg.train.skip_background),
        *runtime_section(rows, size, cfg, meta),
        "Published reference (other data, not comparable row by row): SegFormer3D, 4.5M parameters, "
        "mean Dice 0.821 (WT 89.9, TC 82.2, ET 74.2) on MSD Task01 with its own validation split.",
        "",
        f"**Note.** {HONEST_NOTE}",
        "",
    ]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["## Artifacts that could not be reported", ""]
        lines += [f"- {r['name']}: {r['error']}" for r in errors]  # errors name the file
        lines.append("")
    if meta.get("official"):
        lines += official_section(rows, meta["official"])
    if plot_files:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_files] + [""]
    if meta.get("case_figures"):
        lines += case_section(meta["case_figures"], ref)
    for r in rows:
        if r.get("profile"):
            lines += profile_section(r, meta["gemm_peak"])
    for f in found:
        extra = f.artifact.extra if f.artifact is not None else {}
        for key, (title, render) in EXTRA_SECTIONS.items():
            value = extra.get(key)
            if value:
                lines += [f"## {f.stage}: {title}", "", f"From `{f.path}`.", "", *render(value), ""]
    return "\n".join(lines)


FEW_CASES = 8  # below this many held-out cases the report says how far one case moves a mean


def few_cases_note(n: int) -> list[str]:
    """A warning line for a report on fewer than FEW_CASES held-out cases: one case moves a region's mean
    Dice by up to 1/n (a case without ET flips between 0 and 1 on one false ET voxel), so gaps smaller
    than that between rows may be one case. Nothing for larger sets (or none)."""
    if not 0 < n < FEW_CASES:
        return []
    return [f"**Only {n} held-out case(s)**: one case moves a region's mean Dice by up to {1 / n:.2f} (an ET "
            "region flips between 0 and 1 on a case without ET), so read smaller gaps between rows as possibly "
            "one case. They are the stages' validation split (its split file; data.val_fraction when it was "
            "made), capped by report.max_cases and data.max_val_cases."]


def _of(count: Any, total: Any) -> str:
    """"k of n" cases, "-" when either is unknown."""
    return "-" if count is None or total is None else f"{count} of {total}"


def rule_note(rows: list[dict]) -> list[str]:
    """A warning line when the rows' ET rules differ (each artifact's is calibrated on its own validation
    cases): their Dice ET, and the ET gaps, then include each rule's effect, which on a few cases without
    ET is whole cases flipping between Dice 0 and 1; "Dice ET, rule off" compares the models."""
    rules = {r["et_min_voxels"] for r in rows if not r.get("error") and r.get("et_min_voxels") is not None}
    if len(rules) < 2:
        return []
    moved = [r for r in rows if _num(r.get("dice_et")) and _num(r.get("dice_et_norule"))
             and abs(r["dice_et"] - r["dice_et_norule"]) >= 0.005]
    biggest = max(moved, key=lambda r: abs(r["dice_et"] - r["dice_et_norule"]), default=None)
    shift = (f"; it moves {biggest['name']}'s ET Dice {biggest['dice_et_norule']:.3f} -> {biggest['dice_et']:.3f}"
             if biggest else "")
    return [f"**The rows' ET rules differ** (each calibrated on its artifact's validation cases){shift}: compare "
            "models by \"Dice ET, rule off\"; the ET figures and gaps above include each rule's effect.", ""]


def rising_section(found: list[Found]) -> list[str]:
    """One line naming the artifacts whose fit ended still rising (`engine.loop.ended_rising`: best at
    its last validation, by at least `engine.loop.RISING_MIN_GAIN`): their budget stopped them, not early
    stopping, so their Dice may be short of what the recipe reaches on this data. Nothing when there is none."""
    ended = [(f.stage, r) for f in found if f.artifact is not None and (r := ended_rising(f.artifact))]
    if not ended:
        return []
    named = ", ".join(f"{stage} (epoch {r['epoch']} of {r['epochs']}, {r.get('select', 'Dice')} "
                      f"{r['earlier']:.3f} -> {r['last']:.3f})" for stage, r in ended)
    return [f"Still improving when their epochs ran out (best at the last validation, the end of their learning-rate "
            f"schedule): {named}. A longer run may raise their Dice (`--set train.epochs=N`; train.patience ends a "
            "run that stops improving).", ""]


def runtime_section(rows: list[dict], size: str, cfg: Config, meta: dict) -> list[str]:
    """One row per artifact and runtime: its time per window, against the runtime the row was scored in."""
    rep = cfg.report
    how = ("the fastest measured" if rep.runtime == "auto"
           else f"{rep.runtime} where it can run the artifact, else the fastest")
    lines = [
        "## Runtimes", "",
        f"Each artifact in every runtime that can run it, per {size} window: median of {rep.latency_runs} runs, "
        "the runtimes of one artifact called in turn (interleaved) after a warm-up, the same threads each "
        "(PyTorch intra-op threads, ONNX Runtime intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS). FP32: "
        "PyTorch runs the exact rewrites, ONNX Runtime and OpenVINO their ONNX export (OpenVINO in f32 precision); "
        "INT8 (QDQ ONNX): both run the same stored graph with the QAT's own scales. The row's scores and case "
        f"times above use the runtime marked used (report.runtime={rep.runtime}: {how}).", "",
    ]
    table = []
    for r in rows:
        if r.get("error"):
            continue
        used, notes = r.get("runtime"), r.get("runtime_notes") or {}
        for name, key in RUNTIME_KEYS.items():
            ms = r.get(key)
            vs = f"{ms / r['latency_ms_window']:.2f}x" if _num(ms) and _num(r.get("latency_ms_window")) else "–"
            table.append([r["name"], name, _at(r, _fmt(ms, ".1f"), meta), vs, "used" if name == used else "",
                          notes.get(name, "")])
    return lines + [markdown_table(["stage", "runtime", f"ms / {size}", "vs used", "", "note"], table), ""]


def _at(row: dict, cell: str, meta: dict) -> str:
    """A G MACs or latency cell, with the input it was measured at when that is not the report's."""
    shape = row.get("input")
    return cell if not shape or cell in ("–", "-") or list(shape) == list(meta["input"]) else f"{cell} (at {_shape(shape)})"


def _share(v: Any) -> str:
    return "–" if not _num(v) else f"{100 * v:.1f} %"


def profile_section(row: dict, peak: dict | None) -> list[str]:
    """Where one window's forward time goes in PyTorch: top operators, then top modules, with multiply-adds."""
    p = row["profile"]
    lines = [f"## {row['name']}: where the time goes", ""]
    if p.get("error"):
        return lines + [f"Not profiled: {p['error']}", ""]
    size = "x".join(map(str, p["input"]))
    peak_text = (f"{p['peak_gmacs_per_s']:.1f} G multiply-adds/s, measured on a {peak['n']}x{peak['n']} fp32 "
                 f"torch.mm (median of {peak['runs']}, {peak['threads']} thread(s))" if peak else "not measured")
    ops, modules = p["ops"], p["modules"]
    lines += [
        f"PyTorch eager, one {size} window after {p['warmup']} warm-up forward(s), under torch.profiler: "
        f"{p['forward_ms']:.1f} ms ({p['threads']} thread(s); this row's other figures use {row.get('runtime')}). "
        f"{p['gmacs']:.3f} G multiply-adds in all (fvcore on the graph that runs: the exact inference rewrites, so "
        f"fewer than the results table's count of the model as trained). This CPU's peak: {peak_text}; "
        "\"of peak\" is the achieved rate over it.", "",
        f"Operators as the model's code calls them (each with everything it dispatches to), top {len(ops)} of "
        f"{p['ops_count']} by time; together {_share(sum(o['share'] for o in ops))} of the forward:", "",
        markdown_table(
            ["operator", "calls", "ms", "share", "G MACs", "G MACs/s", "of peak"],
            ([o["op"], str(o["calls"]), _fmt(o["total_ms"], ".2f"), _share(o["share"]), _fmt(o["gmacs"], ".3f"),
              _fmt(o["gmacs_per_s"], ".1f"), _share(o["peak_share"])] for o in ops)),
        "",
        f"Modules by self time (their total less their child modules': the operators a module calls itself), top "
        f"{len(modules)} of {p['modules_count']}; together {_share(sum(m['self_share'] for m in modules))} of the "
        "forward. Multiply-adds and rate are the self part's:", "",
        markdown_table(
            ["module", "type", "calls", "self ms", "self share", "total ms", "total share", "G MACs", "G MACs/s",
             "of peak"],
            ([m["module"], m["type"], str(m["calls"]), _fmt(m["self_ms"], ".2f"), _share(m["self_share"]),
              _fmt(m["total_ms"], ".2f"), _share(m["total_share"]), _fmt(m["gmacs_self"], ".3f"),
              _fmt(m["gmacs_per_s"], ".1f"), _share(m["peak_share"])] for m in modules)),
        "",
    ]
    return lines


def skip_section(rows: list[dict], skip: bool) -> list[str]:
    """Skipped background windows over the held-out cases, and the whole-case time both ways."""
    if not skip:
        return ["Background windows were not skipped (train.skip_background=false): every window was run.", ""]
    return [
        "Background windows skipped (train.skip_background): a window without a brain voxel reuses the logits "
        "of one all-zero window, so the label maps are the same as with every window run; whole-case time "
        "both ways on the first held-out case, interleaved:", "",
        markdown_table(
            ["stage", "windows skipped", "s / case", "s / case, every window"],
            ([r["name"], "-" if r.get("windows") is None else f"{r['windows_skipped']} of {r['windows']}",
              _fmt(r.get("latency_s_case"), ".2f"), _fmt(r.get("latency_s_case_noskip"), ".2f")]
             for r in rows if not r.get("error")),
        ),
        "",
    ]


def official_section(rows: list[dict], versions: str) -> list[str]:
    """The official package's figures per stage: global, then lesion-wise and detection."""
    regions = official.REGIONS
    good = [r for r in rows if not r.get("error")]

    def cells(r: dict, metric: str, spec: str) -> list[str]:
        values = [r.get(f"{metric}_{g}") for g in regions]
        return ["inf" if v == math.inf else _fmt(v, spec) for v in values]  # inf: the package's, not missing

    def counted(r: dict) -> str:
        return "/".join("–" if r.get(k) is None else str(r[k]) for k in OFFICIAL_N_KEYS)

    return [
        "## Official BraTS metrics", "",
        f"Computed by {versions}, the package the BraTS challenges rank with since 2023 (glioma config; "
        "BraTS 2017 ET, label 4, passed as its ET, label 3), on the same held-out predictions. Its conventions "
        "differ from ours: a region empty in both prediction and truth is NaN and left out of the mean "
        "(n: cases counted, WT/TC/ET); the global HD95 is 373 whenever prediction and truth share no voxel, "
        "and is in voxels (spacing ignored). Lesion-wise values are means over matched lesions (connected "
        "components): an unmatched lesion lowers the detection F1, not the lesion-wise Dice; a case with no "
        "lesion matched has lesion-wise HD95 inf, which makes the mean inf.", "",
        markdown_table(
            ["stage", "n", "global Dice WT", "TC", "ET", "global HD95 WT", "TC", "ET"],
            ([r["name"], counted(r), *cells(r, "global_dsc", ".3f"), *cells(r, "global_hd95", ".2f")]
             for r in good)),
        "",
        markdown_table(
            ["stage", "lesion-wise Dice WT", "TC", "ET", "lesion-wise HD95 WT", "TC", "ET", "detection F1 WT",
             "TC", "ET"],
            ([r["name"], *cells(r, "lesionwise_dsc_mean", ".3f"), *cells(r, "lesionwise_hd95_mean", ".2f"),
              *cells(r, "all_instance_f1", ".3f")] for r in good)),
        "",
    ]


def case_section(figures: list[dict], ref: dict | None) -> list[str]:
    """Links to the case figures, with why each case was chosen."""
    by = f"the {ref['name']} row's" if ref else "the reference row's"
    lines = ["## Cases to look at", "",
             f"Chosen by {by} per-case mean Dice: the median and the worst held-out case. One axial slice through "
             "the middle of the true tumour, one column per stage (its Dice WT/TC/ET on this case); FLAIR with "
             "WT (green) and TC (yellow), T1ce with TC and ET (red); a stage's contours solid, the truth's "
             "dashed.", ""]
    for fig in figures:
        name = Path(fig["path"]).name
        lines += [f"{fig['role'].replace('_', ' ').capitalize()}: {fig['case']} (mean Dice {fig['dice_mean']:.3f}).",
                  "", f"![{fig['case']}]({name})", ""]
    return lines


def format_profile(p: dict) -> str:
    size = "x".join(map(str, p["input"]))
    return "\n".join([
        f"{p['arch']} width {p['width']:g}",
        f"  parameters          {p['params']:,}",
        f"  G MACs at 1x4x{size}  {p['gmacs']:.2f}  ({p['convention']})",
        f"  without upsampling  {p['gmacs_no_upsample']:.2f}",
    ])
