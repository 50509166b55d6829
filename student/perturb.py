"""Heavy perturbation of the student's input during self-distillation, seeded by a torch.Generator.

The teacher always sees the clean crop x and gives logits T. Per sample we draw a geometric change g
(flips, a 90-degree rotation, a small affine) and an intensity change i (scale, shift, gamma, noise,
blur, modality dropout); the student sees i(g(x)) and learns against g(T) and g(label), so targets
stay aligned with its input. Logits are resampled linearly, labels by nearest neighbour; voxels the
affine pulls in from outside the crop are marked invalid for distillation (`mask`).
With `prob` < 1 only that share of the samples is perturbed at all; the rest pass clean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import PerturbConfig


ROTATION_PLANES = ("axial", "all")  # brain MRI: axial-plane rotations are the plausible ones

@dataclass
class Geometric:
    """One sample's geometric change, applied in this order: flips, rot90, affine."""

    flips: tuple[int, ...] = ()  # spatial axes (0 D, 1 H, 2 W) to flip
    rot_k: int = 0  # quarter turns in the plane `rot_axes`
    rot_axes: tuple[int, int] = (0, 1)
    theta: torch.Tensor | None = None  # (3, 4) affine_grid matrix (output -> input, normalised coords)


@dataclass
class Perturbed:
    image: torch.Tensor  # (B, C, D, H, W) student input
    target: torch.Tensor  # (B, K, D, H, W) teacher logits moved with the input
    label: torch.Tensor  # (B, D, H, W) BraTS labels moved with the input
    mask: torch.Tensor  # (B, 1, D, H, W) bool: voxels with a valid teacher target
    features: list[torch.Tensor] | None = None  # teacher stage features moved with the input


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(gen: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand(1, generator=gen)) < p


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """3x3 rotation from three angles (radians) about the three axes."""
    mats = []
    for axis, a in enumerate(angles.tolist()):
        c, s = math.cos(a), math.sin(a)
        m = torch.eye(3)
        i, j = [k for k in range(3) if k != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def sample_geometric(cfg: PerturbConfig, gen: torch.Generator, spatial: tuple[int, int, int]) -> Geometric:
    """Draw flips per axis, a rot90 in a plane whose sides are equal (so the shape is kept), an affine;
    rotations only in the axial (X, Y) plane unless `rotation_planes` is "all"."""
    if cfg.rotation_planes not in ROTATION_PLANES:
        raise ValueError(f"distill.perturb.rotation_planes={cfg.rotation_planes!r}: expected one of "
                         f"{', '.join(ROTATION_PLANES)}")
    axial = cfg.rotation_planes == "axial"
    flips = tuple(a for a in range(3) if _chance(gen, cfg.flip_prob))
    planes = ((0, 1),) if axial else ((0, 1), (0, 2), (1, 2))
    square = [(a, b) for a, b in planes if spatial[a] == spatial[b]]
    rot_k, rot_axes = 0, (0, 1)
    if square and _chance(gen, cfg.rot90_prob):
        rot_axes = square[int(torch.randint(len(square), (1,), generator=gen))]
        rot_k = int(torch.randint(1, 4, (1,), generator=gen))
    theta = None
    if _chance(gen, cfg.affine_prob):
        angles = _uniform(gen, -1, 1, 3) * math.radians(cfg.affine_degrees)
        if axial:  # about the Z axis only: grid axis x is voxel axis 2 (Z), so keep angle 0
            angles[1:] = 0.0
        scale = float(_uniform(gen, 1 - cfg.affine_scale, 1 + cfg.affine_scale))
        # rotate in voxel space, expressed in affine_grid's normalised (x=W, y=H, z=D) coordinates
        size = torch.tensor([spatial[2], spatial[1], spatial[0]], dtype=torch.float32)
        a = torch.diag(1 / size) @ _rotation(angles) @ torch.diag(size) / scale
        theta = torch.cat([a, torch.zeros(3, 1)], dim=1)
    return Geometric(flips, rot_k, rot_axes, theta)


def apply_geometric(x: torch.Tensor, g: Geometric, mode: str = "linear", fill: float = 0.0) -> torch.Tensor:
    """Move one sample (C, D, H, W) or label map (D, H, W); `mode` linear (images, logits) or nearest.

    Works at any grid size (feature maps too): rot90 and flips act on indices, the affine on
    normalised coordinates. `fill` is the value outside the original crop.
    """
    squeeze = x.ndim == 3
    y = x[None] if squeeze else x  # (C, D, H, W)
    if g.flips:
        y = torch.flip(y, [a + 1 for a in g.flips])
    if g.rot_k:
        y = torch.rot90(y, g.rot_k, [g.rot_axes[0] + 1, g.rot_axes[1] + 1])
    if g.theta is not None:
        dtype = y.dtype
        grid = F.affine_grid(g.theta[None].to(y.device, torch.float32), [1, *y.shape], align_corners=False)
        z = y[None].float() - fill
        z = F.grid_sample(z, grid, mode="bilinear" if mode == "linear" else "nearest",
                          padding_mode="zeros", align_corners=False)[0] + fill
        y = z.round().to(dtype) if not dtype.is_floating_point else z.to(dtype)
    return y[0] if squeeze else y


def valid_mask(g: Geometric, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(1, D', H', W') bool: output voxels whose value came from inside the crop."""
    ones = torch.ones(1, *spatial, device=device)
    return apply_geometric(ones, g, "linear") > 0.999


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, D, H, W), kernel radius 2 sigma."""
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.reshape(shape).expand(c, 1, *shape[2:]), groups=c)
    return y[0]


def apply_intensity(x: torch.Tensor, cfg: PerturbConfig, gen: torch.Generator) -> torch.Tensor:
    """Intensity perturbation of one sample (C, D, H, W): gamma, scale, shift, blur, noise, modality dropout."""
    c = x.shape[0]
    view = (c, 1, 1, 1)
    dev = x.device
    if cfg.gamma > 0:
        gamma = _uniform(gen, 1 - cfg.gamma, 1 + cfg.gamma, c).to(dev).view(view)
        lo = x.flatten(1).amin(1).view(view)
        hi = x.flatten(1).amax(1).view(view)
        span = (hi - lo).clamp_min(1e-6)
        x = lo + span * ((x - lo) / span).clamp(0, 1) ** gamma
    scale = _uniform(gen, 1 - cfg.intensity_scale, 1 + cfg.intensity_scale, c).to(dev).view(view)
    shift = _uniform(gen, -cfg.intensity_shift, cfg.intensity_shift, c).to(dev).view(view)
    x = x * scale + shift
    if _chance(gen, cfg.blur_prob):
        x = _gaussian_blur(x, float(_uniform(gen, 0.5, 1.0)))
    if cfg.noise_std > 0:
        std = float(_uniform(gen, 0, cfg.noise_std))
        x = x + std * torch.randn(x.shape, generator=gen).to(dev, x.dtype)
    if _chance(gen, cfg.modality_dropout):
        x = x.clone()
        x[int(torch.randint(c, (1,), generator=gen))] = 0
    return x


def perturb_batch(
    image: torch.Tensor,
    teacher_logits: torch.Tensor,
    label: torch.Tensor,
    cfg: PerturbConfig,
    gen: torch.Generator,
    features: list[torch.Tensor] | None = None,
    geometric: list[Geometric] | None = None,
    intensity: bool = True,
) -> Perturbed:
    """Student input i(g(x)) and targets g(T), g(label) for a batch; one draw per sample.

    Each sample is perturbed with probability `cfg.prob` (one draw per sample, before its changes are
    drawn); the others pass unchanged, so the student also sees the clean inputs it is validated on.
    `geometric` fixes the per-sample changes (tests); otherwise they are drawn from `gen`.
    """
    if not 0.0 <= cfg.prob <= 1.0:
        raise ValueError(f"distill.perturb.prob must be in [0, 1], got {cfg.prob}")
    spatial = tuple(image.shape[2:])
    images, targets, labels, masks = [], [], [], []
    feats: list[list[torch.Tensor]] = [[] for _ in features or []]
    for b in range(image.shape[0]):
        if cfg.prob < 1.0 and float(torch.rand(1, generator=gen)) >= cfg.prob:
            g, change_intensity = Geometric(), False  # this sample stays clean
        else:
            g = geometric[b] if geometric is not None else sample_geometric(cfg, gen, spatial)
            change_intensity = intensity
        x = apply_geometric(image[b], g, "linear")
        images.append(apply_intensity(x, cfg, gen) if change_intensity else x)
        targets.append(apply_geometric(teacher_logits[b], g, "linear"))
        labels.append(apply_geometric(label[b], g, "nearest"))
        masks.append(valid_mask(g, spatial, image.device))
        for k, f in enumerate(features or []):
            feats[k].append(apply_geometric(f[b], g, "linear"))
    return Perturbed(
        image=torch.stack(images),
        target=torch.stack(targets),
        label=torch.stack(labels),
        mask=torch.stack(masks),
        features=[torch.stack(f) for f in feats] if features is not None else None,
    )
