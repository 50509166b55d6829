"""Where the time goes: operator and module tables from one profiled forward, with fvcore multiply-adds."""
import copy

import pytest
import torch

from common.artifact import Artifact, build_model
from common.config import Config
from compress.quant.convert import convert, int8_spec, int8_weight_layers
from compress.quant.decide import int8_layers
from compress.quant.onnx_export import OrtModel, export_onnx, onnx_spec
from compress.quant.stage import quantize_step
from model.macs import count_macs
from model.refineformer3d import ModelSpec, RefineFormer3D
from model.rewrites import inference_graph
from pipeline.predict import inference_model
from pipeline.profile import ROOT, gemm_peak, profile_artifact, profile_window

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
SHAPE = (1, 4, 32, 32, 32)


def tiny() -> RefineFormer3D:
    torch.manual_seed(0)
    return RefineFormer3D(ModelSpec(**TINY)).eval()


def test_gemm_peak_is_a_positive_rate():
    peak = gemm_peak(n=256, runs=3)
    assert peak["gmacs_per_s"] > 0 and peak["n"] == 256 and peak["threads"] == torch.get_num_threads()
    assert peak["gmacs_per_s"] == pytest.approx(256 ** 3 / (peak["ms"] / 1e3) / 1e9)


def test_tables_partition_the_forward_and_carry_its_multiply_adds():
    model = inference_graph(tiny())
    full = profile_window(model, model, SHAPE, peak=50.0, top=10 ** 6)
    ops, modules = full["ops"], full["modules"]
    assert ops and modules and full["forward_ms"] > 0
    # operators called by the model's code do not overlap; module self times split the forward exactly
    assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    assert sum(m["self_share"] for m in modules) == pytest.approx(1.0, abs=1e-6)
    root = next(m for m in modules if m["module"] == ROOT)
    assert root["total_share"] == pytest.approx(1.0) and root["total_ms"] == pytest.approx(full["forward_ms"])
    # multiply-adds: the model's fvcore count, split over modules and over operators without loss
    assert full["gmacs"] == pytest.approx(count_macs(model, SHAPE))
    assert sum(m["gmacs_self"] or 0.0 for m in modules) == pytest.approx(full["gmacs"])
    assert sum(o["gmacs"] or 0.0 for o in ops) == pytest.approx(full["gmacs"])
    convs = [m for m in modules if m["type"] == "Conv3d"]
    conv = next(o for o in ops if o["op"] == "aten::conv3d")
    assert conv["calls"] == len(convs) and conv["gmacs"] == pytest.approx(sum(m["gmacs_self"] for m in convs))
    attention = next(o for o in ops if o["op"] == "aten::scaled_dot_product_attention")
    assert attention["gmacs"] > 0  # model.macs' handler, not fvcore's silent 0
    head = next(m for m in modules if m["module"] == "decoder.head")
    assert head["gmacs_per_s"] == pytest.approx(head["gmacs_self"] / (head["self_ms"] / 1e3))
    assert head["peak_share"] == pytest.approx(head["gmacs_per_s"] / 50.0)
    # the top rows are the largest
    top = profile_window(model, model, SHAPE, top=3)
    assert len(top["ops"]) == 3 and len(top["modules"]) == 3
    assert top["ops"][0]["total_ms"] >= top["ops"][-1]["total_ms"] and top["peak_gmacs_per_s"] is None
    assert top["modules_count"] == len(modules)


def test_a_head_run_inside_the_decoder_is_counted_on_the_decoders_row():
    """The polyphase head (model.rewrites.polyphase_head) runs in the decoder's own code, not as a module
    call: its multiply-adds go to the decoder's row with the time, and every row still adds up."""
    torch.manual_seed(0)
    model = inference_graph(RefineFormer3D(ModelSpec(**TINY, head_at="half")).eval())
    assert model.decoder.polyphase_head
    full = profile_window(model, model, SHAPE, top=10 ** 6)
    rows = {m["module"]: m for m in full["modules"]}
    assert "decoder.head" not in rows  # never called as a module
    assert sum(m["gmacs_self"] or 0.0 for m in rows.values()) == pytest.approx(full["gmacs"])
    assert sum(o["gmacs"] or 0.0 for o in full["ops"]) == pytest.approx(full["gmacs"])
    head = model.decoder.head
    head_gmacs = SHAPE[0] * head.out_channels * head.in_channels * 27 * (32 // 2) ** 3 / 1e9  # 1/2 of a 32^3 input
    assert rows["decoder"]["gmacs_self"] >= head_gmacs


def test_int8_artifact_profiles_on_its_float_names_and_onnx_says_why_not():
    model = tiny()
    cfg = Config()
    cfg.quant.decide, cfg.quant.force = "all", {"decoder.head": "fp32"}
    qat, rows = quantize_step(model, cfg, [torch.randn(SHAPE) for _ in range(2)], shape=SHAPE)
    int8 = convert(copy.deepcopy(qat))
    art = Artifact("int8", int8_spec(model.spec.to_dict(), int8_layers(rows), True, "x86", int8_weight_layers(int8)),
                   int8.state_dict())
    served = inference_model(art, build_model(art))
    prof = profile_artifact(art, served, SHAPE, peak=50.0, top=10 ** 6)
    quantized = [o for o in prof["ops"] if o["op"].startswith("quantized::")]
    assert quantized and all(o["gmacs"] for o in quantized if "conv" in o["op"] or "linear" in o["op"])
    float_count = count_macs(inference_graph(model), SHAPE)
    assert sum(m["gmacs_self"] or 0.0 for m in prof["modules"]) == pytest.approx(float_count)
    # an ONNX artifact: no PyTorch operators to see, and the report says so
    data = export_onnx(inference_graph(model), SHAPE)
    onnx = Artifact("int8", onnx_spec(list(SHAPE), len(data), model.spec.to_dict(), "fp32"),
                    OrtModel.from_bytes(data, list(SHAPE)).state_dict())
    prof = profile_artifact(onnx, build_model(onnx), SHAPE)
    assert set(prof) == {"error"} and "ONNX Runtime" in prof["error"]
