"""Inference rewrites (model.rewrites): BatchNorm folding, decoder re-association, the channels_last_3d tail
and oneDNN convolutions leave outputs equal; `inference_graph` applies them to a copy, once."""
import copy
import io

import onnx
import pytest
import torch
from torch import nn

from model.layers import LowRankConv3d, LowRankLinear
from model.macs import count_macs
from model.refineformer3d import ModelSpec, RefineFormer3D, factorise_module
from compress.quant.lsq import quantizable
from model.refineformer3d import polyphase_head_applies
from model.rewrites import (ChannelsLast3d, OneDNNConv3d, ReassociatedDecoder, bn_pairs, channels_last_tail, fold_bn,
                            has_channels_last_tail, inference_graph, onednn_convs, polyphase_head, reassociate_decoder)

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
# Low-rank layers in the encoder, in the fusion conv (re-associated through its `down` half), in the refine
# decoder's pointwise conv (its BatchNorm folds into `up`) and in the head (the channels-last tail runs it).
RANKS = {"encoder.stages.0.blocks.0.mlp.fc1": 8, "encoder.stages.1.blocks.0.attn.q": 8, "decoder.fuse": 6,
         "decoder.refine_pw": 3, "decoder.head": 3}
ALLMLP_RANKS = {"encoder.stages.0.blocks.0.mlp.fc1": 8, "decoder.fuse": 6, "decoder.pred": 2}


def tiny_model(decoder: str, seed: int = 0, ranks: dict[str, int] | None = None,
               head_at: str = "full") -> RefineFormer3D:
    torch.manual_seed(seed)
    model = RefineFormer3D(ModelSpec(decoder=decoder, **TINY, ranks=dict(ranks or {}), head_at=head_at))
    with torch.no_grad():  # non-trivial BatchNorm statistics, else folding is nearly the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest logit."""
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
def test_fold_bn_is_exact(decoder):
    model = tiny_model(decoder)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        n = len(bn_pairs(model))
        fold_bn(model)
        out = model(x)
    assert n == (4 + 3 if decoder == "refine" else 4 + 1)  # 4 MixFFN dwconvs + the decoder BNs
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert model.decoder.fuse.bias is not None
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
@pytest.mark.parametrize("fold", [True, False])
def test_reassociated_decoder_is_exact(decoder, fold):
    model = tiny_model(decoder, seed=1)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        if fold:
            fold_bn(model)
        reassociate_decoder(model)
        out = model(x)
    assert isinstance(model.decoder, ReassociatedDecoder)
    assert len(model.decoder.fuse_parts) == 4
    # stage 0's block is the LAST input-channel block of the fused conv (concatenation is deepest first)
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))


def test_reassociation_with_low_rank_fuse():
    model = tiny_model("refine", seed=2)
    factorise_module(model, "decoder.fuse", 6)
    nn.init.normal_(model.decoder.fuse.down.weight, std=0.2)
    nn.init.normal_(model.decoder.fuse.up.weight, std=0.2)
    model.eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fold_bn(model)  # folds fuse_bn into fuse.up
        reassociate_decoder(model)
        out = model(x)
    assert model.decoder.fuse_parts[0].out_channels == 6  # rank-6 sums are upsampled, not 16 channels
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))


CL = torch.channels_last_3d


