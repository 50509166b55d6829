"""ONNX export: FP32 graph matches PyTorch, the QDQ INT8 graph (LSQ scales) matches the fake quantisation."""
import copy

import onnx
import torch

from common.artifact import Artifact, build_model
from common.config import Config
from compress.quant.convert import prepare_float
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from compress.quant.stage import quantize_step
from model.refineformer3d import ModelSpec, RefineFormer3D

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
SHAPE = (1, 4, 32, 32, 32)


def test_fp32_and_int8_onnx(tmp_path):
    torch.manual_seed(0)
    model = RefineFormer3D(ModelSpec(**TINY)).eval()
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        ref = model(x)

    fp32 = OrtModel.from_bytes(export_onnx(prepare_float(copy.deepcopy(model)), SHAPE), list(SHAPE), threads=1)
    assert float((fp32(x) - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))

    cfg = Config()
    cfg.quant.decide, cfg.quant.force = "all", {"decoder.head": "fp32", "encoder.stages.0.patch_embed.proj": "int8"}
    qat, _ = quantize_step(model, cfg, [torch.randn(SHAPE) for _ in range(2)], shape=SHAPE)
    with torch.no_grad():
        fq = qat(x)
    data = export_onnx(qat, SHAPE)
    graph = onnx.load_from_string(data).graph
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    # every layer's weight stored as int8 (40 INT8 ones and the weight-only head), none left as float + Quantize
    assert len(int8_weights) == 41
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in graph.initializer}
                   for n in graph.node)
    # rebuilt through the artifact (kind "onnx"), weights_only load
    spec = onnx_spec(list(SHAPE), len(data), model.spec.to_dict(), "int8", threads=1)
    ort8 = OrtModel.from_bytes(data, list(SHAPE), threads=1)
    Artifact(stage="int8", spec=spec, state_dict=ort8.state_dict()).save(tmp_path / "int8.pt")
    rebuilt = build_model(Artifact.load(tmp_path / "int8.pt"))
    y = rebuilt(x)
    assert y.shape == ref.shape
    # ORT's QLinearConv / QGemm on the same grids: the fake quantisation's values, except where float
    # rounding breaks a tie and one step propagates
    err = (y - fq).abs()
    assert float(err.mean()) < 0.02 * float((fq - ref).abs().mean())
    assert float(err.max()) < 0.05 * float(ref.abs().max())
    assert float((err > 1e-3).float().mean()) < 0.05  # a coarse-grid flip spreads through upsampling


def test_weight_only_layers_run_float_weights_in_onnx_runtime_and_int8_layers_keep_theirs():
    """ORT does not fold a DequantizeLinear of a constant (it keeps QDQ patterns for fusion), so a layer that
    stays FP32 on int8-stored weights dequantized them on every run: `dequantize_weight_only` gives such
    layers float initializers when the session is made; INT8 layers keep their weight's DequantizeLinear
    (ORT fuses it into QLinearConv); the outputs are the same to float rounding."""
    import numpy as np

    from compress.quant.onnx_export import ONNX_RUNTIMES, dequantize_weight_only, onnx_runner

    torch.manual_seed(0)
    model = RefineFormer3D(ModelSpec(**TINY)).eval()
    cfg = Config()
    cfg.quant.decide = "table"  # only the forced layer runs INT8; the other 40 are weight-only
    cfg.quant.force = {"encoder.stages.1.blocks.0.mlp.dwconv": "int8"}
    qat, rows = quantize_step(model, cfg, [torch.randn(SHAPE) for _ in range(2)], shape=SHAPE)
    data = export_onnx(qat, SHAPE)

    def ops(b: bytes) -> list[str]:
        return [n.op_type for n in onnx.load_from_string(b).graph.node]

    served = dequantize_weight_only(data)
    # every weight, plus the INT8 layer's input and output pairs
    assert ops(data).count("DequantizeLinear") == len(rows) + 2 and ops(data).count("QuantizeLinear") == 2
    assert ops(served).count("DequantizeLinear") == 3 and ops(served).count("QuantizeLinear") == 2  # the INT8 layer's
    assert len(served) > len(data)  # float weights now, in the session only
    assert ops(served).count("Constant") < ops(data).count("Constant")  # their scale constants went with them
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with torch.no_grad():
        fq = qat(torch.from_numpy(x)).numpy()
    for runtime in ONNX_RUNTIMES:  # sessions and compiled models are made from the folded graph
        out = onnx_runner(data, runtime, 1)(x)
        # the fake quantisation's values to float rounding (optimised ORT and OpenVINO on the unfolded graph
        # were 0.11-0.13 off on logits of 20 here, with or without the INT8 layer)
        np.testing.assert_allclose(out, fq, rtol=0, atol=1e-4 * float(np.abs(fq).max()), err_msg=runtime)
    assert dequantize_weight_only(served) == served  # nothing left to fold: the bytes as they are



def test_a_weight_only_layer_right_after_an_int8_layer_is_folded_too():
    """The two parts of a low-rank layer run back to back: with `down` INT8 and `up` weight-only, `up` reads
    `down`'s requantized output through a DequantizeLinear; that is not its own input quantizer, so its
    weight is folded (it was kept, and dequantized on every run); the INT8 layer keeps its pattern."""
    import numpy as np
    from torch import nn

    from compress.quant.lsq import LSQConfig, calibrate, quantize_
    from compress.quant.onnx_export import ONNX_RUNTIMES, dequantize_weight_only, onnx_runner

    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    quantize_(chain, LSQConfig(weight_only={"1", "3"}))
    shape = (1, 16, 8)
    calibrate(chain, [torch.randn(shape)])
    data = export_onnx(chain, shape)
    served = onnx.load_from_string(dequantize_weight_only(data)).graph
    weight_dq = [n.name for n in served.node if n.op_type == "DequantizeLinear"
                 and any(i.name == n.input[0] for i in served.initializer)]
    assert weight_dq == ["/0/DequantizeLinear_1"]  # layer 0's weight only: layers 1 and 3 run float weights
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        fq = chain(torch.from_numpy(x)).numpy()
    for runtime in ONNX_RUNTIMES:  # layer 0's requantized output may round a tie the other way: one step
        err = np.abs(onnx_runner(data, runtime, 1)(x) - fq)
        assert err.max() < 0.02 * np.abs(fq).max() and (err > 1e-4).mean() < 0.1, (runtime, err.max())
