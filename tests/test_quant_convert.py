"""Real INT8 layers agree with the LSQ fake quantisation; forced decisions; the INT8 artifact reloads."""
import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from common.artifact import Artifact, ArtifactError, build_model
from common.config import Config
from compress.quant.convert import (Int8Conv3d, Int8Linear, Int8WeightConv3d, Int8WeightLinear, convert, int8_spec,
                                     int8_state_bytes, int8_weight_layers, prepare_float)
from compress.quant.decide import decide, int8_layers
from compress.quant.lsq import LSQConfig, calibrate, quantize_
from compress.quant.stage import quantize_step
from model.refineformer3d import ModelSpec, RefineFormer3D, preset_spec
from model.rewrites import OneDNNConv3d

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
SHAPE = (1, 4, 32, 32, 32)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(32, 48), (1, 300, 32)),
    (nn.Conv3d(16, 16, 3, padding=1, groups=16), (1, 16, 8, 8, 8)),  # depthwise
    (nn.Conv3d(4, 16, 7, stride=4, padding=3), (1, 4, 32, 32, 32)),  # stem
    (nn.Conv3d(24, 8, 1), (1, 24, 8, 8, 8)),  # 1x1x1
])
def test_int8_layer_reproduces_fake_quant_exactly(layer, shape):
    """With 0..127 activations the x86 kernels give the fake quantisation's values; an output can land
    one step away where float summation order breaks a rounding tie (at most 1 in 1000 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    quantize_(model, LSQConfig())
    x = torch.randn(shape)
    calibrate(model, [x])
    with torch.no_grad():
        fq = model(x)
        convert(model)
        y = model(x)
    assert isinstance(model[0], (Int8Linear, Int8Conv3d))
    assert model[0].weight_int8.dtype == torch.int8
    step = float(model[0].out_scale)
    off = (fq - y).abs() / step
    assert float(off.max()) <= 1.001
    assert float((off > 1e-3).float().mean()) <= 1e-3


def _tiny_qat(mode: str = "all", force: dict | None = None, head_at: str = "full"):
    torch.manual_seed(0)
    model = RefineFormer3D(ModelSpec(**TINY, head_at=head_at)).eval()
    cfg = Config()
    cfg.quant.decide, cfg.quant.force = mode, dict(force or {})
    calib = [torch.randn(SHAPE) for _ in range(2)]
    qat, rows = quantize_step(model, cfg, calib, shape=SHAPE)
    return model, qat, rows


def test_whole_tiny_model_int8_matches_fake_quant():
    """Float logits layer: INT8 == fake quant to float rounding. INT8 logits layer: its output is
    requantized over the calibrated logit range (255 steps), so only the mean error is small and
    the thresholded masks agree on almost every voxel."""
    x = torch.randn(SHAPE)
    model, qat, rows = _tiny_qat("all", {"decoder.head": "fp32"})
    with torch.no_grad():
        ref, fq = model(x), qat(x)
        int8 = convert(copy.deepcopy(qat))(x)
    assert len(int8_layers(rows)) == len(rows) - 2 == 39  # the logits and the stem stay float
    assert {r["layer"]: r["why"] for r in rows}["encoder.stages.0.patch_embed.proj"] == "stem stays float"
    assert float((int8 - fq).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((fq - ref).abs().mean()) > 0.01  # the quantisation itself is far larger

    _, qat, _ = _tiny_qat("all", {"decoder.head": "int8"})
    with torch.no_grad():
        fq = qat(x)
        int8 = convert(copy.deepcopy(qat))(x)
    assert float((int8 - fq).abs().mean()) < 0.1 * float((fq - ref).abs().mean())
    assert float(((int8 > 0) == (fq > 0)).float().mean()) > 0.98


def test_decision_honours_forced_table():
    force = {"decoder.head": "int8", "encoder.stages.1.blocks.0.mlp.dwconv": "int8", "decoder.fuse_parts.0": "fp32"}
    _, qat, rows = _tiny_qat("table", force)
    chosen = {r["layer"]: r["choice"] for r in rows}
    assert sorted(int8_layers(rows)) == ["decoder.head", "encoder.stages.1.blocks.0.mlp.dwconv"]
    assert chosen["decoder.fuse_parts.0"] == "fp32" and all(r["fp32_ms"] is None for r in rows)
    quant_names = [n for n, m in qat.named_modules() if hasattr(m, "w_fq") and not m.weight_only]
    assert sorted(quant_names) == sorted(int8_layers(rows))
    weight_only = [n for n, m in qat.named_modules() if hasattr(m, "w_fq") and m.weight_only]
    assert sorted(weight_only) == sorted(set(chosen) - set(int8_layers(rows)))  # the rest: weights only
    # "all" keeps the logits layer float unless forced, and a forced fp32 entry keeps that layer float
    _, _, rows = _tiny_qat("all", {"decoder.refine_dw": "fp32"})
    chosen = {r["layer"]: (r["choice"], r["why"]) for r in rows}
    assert chosen["decoder.head"] == ("fp32", "logits stay float")
    assert chosen["decoder.refine_dw"] == ("fp32", "forced")
    assert len(int8_layers(rows)) == len(rows) - 3  # + the stem
    with pytest.raises(ValueError, match="no.such"):
        decide(RefineFormer3D(ModelSpec(**TINY)), SHAPE, "table", {"no.such": "int8"})


def test_measured_decision_uses_and_writes_cache(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1, groups=8))
    cache = tmp_path / "int8_decisions.json"
    rows = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, force={"1": "fp32"})
    assert cache.is_file() and all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    assert rows[1]["choice"] == "fp32" and rows[1]["why"] == "forced"
    assert rows[0]["choice"] == ("int8" if rows[0]["int8_ms"] * 1.05 <= rows[0]["fp32_ms"] else "fp32")
    again = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache)
    assert [r["fp32_ms"] for r in again] == [r["fp32_ms"] for r in rows]  # read back, not re-measured


def test_onnxruntime_backend_times_each_layer_fp32_against_its_qdq_graph_in_onnxruntime(tmp_path, monkeypatch):
    """quantize.py --backend onnxruntime: ORT runs the artifact, so its INT8 choices are timed in ORT (they
    reused PyTorch's timings, whose kernels rank layers differently), cached apart from PyTorch's."""
    import onnx
    import onnxruntime

    import compress.quant.onnx_export as onnx_export

    dec = sys.modules[decide.__module__]
    graphs = []

    threads_seen = []

    def recording_session(data, threads=None):
        graphs.append({n.op_type for n in onnx.load_from_string(data).graph.node})
        threads_seen.append(threads)
        return real_session(data, threads)

    real_session = onnx_export.ort_session
    monkeypatch.setattr(onnx_export, "ort_session", recording_session)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), _ToChannelsLast(), nn.Conv3d(8, 8, 3, padding=1, groups=8))
    cache = tmp_path / "int8_decisions.json"
    torch_rows = dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache)
    assert graphs == []  # PyTorch's kernels: no ONNX session
    rows = dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, backend="onnxruntime")
    assert len(graphs) == 4 and all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
    for fp32, qdq in zip(graphs[::2], graphs[1::2]):  # per layer: its float graph, then its QDQ graph
        assert "QuantizeLinear" not in fp32 and {"QuantizeLinear", "DequantizeLinear", "Conv"} <= qdq
    assert [r["layout"] for r in rows] == ["contiguous"] * 2  # ORT takes contiguous arrays
    sigs = sorted(list(json.loads(cache.read_text()).values())[0])
    assert len(sigs) == 4 and sum(k.startswith(f"onnxruntime {onnxruntime.__version__}:") for k in sigs) == 2
    assert [r["fp32_ms"] for r in dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache,
                                             backend="onnxruntime")] == [r["fp32_ms"] for r in rows]
    assert len(graphs) == 4  # the second time from the cache
    assert set(threads_seen) == {torch.get_num_threads()}
    # the artifact's own ORT threads (quant.threads) when they differ from PyTorch's: timed and cached apart
    other = torch.get_num_threads() + 1
    dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, backend="onnxruntime", threads=other)
    assert len(graphs) == 8 and threads_seen[4:] == [other] * 4
    keys = list(json.loads(cache.read_text()).values())[0]
    assert sum(k.startswith(f"onnxruntime {onnxruntime.__version__} threads {other}:") for k in keys) == 2
    assert [r["layer"] for r in torch_rows] == [r["layer"] for r in rows]
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, got 'tflite'"):
        dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, backend="tflite")


def test_a_damaged_or_unwritable_decision_cache_never_stops_a_run(tmp_path, capsys):
    """A hand-edited entry (null, one number) is measured again; a cache folder that is a file is one warning
    (both were tracebacks after the measurements)."""
    model = nn.Sequential(nn.Conv3d(4, 8, 1), nn.ReLU(), nn.Conv3d(8, 8, 1))
    cache = tmp_path / "int8_decisions.json"
    decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache)
    store = json.loads(cache.read_text())
    (machine,) = store
    first, second = sorted(store[machine])
    store[machine][first], store[machine][second] = None, [1.0]
    cache.write_text(json.dumps(store))
    rows = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, progress=True)
    assert "2 layer(s) measured on this CPU" in capsys.readouterr().out and all(r["fp32_ms"] > 0 for r in rows)
    cache.write_text(json.dumps({machine: None}))
    assert len(decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache)) == 2
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    rows = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=afile / "int8_decisions.json")
    assert len(rows) == 2 and f"warning: cannot write the cache {afile / 'int8_decisions.json'}" in capsys.readouterr().err


class _ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last_3d)


def test_layers_are_timed_in_the_layout_the_model_feeds_them(tmp_path, monkeypatch):
    """The encoder's convs get channels_last_3d views of the token grid; timing them on a contiguous copy
    measured ATen's other kernel (for a depthwise conv 10x and more apart) and chose INT8 where it is slower."""
    dec = sys.modules[decide.__module__]  # the module (compress.quant exports its function `decide` by that name)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), _ToChannelsLast(), nn.Conv3d(8, 8, 3, padding=1, groups=8))
    assert dec.layer_inputs(model, (1, 4, 8, 8, 8)) == {"0": ((1, 4, 8, 8, 8), "contiguous"),
                                                       "2": ((1, 8, 8, 8, 8), dec.CHANNELS_LAST)}
    assert dec.input_layout(torch.zeros(1, 8, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)) == "contiguous"
    seen = []

    def fake_median_ms(fn, x, runs):  # records the layout each timing saw
        seen.append(dec.input_layout(x))
        return 1.0

    monkeypatch.setattr(dec, "_median_ms", fake_median_ms)
    cache = tmp_path / "int8_decisions.json"
    rows = dec.decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache)
    assert [r["layout"] for r in rows] == ["contiguous", dec.CHANNELS_LAST]
    assert seen == ["contiguous"] * 4 + [dec.CHANNELS_LAST] * 4  # fp32 and int8, two rounds each
    sigs = list(json.loads(cache.read_text()).values())[0]
    assert sorted(k.endswith("@cl") for k in sigs) == [False, True]  # a layout is its own cache entry
    assert " cl " in dec.format_table(rows).splitlines()[2]


