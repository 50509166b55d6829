"""model.resample: trilinear upsampling as three matrix products equals F.interpolate (to rounding)."""
import io

import onnx
import pytest
import torch
import torch.nn.functional as F

from model.resample import SEPARABLE_MAX_CHANNELS, separable_trilinear, upsample


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
