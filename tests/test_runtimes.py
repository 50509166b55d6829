"""Runtimes: PyTorch, ONNX Runtime and OpenVINO give the same outputs (FP32) / run the same QDQ graph (INT8);
`auto` picks the fastest measured and caches it; a missing runtime is skipped with a note."""
import importlib.util
import sys

import pytest
import torch

from common.artifact import Artifact, build_model
from common.config import Config
from compress.quant.convert import int8_spec, prepare_float
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from compress.quant.stage import quantize_step
from model.refineformer3d import ModelSpec, RefineFormer3D
from pipeline.predict import inference_model
from pipeline import runtimes
from pipeline.runtimes import (RuntimeUnavailable, choose_runtime, measure_runtimes, pick_runtime, runtime_cache,
                               runtime_model)

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
SHAPE = (1, 4, 32, 32, 32)
FP32_TOL = 1e-4  # max |difference| over max |logit|: float reassociation in other kernels, nothing more


def tiny() -> RefineFormer3D:
    torch.manual_seed(0)
    return RefineFormer3D(ModelSpec(**TINY)).eval()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = tiny()
    path = Artifact("student", model.spec.to_dict(), model.state_dict()).save(
        tmp_path_factory.mktemp("rt") / "student.pt")
    art = Artifact.load(path)
    return model, art, path, inference_model(art)


@pytest.fixture(scope="module")
def int8(fp32):
    """The fake-quant model and its QDQ graph as quantize.py --backend onnxruntime writes it (kind onnx)."""
    model = fp32[0]
    cfg = Config()
    cfg.quant.decide, cfg.quant.force = "all", {"decoder.head": "fp32"}
    torch.manual_seed(1)
    qat, _ = quantize_step(model, cfg, [torch.randn(SHAPE) for _ in range(2)], shape=SHAPE)
    data = export_onnx(qat, SHAPE)
    ort = OrtModel.from_bytes(data, list(SHAPE))
    art = Artifact("int8", onnx_spec(list(SHAPE), len(data), model.spec.to_dict(), "int8"), ort.state_dict())
    return qat, art, build_model(art)


def test_fp32_outputs_agree_in_every_runtime(fp32):
    pytest.importorskip("openvino")
    model, art, _, served = fp32
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    scale = float(ref.abs().max())
    for name in runtimes.RUNTIMES:
        with torch.no_grad():
            out = runtime_model(art, served, name, threads=1)(x)
        assert out.shape == ref.shape, name
        assert float((out - ref).abs().max()) < FP32_TOL * scale, name
    onnx = runtime_model(art, served, "openvino", threads=1)
    onnx(x[:1])
    onnx(torch.zeros(1, 4, 64, 32, 32))  # another window: exported again, not refused
    assert sorted(onnx._runs) == [(1, 4, 32, 32, 32), (1, 4, 64, 32, 32)]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_qdq_graph_runs_quantized_in_onnx_runtimes(int8, runtime):
    pytest.importorskip(runtime)
    qat, art, built = int8
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fq = qat(x)
    float_model = tiny()
    with torch.no_grad():
        ref = float_model(x)
    quant_error = float((fq - ref).abs().mean())
    out = runtime_model(art, built, runtime, threads=1)(x)
    # the QAT's own grids: far closer to the fake quantisation than the float model is (one step flipped by
    # rounding at a coarse stage spreads through the upsampling, so not exact; the float model scores 1.0)
    assert float((out - fq).abs().mean()) < 0.5 * quant_error
    assert float((out - ref).abs().mean()) > 0.5 * quant_error


def test_openvino_runs_int8_kernels_from_the_qdq_graph(int8):
    pytest.importorskip("openvino")
    from compress.quant.onnx_export import ov_compiled

    _, _, built = int8
    ops = ov_compiled(built.onnx_bytes(), threads=1).get_runtime_model().get_ops()
    precisions = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in ops}
    assert ("Convolution", "u8") in precisions or ("Convolution", "i8") in precisions
    assert ("FullyConnected", "u8") in precisions


def test_what_cannot_run_where_is_a_note(fp32, int8, monkeypatch):
    model, art, _, served = fp32
    _, onnx_art, built = int8
    with pytest.raises(RuntimeUnavailable, match="no PyTorch graph"):
        runtime_model(onnx_art, built, "torch")
    int8_torch = Artifact("int8", int8_spec(art.spec, [], True, "x86"), prepare_float(model).state_dict())
    with pytest.raises(RuntimeUnavailable, match="--backend onnxruntime"):
        runtime_model(int8_torch, build_model(int8_torch), "onnxruntime")
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime_model(art, served, "tensorrt")
    # openvino missing (an import that fails on a user's machine): skipped with one line, the rest measured
    monkeypatch.setitem(sys.modules, "openvino", None)
    models, ms, notes = measure_runtimes(art, served, SHAPE[2:], runs=1, warmup=0, threads=1)
    assert set(ms) == {"torch", "onnxruntime"} == set(models)
    assert list(notes) == ["openvino"] and "pip install openvino" in notes["openvino"]
    assert "\n" not in notes["openvino"]
    # the ONNX artifact: only ONNX Runtime left, its window fixed by the export
    models, ms, notes = measure_runtimes(onnx_art, built, SHAPE[2:], runs=1, warmup=0, threads=1)
    assert list(ms) == ["onnxruntime"] and set(notes) == {"torch", "openvino"}
    _, ms, notes = measure_runtimes(onnx_art, built, (64, 32, 32), runs=1, warmup=0, threads=1)
    assert not ms and "exported for inputs" in notes["onnxruntime"]