def test_a_head_at_half_resolution_is_decided_quantized_and_served_polyphase(tmp_path):
    """The polyphase head runs inside the decoder's code: the INT8 flow must still see decoder.head as a
    layer (decision row, quant.force, fake-quant, int8-stored weights), and the served model run it
    polyphase with the same logits."""
    model, qat, rows = _tiny_qat("all", {"decoder.head": "fp32"}, head_at="half")
    assert {r["layer"]: r["why"] for r in rows}["decoder.head"] == "forced"
    assert type(qat.decoder.head).__name__ == "QuantConv3d"
    int8 = convert(copy.deepcopy(qat))
    assert isinstance(int8.decoder.head, Int8WeightConv3d) and "decoder.head.weight_int8" in int8.state_dict()
    spec = int8_spec(model.spec.to_dict(), int8_layers(rows), True, torch.backends.quantized.engine,
                     int8_weight_layers(int8))
    Artifact(stage="int8", spec=spec, state_dict=int8.state_dict()).save(tmp_path / "int8.pt")
    served = build_model(Artifact.load(tmp_path / "int8.pt"))
    assert served.decoder.polyphase_head and not getattr(int8.decoder, "polyphase_head", False)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(served(x), int8(x), rtol=0, atol=1e-4 * float(int8(x).abs().max()))


