"""Run any artifact over BraTS cases and write `<case>.nii.gz` label maps on the input grid.

Each case is preprocessed exactly as the training cache is (`brats.prepare.preprocess_case`: crop
to the non-zero bounding box, z-score over brain voxels, float16 rounding), predicted by Gaussian
sliding window, mapped to BraTS values 0/1/2/4 and put back on the full grid with the input's
affine and header. A bad case is reported and skipped; the others are still written. Cases are read
and checked by `brats.nifti.load_case`, as for the cache: a modality constant inside the brain is a
bad case unless `allow_constant_modality` (then a warning). With `overlay_dir`, each case also
gets `<case>.png`: an axial slice through its tumour with the prediction's contours over FLAIR and
T1ce, beside the truth's when the case has one (`brats.overlay.case_figure`, as the report draws).
Windows without a brain voxel are skipped unless told (`brats.inference`: the same label maps).
`runtime` runs the artifact in PyTorch, ONNX Runtime or OpenVINO, or ("auto") in the one measured fastest
on this machine (`pipeline.runtimes`).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from brats.inference import WindowCount, check_coarse, predict_case, to_full_grid
from brats.layout import MODALITIES, CaseRef, DataError, discover_cases, warn
from brats.metrics import REGIONS, dice, region_masks
from brats.nifti import LoadedCase, load_case, save_label_map
from brats.overlay import axial_slice, case_figure
from brats.scoring import artifact_et_rule
from brats.prepare import preprocess_case
from brats.splits import read_splits
import compress.quant  # noqa: F401  (registers the int8-torch, int8-qat and onnx artifact kinds)
from common.artifact import Artifact, build_model
from common.errors import UserInputError
from common.progress import bar_off
from model.refineformer3d import ModelSpec, model_from_spec, total_stride
from model.rewrites import inference_graph
from pipeline.runtimes import RuntimeChoice, RuntimeUnavailable, choose_runtime

FP32_KINDS = ("fp32",)


@dataclass
class PredictResult:
    written: dict[str, Path] = field(default_factory=dict)  # case -> label map
    failed: dict[str, str] = field(default_factory=dict)  # case -> message naming case and file
    overlays: dict[str, Path] = field(default_factory=dict)  # case -> PNG (with overlay_dir)
    windows: WindowCount = field(default_factory=WindowCount)  # over the cases predicted
    runtime: RuntimeChoice | None = None  # where the model ran (None: the artifact's own module)


def artifact_scheme(art: Artifact, default: str = "regions") -> str:
    """Label scheme the artifact was trained with (its config's data.scheme)."""
    data = (art.config or {}).get("data") or {}
    return str(data.get("scheme") or default)


def base_spec(spec: dict) -> dict:
    """The FP32 model spec underneath any artifact spec (INT8 / ONNX ones name their base).

    An INT8 or ONNX spec either nests it as spec["base"] or carries the ModelSpec fields itself
    next to its own keys; either way the result has kind "fp32" and only ModelSpec fields.
    """
    if spec.get("kind", "fp32") in FP32_KINDS:
        return dict(spec)
    inner = spec.get("base") if isinstance(spec.get("base"), dict) else spec
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    out = {k: v for k, v in inner.items() if k in names}
    out["kind"] = "fp32"
    return out


def fp32_model(art: Artifact) -> nn.Module:
    """A float model of the artifact's architecture (weights loaded when the artifact is FP32)."""
    if art.spec.get("kind", "fp32") in FP32_KINDS:
        return build_model(art)
    return model_from_spec(base_spec(art.spec))


def inference_model(art: Artifact, model: nn.Module | None = None) -> nn.Module:
    """The artifact's model as it runs here (PyTorch eager on CPU).

    FP32: the exact inference rewrites (`model.rewrites.inference_graph`: BatchNorm folded, fusion
    re-associated, channels-last tail) of `model`, or of the artifact's model when None; `model` itself
    is left as it is (count parameters and multiply-adds on it). INT8 and ONNX kinds: their builders
    apply the rewrites already, so `model` (or the built artifact) is returned unchanged.
    """
    model = build_model(art) if model is None else model
    if art.spec.get("kind", "fp32") in FP32_KINDS:
        return inference_graph(model)  # a copy, in eval mode
    return model


def downsample(spec: dict) -> int:
    """Total encoder stride of any artifact's spec (an INT8 or ONNX one: of its float base): window sizes
    must be multiples of it."""
    return total_stride(base_spec(spec))


def check_window(window: Sequence[int], spec: dict, name: str = "window") -> tuple[int, int, int]:
    window = tuple(int(w) for w in window)
    stride = downsample(spec)
    if len(window) != 3 or any(w < stride or w % stride for w in window):
        raise ValueError(f"{name} {window} must be three multiples of the model's stride {stride}")
    return window  # type: ignore[return-value]


def shape_multiple(art: Artifact, runtime: RuntimeChoice | None) -> int:
    """What input sizes the served model takes besides the window: any multiple of the encoder's stride
    in eager PyTorch (the artifact's own module, or runtime torch); 0 (the window only) for a stored
    ONNX graph, and for ONNX Runtime / OpenVINO, which would build a session for every new size."""
    eager = runtime is None or runtime.runtime == "torch"
    return downsample(art.spec) if eager and art.spec.get("kind") != "onnx" else 0


def predict_fn(model: nn.Module):
    """(B, 4, *window) -> logits, in eval mode and without autograd."""
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return predict


def split_cases(path: str | Path, fold: int = 0) -> list[str]:
    """The validation cases of one fold of a splits.json (the cases a run held out)."""
    folds = read_splits(path)
    if not 0 <= fold < len(folds):
        raise DataError(f"split file {path}: no fold {fold} (it has {len(folds)} fold(s): 0..{len(folds) - 1})")
    return list(folds[fold].val)


def select_cases(refs: Sequence[CaseRef], cases: Sequence[str], source: str | Path) -> list[CaseRef]:
    """The cases of `refs` named in `cases`, in discovery order; a name not found is an error."""
    wanted = set(cases)
    missing = [c for c in dict.fromkeys(cases) if c not in {r.case for r in refs}]
    if missing:
        raise DataError(f"{source}: no case named {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(wanted)} asked for; "
                        f"the folder has {len(refs)} case(s))")
    chosen = [r for r in refs if r.case in wanted]
    if not chosen:
        raise DataError(f"{source}: the case selection is empty")
    return chosen


def predict_ref(model: nn.Module, ref: CaseRef, scheme: str, window: Sequence[int], overlap: float,
                sw_batch: int = 1, et_min_voxels: int = 0, allow_constant_modality: bool = False,
                skip_background: bool = True, count: WindowCount | None = None,
                coarse: int = 0, coarse_fit: int = 0) -> tuple[np.ndarray, LoadedCase]:
    """(full-grid uint8 BraTS label map (X, Y, Z), LoadedCase) for one case; the seg is not read.
    `skip_background` and `count`: as `brats.inference.sliding_window` takes them; `coarse` and
    `coarse_fit`: as `brats.inference.predict_case`."""
    loaded = load_case(dataclasses.replace(ref, has_label=False), allow_constant_modality)
    image, _, bbox = preprocess_case(loaded)  # float16 (4, d, h, w), as stored in the cache
    label = predict_case(predict_fn(model), image.astype(np.float32), scheme, window, overlap, sw_batch,
                         et_min_voxels, coarse, coarse_fit, skip_background=skip_background, count=count)
    full = to_full_grid(label, bbox, loaded.image.shape[1:])
    return full, loaded


def overlay_truth(ref: CaseRef, allow_constant_modality: bool = False) -> np.ndarray | None:
    """The case's reference labels on its image grid, for a picture: None when it has none, or (with
    a warning) when they do not load; the prediction itself never reads them."""
    if not ref.has_label:
        return None
    try:
        return load_case(ref, allow_constant_modality).label
    except DataError as e:
        warn(f"{e}; its overlay is drawn without the truth")
        return None


def write_overlay(path: str | Path, loaded: LoadedCase, label: np.ndarray, stage: str,
                  truth: np.ndarray | None = None) -> Path:
    """`case_figure` of one predicted case: the axial slice through the middle of the true tumour
    (of the predicted one without truth), the prediction beside the truth when given, with its Dice."""
    z = axial_slice(truth if truth is not None and truth.any() else label)
    title = stage
    if truth is not None:
        pred_m, true_m = region_masks(label), region_masks(truth)
        title += "\n" + " ".join(f"{r.upper()} {dice(pred_m[r], true_m[r]):.2f}" for r in REGIONS)
    image = loaded.image[..., z]
    case_figure(path, image[MODALITIES.index("flair")], image[MODALITIES.index("t1ce")], [(title, label[:, :, z])],
                truth=None if truth is None else truth[:, :, z], title=f"{loaded.case}: axial slice {z}")
    return Path(path)


def _refuse_existing(folder: Path, names: list[str], what: str, option: str) -> None:
    """UserInputError naming the files of `names` that already exist in `folder` (nothing replaced)."""
    taken = [name for name in names if (folder / name).exists()]
    if taken:
        shown = ", ".join(taken[:3]) + (" ..." if len(taken) > 3 else "")
        raise UserInputError(f"{folder} already holds {len(taken)} of the {what} to write ({shown}); "
                             f"pass --overwrite to replace them, or choose another {option}")


def fixed_window(art: Artifact) -> tuple[int, int, int] | None:
    """(D, H, W) of the one input size a stored ONNX graph takes (it was exported for a fixed shape);
    None for an artifact with a PyTorch graph, which takes any multiple of its stride."""
    if art.spec.get("kind") == "onnx" and art.spec.get("input_shape"):
        return tuple(int(n) for n in art.spec["input_shape"][-3:])  # type: ignore[return-value]
    return None


def check_fixed_window(art: Artifact, window: Sequence[int], path, what: str, fix: str, sep: str) -> None:
    """ValueError, naming `path`, the graph's size, `what` was asked and how to fix it (`fix` with the
    graph's sizes joined by `sep` in its {}), when an ONNX graph (`fixed_window`) cannot slide `window`."""
    fixed = fixed_window(art)
    if fixed is not None and tuple(window) != fixed:
        raise ValueError(f"{path}: an ONNX graph exported for {'x'.join(map(str, fixed))} windows cannot slide "
                         f"{what} of {'x'.join(map(str, window))}; pass " + fix.format(sep.join(map(str, fixed))))


def default_window(art: Artifact) -> tuple[int, int, int]:
    """The sliding window an artifact is served with unless told: an ONNX graph's fixed input size, else
    the window its stage validated with (`train.window` in its config, as report.py scores it), else 128^3."""
    fixed = fixed_window(art)
    if fixed is not None:
        return fixed
    window = (art.config.get("train") or {}).get("window")
    if window and len(window) == 3:
        return tuple(int(n) for n in window)  # type: ignore[return-value]
    return (128, 128, 128)


def predict_folder(artifact: str | Path, input_dir: str | Path, output_dir: str | Path,
                   window: Sequence[int] | None = None, overlap: float = 0.5, sw_batch: int = 1,
                   progress: bool = True, cases: Sequence[str] | None = None,
                   et_min_voxels: int | None = None, allow_constant_modality: bool = False,
                   overwrite: bool = False, overlay_dir: str | Path | None = None,
                   skip_background: bool = True, runtime: str | None = None, coarse: int = 0) -> PredictResult:
    """Predict every case under `input_dir` (any BraTS layout, or one case folder), or only `cases`.

    `window` None: the artifact's own (`default_window`), printed. Writes `<output_dir>/<case>.nii.gz`
    atomically. `et_min_voxels` None: the threshold calibrated
    for the artifact on its validation cases (extra["et_rule"], 0 when absent). > 0: a case whose predicted ET
    has fewer voxels gets it relabelled NCR/NET. A missing or unusable artifact, no cases, or a
    named case not in `input_dir` raise; a bad case lands in `result.failed` and the rest go on.
    `allow_constant_modality`: a modality constant inside the brain is a warning, not a failed case.
    An output file that already exists is an error (UserInputError, before any prediction) unless
    `overwrite`. `overlay_dir`: also `<overlay_dir>/<case>.png` per case (`write_overlay`; the
    truth drawn when the case has one); a picture that fails is reported, its label map kept.
    `skip_background`: windows without a brain voxel reuse one all-zero window's logits (the same
    label maps, less work); `result.windows` counts them. `runtime` None: the artifact's own module
    (`inference_model`); torch / onnxruntime / openvino: that runtime (UserInputError when it cannot run
    the artifact); auto: the fastest measured on one window here (cached per artifact and machine). The
    choice is printed to stderr and kept in `result.runtime`. `coarse` >= 2: coarse-to-fine
    (`brats.inference`: a first pass at 1/coarse resolution, in a window fitted to the pooled case where
    the runtime takes other sizes (`shape_multiple`), then only the tumour's box; not the same label maps
    as the full pass). The ET rule applied is printed to stderr.
    """
    art = Artifact.load(artifact)
    window_given = window
    window = check_window(default_window(art) if window is None else window, art.spec)
    check_fixed_window(art, window, artifact, "a window", "--window {} (or leave --window out: its own)", " ")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    model = inference_model(art)
    scheme = artifact_scheme(art)
    given_rule = et_min_voxels is not None
    if et_min_voxels is None:
        et_min_voxels = artifact_et_rule(art)
    if et_min_voxels < 0:
        raise ValueError(f"et_min_voxels must be >= 0, got {et_min_voxels}")
    check_coarse(coarse)
    refs = discover_cases(input_dir)
    if cases is not None:
        refs = select_cases(refs, cases, input_dir)
    output_dir = Path(output_dir)
    if not overwrite:
        _refuse_existing(output_dir, [f"{ref.case}.nii.gz" for ref in refs], "label maps", "--output")
    if overlay_dir is not None:
        overlay_dir = Path(overlay_dir)
        if not overwrite:
            _refuse_existing(overlay_dir, [f"{ref.case}.png" for ref in refs], "overlays", "--overlay folder")
    result = PredictResult()
    if runtime is not None:
        try:
            result.runtime, model = choose_runtime(art, model, window, runtime, path=artifact)
        except RuntimeUnavailable as e:
            raise UserInputError(f"{artifact}: runtime {runtime}: {e}") from None
        print(result.runtime.line(), file=sys.stderr)
    coarse_fit = shape_multiple(art, result.runtime) if coarse else 0
    print(f"window: {'x'.join(map(str, window))}, overlap {overlap}"
          + (" (the artifact's own)" if window_given is None else ""), file=sys.stderr)
    print(f"ET rule: {f'a case with fewer than {et_min_voxels} predicted ET voxels gets them relabelled NCR/NET' if et_min_voxels else 'off'} "
          f"({'given' if given_rule else 'calibrated for this artifact' if (art.extra.get('et_rule') or {}).get('et_min_voxels') is not None else 'none recorded'})",
          file=sys.stderr)
    output_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(refs, desc=f"predict ({art.stage})", unit="case", disable=bar_off(progress), file=sys.stderr)
    for ref in bar:
        bar.set_postfix_str(ref.case)
        try:
            full, loaded = predict_ref(model, ref, scheme, window, overlap, sw_batch, et_min_voxels,
                                       allow_constant_modality, skip_background, result.windows, coarse,
                                       coarse_fit)
            path = save_label_map(output_dir / f"{ref.case}.nii.gz", full, loaded.affine, loaded.header)
        except DataError as e:
            result.failed[ref.case] = str(e)
        except Exception as e:  # one case's failure must not cost the others their output
            result.failed[ref.case] = f"case {ref.case}: {type(e).__name__}: {e}"
        else:
            result.written[ref.case] = path
            if overlay_dir is not None:
                try:
                    truth = overlay_truth(ref, allow_constant_modality)
                    result.overlays[ref.case] = write_overlay(overlay_dir / f"{ref.case}.png", loaded, full,
                                                              art.stage, truth)
                except Exception as e:  # the label map is written; only its picture is missing
                    result.failed[ref.case] = f"case {ref.case}: overlay: {type(e).__name__}: {e}"
    return result
