import importlib.util
import json

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

import predict as predict_cli
from brats.cache import uncrop
from brats.inference import predict_case
from brats.layout import DataError, discover_cases
from brats.overlay import FIGURE_DPI, PANEL_INCHES
from brats.phantom import write_phantom_dataset
from brats.prepare import prepare, run_prepare
from common.artifact import Artifact, build_model
from common.errors import UserInputError
from compress.quant.convert import int8_spec, prepare_float
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from pipeline.runtimes import RUNTIMES, RuntimeChoice
from pipeline.predict import (artifact_scheme, base_spec, check_window, inference_model, predict_folder, predict_fn,
                               select_cases, shape_multiple, split_cases)
from model.refineformer3d import ModelSpec, RefineFormer3D
from model.rewrites import ChannelsLast3d, ReassociatedDecoder, inference_graph

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
        served = inference_graph(model)  # what predict_folder runs for an FP32 artifact
        expected = uncrop(predict_case(predict_fn(served), image, "regions", WINDOW, 0.5, 1), meta)
        np.testing.assert_array_equal(label, expected)
        outside = np.ones(SHAPE, bool)
        outside[tuple(slice(a, b) for a, b in meta.bbox)] = False
        assert not label[outside].any()  # nothing predicted outside the brain's bounding box
    assert len(seen) >= 3  # a real mix of labels, not a constant map


def test_background_skipping_counted_and_switchable(setup, tmp_path, capsys):
    root, data, artifact, _ = setup
    case = discover_cases(data)[0].case
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "skip"),
                             "--window", *map(str, WINDOW), "--cases", case, "--quiet", "--runtime", "torch"])
    out = capsys.readouterr().out
    assert code == 0 and "windows (background)" in out
    every = predict_folder(artifact, data, tmp_path / "all", WINDOW, cases=[case], progress=False,
                           skip_background=False)
    assert every.windows.skipped == 0 and every.windows.windows >= 1
    assert f"skipped 0 of {every.windows.windows} windows (background)" in out  # a brain-cropped phantom: none
    skip = np.asanyarray(nib.load(str(tmp_path / "skip" / f"{case}.nii.gz")).dataobj)
    np.testing.assert_array_equal(skip, np.asanyarray(nib.load(str(every.written[case])).dataobj))


def test_predict_says_its_et_rule_and_runs_coarse_to_fine(setup, tmp_path, capsys):
    root, data, artifact, _ = setup
    case = discover_cases(data)[0].case
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "c"), "--window",
                             *map(str, WINDOW), "--cases", case, "--quiet", "--runtime", "torch", "--coarse", "2",
                             "--et-min-voxels", "7"])
    captured = capsys.readouterr()
    assert code == 0 and "coarse-to-fine: " in captured.out
    assert "ET rule: a case with fewer than 7 predicted ET voxels gets them relabelled NCR/NET (given)" in captured.err
    label = np.asanyarray(nib.load(str(tmp_path / "c" / f"{case}.nii.gz")).dataobj)
    assert set(np.unique(label)) <= {0, 1, 2, 4}
    with pytest.raises(SystemExit) as stop:  # refused with the command line, before anything loads
        predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "d"), "--window",
                          *map(str, WINDOW), "--cases", case, "--quiet", "--coarse", "1"])
    assert stop.value.code == 2 and "--coarse must be a pooling factor >= 2" in capsys.readouterr().err


def test_the_coarse_window_is_fitted_only_where_the_runtime_takes_other_sizes():
    spec = ModelSpec(embed_dims=[8, 8, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1]).to_dict()
    art = Artifact("student", spec, {})
    assert shape_multiple(art, None) == 32  # eager PyTorch: any multiple of the encoder's stride
    assert shape_multiple(art, RuntimeChoice("torch", [64, 64, 64], "asked")) == 32
    for runtime in ("onnxruntime", "openvino"):  # a session per size: the window only
        assert shape_multiple(art, RuntimeChoice(runtime, [64, 64, 64], "asked")) == 0
    stored = Artifact("int8", {"kind": "onnx", "input_shape": [1, 4, 64, 64, 64], "base": spec}, {})
    assert shape_multiple(stored, None) == 0  # a graph exported for one input shape


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


def test_fp32_artifacts_run_as_their_inference_graph_and_int8_ones_as_built(setup):
    _, _, artifact, model = setup
    art = Artifact.load(artifact)
    served = inference_model(art)
    assert isinstance(served.decoder, ReassociatedDecoder) and not served.training
    assert sum(isinstance(m, ChannelsLast3d) for m in served.modules()) == 1
    x = torch.randn(1, 4, *WINDOW)
    with torch.no_grad():
        assert torch.allclose(served(x), model(x), atol=1e-5 * float(model(x).abs().max()))
    # an INT8 builder applies the rewrites itself: the served model is the built one, rewritten once
    prepared = prepare_float(model)
    int8 = Artifact("int8", int8_spec(art.spec, [], True, "x86"), prepared.state_dict())
    built = build_model(int8)
    assert inference_model(int8, built) is built
    assert sum(isinstance(m, ChannelsLast3d) for m in built.modules()) == 1 and len(built.decoder._forward_hooks) == 1


