"""Whole-case inference: Gaussian-weighted sliding window, label maps, and back to the full grid.

The model only ever sees tensors of exactly the window size (so a model that needs sizes divisible
by 32 works whatever the case size): windows tile the volume with the requested overlap, the last
one flush with the end, and a volume smaller than the window is zero-padded up to it.

Background windows (`skip_background`): a window in which every modality is 0 at every voxel holds no
brain (the cache and predict z-score brain voxels and leave everything outside the brain exactly 0,
`brats.prepare.zscore`), so the model sees the same all-zero tensor there whatever the window's
place. Its logits are computed once per case, from one all-zero window, and added wherever such a
window lies, in the windows' usual order: the Gaussian blend, and so the label map, is the same as
without skipping (bit for bit with `sw_batch` 1; with larger batches the other windows are batched
differently, which can move logits by float rounding, ~1e-6). A constant "confident background"
would not be: it would change the blend at the brain's edge, where skipped and computed windows
overlap.

Coarse-to-fine (`coarse=f`, off by default): on a brain-cropped case every 50 %-overlap window reaches
the brain, so skipping saves nothing there (bench/bench_skip.py). A first pass of the same model on the
image average-pooled by f (one or a few windows) gives a whole-tumour probability; the box of voxels
above COARSE_THRESHOLD (any region), grown by COARSE_MARGIN voxels and to at least one window per axis
(so the model sees real context, not padding), is then predicted at full resolution and everything
outside it is background. A case that fits in one window, or has an axis shorter than f, gets the
full pass (the box would be the whole case). With `coarse_fit=m` (a model that takes any multiple of m
per axis, as eager PyTorch does) the coarse window shrinks to the pooled image rounded up to multiples
of m, instead of padding it to the full window: a 197x197x131 brain box pooled by 2 runs one 128x128x96
window rather than 128^3, pooled by 3 one 96x96x64. This is not the same label map as the full pass (other window positions inside the box;
a tumour the coarse pass misses is lost): `bench/bench_targets.py` measures time, and Dice on/off where
held-out cases are larger than a window. When the coarse pass finds nothing, the full pass runs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from brats.labels import is_softmax, probs_to_brats, suppress_small_et
from common.progress import bar_off

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, C, *window) -> (B, K, *window)

# Floor of the importance map relative to its centre: far corners of a window would otherwise
# underflow towards 0 and a voxel seen only there would get a 0 / 0 average.
MIN_WEIGHT = 1e-4


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """(D, H, W) float32 map, 1 at the centre, sigma = sigma_scale * window per axis (as nnU-Net).

    Centred at (n - 1) / 2 so the map is mirror-symmetric along each axis, floored at MIN_WEIGHT.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    axes = []
    for n in window:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = sigma_scale * n
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    return weight.clamp_min(MIN_WEIGHT).to(torch.float32)


