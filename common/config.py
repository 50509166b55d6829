"""Typed configuration: YAML files loaded into dataclasses, with `--set key.sub=value` overrides.

Every section is a dataclass; an unknown key anywhere (file or override) is a `ConfigError` that
names the key and where it came from. A YAML file may start from another with `base: other.yaml`
(relative to the file), so demo configs only state what they change.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserInputError


class ConfigError(UserInputError, ValueError):
    """A configuration key or value that does not fit the schema."""


@dataclass
class DataConfig:
    dir: str | None = None  # BraTS-layout folder; None: synthetic cases under data/synthetic
    cache: str | None = None  # preprocessing cache; None: <dir>/.cache next to the data
    scheme: str = "regions"  # regions (3 sigmoid: TC, WT, ET) | seed3 (softmax: bg, core, edema)
    crop: list[int] = field(default_factory=lambda: [128, 128, 128])
    fg_ratio: float = 0.33  # share of crops centred on a tumour voxel
    val_fraction: float = 0.2
    folds: int = 1  # >1: k-fold split, `fold` picks the validation fold
    fold: int = 0
    split_seed: int = 0
    split_file: str | None = None  # None: <cache>/splits.json
    samples_per_epoch: int | None = None  # None: one crop per training case
    skip_bad: bool = False
    allow_constant_modality: bool = False  # a modality constant inside the brain: a warning, not a bad case
    max_val_cases: int | None = None
    num_workers: int = 0
    synthetic_cases: int = 12  # used only when dir is None
    synthetic_val_cases: int = 2
    synthetic_shape: list[int] = field(default_factory=lambda: [96, 96, 64])
    synthetic_seed: int = 0


# DataConfig fields that say which cases and which split (not how crops are drawn): a compression
# stage takes them from its source artifact unless the user names data (engine.runner.inherit_data)
DATA_IDENTITY = ("dir", "cache", "split_file", "fold", "folds", "val_fraction", "split_seed", "max_val_cases",
                 "synthetic_cases", "synthetic_val_cases", "synthetic_shape", "synthetic_seed")


@dataclass
class ModelConfig:
    preset: str = "refineformer3d"
    width: float = 1.0
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelSpec fields to replace


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    grad_clip: float = 1.0
    amp: str = "auto"  # one of AMP_CHOICES (engine.runtime.resolve_precision)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    dice_weight: float = 1.0
    ce_weight: float = 1.0  # BCE for regions, cross-entropy for softmax schemes
    val_every: int = 1
    window: list[int] = field(default_factory=lambda: [128, 128, 128])
    overlap: float = 0.5
    sw_batch: int = 2
    et_min_voxels: int = 0  # inference: a case with fewer ET voxels gets them relabelled NCR (0: off)
    skip_background: bool = True  # inference: all-zero (no brain) windows reuse one zero window's logits (same output)
    steps_per_epoch: int | None = None  # None: len(loader)
    log_images: bool = True
    threads: int | None = None  # torch.set_num_threads; None: leave as is
    val_at_start: bool = False  # validate the initial weights first; they count for best.pt (fine-tunes)
    patience: int | None = None  # stop after this many validations without a better `select` (epochs: a maximum)
    # the validation figure that chooses the best epoch (and counts patience): pooled_dice_mean (Dice over
    # all cases' voxels at once, nnU-Net's pseudo Dice: never predicting ET scores 0, not 1 on the cases
    # without ET) or dice_mean (the BraTS per-case mean, which rewards an empty ET on those cases)
    select: str = "pooled_dice_mean"


@dataclass
class PerturbConfig:
    """Perturbation applied only to the student's input during self-distillation."""

    prob: float = 0.5  # per-sample chance of any perturbation; the rest of the batch stays clean
    # intensity changes are kept mild: the student is validated on clean inputs (see configs/distill.yaml)
    intensity_scale: float = 0.1  # multiply each modality by U(1-s, 1+s)
    intensity_shift: float = 0.1
    gamma: float = 0.1  # gamma in U(1-g, 1+g) on min-max normalised intensities
    noise_std: float = 0.05
    blur_prob: float = 0.1
    modality_dropout: float = 0.0  # probability to zero one modality
    flip_prob: float = 0.5  # per axis
    rot90_prob: float = 0.5
    affine_prob: float = 0.2
    affine_degrees: float = 10.0
    affine_scale: float = 0.1
    rotation_planes: str = "axial"  # axial: rot90 and affine rotations in the axial (X, Y) plane only | all
    warmup_epochs: int = 0  # prob ramps from 0 (epoch 1: clean) to `prob` over these epochs


