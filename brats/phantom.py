"""Synthetic BraTS-like cases, written in the exact BraTS 2017 release layout.

    python -m brats.phantom OUT --cases 12 --val-cases 2 [--shape 96 96 64] [--seed 0]

writes OUT/Brats17TrainingData/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz and
OUT/Brats17ValidationData/<case>/ (no seg).

Anatomy: a skull-stripped ellipsoidal brain (background exactly 0) with grey-matter cortex,
white matter and two ventricles; a tumour of nested shells sharing one random shape, so
NCR inside ET inside TC inside WT with at least ~2 voxels between shells:
    edema (2)   bright on FLAIR and T2
    ET (4)      bright rim on T1ce (HGG; most LGG have none)
    NCR/NET (1) dark on T1 and T1ce, bright on T2
Per case: an intensity scale, a smooth multiplicative bias field per modality, smooth texture
and noise. Even-indexed cases are stored as int16 (seg uint8), odd ones as float32 (seg float32).
Same seed -> byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from brats.layout import MODALITIES
from brats.nifti import write_nifti

# relative intensity of each tissue per modality (flair, t1, t1ce, t2)
TISSUE = {
    "csf": (0.15, 0.30, 0.30, 1.00),
    "gm": (0.60, 0.70, 0.68, 0.62),
    "wm": (0.48, 1.00, 0.92, 0.42),
    "edema": (1.05, 0.55, 0.55, 0.92),
    "et": (0.80, 0.62, 1.45, 0.70),
    "ncr": (0.55, 0.22, 0.24, 1.05),
    "net": (0.90, 0.45, 0.46, 0.95),  # LGG non-enhancing core
}


@dataclass
class PhantomCase:
    case: str
    grade: str | None  # "hgg" | "lgg"; None for validation cases
    images: dict[str, np.ndarray]  # modality -> (X, Y, Z), int16 or float32
    label: np.ndarray  # (X, Y, Z) BraTS values; stored as uint8 (int16 cases) or float32
    affine: np.ndarray  # (4, 4)


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """1 mm LPS-like grid as in the BraTS releases: diag(-1, -1, 1) with an offset."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = (0.0, float(shape[1] - 1), 0.0)
    return affine


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear-interpolation weights from m coarse points spread over n fine ones."""
    pos = np.linspace(0, m - 1, n)
    lo = np.minimum(np.floor(pos).astype(int), m - 2) if m > 1 else np.zeros(n, int)
    frac = pos - lo
    w = np.zeros((n, m))
    w[np.arange(n), lo] = 1 - frac
    if m > 1:
        w[np.arange(n), lo + 1] += frac
    return w


def _smooth_field(rng: np.random.Generator, shape, coarse=(4, 4, 3)) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse noise, separably (trilinearly) upsampled."""
    noise = rng.standard_normal(coarse)
    wx, wy, wz = (_interp_matrix(s, c) for s, c in zip(shape, coarse))
    field = np.einsum("abc,xa->xbc", noise, wx)
    field = np.einsum("xbc,yb->xyc", field, wy)
    field = np.einsum("xyc,zc->xyz", field, wz)
    return (field / (np.abs(field).max() + 1e-6)).astype(np.float32)


def _direction_warp(rng: np.random.Generator, u: tuple[np.ndarray, ...], amount: float) -> np.ndarray:
    """1 + amount * f(direction): a smooth random bump pattern on the unit sphere."""
    ux, uy, uz = u
    terms = [ux, uy, uz, ux * uy, uy * uz, ux * uz, ux * ux - uy * uy, 2 * uz * uz - ux * ux - uy * uy]
    coef = rng.normal(size=len(terms))
    f = sum(c * t for c, t in zip(coef, terms))
    return 1.0 + amount * f / (np.abs(coef).sum() * 2.0)  # |f| <= 2 * sum|c| bound keeps it in 1 +- amount