def test_int8_artifact_reloads_weights_only_and_predicts(tmp_path):
    model, qat, rows = _tiny_qat("all", {"decoder.head": "int8", "encoder.stages.0.patch_embed.proj": "int8"})
    int8 = convert(copy.deepcopy(qat))
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = int8(x)
    spec = int8_spec(model.spec.to_dict(), int8_layers(rows), True, torch.backends.quantized.engine)
    Artifact(stage="int8", spec=spec, state_dict=int8.state_dict()).save(tmp_path / "int8.pt")
    Artifact(stage="student", spec=model.spec.to_dict(), state_dict=model.state_dict()).save(tmp_path / "fp32.pt")
    art = Artifact.load(tmp_path / "int8.pt")  # weights_only=True inside
    rebuilt = build_model(art)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    assert art.state_dict["decoder.head.weight_int8"].dtype == torch.int8
    # quantized layers stored ~4x smaller: int8 weights + one float scale per output channel
    fp32_bytes = sum(v.numel() * 4 for k, v in qat.state_dict().items() if k.endswith(".weight") and v.ndim > 1)
    int8_bytes = sum(v.numel() for k, v in art.state_dict.items() if k.endswith("weight_int8"))
    assert int8_bytes * 4 == fp32_bytes
    assert (tmp_path / "int8.pt").stat().st_size < 0.5 * (tmp_path / "fp32.pt").stat().st_size