@functools.lru_cache(maxsize=8)
def _shared_importance(window: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    """`gaussian_importance`, computed once per window and shared (a 128^3 map costs ~25 ms): never modify it.
    Built outside inference mode, so a first call under `torch.inference_mode()` does not cache an
    inference tensor that a later autograd use would refuse."""
    with torch.inference_mode(False):
        return gaussian_importance(window, sigma_scale)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets along one axis: evenly spread, step <= window * (1 - overlap), last flush."""
    if size <= window:
        return [0]
    max_step = max(1, int(window * (1 - overlap)))
    count = math.ceil((size - window) / max_step) + 1
    step = (size - window) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


# Coarse-to-fine: whole-tumour probability that marks the box, and the box's margin in full-resolution voxels.
COARSE_THRESHOLD = 0.25
COARSE_MARGIN = 16


@dataclass
class WindowCount:
    """Windows of one or more sliding-window passes: how many, and how many were skipped as background;
    with coarse-to-fine also the coarse windows run, the full-resolution windows the box saved, and the
    cases that got the full pass all the same (within one window, too small to pool, or no tumour found)."""

    windows: int = 0
    skipped: int = 0
    coarse: int = 0
    saved: int = 0
    full_pass: int = 0

    def add(self, other: "WindowCount") -> None:
        self.windows += other.windows
        self.skipped += other.skipped
        self.coarse += other.coarse
        self.saved += other.saved
        self.full_pass += other.full_pass

    def line(self) -> str:
        line = f"skipped {self.skipped} of {self.windows} windows (background)"
        if self.coarse:
            line += f"; coarse-to-fine: {self.coarse} coarse window(s) run, {self.saved} full-resolution window(s) saved"
        if self.full_pass:
            line += (f"; {self.full_pass} case(s) got the full pass (within one window, too small to pool, "
                     "or no tumour found by the coarse pass)")
        return line


def _check_args(image: torch.Tensor, window: Sequence[int], overlap: float, sw_batch: int) -> tuple[int, ...]:
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window must be three positive sizes, got {window}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch < 1:
        raise ValueError(f"sw_batch must be >= 1, got {sw_batch}")
    return window


def sliding_window(
    predict: Predict,
    image: torch.Tensor,
    window: Sequence[int] = (128, 128, 128),
    overlap: float = 0.5,
    sw_batch: int = 2,
    gaussian: bool = True,
    sigma_scale: float = 0.125,
    progress: bool = False,
    out_device: str | torch.device = "cpu",
    skip_background: bool = True,
    count: WindowCount | None = None,
    brain: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K, D, H, W) float32: importance-weighted average of `predict` over windows of `image` (one window:
    its logits as they are, which the weighted average equals up to float rounding).

    `image` (C, D, H, W) stays on its device; windows are cut from it `sw_batch` at a time and
    the outputs accumulate on `out_device`. `skip_background`: all-zero windows are not run but
    take the logits of one all-zero window (module docstring). `count`, when given, is increased by
    this pass's windows and skipped windows. `brain`: `image`'s brain mask (D, H, W) bool, where any
    modality is non-zero, when the caller has it already (`brain_mask`); computed here otherwise.
    """
    image = torch.as_tensor(image)
    window = _check_args(image, window, overlap, sw_batch)
    spatial = tuple(image.shape[1:])
    image = _pad_to_window(image, window)  # zeros at the end of each short axis; cropped off below
    padded = tuple(image.shape[1:])
    if skip_background:  # the mask of the padded image, or the caller's padded alike
        brain = brain_mask(image) if brain is None else _pad_to_window(_checked_mask(brain, spatial), window)
    slices, run = _window_plan(padded, window, overlap, brain if skip_background else None)
    if count is not None:
        count.add(WindowCount(len(slices), run.count(False)))
    d, h, w = spatial
    if len(slices) == 1:  # one window: the blend would multiply by the weights and divide them out again
        with torch.no_grad():
            ((_, logits),) = _window_logits(predict, image, slices, run, sw_batch, progress)
        return logits.to(device=out_device, dtype=torch.float32)[:, :d, :h, :w].contiguous()
    weight = _shared_importance(window, float(sigma_scale)) if gaussian else torch.ones(window)
    weight = weight.to(out_device)
    out: torch.Tensor | None = None
    total = torch.zeros((1, *padded), dtype=torch.float32, device=out_device)
    with torch.no_grad():
        for s, logits in _window_logits(predict, image, slices, run, sw_batch, progress):
            logits = logits.to(device=out_device, dtype=torch.float32)
            if out is None:
                out = torch.zeros((logits.shape[0], *padded), dtype=torch.float32, device=out_device)
            out[(slice(None), *s)] += logits * weight
            total[(slice(None), *s)] += weight
    assert out is not None  # at least one window always exists
    out /= total
    return out[:, :d, :h, :w].contiguous()


def _pad_to_window(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """`x` (..., D, H, W) zero-padded at the end of each spatial axis shorter than `window` (itself when none is)."""
    pad = []
    for n, w in reversed(list(zip(x.shape[-3:], window))):
        pad += [0, max(0, w - n)]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def brain_mask(image: torch.Tensor) -> torch.Tensor:
    """(D, H, W) bool: voxels of `image` (C, D, H, W) where any modality is non-zero (the brain, as
    `brats.prepare.zscore` leaves everything outside it exactly 0)."""
    return image.ne(0).any(dim=0)


def _checked_mask(brain: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    if brain.dtype != torch.bool or tuple(brain.shape) != tuple(spatial):
        raise ValueError(f"brain mask must be bool of the image's spatial shape {tuple(spatial)}, "
                         f"got {brain.dtype} {tuple(brain.shape)}")
    return brain


def _window_plan(spatial: Sequence[int], window: tuple[int, ...], overlap: float,
                 brain: torch.Tensor | None) -> tuple[list[tuple[slice, ...]], list[bool]]:
    """The windows' slices of a grid `spatial` (each axis at least the window) in their order, and whether
    each is run: `brain` (D, H, W) bool, where any modality is non-zero (None: every window runs).

    A window holds brain when the mask has a voxel in its box; the box test is done axis by axis
    (reduce over the window's depth once per depth start, then its height, then its width), so each
    mask voxel is read about once per depth start instead of once per window."""
    starts = [window_starts(n, w, overlap) for n, w in zip(spatial, window)]
    slices = [tuple(slice(c, c + w) for c, w in zip((z, y, x), window))
              for z in starts[0] for y in starts[1] for x in starts[2]]
    if brain is None:
        return slices, [True] * len(slices)
    wd, wh, ww = window
    run = []
    for z in starts[0]:
        plane = brain[z:z + wd].any(dim=0)  # (H, W): brain anywhere in this depth range
        for y in starts[1]:
            row = plane[y:y + wh].any(dim=0)  # (W,)
            run += [bool(row[x:x + ww].any()) for x in starts[2]]
    return slices, run


def _window_logits(predict: Predict, image: torch.Tensor, slices: list[tuple[slice, ...]], run: list[bool],
                   sw_batch: int, progress: bool) -> Iterator[tuple[tuple[slice, ...], torch.Tensor]]:
    """(window slices, logits (K, *window)) for every window, in the order of `slices` (so sums over
    windows add up in the same order, skipped or not): the windows with `run` go through `predict`
    `sw_batch` at a time; the others get the logits of one all-zero window, computed once."""
    window = tuple(s.stop - s.start for s in slices[0])
    background: torch.Tensor | None = None
    waiting: list[int] = []  # windows in order, up to the last one of the batch being filled
    batch: list[int] = []
    bar = tqdm(total=sum(run), desc="sliding window", unit="window", disable=bar_off(progress), leave=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = predict(x)
        if y.ndim != 5 or y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != window:
            raise ValueError(
                f"predict returned shape {tuple(y.shape)} for input {tuple(x.shape)}; "
                f"expected ({x.shape[0]}, K, {', '.join(map(str, window))})"
            )
        return y

    def flush() -> Iterator[tuple[tuple[slice, ...], torch.Tensor]]:
        nonlocal background
        done = {}
        if batch:
            y = forward(torch.stack([image[(slice(None), *slices[i])] for i in batch]))  # (B, C, *window)
            done = dict(zip(batch, y))
            bar.update(len(batch))
        for i in waiting:
            if i not in done and background is None:
                background = forward(torch.zeros((1, image.shape[0], *window), dtype=image.dtype,
                                                 device=image.device))[0]
            yield slices[i], done.get(i, background)
        waiting.clear()
        batch.clear()

    with bar:
        for i, runs in enumerate(run):
            waiting.append(i)
            if runs:
                batch.append(i)
                if len(batch) == sw_batch:
                    yield from flush()
        yield from flush()


def predict_case(
    predict: Predict,
    image: torch.Tensor | np.ndarray,
    scheme: str,
    window: Sequence[int] = (128, 128, 128),
    overlap: float = 0.5,
    sw_batch: int = 2,
    et_min_voxels: int = 0,
    coarse: int = 0,
    coarse_fit: int = 0,
    **kwargs,
) -> np.ndarray:
    """BraTS label map (D, H, W) uint8 (values 0/1/2/4) of one case's image (C, D, H, W).

    regions: sigmoid on channels [TC, WT, ET]; seed3: softmax, class 1 core -> 1, 2 edema -> 2.
    `et_min_voxels` > 0: a case with fewer ET voxels than that gets them relabelled NCR/NET
    (`brats.labels.suppress_small_et`). `coarse` >= 2: coarse-to-fine with that pooling factor (module
    docstring; 0: off); `coarse_fit` > 0: its window fitted to the pooled image in multiples of that
    (the model must take such sizes; 0: the coarse pass uses `window`). Extra keyword arguments go to
    `sliding_window`.
    """
    image = torch.as_tensor(image)
    check_coarse(coarse, coarse_fit)
    brain = kwargs.pop("brain", None)  # a caller's brain mask of `image`: for the full pass, or the box and the count
    # a case within one window: the box would be the whole case, so the coarse pass would only cost time;
    # an axis shorter than the pooling factor cannot be pooled: the full pass either way
    worth = coarse and any(n > w for n, w in zip(image.shape[1:], window)) and min(image.shape[1:]) >= coarse
    box = tumour_box(predict, image, scheme, window, coarse, sw_batch, fit=coarse_fit, **kwargs) if worth else None
    if box is None:
        if coarse and kwargs.get("count") is not None:
            kwargs["count"].full_pass += 1
        logits = sliding_window(predict, image, window, overlap, sw_batch, brain=brain, **kwargs)
        return suppress_small_et(_labels(logits, scheme), et_min_voxels)
    count, skip = kwargs.pop("count", None), kwargs.get("skip_background", True)
    # counting needs the whole case's brain mask (the full pass's windows); the box pass shares it.
    # Without a count only the box's mask is needed, and sliding_window makes it (a fifth of the voxels)
    if brain is None and count is not None:
        brain = brain_mask(image)
    elif brain is not None:
        brain = _checked_mask(brain, image.shape[1:])
    inside = WindowCount()
    logits = sliding_window(predict, image[(slice(None), *box)], window, overlap, sw_batch, count=inside,
                            brain=brain[box] if skip and brain is not None else None, **kwargs)
    if count is not None:  # the full pass's windows, counted without running it, minus the box's
        full = WindowCount()
        _grid(brain, window, overlap, skip, full)
        count.add(inside)
        count.saved += (full.windows - full.skipped) - (inside.windows - inside.skipped)
    label = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
    label[box] = _labels(logits, scheme)
    return suppress_small_et(label, et_min_voxels)


def _labels(logits: torch.Tensor, scheme: str) -> np.ndarray:
    """(D, H, W) uint8 BraTS labels of logits (K, D, H, W): softmax schemes take the argmax in NumPy
    (faster there than torch's), region schemes threshold in torch (faster there than NumPy's)."""
    if is_softmax(scheme):
        return np.asarray(probs_to_brats(torch.softmax(logits, dim=0).cpu().numpy(), scheme), dtype=np.uint8)
    return probs_to_brats(torch.sigmoid(logits), scheme).cpu().numpy()


def _grid(brain: torch.Tensor, window: Sequence[int], overlap: float, skip_background: bool,
          count: WindowCount) -> None:
    """Count the windows `sliding_window` would run (and skip) on an image whose brain mask (D, H, W) is
    `brain`, without running any."""
    brain = _pad_to_window(brain, window)
    slices, run = _window_plan(tuple(brain.shape), tuple(window), overlap, brain if skip_background else None)
    count.add(WindowCount(len(slices), run.count(False)))


def check_coarse(coarse: int, fit: int = 0) -> None:
    """ValueError unless `coarse` is a pooling factor >= 2 or 0 (off) and `fit` (`coarse_window`) >= 0."""
    if coarse and coarse < 2:
        raise ValueError(f"coarse must be a pooling factor >= 2 (or 0: off), got {coarse}")
    if fit < 0:
        raise ValueError(f"coarse_fit must be >= 0 (0: the full window), got {fit}")


def coarse_window(pooled: Sequence[int], window: Sequence[int], fit: int) -> tuple[int, ...]:
    """The coarse pass's window for a pooled image of spatial size `pooled`: per axis the smallest multiple
    of `fit` that holds it, at most `window` (`fit` 0: `window` itself). ValueError for fit < 0."""
    check_coarse(0, fit)
    if not fit:
        return tuple(window)
    return tuple(min(w, max(fit, -(-n // fit) * fit)) for n, w in zip(pooled, window))


def tumour_box(predict: Predict, image: torch.Tensor, scheme: str, window: Sequence[int], factor: int,
               sw_batch: int = 1, fit: int = 0, **kwargs) -> tuple[slice, slice, slice] | None:
    """Coarse pass (module docstring): the (D, H, W) slices of `image` (C, D, H, W; every axis >= `factor`)
    to predict at full resolution, or None when no voxel of the 1/`factor` pass reaches COARSE_THRESHOLD.
    `fit`: as `coarse_window`. The coarse windows are counted in `kwargs["count"].coarse` when given.
    ValueError for factor < 2 or fit < 0."""
    if factor < 2:
        raise ValueError(f"coarse must be a pooling factor >= 2 (or 0: off), got {factor}")
    spatial = tuple(image.shape[1:])
    low = torch.nn.functional.avg_pool3d(image[None].float(), factor, ceil_mode=True)[0]
    passed = WindowCount()
    logits = sliding_window(predict, low, coarse_window(low.shape[1:], window, fit), 0.5, sw_batch, count=passed,
                            **{k: v for k, v in kwargs.items() if k != "count"})
    if kwargs.get("count") is not None:
        kwargs["count"].coarse += passed.windows - passed.skipped
    # any tumour: 1 - p(background) for softmax schemes; for regions the largest of the TC, WT and ET
    # probabilities (probs_to_brats labels a voxel tumour when any of them passes 0.5)
    wt = 1 - torch.softmax(logits, dim=0)[0] if is_softmax(scheme) else torch.sigmoid(logits).amax(0)
    found = (wt >= COARSE_THRESHOLD).nonzero()
    if found.numel() == 0:
        return None
    box = []
    for axis, (n, w) in enumerate(zip(spatial, window)):
        lo = max(0, int(found[:, axis].min()) * factor - COARSE_MARGIN)
        hi = min(n, (int(found[:, axis].max()) + 1) * factor + COARSE_MARGIN)
        if hi - lo < w:  # grow to one window (centred, inside the image) so the model sees real context
            lo = max(0, min(lo - (w - (hi - lo)) // 2, n - w))
            hi = min(n, lo + w)
        box.append(slice(lo, hi))
    return tuple(box)


def to_full_grid(
    label_crop: np.ndarray, bbox: Sequence[Sequence[int]], full_shape: Sequence[int]
) -> np.ndarray:
    """Place a cropped label map back in a zero volume of `full_shape`.

    `bbox` is [[x0, x1], [y0, y1], [z0, z1]], half-open (x1 exclusive), so its extents must equal
    `label_crop.shape`; anything else is an error rather than a silent shift.
    """
    label_crop = np.asarray(label_crop)
    full_shape = tuple(int(s) for s in full_shape)
    bbox = [(int(a), int(b)) for a, b in bbox]
    if len(bbox) != label_crop.ndim or len(full_shape) != label_crop.ndim:
        raise ValueError(f"bbox {bbox} / full shape {full_shape} do not match a {label_crop.ndim}-D crop")
    extents = tuple(b - a for a, b in bbox)
    if extents != label_crop.shape:
        raise ValueError(f"bbox {bbox} spans {extents}, but the crop has shape {label_crop.shape}")
    if any(a < 0 or b > n for (a, b), n in zip(bbox, full_shape)):
        raise ValueError(f"bbox {bbox} lies outside the full shape {full_shape}")
    full = np.zeros(full_shape, dtype=label_crop.dtype)
    full[tuple(slice(a, b) for a, b in bbox)] = label_crop
    return full