def make_case(case: str, grade: str | None, shape=(96, 96, 64), seed: int = 0, index: int = 0,
              as_int16: bool = True) -> PhantomCase:
    """One synthetic case; `grade` None draws HGG-like or LGG-like tumours at random (validation)."""
    rng = np.random.default_rng((seed, index, 7919))
    shape = tuple(int(s) for s in shape)
    tumour_grade = grade or ("hgg" if rng.random() < 0.67 else "lgg")
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = np.array(shape, dtype=np.float32) / 2 - 0.5 + rng.uniform(-1, 1, 3).astype(np.float32)

    # brain: an ellipsoid with a gently warped surface
    radii = np.array(shape, dtype=np.float32) * rng.uniform(0.40, 0.45, 3).astype(np.float32)
    rel = [(g - c) / r for g, c, r in zip(grid, centre, radii)]
    rho = np.sqrt(sum(r * r for r in rel)) + 1e-6
    warp = _direction_warp(rng, tuple(r / rho for r in rel), 0.08)
    d_brain = rho / warp  # < 1 inside the brain
    brain = d_brain < 1.0

    # tissue map: cortex shell, white matter, two ventricles
    tissue = np.where(d_brain > 0.82, 0, 1)  # 0 gm, 1 wm
    vent_off = 0.18 + 0.04 * rng.random()
    for side in (-1, 1):
        v = [(rel[0] - side * vent_off) / 0.10, rel[1] / 0.32, (rel[2] - 0.05) / 0.22]
        tissue = np.where(sum(x * x for x in v) < 1.0, 2, tissue)  # 2 csf
    names = ("gm", "wm", "csf")

    # tumour: nested shells of one warped shape, in one hemisphere, clear of the brain edge
    scale = float(min(r for r in radii))  # voxels
    r_wt = scale * rng.uniform(0.42, 0.52)
    side = rng.choice([-1.0, 1.0])
    t_centre = centre + np.array([side * radii[0] * rng.uniform(0.2, 0.3), radii[1] * rng.uniform(-0.2, 0.2),
                                  radii[2] * rng.uniform(-0.15, 0.15)], dtype=np.float32)
    tv = [g - c for g, c in zip(grid, t_centre)]
    t_rho = np.sqrt(sum(x * x for x in tv)) + 1e-6
    t_warp = _direction_warp(rng, tuple(x / t_rho for x in tv), 0.2)
    t_d = t_rho / t_warp / r_wt  # < 1 inside WT
    label = np.zeros(shape, dtype=np.uint8)
    label[t_d < 1.0] = 2
    core = t_d < rng.uniform(0.55, 0.65)
    inner = t_d < rng.uniform(0.30, 0.38)
    has_et = tumour_grade == "hgg" or rng.random() < 0.15
    if has_et:
        label[core] = 4
        label[inner] = 1
    else:
        label[core] = 1
    label[~brain] = 0

    # intensities: tissue means, tumour classes, texture, bias, scale
    per_case = rng.uniform(0.85, 1.15, (len(TISSUE), 4))
    texture = _smooth_field(rng, shape, coarse=(12, 12, 8))
    images = {}
    base_scale = rng.uniform(300, 1500)
    for m, modality in enumerate(MODALITIES):
        img = np.zeros(shape, dtype=np.float32)
        for t, name in enumerate(names):
            img[tissue == t] = TISSUE[name][m] * per_case[list(TISSUE).index(name), m]
        core_name = "ncr" if has_et else "net"
        for value, name in ((2, "edema"), (4, "et"), (1, core_name)):
            img[label == value] = TISSUE[name][m] * per_case[list(TISSUE).index(name), m]
        img = ndimage.gaussian_filter(img, 0.6)  # partial volume at boundaries
        img *= 1.0 + 0.06 * texture + 0.03 * rng.standard_normal(shape).astype(np.float32)
        img *= np.exp(0.2 * _smooth_field(rng, shape))  # bias field
        img *= base_scale * rng.uniform(0.7, 1.3)
        img = np.maximum(img, 1.0)  # brain voxels never 0
        img[~brain] = 0.0
        images[modality] = np.round(img).astype(np.int16) if as_int16 else img.astype(np.float32)
    stored_label = label if as_int16 else label.astype(np.float32)
    return PhantomCase(case, grade, images, stored_label, brats_affine(shape))


def case_names(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """BraTS 2017-style names: Brats17_TCIA_105_1, Brats17_CBICA_AAB_1, Brats17_2013_10_1."""
    names = []
    while len(names) < n:
        kind = rng.integers(3)
        if kind == 0:
            name = f"Brats17_TCIA_{rng.integers(100, 700)}_1"
        elif kind == 1:
            letters = "".join(chr(ord("A") + int(x)) for x in rng.integers(0, 26, 3))
            name = f"Brats17_CBICA_{letters}_1"
        else:
            name = f"Brats17_2013_{rng.integers(0, 30)}_1"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def write_case(folder: Path, pc: PhantomCase, with_label: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for modality in MODALITIES:
        write_nifti(folder / f"{pc.case}_{modality}.nii.gz", pc.images[modality], pc.affine)
    if with_label:
        write_nifti(folder / f"{pc.case}_seg.nii.gz", pc.label, pc.affine)


def write_phantom_dataset(out: str | Path, cases: int = 12, val_cases: int = 2, shape=(96, 96, 64),
                          seed: int = 0) -> list[Path]:
    """Write the training (about 2/3 HGG) and validation releases under `out`; returns case folders."""
    out = Path(out)
    rng = np.random.default_rng((seed, 104729))
    taken: set[str] = set()
    n_hgg = int(round(cases * 2 / 3)) if cases > 1 else cases
    grades = ["hgg"] * n_hgg + ["lgg"] * (cases - n_hgg)
    train_names = case_names(cases, rng, taken)
    val_names = case_names(val_cases, rng, taken)
    folders = []
    for i, (name, grade) in enumerate(zip(train_names, grades)):
        pc = make_case(name, grade, shape, seed, index=i, as_int16=i % 2 == 0)
        folder = out / "Brats17TrainingData" / grade.upper() / name
        write_case(folder, pc)
        folders.append(folder)
    for j, name in enumerate(val_names):
        i = cases + j
        pc = make_case(name, None, shape, seed, index=i, as_int16=i % 2 == 0)
        folder = out / "Brats17ValidationData" / name
        write_case(folder, pc, with_label=False)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brats.phantom",
        description="Write synthetic BraTS-like cases in the BraTS 2017 folder layout.",
    )
    parser.add_argument("out", help="output folder (gets Brats17TrainingData/ and Brats17ValidationData/)")
    parser.add_argument("--cases", type=int, default=12, help="training cases (about 2/3 HGG, 1/3 LGG)")
    parser.add_argument("--val-cases", type=int, default=2, help="validation-release cases (no seg)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cases < 0 or args.val_cases < 0 or min(args.shape) < 16:
        parser.error("case counts must be >= 0 and every shape size >= 16")
    folders = write_phantom_dataset(args.out, args.cases, args.val_cases, tuple(args.shape), args.seed)
    print(f"wrote {len(folders)} case(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
