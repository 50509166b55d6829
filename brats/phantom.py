"""Synthetic BraTS-like cases, written in the exact BraTS 2017 release layout.

    python -m brats.phantom OUT --cases 12 --val-cases 2 [--shape 96 96 64] [--seed 0] [--family demo]

writes OUT/Brats17TrainingData/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz and
OUT/Brats17ValidationData/<case>/ (no seg). Labels are BraTS values 0/1/2/4 in every family.

Families (`--family`), two kinds of case that differ on purpose, so that a model tuned on one can
be scored on the other:

demo (default; what the demo trains on, output unchanged since the first version)
    A skull-stripped ellipsoidal brain (background exactly 0) with grey-matter cortex, white
    matter and two ventricles; a tumour of nested shells sharing one random shape, so NCR inside
    ET inside TC inside WT with at least ~2 voxels between shells:
        edema (2)   bright on FLAIR and T2
        ET (4)      bright rim on T1ce (HGG; most LGG have none)
        NCR/NET (1) dark on T1 and T1ce, bright on T2
    About 2/3 HGG, 85 % of the LGG without ET (about 28 % of all cases); ET is about 20 % of
    the whole tumour's volume.

lgg-rich (LGG-rich, small ET, low contrast, other anatomy)
    A smaller brain, longer front to back and more warped; a thicker folded cortex, a CSF rim,
    deep grey nuclei, long lateral ventricles and a third ventricle; other relative intensities
    per modality (darker CSF on FLAIR, weaker grey/white contrast on T1), more noise and a
    stronger bias field. Tumours are multi-lobed, elongated or round, small, medium or large;
    tumour classes are blended with the tissue they infiltrate, so their contrast is lower.
    ET is a thin (1-2 voxel, sometimes broken) rim or a few small enhancing foci; 45 % of the
    training cases are LGG, and 35 % of all cases (rounded) have no ET at all. ET is about 6 % of
    the whole tumour's volume, the whole tumour about a third of the demo's.

Per case: an intensity scale, a smooth multiplicative bias field per modality, smooth texture
and noise. Even-indexed cases are stored as int16 (seg uint8), odd ones as float32 (seg float32).
Same seed and family -> byte-identical files.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from brats.layout import MODALITIES
from brats.nifti import write_nifti

# relative intensity of each tissue per modality (flair, t1, t1ce, t2), demo family
TISSUE = {
    "csf": (0.15, 0.30, 0.30, 1.00),
    "gm": (0.60, 0.70, 0.68, 0.62),
    "wm": (0.48, 1.00, 0.92, 0.42),
    "edema": (1.05, 0.55, 0.55, 0.92),
    "et": (0.80, 0.62, 1.45, 0.70),
    "ncr": (0.55, 0.22, 0.24, 1.05),
    "net": (0.90, 0.45, 0.46, 0.95),  # LGG non-enhancing core
}

# lgg-rich family: darker CSF on FLAIR, weaker grey/white contrast on T1, deep grey nuclei; tumour
# classes nearer the tissue (and blended with it per case, see `_lgg_rich_case`)
TISSUE_LGG_RICH = {
    "csf": (0.10, 0.26, 0.28, 1.10),
    "gm": (0.66, 0.64, 0.62, 0.72),
    "wm": (0.54, 0.86, 0.80, 0.52),
    "deep": (0.62, 0.74, 0.71, 0.64),  # deep grey nuclei
    "edema": (0.86, 0.60, 0.60, 0.84),
    "et": (0.74, 0.66, 1.12, 0.72),
    "ncr": (0.64, 0.40, 0.42, 0.94),
    "net": (0.80, 0.52, 0.54, 0.86),
}

FAMILIES = ("demo", "lgg-rich")
# lgg-rich: share of LGG among training cases, and of cases without ET among all of them
LGG_RICH_LGG_SHARE = 0.45
LGG_RICH_NO_ET_SHARE = 0.35
MIN_ET_VOXELS = 6  # a case meant to have ET gets at least this many ET voxels


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


def _acquire(img: np.ndarray, rng: np.random.Generator, texture: np.ndarray, brain: np.ndarray, base_scale: float,
             as_int16: bool, *, blur: float, texture_amp: float, noise: float, bias: float,
             gain: tuple[float, float]) -> np.ndarray:
    """A modality's ideal tissue intensities -> what a scanner gives: partial volume (Gaussian blur,
    voxels), texture and noise, a smooth bias field, a random gain; brain voxels >= 1, background 0."""
    img = ndimage.gaussian_filter(img, blur)  # partial volume at boundaries
    img *= 1.0 + texture_amp * texture + noise * rng.standard_normal(img.shape).astype(np.float32)
    img *= np.exp(bias * _smooth_field(rng, img.shape))  # bias field
    img *= base_scale * rng.uniform(*gain)
    img = np.maximum(img, 1.0)  # brain voxels never 0
    img[~brain] = 0.0
    return np.round(img).astype(np.int16) if as_int16 else img.astype(np.float32)


def make_case(case: str, grade: str | None, shape=(96, 96, 64), seed: int = 0, index: int = 0,
              as_int16: bool = True, family: str = "demo", has_et: bool | None = None) -> PhantomCase:
    """One synthetic case of `family`; `grade` None draws HGG-like or LGG-like tumours at random
    (validation). `has_et` None draws whether the tumour has ET by the family's rule (every HGG,
    some LGG); True / False decides it (the random draws are made all the same, so every other
    property of the case stays as it would be)."""
    if family == "demo":
        return _demo_case(case, grade, shape, seed, index, as_int16, has_et)
    if family == "lgg-rich":
        return _lgg_rich_case(case, grade, shape, seed, index, as_int16, has_et)
    raise ValueError(f"unknown phantom family {family!r}; expected one of {', '.join(FAMILIES)}")


def _demo_case(case: str, grade: str | None, shape, seed: int, index: int, as_int16: bool,
               has_et: bool | None) -> PhantomCase:
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
    drawn_et = tumour_grade == "hgg" or rng.random() < 0.15
    has_et = drawn_et if has_et is None else has_et
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
        images[modality] = _acquire(img, rng, texture, brain, base_scale, as_int16, blur=0.6, texture_amp=0.06,
                                    noise=0.03, bias=0.2, gain=(0.7, 1.3))
    stored_label = label if as_int16 else label.astype(np.float32)
    return PhantomCase(case, grade, images, stored_label, brats_affine(shape))


def _ellipsoid(rel: list[np.ndarray], centre, radii) -> np.ndarray:
    """Mask of an axis-aligned ellipsoid in brain-normalised coordinates `rel`."""
    return sum(((r - c) / a) ** 2 for r, c, a in zip(rel, centre, radii)) < 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) rotation, uniform: QR of a Gaussian matrix with the sign fixed."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _lgg_rich_case(case: str, grade: str | None, shape, seed: int, index: int, as_int16: bool,
                   has_et: bool | None) -> PhantomCase:
    """The lgg-rich family (module docstring): other anatomy, lobed or long tumours, small ET."""
    rng = np.random.default_rng((seed, index, 7919, 2))
    shape = tuple(int(s) for s in shape)
    lgg_et = (LGG_RICH_LGG_SHARE - LGG_RICH_NO_ET_SHARE) / LGG_RICH_LGG_SHARE  # P(ET | LGG)
    tumour_grade = grade or ("lgg" if rng.random() < LGG_RICH_LGG_SHARE else "hgg")
    drawn_et = tumour_grade == "hgg" or rng.random() < lgg_et
    has_et = drawn_et if has_et is None else has_et
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    dims = np.array(shape, dtype=np.float32)
    centre = dims / 2 - 0.5 + rng.uniform(-2, 2, 3).astype(np.float32)

    # brain: smaller than the demo's, longer front to back (y), more warped
    radii = dims * np.array([0.34, 0.43, 0.38], np.float32) * rng.uniform(0.92, 1.04, 3).astype(np.float32)
    rel = [(g - c) / r for g, c, r in zip(grid, centre, radii)]
    rho = np.sqrt(sum(r * r for r in rel)) + 1e-6
    warp = _direction_warp(rng, tuple(r / rho for r in rel), 0.12)
    d_brain = rho / warp  # < 1 inside the brain
    brain = d_brain < 1.0

    # tissue: folded cortex, CSF rim, deep grey nuclei, long lateral ventricles, third ventricle
    folds = _smooth_field(rng, shape, coarse=(10, 10, 7))
    tissue = np.where(d_brain > 0.72 + 0.07 * folds, 0, 1)  # 0 gm, 1 wm
    tissue = np.where(d_brain > 0.95, 2, tissue)  # 2 csf
    for side in (-1, 1):
        tissue = np.where(_ellipsoid(rel, (side * 0.30, 0.02, -0.10), (0.11, 0.16, 0.14)), 3, tissue)  # 3 deep
    vent_off = 0.11 + 0.03 * rng.random()
    for side in (-1, 1):
        tissue = np.where(_ellipsoid(rel, (side * vent_off, 0.0, 0.12), (0.06, 0.42, 0.15)), 2, tissue)
    tissue = np.where(_ellipsoid(rel, (0.0, 0.05, -0.12), (0.025, 0.14, 0.16)), 2, tissue)
    names = ("gm", "wm", "csf", "deep")

    # tumour: a round, long or multi-lobed shape; WT = t_d < 1, the core a smaller level set
    scale = float(radii.min())
    size = rng.choice(3, p=[0.35, 0.40, 0.25])  # small, medium, large
    r_wt = scale * rng.uniform(*((0.24, 0.32), (0.34, 0.44), (0.46, 0.56))[size])
    kind = rng.choice(3, p=[0.2, 0.4, 0.4])  # round, long, lobed
    side = rng.choice([-1.0, 1.0])
    t_centre = centre + np.array([side * radii[0] * rng.uniform(0.25, 0.40), radii[1] * rng.uniform(-0.30, 0.30),
                                  radii[2] * rng.uniform(-0.20, 0.20)], dtype=np.float32)
    lobes = [(t_centre, np.eye(3), np.full(3, r_wt))]
    if kind == 1:  # long: one axis 1.5-2x the radius, the others shorter
        long = rng.uniform(1.5, 2.0)
        lobes = [(t_centre, _random_rotation(rng), r_wt * np.array([long, 0.7, 0.7]))]
    elif kind == 2:  # lobed: 1-3 satellite lobes on the main one
        for _ in range(int(rng.integers(1, 4))):
            u = rng.standard_normal(3)
            offset = r_wt * rng.uniform(0.55, 0.85) * u / np.linalg.norm(u)
            lobes.append((t_centre + offset.astype(np.float32), np.eye(3), np.full(3, r_wt * rng.uniform(0.45, 0.70))))
    t_d = np.full(shape, np.inf, dtype=np.float32)
    for c, rot, ax in lobes:
        v = [g - ci for g, ci in zip(grid, c)]
        local = [sum(rot[j, i] * v[j] for j in range(3)) / ax[i] for i in range(3)]  # (R^T v) / axes
        d = np.sqrt(sum(x * x for x in local)) + 1e-6
        d = d / _direction_warp(rng, tuple(x / d for x in local), 0.25)
        t_d = np.minimum(t_d, d)
    wt = (t_d < 1.0) & brain
    core_level = rng.uniform(0.50, 0.62) if tumour_grade == "hgg" else rng.uniform(0.55, 0.78)
    core = (t_d < core_level) & brain
    if not core.any():  # tiny volumes: at least the voxel nearest the tumour centre
        core.flat[int(np.argmin(np.where(brain, t_d, np.inf)))] = True
    wt |= core

    # ET: a thin rim (1-2 voxels, sometimes broken) or a few small foci inside the core
    pattern = rng.choice(2, p=[0.6, 0.4]) if tumour_grade == "hgg" else 1  # 0 rim, 1 foci
    breaks = _smooth_field(rng, shape, coarse=(6, 6, 5))
    rim = core & ~ndimage.binary_erosion(core, iterations=int(rng.integers(1, 3)))
    rim &= breaks > rng.uniform(-1.0, -0.2)
    foci = np.zeros(shape, bool)
    core_voxels = np.flatnonzero(core)
    for _ in range(int(rng.integers(1, 5)) if tumour_grade == "hgg" else int(rng.integers(1, 3))):
        at = np.unravel_index(core_voxels[int(rng.integers(core_voxels.size))], shape)
        r = rng.uniform(1.5, 3.0)
        foci |= sum((g - a) ** 2 for g, a in zip(grid, at)) < r * r
    et = (rim if pattern == 0 else foci & core) if has_et else np.zeros(shape, bool)
    if has_et and et.sum() < MIN_ET_VOXELS:  # too small to count: the whole core's rim, else the core
        et = core & ~ndimage.binary_erosion(core)
        et = et if et.sum() >= MIN_ET_VOXELS else core
    label = np.zeros(shape, dtype=np.uint8)
    label[wt] = 2
    label[core] = 1
    label[et] = 4

    # intensities: tissue, then tumour classes blended with the tissue they infiltrate
    table = list(TISSUE_LGG_RICH)
    per_case = rng.uniform(0.90, 1.10, (len(table), 4))
    blend = rng.uniform(0.65, 0.90)  # share of the tumour class in a tumour voxel's intensity
    texture = _smooth_field(rng, shape, coarse=(16, 16, 10))
    core_name = "ncr" if has_et and pattern == 0 else "net"
    images = {}
    base_scale = rng.uniform(150, 3000)
    for m, modality in enumerate(MODALITIES):
        img = np.zeros(shape, dtype=np.float32)
        for t, name in enumerate(names):
            img[tissue == t] = TISSUE_LGG_RICH[name][m] * per_case[table.index(name), m]
        for value, name in ((2, "edema"), (1, core_name), (4, "et")):
            mask = label == value
            img[mask] = blend * TISSUE_LGG_RICH[name][m] * per_case[table.index(name), m] + (1 - blend) * img[mask]
        images[modality] = _acquire(img, rng, texture, brain, base_scale, as_int16, blur=0.7, texture_amp=0.08,
                                    noise=0.05, bias=0.3, gain=(0.6, 1.4))
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


def training_plan(cases: int, family: str = "demo", seed: int = 0) -> list[tuple[str, bool | None]]:
    """(grade, has_et) of each training case; has_et None: drawn by `make_case`.

    demo: about 2/3 HGG, ET drawn per case. lgg-rich: round(45 %) LGG (at least the cases without
    ET), exactly round(35 %) of the cases without ET (all LGG), every HGG with ET; which LGG keep
    a little ET is drawn with `seed`.
    """
    if family == "demo":
        n_hgg = int(round(cases * 2 / 3)) if cases > 1 else cases
        return [("hgg", None)] * n_hgg + [("lgg", None)] * (cases - n_hgg)
    if family == "lgg-rich":
        n_no_et = int(round(cases * LGG_RICH_NO_ET_SHARE))
        n_lgg = max(n_no_et, int(round(cases * LGG_RICH_LGG_SHARE)))
        lgg_et = np.zeros(n_lgg, bool)
        lgg_et[n_no_et:] = True
        lgg_et = np.random.default_rng((seed, 104729, 2)).permutation(lgg_et)
        return [("hgg", True)] * (cases - n_lgg) + [("lgg", bool(e)) for e in lgg_et]
    raise ValueError(f"unknown phantom family {family!r}; expected one of {', '.join(FAMILIES)}")


def write_phantom_dataset(out: str | Path, cases: int = 12, val_cases: int = 2, shape=(96, 96, 64),
                          seed: int = 0, family: str = "demo") -> list[Path]:
    """Write the training (grades and ET by `training_plan`) and validation releases of `family`
    under `out`; returns case folders."""
    out = Path(out)
    plan = training_plan(cases, family, seed)
    rng = np.random.default_rng((seed, 104729) if family == "demo" else (seed, 104729, FAMILIES.index(family)))
    taken: set[str] = set()
    train_names = case_names(cases, rng, taken)
    val_names = case_names(val_cases, rng, taken)
    folders = []
    for i, (name, (grade, has_et)) in enumerate(zip(train_names, plan)):
        pc = make_case(name, grade, shape, seed, index=i, as_int16=i % 2 == 0, family=family, has_et=has_et)
        folder = out / "Brats17TrainingData" / grade.upper() / name
        write_case(folder, pc)
        folders.append(folder)
    for j, name in enumerate(val_names):
        i = cases + j
        pc = make_case(name, None, shape, seed, index=i, as_int16=i % 2 == 0, family=family)
        folder = out / "Brats17ValidationData" / name
        write_case(folder, pc, with_label=False)
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brats.phantom",
        description="Write synthetic BraTS-like cases in the BraTS 2017 folder layout.",
    )
    parser.add_argument("out", help="output folder (gets Brats17TrainingData/ and Brats17ValidationData/); a folder of "
                        "phantoms with other settings is replaced whole, a folder holding anything else is refused")
    parser.add_argument("--cases", type=int, default=12,
                        help="training cases (default 12; demo: about 2/3 HGG; lgg-rich: 45%% LGG, 35%% without ET)")
    parser.add_argument("--val-cases", type=int, default=2, help="validation-release cases (no seg) (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                        help="volume size in voxels (default 96 96 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed and family give byte-identical files (default 0)")
    parser.add_argument("--family", choices=FAMILIES, default="demo",
                        help="kind of case (module docstring): demo (default) | lgg-rich (LGG-rich, small ET, "
                             "low contrast, other anatomy)")
    args = parser.parse_args(argv)
    if args.cases < 0 or args.val_cases < 0 or args.cases + args.val_cases == 0 or min(args.shape) < 16:
        parser.error("case counts must be >= 0, at least one case in all, and every shape size >= 16")
    from brats.synthetic import ensure_synthetic  # it builds on this module

    ensure_synthetic(args.out, args.cases, args.val_cases, tuple(args.shape), args.seed, args.family)
    print(f"{args.cases} training and {args.val_cases} validation {args.family} case(s) under {args.out}")
    return 0


def cli() -> None:
    """`python -m brats.phantom` and the `rf3d-phantom` console script: user errors are one line, exit 2."""
    from common.cli import run_main

    run_main(main)


if __name__ == "__main__":
    cli()