def test_runtime_auto_says_what_it_measured_and_every_runtime_writes_the_same_maps(setup, tmp_path, capsys,
                                                                                    monkeypatch):
    _, data, artifact, _ = setup
    monkeypatch.setenv("REFINEFORMER3D_CACHE", str(tmp_path / "cache"))  # nothing measured yet
    case = discover_cases(data)[0].case
    args = [str(artifact), "--input", str(data), "--window", *map(str, WINDOW), "--cases", case, "--quiet"]

    def run(folder: str, *more: str) -> str:
        assert predict_cli.main([*args, "--output", str(tmp_path / folder), *more]) == 0
        return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("runtime: "))

    line = run("auto")  # the default
    assert "the fastest here per 32x32x32 window (torch " in line and " onnxruntime " in line
    assert "measured now" in line and "median of 5, interleaved" in line
    assert "cached in" in run("again", "--runtime", "auto")  # measured once per artifact and machine
    maps = {}
    for runtime in RUNTIMES:
        if runtime != "torch" and importlib.util.find_spec(runtime) is None:
            continue
        assert run(runtime, "--runtime", runtime) == f"runtime: {runtime} (as asked)"
        maps[runtime] = np.asanyarray(nib.load(str(tmp_path / runtime / f"{case}.nii.gz")).dataobj)
    assert len(maps) >= 2
    for runtime, label in maps.items():  # FP32 logits agree to 1e-4 of their scale: the same labels
        assert (label != maps["torch"]).mean() < 1e-4, runtime
    # an ONNX artifact cannot run in PyTorch: said before anything is written
    onnx = Artifact.load(artifact)
    data_bytes = export_onnx(inference_model(onnx), (1, 4, *WINDOW))
    path = Artifact("int8", onnx_spec([1, 4, *WINDOW], len(data_bytes), onnx.spec, "fp32"),
                    OrtModel.from_bytes(data_bytes, [1, 4, *WINDOW]).state_dict()).save(tmp_path / "onnx.pt")
    with pytest.raises(UserInputError, match="runtime torch: an ONNX artifact .* has no PyTorch graph"):
        predict_folder(path, data, tmp_path / "refused", WINDOW, cases=[case], progress=False, runtime="torch")
    assert not (tmp_path / "refused").exists()
    # a window the ONNX graph cannot take: refused before any work, with the one it takes (every case failed)
    other = (WINDOW[0] * 2, *WINDOW[1:])
    with pytest.raises(ValueError, match=rf"onnx.pt: an ONNX graph exported for {'x'.join(map(str, WINDOW))} windows "
                                         rf"cannot slide a window of {'x'.join(map(str, other))}; pass --window "
                                         + " ".join(map(str, WINDOW))):
        predict_folder(path, data, tmp_path / "refused", other, cases=[case], progress=False, runtime="onnxruntime")
    assert not (tmp_path / "refused").exists()


def written_cases(folder) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in folder.iterdir())


def test_cases_and_split_restrict_the_folder(setup, tmp_path):
    root, data, artifact, _ = setup
    names = [r.case for r in discover_cases(data)]
    assert len(names) == 3
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "a"),
                             "--window", *map(str, WINDOW), "--cases", names[2], names[0], "--quiet"])
    assert code == 0 and written_cases(tmp_path / "a") == sorted([names[0], names[2]])
    # a splits.json as brats.splits writes it; --fold picks the fold, 'val' its held-out cases
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"seed": 0, "val_fraction": 0.5, "folds": [
        {"train": names[1:], "val": names[:1]}, {"train": [names[0], names[2]], "val": [names[1]]}]}))
    assert split_cases(split) == names[:1] and split_cases(split, 1) == [names[1]]
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "b"),
                             "--window", *map(str, WINDOW), "--split", str(split), "--fold", "1", "--quiet"])
    assert code == 0 and written_cases(tmp_path / "b") == [names[1]]
    with pytest.raises(DataError, match=f"{split}: no fold 2 .*2 fold"):
        split_cases(split, 2)
    # a name not in the folder is an error naming it and the folder, before anything is written
    with pytest.raises(DataError, match=f"{data}: no case named Brats17_nope_1"):
        predict_folder(artifact, data, tmp_path / "c", WINDOW, cases=[names[0], "Brats17_nope_1"], progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    refs = discover_cases(data)
    assert [r.case for r in select_cases(refs, [names[2], names[0], names[2]], data)] == [names[0], names[2]]
    with pytest.raises(SystemExit):  # --cases and --split together make no sense
        predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "d"),
                          "--cases", names[0], "--split", str(split)])