def test_one_reason_for_several_runtimes_is_said_once():
    from pipeline.runtimes import RuntimeChoice as Choice

    why = "kind int8-torch: PyTorch's quantized kernels do not export to ONNX"
    choice = Choice("torch", [128, 128, 128], "measured", {"torch": 10.0}, {"onnxruntime": why, "openvino": why},
                    threads=2)
    assert choice.line().endswith(f"; onnxruntime and openvino skipped: {why}") and choice.line().count(why) == 1
    choice.notes = {"onnxruntime": why, "openvino": "not installed (pip install openvino)"}
    assert "onnxruntime skipped: kind" in choice.line() and "; openvino skipped: not installed" in choice.line()


def test_pick_runtime():
    ms = {"torch": 30.0, "onnxruntime": 10.0, "openvino": 20.0}
    assert pick_runtime(ms, "auto", {}) == ("onnxruntime", None)
    assert pick_runtime(ms, "torch", {}) == ("torch", None)
    runtime, why = pick_runtime({"torch": 3.0}, "openvino", {"openvino": "openvino does not import here"})
    assert runtime == "torch" and "openvino does not import here" in why
    with pytest.raises(RuntimeUnavailable, match="no runtime"):
        pick_runtime({}, "auto", {"torch": "x"})


def test_auto_takes_the_fastest_and_caches_it(fp32, monkeypatch):
    _, art, path, served = fp32
    fake = {"torch": 9.0, "onnxruntime": 4.0, "openvino": 7.0}  # what this machine "measured"
    measured = []

    def measure(art, served, size, runs, threads=None):
        measured.append(list(size))
        return {name: runtime_model(art, served, name, threads) for name in fake}, dict(fake), {}

    monkeypatch.setattr(runtimes, "measure_runtimes", measure)
    choice, model = choose_runtime(art, served, (32, 32, 32), "auto", path=path)
    assert (choice.runtime, choice.how, choice.ms) == ("onnxruntime", "measured", fake)
    assert isinstance(model, runtimes.OnnxModel) and model.runtime == "onnxruntime"
    line = choice.line()
    assert line.startswith("runtime: onnxruntime, the fastest") and "torch 9.0 ms, onnxruntime 4.0 ms" in line
    # the same artifact, window and machine: read back, not measured again
    again, model = choose_runtime(art, served, (32, 32, 32), "auto", path=path)
    assert (again.runtime, again.how, again.ms) == ("onnxruntime", "cached", fake) and len(measured) == 1
    assert str(runtime_cache()) in again.line() and model.runtime == "onnxruntime"
    # another window is another measurement; an asked runtime is not measured
    choose_runtime(art, served, (64, 32, 32), "auto", path=path)
    asked, model = choose_runtime(art, served, (32, 32, 32), "torch", path=path)
    assert measured == [[32, 32, 32], [64, 32, 32]] and asked.how == "asked" and model is served
    # threads are part of the key
    choose_runtime(art, served, (32, 32, 32), "auto", path=path, threads=torch.get_num_threads() + 1)
    assert len(measured) == 3
    # so is how ONNX graphs are served: a choice timed on an older serving path is measured again
    monkeypatch.setattr(runtimes, "SERVING_REVISION", runtimes.SERVING_REVISION + 1)
    assert choose_runtime(art, served, (32, 32, 32), "auto", path=path)[0].how == "measured"
    monkeypatch.setattr(runtimes, "SERVING_REVISION", runtimes.SERVING_REVISION - 1)
    assert len(measured) == 4
    # the cached runtime no longer imports (uninstalled since): measured again, among the others
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    del fake["onnxruntime"]
    again, model = choose_runtime(art, served, (32, 32, 32), "auto", path=path)
    assert (again.runtime, again.how, len(measured)) == ("openvino", "measured", 5)
    with pytest.raises(RuntimeUnavailable, match="pip install onnxruntime"):
        choose_runtime(art, served, (32, 32, 32), "onnxruntime", path=path)


OPENVINO_ALTSTACK = """
import subprocess, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from compress.quant.onnx_export import export_onnx, ov_compiled
from model.refineformer3d import ModelSpec, RefineFormer3D
list(DataLoader(TensorDataset(torch.zeros(4, 3)), batch_size=1, num_workers=2))  # installs a SIGCHLD handler
model = RefineFormer3D(ModelSpec(embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                                 decoder_dim=8, fuse_dim=8, refine_dim=4)).eval()
data = export_onnx(model, (1, 4, 32, 32, 32))
first, second = ov_compiled(data, 1), ov_compiled(data, 1)
del first, second  # torn down in the order they were made
subprocess.run([sys.executable, "-c", "pass"], check=True)  # its exit delivers SIGCHLD
print("survived")
"""


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed")
def test_openvino_models_torn_down_in_any_order_leave_signal_handling_intact():
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack when created and unmaps its own when
    destroyed: two Cores torn down out of order left the main thread on an unmapped stack, and the next
    SIGCHLD (a DataLoader worker's, a subprocess's) killed the process with SIGSEGV (an xdist worker, in
    `make test`). `ov_compiled` shares one Core (`ov_core`); run in a process of its own, as it can die."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", OPENVINO_ALTSTACK], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "survived", (out.returncode, out.stderr[-2000:])


@pytest.fixture(scope="module")
def cache_seen_by_a_module_fixture():
    """What a module-scoped fixture (a whole stage run, say) sees as the measurement cache."""
    return runtime_cache()


def test_module_fixtures_measure_into_the_temporary_cache_not_the_users(cache_seen_by_a_module_fixture,
                                                                        tmp_path_factory):
    assert cache_seen_by_a_module_fixture.is_relative_to(tmp_path_factory.getbasetemp())
    assert runtime_cache() == cache_seen_by_a_module_fixture