@dataclass
class DistillConfig:
    teacher: str | None = None
    width: float = 0.25
    init: str = "pruned"  # pruned | scratch
    importance: str = "taylor"  # taylor (|w * dL/dw| on crops centred on every region) | magnitude
    calib_cases: int = 8  # taylor: training cases whose WT / TC / ET-centred crops rank the channels
    floors: bool = True  # decoder widths next to the output keep channels per region (student.thin.HEAD_FLOORS)
    temperature: float = 2.0
    supervised_weight: float = 1.0
    kd_weight: float = 1.0
    kd_dice_weight: float = 1.0  # soft Dice between student and teacher probabilities: every region counts alike
    kd_gate: str = "all"  # all | correct: logit KD and soft-Dice KD only on voxels where the teacher agrees with the labels
    kd_region_weights: str = "equal"  # equal | teacher (weighted by its validation Dice) | adaptive (KD off where the student beats it)
    feature_weight: float = 0.0
    keep_attn_scale: bool = True  # pruned init keeps the teacher's attention scale (see student/thin.py)
    perturb_input: bool = True  # perturb the student's input (False: both see the clean crop)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)


@dataclass
class LowRankConfig:
    energy: float | None = None  # keep this share of spectral energy per layer
    ratio: float | None = None  # or rank = ratio * full rank (wins over energy)
    params: str | None = "auto"  # or a global parameter budget, "200k" or a share "65%" (wins over both), or "auto"
    min_saving: float = 0.0  # factorise only when it saves more than this share of a layer
    # params "auto": the smallest of these shares whose factorised model (before any fine-tune) keeps every
    # region's validation Dice within auto_tolerance of the source's, scored in the stage (compress.lowrank)
    auto_shares: list[float] = field(default_factory=lambda: [0.25, 0.35, 0.5, 0.65, 0.8])
    auto_tolerance: float = 0.005
    teacher: str | None = None  # None: the teacher in the artifact's lineage


@dataclass
class GrowConfig:
    teacher: str | None = None
    top_k: int = 2
    factor: float = 2.0
    budget: str | None = None  # parameter budget, e.g. "500k"
    cost: str = "macs"  # ranking: macs (gradient score per multiply-add of an added channel) | params (score)
    macs_budget: str | None = None  # multiply-adds at reference_input never exceeded, e.g. "3G"
    reference_input: list[int] = field(default_factory=lambda: [128, 128, 128])  # (D, H, W) for MACs
    window: int = 20  # training batches whose gradients score the units after a phase
    patience: int = 2  # validations without a better Dice that end a phase (its fit's train.patience)
    min_delta: float = 0.002  # Dice improvement that counts
    stop_after: int = 2  # phases without improvement before stopping
    max_events: int = 4  # growth events at most
    kinds: list[str] = field(
        default_factory=lambda: ["mlp_hidden", "attn_dims", "ranks", "fuse_dim", "refine_dim"]
    )  # which unit kinds may grow
    init: str = "copy"  # new channels: copy (duplicates + noise) | random
    noise: float = 0.01  # copy init: noise std relative to the layer's weight std


@dataclass
class SlimConfig:
    teacher: str | None = None
    steps: list[str] = field(default_factory=lambda: ["head", "stem", "widths"])  # compress.slim.STEPS, in this order
    macs_budget: str | None = None  # e.g. "1G" at reference_input: apply as few steps as reach it (largest saving first)
    reference_input: list[int] = field(default_factory=lambda: [128, 128, 128])  # (D, H, W) for multiply-adds
    refine_dim: int = 12  # head: channels feeding the moved head (widened to this, never narrowed)
    head_at: str = "half"  # head: where the refine head moves, half | quarter (resolution 1/2 or 1/4)
    stem_kernel: int = 4  # stem: stage-1 patch-embedding kernel (stride kept)
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4])  # stem: key/value reductions of the first stages
    decoder_dim: int | None = 32  # widths: stage projection width (None: kept)
    fuse_dim: int | None = 32  # widths: fusion width (None: kept)
    mlp_hidden: list[int | None] = field(default_factory=lambda: [16])  # mlp: Mix-FFN hidden width per stage from stage 1


