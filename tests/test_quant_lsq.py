"""LSQ fake quantisation: forward values, the step-size gradient (incl. clipping and grad scale), swap, calibration."""
import math

import pytest
import torch
from torch import nn

from compress.quant.lsq import FakeQuant, LSQConfig, QuantConv3d, QuantLinear, calibrate, lsq_quantize, quantize_


def lsq_reference(x, s, zp, qmin, qmax):
    """Hand-written LSQ: (forward value, d out/d s, d out/d x) per element."""
    v = x / s + zp
    inside = (v >= qmin) & (v <= qmax)
    out = (torch.clamp(torch.round(v), qmin, qmax) - zp) * s
    ds = torch.where(inside, torch.round(x / s + zp) - zp - x / s, torch.where(v < qmin, qmin - zp, qmax - zp) * torch.ones_like(x))
    return out, ds, inside.float()


@pytest.mark.parametrize("zp", [0.0, 3.0])
def test_step_gradient_matches_lsq_formula(zp):
    x = torch.tensor([-4.1, -1.3, -0.2, 0.05, 0.74, 1.9, 3.3, 7.6, 40.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    qmin, qmax, g = 0, 15, 0.37
    out = lsq_quantize(x, s, torch.tensor(zp), qmin, qmax, g)
    out.sum().backward()
    ref, ds, dx = lsq_reference(x.detach(), 0.5, zp, qmin, qmax)
    assert torch.allclose(out, ref)
    assert math.isclose(float(s.grad), g * float(ds.sum()), rel_tol=1e-5)
    assert torch.equal(x.grad, dx)
    # both clipped regions are exercised: the largest value clips above, the most negative below
    assert float(dx[0]) == 0.0 and float(dx[-1]) == 0.0 and float(dx[4]) == 1.0


def test_per_channel_weight_grad_scale():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, 3, requires_grad=True)
    fq = FakeQuant(-127, 127, channels=3, axis=0, symmetric=True)
    fq.init_from_weight(w.detach())
    expected_init = 2 * w.detach().abs().flatten(1).mean(1) / math.sqrt(127)
    assert torch.allclose(fq.step.detach(), expected_init)
    fq(w).sum().backward()
    g = 1 / math.sqrt(54 * 127)  # 2*3*3*3 weights share each channel's step
    for c in range(3):
        _, ds, _ = lsq_reference(w.detach()[c], float(fq.step[c].detach()), 0.0, -127, 127)
        assert math.isclose(float(fq.step.grad[c]), g * float(ds.sum()), rel_tol=1e-4, abs_tol=1e-9)


def test_quantize_swaps_selected_layers_and_keeps_final_output_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1), nn.Linear(4, 4))
    quantize_(model, LSQConfig(final={"2"}), lambda name, m: name != "3")
    assert isinstance(model[0], QuantConv3d) and isinstance(model[2], QuantConv3d)
    assert type(model[3]) is nn.Linear
    assert model[0].out_fq.enabled and not model[2].out_fq.enabled
    x = torch.randn(2, 2, 4, 4, 4)
    n = calibrate(model[:3], [x, x * 0.5])
    assert n == 2  # the range is the mean over batches of the 0.01/99.99 percentiles: 0.75 x the extremes
    # calibrated activation range: 0..127 with an integer zero point that maps 0.0 exactly
    fq = model[0].in_fq
    assert 0 <= float(fq.zero_point) <= 127 and float(fq.zero_point) == round(float(fq.zero_point))
    lo, hi = -float(fq.zero_point) * float(fq.step), (127 - float(fq.zero_point)) * float(fq.step)
    step = float(fq.step)
    assert abs(lo - 0.75 * float(x.min())) <= step and abs(hi - 0.75 * float(x.max())) <= step
    y = model[:3](x)
    # the final layer's output is not on any grid; an inner layer's output is
    inner = model[0](x)
    k = inner / model[0].out_fq.step + model[0].out_fq.zero_point
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert not torch.allclose(y / model[2].out_fq.step, (y / model[2].out_fq.step).round(), atol=1e-3)


def test_quant_linear_equals_float_linear_on_grid_values():
    """Weights and inputs already on the grids: fake quantisation changes nothing."""
    lin = nn.Linear(4, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -1.0, 2.0]]) * 0.01)
    q = QuantLinear(lin, LSQConfig(final={"x"}), final=True)
    with torch.no_grad():
        q.w_fq.step.fill_(0.005)
        q.in_fq.step.fill_(0.25)
        q.in_fq.zero_point.fill_(8)
    x = torch.tensor([[-2.0, -0.25, 0.0, 1.5]])
    assert torch.allclose(q(x), lin(x), atol=1e-6)


def test_weight_only_layer_quantizes_its_weight_and_nothing_else():
    """A weight-only layer (runs FP32, its weight stored int8): the float op on the fake-quantized weight;
    its input and output pass unquantized, and calibration leaves its activation quantizers alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1))
    quantize_(model, LSQConfig(weight_only={"2"}))
    assert model[2].weight_only and not model[0].weight_only
    assert not model[2].in_fq.enabled and not model[2].out_fq.enabled
    x = torch.randn(2, 2, 4, 4, 4)
    calibrate(model, [x])
    assert float(model[2].in_fq.hi) == 0.0 and float(model[0].in_fq.hi) > 0.0  # never observed
    h = model[1](model[0](x))
    w = model[2].w_fq(model[2].weight)
    step = model[2].w_fq.step.view(-1, 1, 1, 1, 1)
    assert torch.allclose(w / step, (w / step).round(), atol=1e-4) and not torch.equal(w, model[2].weight)
    assert torch.equal(model[2](h), nn.functional.conv3d(h, w, model[2].bias))
