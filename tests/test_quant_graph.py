"""Exact graph rewrites: BatchNorm folding and decoder re-association leave outputs equal."""
import pytest
import torch
from torch import nn

from compress.quant.fold import bn_pairs, fold_bn
from compress.quant.reassoc import ReassociatedDecoder, reassociate_decoder
from teacher.model import ModelSpec, RefineFormer3D, factorise_module

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)


def tiny_model(decoder: str, seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    model = RefineFormer3D(ModelSpec(decoder=decoder, **TINY))
    with torch.no_grad():  # non-trivial BatchNorm statistics, else folding is nearly the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


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
