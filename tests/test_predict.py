import nibabel as nib
import numpy as np
import pytest
import torch

import predict as predict_cli
from brats.cache import uncrop
from brats.inference import predict_case
from brats.layout import discover_cases
from brats.phantom import write_phantom_dataset
from brats.prepare import prepare
from common.artifact import Artifact
from pipeline.predict import artifact_scheme, base_spec, check_window, predict_folder, predict_fn
from teacher.model import ModelSpec, RefineFormer3D

SHAPE = (40, 40, 32)
WINDOW = (32, 32, 32)


def tiny_model(seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    spec = ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                     decoder_dim=8, fuse_dim=8, refine_dim=4)
    model = RefineFormer3D(spec).eval()
    with torch.no_grad():  # logits spread around 0 so that every label value can occur
        model.decoder.head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    write_phantom_dataset(data, cases=2, val_cases=1, shape=SHAPE, seed=3)
    model = tiny_model()
    art = Artifact("student", model.spec.to_dict(), model.state_dict(), config={"data": {"scheme": "regions"}})
    path = art.save(root / "student.pt")
    return root, data, path, model


def test_predictions_on_input_grid_and_equal_to_cache_pipeline(setup, tmp_path):
    root, data, artifact, model = setup
    result = predict_folder(artifact, data, tmp_path / "out", WINDOW, 0.5, progress=False)
    refs = discover_cases(data)
    assert sorted(result.written) == sorted(r.case for r in refs) and len(refs) == 3  # validation case too
    assert not result.failed
    # the cache path (brats.prepare + sliding window + uncrop) must give the very same label maps
    cache = prepare(data, root / "cache", progress=False)
    seen = set()
    for ref in refs:
        out = nib.load(str(tmp_path / "out" / f"{ref.case}.nii.gz"))
        flair = nib.load(str(ref.files["flair"]))
        label = np.asanyarray(out.dataobj)
        assert out.get_data_dtype() == np.uint8
        assert label.shape == flair.shape == SHAPE
        np.testing.assert_array_equal(out.affine, flair.affine)
        assert out.header.get_zooms() == flair.header.get_zooms()
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        seen |= set(np.unique(label).tolist())
        meta = cache.meta(ref.case)
        image = torch.from_numpy(np.asarray(cache.image(ref.case), dtype=np.float32))
        expected = uncrop(predict_case(predict_fn(model), image, "regions", WINDOW, 0.5, 1), meta)
        np.testing.assert_array_equal(label, expected)
        outside = np.ones(SHAPE, bool)
        outside[tuple(slice(a, b) for a, b in meta.bbox)] = False
        assert not label[outside].any()  # nothing predicted outside the brain's bounding box
    assert len(seen) >= 3  # a real mix of labels, not a constant map


def test_bad_case_reported_and_skipped_others_written(setup, tmp_path):
    root, data, artifact, _ = setup
    import shutil

    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    refs = discover_cases(bad_data)
    victim = refs[0]
    flair = victim.files["flair"]
    raw = flair.read_bytes()
    flair.write_bytes(raw[: len(raw) // 2])  # truncated gzip
    out = tmp_path / "out"
    code = predict_cli.main([str(artifact), "--input", str(bad_data), "--output", str(out),
                             "--window", *map(str, WINDOW), "--quiet"])
    assert code == 1
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{r.case}.nii.gz" for r in refs[1:])
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary leftovers
    result = predict_folder(artifact, bad_data, tmp_path / "again", WINDOW, progress=False)
    assert list(result.failed) == [victim.case]
    assert victim.case in result.failed[victim.case] and str(flair) in result.failed[victim.case]


def test_single_case_folder(setup, tmp_path):
    root, data, artifact, _ = setup
    case_dir = discover_cases(data)[-1].files["flair"].parent
    code = predict_cli.main([str(artifact), "--input", str(case_dir), "--output", str(tmp_path),
                             "--window", "32", "32", "32", "--overlap", "0.25", "--quiet"])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{case_dir.name}.nii.gz"]


def test_window_and_scheme_checks(setup, capsys):
    _, data, artifact, _ = setup
    art = Artifact.load(artifact)
    assert artifact_scheme(art) == "regions"
    assert artifact_scheme(Artifact("x", {}, {}, config={"data": {"scheme": "seed3"}})) == "seed3"
    assert check_window([64, 32, 96], art.spec) == (64, 32, 96)
    with pytest.raises(ValueError, match="multiples of the model's stride 32"):
        check_window([48, 32, 32], art.spec)
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", "/nonexistent/x",
                             "--window", "48", "48", "48", "--quiet"])
    assert code == 2 and "stride 32" in capsys.readouterr().err
    # an INT8/ONNX spec carrying (or nesting) its float base
    spec = {**art.spec, "kind": "int8-torch", "qconfig": "x86"}
    assert base_spec(spec) == {**art.spec, "kind": "fp32"}
    assert base_spec({"kind": "onnx", "base": art.spec, "onnx": "..."}) == {**art.spec, "kind": "fp32"}