def layouts(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Memory layout ("cl", "std" or "other") of the inputs of refine_pw / head / pred, and of the logits."""
    def kind(t: torch.Tensor) -> str:
        return "std" if t.is_contiguous() else "cl" if t.is_contiguous(memory_format=CL) else "other"

    seen: dict[str, str] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left as it is
            seen.setdefault(name, kind(args[0]))
        return hook

    hooks = [getattr(model.decoder, name).register_forward_pre_hook(record(name))
             for name in ("refine_pw", "head", "pred") if hasattr(model.decoder, name)]
    with torch.no_grad():
        seen["logits"] = kind(model(x))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
@pytest.mark.parametrize("reassoc", [True, False])
def test_channels_last_tail_is_exact(decoder, reassoc):
    base = tiny_model(decoder, seed=3)
    x = torch.randn(1, 4, 32, 32, 32)
    plain = inference_graph(base, reassoc=reassoc, channels_last=False)
    fast = inference_graph(base, reassoc=reassoc)  # channels_last=True is the default
    with torch.no_grad():
        ref, out = plain(x), fast(x)
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    assert fast.state_dict().keys() == plain.state_dict().keys()  # parameter-free: artifacts are unchanged
    assert has_channels_last_tail(fast) == (decoder == "refine") and not has_channels_last_tail(plain)
    if decoder == "refine":
        assert isinstance(fast.decoder.refine_pw_bn, ChannelsLast3d)
        # the x4 upsample and the head run channels_last_3d; the logits come back in the default layout
        assert layouts(fast, x) == {"refine_pw": "std", "head": "cl", "logits": "std"}
        assert layouts(plain, x) == {"refine_pw": "std", "head": "std", "logits": "std"}
        # at real sizes the head conv itself returns channels_last_3d (oneDNN); the logits still come back default
        fast.decoder.head.register_forward_hook(lambda m, a, y: y.contiguous(memory_format=CL))
        assert layouts(fast, x)["logits"] == "std" and layouts(plain, x)["logits"] == "std"
    else:  # no slot: measured no faster (bench/bench_int8.py), so the allmlp graph is unchanged
        assert layouts(fast, x) == layouts(plain, x) == {"pred": "std", "logits": "std"}


def test_channels_last_tail_needs_folded_batchnorm_and_is_idempotent():
    model = tiny_model("refine", seed=4)
    with pytest.raises(TypeError, match="decoder.refine_pw_bn.*BatchNorm3d.*fold_bn"):
        channels_last_tail(model)
    fold_bn(model)
    assert channels_last_tail(model) is model and channels_last_tail(model) is model
    assert sum(isinstance(m, ChannelsLast3d) for m in model.modules()) == 1  # one slot, one hook
    assert len(model.decoder._forward_hooks) == 1


def test_channels_last_tail_skips_narrow_tails():
    """refine_dim 2 measured no faster in channels_last_3d: the graph is left as it is."""
    torch.manual_seed(5)
    model = inference_graph(RefineFormer3D(ModelSpec(decoder="refine", **{**TINY, "refine_dim": 2})))
    assert not has_channels_last_tail(model) and type(model.decoder.refine_pw_bn) is nn.Identity
    assert layouts(model, torch.randn(1, 4, 32, 32, 32)) == {"refine_pw": "std", "head": "std", "logits": "std"}


@pytest.mark.parametrize("decoder, ranks, head_at", [("refine", None, "full"), ("allmlp", None, "full"),
                                                     ("refine", RANKS, "full"), ("allmlp", ALLMLP_RANKS, "full"),
                                                     ("refine", None, "quarter"), ("refine", None, "half")])
def test_inference_graph_matches_the_plain_model(decoder, ranks, head_at):
    """Same function, different rounding: folding scales the conv weights before the sum instead of the
    sum after it, and re-association adds the four stages' convs after upsampling each instead of
    convolving their concatenation. Each float32 op rounds at ~6e-8 relative; the logits are sums of a
    few hundred such terms through a few dozen layers, so 1e-5 of the largest logit bounds the
    difference with room to spare (measured: 1e-7 to 6e-7), while any wiring mistake (a block or
    a BatchNorm statistic out of place) is off by far more than that."""
    model = tiny_model(decoder, seed=6, ranks=ranks, head_at=head_at)
    if ranks:
        assert {n for n, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv3d))} == set(ranks)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 4, 32, 64, 32)
    fast = inference_graph(model)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert max_error(out, ref) < 1e-5
    assert out.is_contiguous() and not fast.training
    assert isinstance(fast.decoder, ReassociatedDecoder) and not bn_pairs(fast)
    assert has_channels_last_tail(fast) == (decoder == "refine" and head_at != "quarter")  # quarter: 3 channels upsampled
    # the plain model is untouched: same modules, same weights, still unfolded
    assert not isinstance(model.decoder, ReassociatedDecoder) and bn_pairs(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # idempotent: a rewritten model comes back with the same graph and the same numbers
    again = inference_graph(fast)
    assert sum(isinstance(m, ChannelsLast3d) for m in again.modules()) == int(has_channels_last_tail(fast))
    assert len(again.decoder._forward_hooks) == len(fast.decoder._forward_hooks)
    with torch.no_grad():
        assert torch.equal(again(x), out)



@pytest.mark.parametrize("batch, stride, channels_last", [(1, 1, False), (1, 2, True), (2, 1, True)])
def test_onednn_conv3d_equals_conv3d_and_traces_as_one(batch, stride, channels_last):
    torch.manual_seed(0)
    plain = nn.Conv3d(8, 3, 3, stride=stride, padding=1).eval()
    fast = copy.deepcopy(plain)
    onednn_convs(fast)
    assert type(fast) is OneDNNConv3d and fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(batch, 8, 16, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=0)
        with torch.profiler.profile() as prof:
            fast(x)
        assert any(e.name == "aten::mkldnn_convolution" for e in prof.events())  # what the swap is for
        graph = str(torch.jit.trace(fast, x).graph)
    assert "mkldnn_convolution" not in graph and "aten::_convolution" in graph  # exporters, fvcore: a Conv3d


def test_onednn_convs_swaps_only_plain_convs_with_kernels_above_one():
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 1), nn.Conv3d(4, 4, 3, padding=1, groups=4),
                          nn.Linear(4, 4))
    onednn_convs(model)
    assert [type(m) for m in model] == [OneDNNConv3d, nn.Conv3d, nn.Conv3d, nn.Linear]
    assert quantizable(model[0])  # the INT8 stage still sees a Conv3d to quantize
    graph = inference_graph(tiny_model("refine", seed=1))
    assert isinstance(graph.decoder.head, OneDNNConv3d)
    assert not any(type(m) is OneDNNConv3d for m in inference_graph(tiny_model("refine"), onednn=False).modules())


def test_onednn_conv3d_leaves_unbatched_and_autocast_inputs_to_conv3d():
    plain = nn.Conv3d(4, 3, 3, padding=1).eval()
    fast = onednn_convs(copy.deepcopy(plain))
    x = torch.randn(4, 8, 8, 8)  # unbatched, as nn.Conv3d accepts
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast(x[None]).dtype == plain(x[None]).dtype == torch.bfloat16


def _ran(model: nn.Module, x: torch.Tensor, op: str) -> bool:
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    return any(e.name == op for e in prof.events())


def test_polyphase_head_runs_the_half_head_at_quarter_resolution_and_exports_plain():
    """The rewrite is taken where it applies (a float 3x3x3 head at 1/2) and only there: a fake-quant head
    swapped in later, a traced graph (ONNX, fvcore) and heads at full or 1/4 resolution run the plain
    upsampling and conv. Equal outputs are test_inference_graph_matches_the_plain_model's (head_at half)."""
    x = torch.randn(1, 4, 32, 64, 32)
    half = tiny_model("refine", seed=3, head_at="half")
    fast = inference_graph(half)
    assert fast.decoder.polyphase_head and polyphase_head_applies(fast.decoder, torch.zeros(1, 4, 8, 16, 8), (16, 32, 16))
    assert not polyphase_head_applies(fast.decoder, torch.zeros(1, 4, 8, 16, 8), (18, 32, 16))  # not x2: plain
    assert _ran(fast, x, "aten::replication_pad3d")  # the polyphase conv's padding
    plain = inference_graph(half, polyphase=False)
    assert not getattr(plain.decoder, "polyphase_head", False) and not _ran(plain, x, "aten::replication_pad3d")
    assert count_macs(fast, tuple(x.shape)) == count_macs(plain, tuple(x.shape))  # fvcore's trace: the plain ops
    buf = io.BytesIO()
    torch.onnx.export(fast, (x,), buf, opset_version=17, dynamo=False)
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    assert ops.count("Resize") >= 2 and "Pad" not in ops and "DepthToSpace" not in ops  # exporters: the plain ops
    for head_at in ("full", "quarter"):
        other = polyphase_head(inference_graph(tiny_model("refine", seed=3, head_at=head_at)))
        assert not getattr(other.decoder, "polyphase_head", False)
    assert not getattr(polyphase_head(inference_graph(tiny_model("allmlp"))).decoder, "polyphase_head", False)

    from compress.quant.lsq import LSQConfig, QuantConv3d  # a fake-quant head: its own forward, not the polyphase one
    fast.decoder.head = QuantConv3d(fast.decoder.head, LSQConfig(), final=True)
    assert not polyphase_head_applies(fast.decoder, torch.zeros(1, 4, 8, 16, 8), (16, 32, 16))
    assert not _ran(fast, x, "aten::replication_pad3d")


@pytest.mark.parametrize("override", [dict(patch_strides=[2, 2, 2, 2], patch_kernels=[3, 3, 3, 3],
                                           patch_paddings=[1, 1, 1, 1]),
                                      dict(patch_paddings=[4, 1, 1, 1])])
def test_a_first_stage_not_at_a_quarter_keeps_the_plain_half_head(override):
    """The polyphase form doubles x's grid; the plain tail resizes to half the output whatever x's grid:
    where those differ (a first stage at 1/2, or an odd padding) the plain path runs, with equal outputs."""
    torch.manual_seed(2)
    spec = ModelSpec(decoder="refine", **{**TINY, **override}, head_at="half")
    model = RefineFormer3D(spec).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    fast = inference_graph(model)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert max_error(out, ref) < 1e-5