def test_et_min_voxels_relabels_small_et_as_ncr(setup, tmp_path):
    root, data, artifact, _ = setup
    case = discover_cases(data)[0].case
    plain = predict_folder(artifact, data, tmp_path / "plain", WINDOW, cases=[case], progress=False)
    label = np.asanyarray(nib.load(str(plain.written[case])).dataobj)
    n_et = int((label == 4).sum())
    assert n_et > 0  # the test needs a prediction with some ET
    # fewer ET voxels than N: all ET becomes NCR/NET (1), the rest of the map unchanged
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(tmp_path / "big"),
                             "--window", *map(str, WINDOW), "--cases", case, "--et-min-voxels", str(n_et + 1),
                             "--quiet", "--runtime", "torch"])
    assert code == 0
    big = np.asanyarray(nib.load(str(tmp_path / "big" / f"{case}.nii.gz")).dataobj)
    np.testing.assert_array_equal(big, np.where(label == 4, 1, label))
    # exactly N ET voxels is not "fewer than N": the map is untouched
    same = predict_folder(artifact, data, tmp_path / "same", WINDOW, cases=[case], et_min_voxels=n_et,
                          progress=False)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(same.written[case])).dataobj), label)
    with pytest.raises(ValueError, match="et_min_voxels must be >= 0"):
        predict_folder(artifact, data, tmp_path / "neg", WINDOW, cases=[case], et_min_voxels=-1, progress=False)


def test_constant_modality_fails_as_in_prepare_unless_allowed(setup, tmp_path, capsys):
    import shutil

    root, data, artifact, _ = setup
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    victim = discover_cases(bad_data)[0]
    img = nib.load(str(victim.files["t1ce"]))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(victim.files["t1ce"]))
    expected = run_prepare(bad_data, tmp_path / "cache", progress=False).bad[victim.case]
    assert f"{victim.files['t1ce']}: t1ce is constant (0)" in expected
    result = predict_folder(artifact, bad_data, tmp_path / "out", WINDOW, cases=[victim.case], progress=False)
    assert result.failed == {victim.case: expected} and not result.written
    code = predict_cli.main([str(artifact), "--input", str(bad_data), "--output", str(tmp_path / "out"),
                             "--window", *map(str, WINDOW), "--cases", victim.case, "--quiet",
                             "--allow-constant-modality"])
    assert code == 0 and (tmp_path / "out" / f"{victim.case}.nii.gz").is_file()
    assert f"warning: case {victim.case}: {victim.files['t1ce']}: t1ce is constant" in capsys.readouterr().err


def test_overlay_pictures_with_truth_when_the_case_has_one(setup, tmp_path):
    root, data, artifact, _ = setup
    refs = discover_cases(data)
    out, pictures = tmp_path / "out", tmp_path / "overlay"
    code = predict_cli.main([str(artifact), "--input", str(data), "--output", str(out), "--overlay", str(pictures),
                             "--window", *map(str, WINDOW), "--quiet"])
    assert code == 0
    assert sorted(p.name for p in pictures.iterdir()) == sorted(f"{r.case}.png" for r in refs)
    for ref in refs:  # a training case: truth and prediction; the validation case: the prediction alone
        width = mpimg.imread(pictures / f"{ref.case}.png").shape[1]
        assert width == round((2 if ref.has_label else 1) * PANEL_INCHES * FIGURE_DPI), ref.case
    assert any(r.has_label for r in refs) and not all(r.has_label for r in refs)
    # pictures are outputs too: not replaced without --overwrite
    with pytest.raises(UserInputError, match="already holds 3 of the overlays"):
        predict_folder(artifact, data, tmp_path / "other", WINDOW, progress=False, overlay_dir=pictures)
    result = predict_folder(artifact, data, tmp_path / "other", WINDOW, progress=False, overlay_dir=pictures,
                            overwrite=True, cases=[refs[0].case])
    assert list(result.overlays) == [refs[0].case] and not result.failed


def test_the_default_window_is_the_artifacts_own():
    """predict.py took 128^3 whatever the artifact: an ONNX graph fixed at its export size then failed on every
    case, and a demo artifact validated with 96x96x64 windows gave other label maps than its report."""
    from pipeline.predict import default_window

    onnx = Artifact(stage="int8", spec={"kind": "onnx", "input_shape": [1, 4, 96, 96, 64]}, state_dict={},
                    config={"train": {"window": [128, 128, 128]}})
    assert default_window(onnx) == (96, 96, 64)
    fp32 = Artifact(stage="slim", spec={}, state_dict={}, config={"train": {"window": [96, 96, 64]}})
    assert default_window(fp32) == (96, 96, 64)
    assert default_window(Artifact(stage="teacher", spec={}, state_dict={})) == (128, 128, 128)  # none recorded