def test_decisions_say_what_was_measured_and_what_came_from_the_cache(tmp_path, capsys):
    from torch import nn

    from compress.quant.decide import decide

    model = nn.Sequential(nn.Conv3d(4, 8, 1), nn.ReLU(), nn.Conv3d(8, 8, 1))
    cache = tmp_path / "int8_decisions.json"
    first = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, progress=True)
    assert "2 layer(s) measured on this CPU (torch kernels), 0 reused" in capsys.readouterr().out
    again = decide(model, (1, 4, 8, 8, 8), "measure", runs=1, cache=cache, progress=True)
    assert f"0 layer(s) measured on this CPU (torch kernels), 2 reused from the cache {cache}" in capsys.readouterr().out
    assert [r["fp32_ms"] for r in again] == [r["fp32_ms"] for r in first]  # the cached timings, not new ones


def test_int8_layers_run_without_torchs_dtype_deprecation_warning_and_unchanged_numerics(tmp_path):
    """torch 2.13 warns once per process at the first quantized tensor (pytorch#184982): a fresh
    process, warnings as errors, through convert, forward and a reload (repacking); the outputs are
    those of the quantized kernels called directly."""
    script = """
import warnings
warnings.simplefilter("error")
import torch
from torch import nn
from compress.quant.convert import convert, empty_int8_like
from compress.quant.lsq import LSQConfig, calibrate, quantize_
torch.manual_seed(0)
floats = [nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1, groups=8)]
layers = nn.Sequential(*floats)
quantize_(layers, LSQConfig())
x = torch.randn(1, 4, 8, 8, 8)
calibrate(layers, [x])
reloaded = nn.Sequential(*map(empty_int8_like, floats))
with torch.no_grad():
    y = convert(layers)(x)
    reloaded.load_state_dict(layers.state_dict())
    assert torch.equal(reloaded(x), y)
torch.save({"y": y, "x": x, "layers": layers.state_dict()}, "out.pt")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "deprecated" not in out.stderr
    saved = torch.load(tmp_path / "out.pt")
    x = saved["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (groups, channels) in enumerate([(1, 8), (8, 8)]):
            state = {k.split(".", 1)[1]: v for k, v in saved["layers"].items() if k.startswith(f"{i}.")}
            w = torch.quantize_per_channel(state["weight_int8"].float() * state["weight_scale"].view(-1, 1, 1, 1, 1),
                                           state["weight_scale"].double(), torch.zeros(channels, dtype=torch.int64),
                                           0, torch.qint8)
            packed = torch.ops.quantized.conv3d_prepack(w, state["bias"], [1, 1, 1], [1, 1, 1], [1, 1, 1], groups)
            scale, zp, qmax = float(state["in_scale"]), int(state["in_zero_point"]), int(state["in_qmax"])
            qx = torch.quantize_per_tensor(x.clamp(-zp * scale, (qmax - zp) * scale), scale, zp, torch.quint8)
            x = torch.ops.quantized.conv3d(qx, packed, float(state["out_scale"]), int(state["out_zero_point"])).dequantize()
    assert torch.equal(saved["y"], x)


def _save_int8(path, model, qat, rows):
    """The INT8 artifact as the INT8 stage writes it (compress.quant.stage.to_int8)."""
    int8 = convert(copy.deepcopy(qat))
    spec = int8_spec(model.spec.to_dict(), int8_layers(rows), True, torch.backends.quantized.engine,
                     int8_weight_layers(int8))
    Artifact(stage="int8", spec=spec, state_dict=int8.state_dict()).save(path)
    return int8


@pytest.mark.parametrize("force", [{}, {"decoder.refine_pw": "int8", "encoder.stages.1.blocks.0.mlp.fc1": "int8"}])
def test_every_weight_stored_int8_and_fp32_layers_run_the_qat_weights(tmp_path, force):
    """decide "table": only the forced layers run INT8; every other Linear/Conv3d runs FP32 on the int8
    weights QAT trained (weight-only fake quantisation), so the loaded model is the fake-quant model:
    to float rounding with no INT8 kernel, to an INT8 output step where some run INT8."""
    model, qat, rows = _tiny_qat("table", force)
    assert sorted(int8_layers(rows)) == sorted(force)
    int8 = _save_int8(tmp_path / "int8.pt", model, qat, rows)
    art = Artifact.load(tmp_path / "int8.pt")
    assert sorted(art.spec["int8_weights"]) == sorted({r["layer"] for r in rows} - set(force))
    # no float weight left: every >= 2-D tensor of the state (conv / linear weights) is int8
    assert all(v.dtype == torch.int8 for v in art.state_dict.values() if v.ndim >= 2)
    rebuilt = build_model(art)
    assert isinstance(rebuilt.decoder.head, Int8WeightConv3d) and isinstance(rebuilt.decoder.head, nn.Conv3d)
    assert isinstance(rebuilt.encoder.stages[0].blocks[0].mlp.fc1, Int8WeightLinear)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        fq, before, after = qat(x), int8(x), rebuilt(x)
    assert torch.equal(after, before)  # loaded == pre-save
    scale = float(fq.abs().max())
    if not force:
        torch.testing.assert_close(after, fq, atol=1e-5 * scale, rtol=0)
    else:
        assert float((after - fq).abs().mean()) < 1e-3 * scale and float((after - fq).abs().max()) < 0.05 * scale


def test_int8_state_is_under_a_third_of_the_fp32_student():
    """Width 0.25 (the demo student's size): weights int8 + one float scale per output channel; biases and
    LayerNorms stay FP32. Measured 0.273 of the FP32 model's state bytes (BatchNorm unfolded there)."""
    torch.manual_seed(0)
    fp32 = RefineFormer3D(preset_spec("refineformer3d", 0.25)).eval()
    cfg = Config()
    cfg.quant.decide = "table"
    qat, _ = quantize_step(fp32, cfg, [torch.randn(SHAPE)], shape=SHAPE)
    ratio = int8_state_bytes(convert(qat)) / int8_state_bytes(fp32)
    assert 0.2 < ratio <= 0.3


def test_int8_artifact_before_int8_weights_still_loads(tmp_path):
    """An artifact written before `int8_weights` existed: FP32-run layers stored as float, no such key."""
    model, _, rows = _tiny_qat("table", {"decoder.refine_pw": "int8"})
    old = prepare_float(model)  # the old INT8 stage: LSQ (and int8 storage) on the INT8 layers only
    quantize_(old, LSQConfig(final={"decoder.head"}), lambda name, m: name == "decoder.refine_pw")
    calibrate(old, [torch.randn(SHAPE)])
    convert(old)
    spec = int8_spec(model.spec.to_dict(), ["decoder.refine_pw"], True, torch.backends.quantized.engine)
    del spec["int8_weights"]
    Artifact(stage="int8", spec=spec, state_dict=old.state_dict()).save(tmp_path / "old.pt")
    rebuilt = build_model(Artifact.load(tmp_path / "old.pt"))
    assert type(rebuilt.decoder.head) is OneDNNConv3d and "decoder.head.weight" in rebuilt.state_dict()  # FP32-stored
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), old(x))


def test_bad_int8_artifacts_are_refused_with_the_reason(tmp_path):
    model, qat, rows = _tiny_qat("table", {})
    _save_int8(tmp_path / "int8.pt", model, qat, rows)
    art = Artifact.load(tmp_path / "int8.pt")
    float_state = build_model(art).state_dict()
    float_state["decoder.head.weight"] = float_state.pop("decoder.head.weight_int8").float()  # FP32 weights
    with pytest.raises(ArtifactError, match="(?s)weights do not fit.*decoder.head.weight_int8"):
        build_model(Artifact(stage="int8", spec=art.spec, state_dict=float_state))
    bad = {**art.spec, "int8_weights": [*art.spec["int8_weights"], "decoder.no_such"]}
    with pytest.raises(ArtifactError, match="not Linear/Conv3d of its base model: \\['decoder.no_such'\\]"):
        build_model(Artifact(stage="int8", spec=bad, state_dict=art.state_dict))
    both = {**art.spec, "int8_layers": ["decoder.head"]}
    with pytest.raises(ArtifactError, match="both as INT8 and as FP32 on int8 weights: \\['decoder.head'\\]"):
        build_model(Artifact(stage="int8", spec=both, state_dict=art.state_dict))
