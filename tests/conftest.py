import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_SHAPE = (12, 10, 8)
LPS = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 9.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # as the BraTS releases


def tiny_label(shape=TINY_SHAPE) -> np.ndarray:
    """(X, Y, Z) uint8: edema around a core with an enhancing part, all inside `tiny_images`' brain."""
    label = np.zeros(shape, np.uint8)
    label[3:9, 3:8, 2:6] = 2
    label[4:7, 4:7, 3:5] = 1
    label[5:7, 5:6, 3:5] = 4
    return label


def tiny_images(seed: int = 0, shape=TINY_SHAPE) -> dict[str, np.ndarray]:
    """modality -> (X, Y, Z) float32: a box of varied positive values (the brain), zero outside."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    out = {}
    for key in ("flair", "t1", "t1ce", "t2"):
        img = np.zeros(shape, np.float32)
        img[brain] = rng.uniform(50, 500, int(brain.sum())).astype(np.float32)
        out[key] = img
    return out


@pytest.fixture
def write_tiny_case():
    """write(folder, ...) -> {key: path}: one tiny case in the BraTS 2017 layout, written with nibabel.

    `<folder>/<case>_{flair,t1,t1ce,t2}.nii.gz` and the label as `label_name` (default
    `<case>_seg.nii.gz`, None: no label), case = folder name; `images` / `label` replace the
    default arrays (`write.images(seed)`, `write.label()`), `skip` leaves modalities out.
    """
    def write(folder, label_name="{case}_seg.nii.gz", images=None, label=None, affine=LPS, skip=(), seed=0):
        folder.mkdir(parents=True, exist_ok=True)
        case = folder.name
        images = {**tiny_images(seed), **(images or {})}
        paths = {}
        for key, data in images.items():
            if key in skip:
                continue
            paths[key] = folder / f"{case}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), str(paths[key]))
        if label_name is not None:
            paths["seg"] = folder / label_name.format(case=case)
            nib.save(nib.Nifti1Image(tiny_label() if label is None else label, affine), str(paths["seg"]))
        return paths

    write.images, write.label = tiny_images, tiny_label
    return write


@pytest.fixture(autouse=True, scope="session")
def measurement_cache(tmp_path_factory):
    """Per-machine measurement caches (INT8 decisions, runtime choices) in a temporary folder, never the user's.

    Session-scoped, so that it is set before the module-scoped fixtures that run whole stages (a
    function-scoped one came after them: tests/test_pipeline.py's chain wrote 269 runtime choices into
    ~/.cache/refineformer3d and could have read the user's INT8 decisions)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFINEFORMER3D_CACHE", str(tmp_path_factory.getbasetemp() / "measurement_cache"))
        yield
