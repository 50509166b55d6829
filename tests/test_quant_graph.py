"""The INT8 models' float graph: `prepare_float` is `model.rewrites.inference_graph`, and its channels_last_3d
tail survives the LSQ and INT8 layer swaps (the rewrites themselves: tests/test_rewrites.py)."""
import pytest
import torch
from torch import nn

from compress.quant.convert import Int8Conv3d, convert, prepare_float
from compress.quant.lsq import LSQConfig, calibrate, quantize_
from model.refineformer3d import ModelSpec, RefineFormer3D
from model.rewrites import ChannelsLast3d, ReassociatedDecoder, bn_pairs, inference_graph

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)


def tiny_model(seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(ModelSpec(decoder="refine", **TINY)).eval()


@pytest.mark.parametrize("reassoc", [True, False])
def test_prepare_float_is_the_inference_graph_on_a_copy(reassoc):
    model = tiny_model(seed=4)
    prepared = prepare_float(model, reassoc=reassoc)
    assert prepared is not model and bn_pairs(model) and not bn_pairs(prepared)  # the input stays as it was
    assert isinstance(prepared.decoder, ReassociatedDecoder) == reassoc
    assert isinstance(prepared.decoder.refine_pw_bn, ChannelsLast3d)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(prepared(x), inference_graph(model, reassoc=reassoc)(x))


def test_channels_last_tail_survives_int8_swaps():
    model = prepare_float(tiny_model(seed=4))
    x = torch.randn(1, 4, 32, 32, 32)
    quantize_(model, LSQConfig(final={"decoder.head"}), lambda name, m: name.startswith("decoder.refine"))
    calibrate(model, [x])
    with torch.no_grad():
        fake = model(x)
    convert(model)  # refine_dw / refine_pw become real INT8 layers; the slot stays
    assert isinstance(model.decoder.refine_pw, Int8Conv3d) and isinstance(model.decoder.refine_pw_bn, ChannelsLast3d)
    assert sum(isinstance(m, ChannelsLast3d) for m in model.modules()) == 1 and len(model.decoder._forward_hooks) == 1
    head_input = []
    model.decoder.head.register_forward_pre_hook(
        lambda m, args: head_input.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    with torch.no_grad():
        real = model(x)
    assert head_input == [True] and real.is_contiguous()  # tail in channels_last_3d, logits in the default layout
    assert torch.allclose(real, fake, atol=0.05 * float(fake.abs().max()))  # INT8 vs fake-quant, not exact
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