@dataclass
class QuantConfig:
    teacher: str | None = None
    backend: str = "torch"  # torch | onnxruntime
    calib: int = 4  # calibration batches
    decide: str = "measure"  # measure | all | none | table
    force: dict[str, str] = field(default_factory=dict)  # layer -> int8 | fp32
    bench_runs: int = 5
    onnx: bool = False
    input: list[int] | None = None  # input size for decisions and ONNX export; None: train.window
    act_qmax: int = 127  # activations 0..act_qmax (127: fbgemm reduce_range, exact on non-VNNI x86)
    percentile: float = 99.99  # calibration range of activations
    min_speedup: float = 1.05  # decide=measure: INT8 only where at least this much faster
    reassoc: bool = True  # re-associate the decoder's fusion (exact)
    threads: int | None = None  # ONNX Runtime intra-op threads of the saved "onnx" artifact


@dataclass
class ReportConfig:
    input: list[int] = field(default_factory=lambda: [128, 128, 128])  # window for G MACs and latency
    latency_runs: int = 5  # timed runs per figure; the median is reported
    warmup_runs: int = 1  # untimed runs before timing
    max_cases: int | None = None  # held-out cases evaluated per row (None: the whole validation split)
    window: list[int] | None = None  # sliding window; None: train.window
    overlap: float | None = None  # None: train.overlap
    sw_batch: int = 1  # windows per forward pass
    case_latency: bool = True  # also time whole-case sliding-window inference
    plots: bool = True
    et_min_voxels: int | None = None  # ET smaller than this in a case -> NCR/NET; None: train.et_min_voxels
    runtime: str = "auto"  # auto | torch | onnxruntime | openvino: scores and times each row (auto: the fastest)
    profile: bool = False  # a "where the time goes" table per stage (PyTorch profiler, fvcore multiply-adds)
    profile_top: int = 10  # operators and modules shown per profile table


