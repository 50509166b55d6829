"""model.resample: trilinear upsampling as three matrix products equals F.interpolate (to rounding)."""
import io

import onnx
import pytest
import torch
import torch.nn.functional as F

from model.resample import (SEPARABLE_MAX_CHANNELS, depth_to_space3d, separable_trilinear, upsample,
                            upsample2_conv3d)


def _reference(x, size):
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


@pytest.mark.parametrize("shape, size", [
    ((1, 3, 32, 32, 32), (128, 128, 128)),  # the logits of a head at 1/4 resolution
    ((2, 3, 8, 12, 5), (32, 48, 20)),  # anisotropic, batch of 2
    ((1, 2, 7, 9, 4), (16, 9, 13)),  # non-integer ratios, one axis unchanged
    ((1, 3, 16, 16, 16), (8, 12, 16)),  # smaller: plain linear interpolation, no antialiasing, as F.interpolate
])
def test_separable_trilinear_equals_f_interpolate(shape, size):
    torch.manual_seed(0)
    x = torch.randn(shape)
    out = separable_trilinear(x, size)
    assert out.shape == (*shape[:2], *size) and out.is_contiguous()
    cl = separable_trilinear(x.contiguous(memory_format=torch.channels_last_3d), size)
    assert cl.is_contiguous() and torch.equal(cl, out)  # any input layout: a contiguous result
    torch.testing.assert_close(out, _reference(x, size), atol=1e-5, rtol=0)


def test_separable_trilinear_from_channels_last_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weights = torch.randn(1, 3, 12, 20, 8)
    (separable_trilinear(x, (12, 20, 8)) * weights).sum().backward()
    mine = x.grad.clone()
    x.grad = None
    (_reference(x, (12, 20, 8)) * weights).sum().backward()
    torch.testing.assert_close(mine, x.grad, atol=1e-5, rtol=0)


def test_upsample_leaves_many_channels_and_equal_sizes_to_f_interpolate():
    x = torch.randn(1, SEPARABLE_MAX_CHANNELS + 1, 4, 4, 4)
    assert torch.equal(upsample(x, (8, 8, 8)), _reference(x, (8, 8, 8)))  # bit-identical: the same kernel
    few = torch.randn(1, 3, 4, 4, 4)
    assert torch.equal(upsample(few, (4, 4, 4)), few)
    with pytest.raises(ValueError, match="needs \\(B, C, D, H, W\\) and 3 sizes"):
        separable_trilinear(torch.randn(1, 3, 4, 4), (8, 8))


def test_onnx_export_sees_one_resize_not_matrix_products():
    class Head(torch.nn.Module):
        def forward(self, x):
            return upsample(x, (16, 16, 16))

    buf = io.BytesIO()
    torch.onnx.export(Head(), (torch.randn(1, 3, 4, 4, 4),), buf, opset_version=17, dynamo=False)
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    assert "Resize" in ops and "MatMul" not in ops


def test_upsample_after_an_inference_mode_call_still_trains():
    """The interpolation matrices are cached: one built under inference_mode must not poison autograd."""
    x = torch.randn(1, 3, 5, 6, 7)
    with torch.inference_mode():
        upsample(x, (10, 12, 14))
    leaf = x.clone().requires_grad_()
    upsample(leaf, (10, 12, 14)).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape


def test_upsample_under_autocast_is_f_interpolate():
    x = torch.randn(1, 3, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample(x, (8, 8, 8))
    assert torch.equal(out, _reference(x, (8, 8, 8)))


def plain_up2_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv3d(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False), weight, bias, padding=1)


@pytest.mark.parametrize("shape", [(1, 12, 16, 16, 16), (2, 5, 3, 4, 6), (1, 3, 2, 2, 2), (1, 4, 2, 7, 3)])
@pytest.mark.parametrize("bias, channels_last", [(True, False), (False, True)])
def test_upsample2_conv3d_equals_upsampling_then_conv_everywhere(shape, bias, channels_last):
    """The polyphase form equals trilinear x2 then the zero-padded conv on every voxel, the border shell
    (recomputed face by face) included; the smallest grids (2 per side) are all border. Relative 1e-5:
    float32 sums of 27 x C terms in another order (measured 1e-6); a phase or a face out of place is off
    by the logits' own size."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(3, shape[1], 3, 3, 3, generator=gen)
    b = torch.randn(3, generator=gen) if bias else None
    ref = plain_up2_conv(x, weight, b)
    with torch.no_grad():  # oneDNN's kernel, as served
        out = upsample2_conv3d(x, weight, b)
    assert out.shape == ref.shape and out.is_contiguous()
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) < 1e-5 * scale
    border = torch.ones_like(ref, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1, 1:-1] = False
    assert float((out - ref)[border].abs().max()) < 1e-5 * scale  # the shell is not left to the replication
    out_grad = upsample2_conv3d(x, weight, b)  # with autograd on: F.conv3d, same values
    assert float((out_grad - ref).abs().max()) < 1e-5 * scale


def test_upsample2_conv3d_gradients_match_and_bad_shapes_are_refused():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 3, 5, generator=gen, requires_grad=True)
    weight = torch.randn(2, 4, 3, 3, 3, generator=gen, requires_grad=True)
    upsample2_conv3d(x, weight, None).square().sum().backward()
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    plain_up2_conv(x, weight, None).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="every side >= 2"):
        upsample2_conv3d(torch.zeros(1, 4, 1, 4, 4), weight.detach(), None)
    with pytest.raises(ValueError, match="3x3x3 kernel"):
        upsample2_conv3d(torch.zeros(1, 4, 4, 4, 4), torch.zeros(2, 4, 1, 1, 1), None)


def test_depth_to_space3d_places_each_channel_of_a_block_and_refuses_other_counts():
    x = torch.arange(2 * 16 * 2 * 3 * 1, dtype=torch.float32).reshape(2, 16, 2, 3, 1)
    y = depth_to_space3d(x)
    assert y.shape == (2, 2, 4, 6, 2) and y.is_contiguous()
    for o in range(2):
        for p in range(8):
            pd, ph, pw = p >> 2, (p >> 1) & 1, p & 1
            assert torch.equal(y[:, o, pd::2, ph::2, pw::2], x[:, 8 * o + p])
    with pytest.raises(ValueError, match=r"needs \(B, 8 O, D, H, W\), got \(1, 12, 2, 2, 2\)"):
        depth_to_space3d(torch.zeros(1, 12, 2, 2, 2))