@dataclass
class GuardConfig:
    """Guard rails of every compression stage (engine.runner): the result is scored against its source."""

    max_region_drop: float = 0.10  # a region's Dice more than this below the source model's: a loud warning
    strict: bool = False  # ... and a non-zero exit (3) once the artifact is written (--strict)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its `base:` chain), then `key.sub=value` overrides."""
    cfg = Config()
    from_file = read_yaml_chain(Path(path)) if path is not None else {}
    if path is not None:
        merge(cfg, from_file, source=str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(raw) if raw else None
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        merge(cfg, nested, source=f"--set {item}")
    try:
        check_values(cfg)
    except ConfigError as e:  # say where the bad value came from
        key = getattr(e, "key", None)
        given = [item for item in overrides if item.partition("=")[0].strip() == key]
        node: Any = from_file
        for part in (key or "").split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        origin = f"--set {given[-1]}" if given else (f"from {path}" if node is not KeyError else None)
        if origin is None:
            raise
        raise ConfigError(f"{e} ({origin})") from None
    return cfg


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
AMP_CHOICES = ("auto", "off", "fp16", "bf16")  # train.amp


def check_values(cfg: Config) -> None:
    """ConfigError, naming the key and the value, for a setting outside its range (types are checked by
    `merge`): every command loads its config through here, so a bad value stops it before any work
    (they failed after a training epoch, in a library traceback, or ran on silently)."""
    from brats.labels import SCHEMES  # here: brats imports this module

    d, t, m = cfg.data, cfg.train, cfg.model

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            error = ConfigError(f"{key}={value!r}: {rule}")
            error.key = key  # load_config names the file or --set it came from
            raise error

    def at_least(value: float | None, low: float, key: str, optional: bool = False) -> None:
        need((optional and value is None) or (value is not None and value >= low), key, value,
             f"must be >= {low}" + (" (or null)" if optional else ""))

    def fraction(value: float, key: str) -> None:
        need(0.0 <= value <= 1.0, key, value, "a fraction in [0, 1]")

    need(d.scheme in SCHEMES, "data.scheme", d.scheme, f"one of {', '.join(SCHEMES)}")
    fraction(d.fg_ratio, "data.fg_ratio")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a fraction in [0, 1)")
    at_least(d.folds, 1, "data.folds")
    need(0 <= d.fold < d.folds, "data.fold", d.fold, f"a fold of data.folds={d.folds}: 0 to {d.folds - 1}")
    at_least(d.samples_per_epoch, 1, "data.samples_per_epoch", optional=True)
    at_least(d.max_val_cases, 1, "data.max_val_cases", optional=True)
    at_least(d.num_workers, 0, "data.num_workers")
    need(0.0 < m.width <= 1.0, "model.width", m.width, "must be in (0, 1] (a share of the preset's widths)")
    need(t.epochs >= 0, "train.epochs", t.epochs, "the epochs to train (a maximum with train.patience), >= 0 "
         "(0: a compression stage without its fine-tune)")
    at_least(t.batch_size, 1, "train.batch_size")
    need(t.lr > 0, "train.lr", t.lr, "must be > 0")
    need(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"in [0, train.lr={t.lr}]")
    at_least(t.weight_decay, 0, "train.weight_decay")
    at_least(t.warmup_epochs, 0, "train.warmup_epochs")
    at_least(t.grad_clip, 0, "train.grad_clip", optional=True)
    need(DEVICE.fullmatch(t.device) is not None, "train.device", t.device, "auto, cpu, cuda or cuda:N")
    need(t.amp in AMP_CHOICES, "train.amp", t.amp, f"one of {', '.join(AMP_CHOICES)}")
    at_least(t.val_every, 1, "train.val_every")
    at_least(t.sw_batch, 1, "train.sw_batch")
    at_least(t.et_min_voxels, 0, "train.et_min_voxels")
    at_least(t.steps_per_epoch, 1, "train.steps_per_epoch", optional=True)
    at_least(t.threads, 1, "train.threads", optional=True)
    at_least(t.patience, 0, "train.patience", optional=True)  # 0 and null: no early stopping
    need(t.dice_weight >= 0 and t.ce_weight >= 0, "train.dice_weight / train.ce_weight",
         (t.dice_weight, t.ce_weight), "must be >= 0")
    r = cfg.report
    at_least(r.latency_runs, 1, "report.latency_runs")
    at_least(r.warmup_runs, 0, "report.warmup_runs")
    at_least(r.sw_batch, 1, "report.sw_batch")
    at_least(r.max_cases, 1, "report.max_cases", optional=True)
    at_least(r.profile_top, 1, "report.profile_top")
    fraction(cfg.guard.max_region_drop, "guard.max_region_drop")
    lr = cfg.lowrank
    need(bool(lr.auto_shares) and all(0.0 < v < 1.0 for v in lr.auto_shares), "lowrank.auto_shares",
         lr.auto_shares, "shares of the model's parameters, each in (0, 1), at least one")
    fraction(lr.auto_tolerance, "lowrank.auto_tolerance")
    p = cfg.distill.perturb
    for key in ("prob", "blur_prob", "modality_dropout", "flip_prob", "rot90_prob", "affine_prob"):
        fraction(getattr(p, key), f"distill.perturb.{key}")
    need(cfg.distill.temperature > 0, "distill.temperature", cfg.distill.temperature, "must be > 0")


def merge(obj: Any, values: dict, source: str, prefix: str = "") -> None:
    """Write `values` into dataclass `obj`, checking every key and coercing scalar types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at '{prefix or '<root>'}', got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, source, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


def parse_count(text: str | int | float | None, total: int | None = None, what: str = "count",
                share: bool = True) -> int | None:
    """A count from a config value: '200k', '1.5M', '3G', '350000', '1e9', or (with `share`) '65%' of
    `total`; None stays None. ConfigError for anything else, naming `what` and the forms it takes."""
    if text is None:
        return None
    forms = "200k, 1.5M, 3G" + (" or 65%" if share else " or 1e9")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg%]?)\s*",
                     str(text).lower().replace("_", "").replace(",", ""))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a count like {forms}")
    value, suffix = float(m.group(1)), m.group(2)
    if suffix == "%" and not share:
        raise ConfigError(f"{what} {text!r}: a count such as {forms}, not a share")
    if suffix == "%":
        if total is None:
            raise ConfigError(f"{what} {text!r} is a share: it needs the model's parameter count")
        if not 0.0 < value < 100.0:
            raise ConfigError(f"{what} {text!r}: a share must be strictly between 0% and 100%")
        return int(round(value / 100.0 * total))
    return int(round(value * {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}[suffix]))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = Config()
    merge(cfg, values, source="stored config")
    return cfg


def read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The values of a config YAML merged over those of its `base:` chain (no defaults, no overrides).
    ConfigError for a missing file, invalid YAML or a loop."""
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a YAML file (e.g. configs/teacher.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back on itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8; a binary file?)") from None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable ({e.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    if values is None:
        raise ConfigError(f"{path}: empty (no settings)" + ("" if seen else "; leave --config out for the built-in "
                                                              "defaults"))
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = read_yaml_chain(path.parent / base, seen + (path.resolve(),))
    _deep_update(merged, values)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a simple type hint (scalars, optionals, lists, dicts)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for '{key}': {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, bool):  # YAML 1.1 reads an unquoted off / no / on / yes as a bool
        return "on" if value else "off"
    if hint is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{source}: '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")
