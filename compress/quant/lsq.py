"""LSQ fake quantisation (Esser et al., "Learned Step Size Quantization") as a module swap.

`quantize_(model, LSQConfig(), filter_fn)` swaps every selected nn.Linear / nn.Conv3d for a
QuantLinear / QuantConv3d that fake-quantizes, with learned step sizes:

- the weight: per output channel, symmetric INT8 (-127..127, zero point 0);
- the input activation: per tensor, asymmetric unsigned (0..act_qmax, integer zero point fixed by
  calibration, step learned). Asymmetric because inputs after GELU/LayerNorm are far from
  symmetric. act_qmax defaults to 127, fbgemm's "reduce_range" (without VNNI the x86 u8*s8 kernels
  add pairs of products in int16, which can saturate); the converted layers clamp their input to
  the same range. Measured here: with 0..127 the x86 kernels reproduce the fake quantisation
  exactly, with 0..255 some outputs are off by one step, which compounds through the network;
- the output: per tensor, asymmetric 0..255, as the real INT8 kernel requantizes its output.
  The layers named in `LSQConfig.final` (the logits) keep a float output ("Dice-aware": quantisation
  stops before the probabilities); their output quantizer only records the calibrated range the
  converted kernel needs.

The layers named in `LSQConfig.weight_only` quantize their weight only (input and output stay float):
they run FP32 kernels, yet the INT8 artifact stores their weights as int8 with the learned step
(`compress.quant.convert`), so the fine-tune trains them towards the weights they will have.

The step gradient is LSQ's: inside the range d(out)/ds = round(v) - v (v = x/s), below/above it
qmin - zp / qmax - zp, all times g = 1/sqrt(n * Qp), where n is the number of values one step
quantizes (weights: elements per output channel; activations: elements per sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from model.refineformer3d import set_module
from model.rewrites import OneDNNConv3d

W_QMAX = 127  # symmetric INT8 weights, -127..127
MAX_CALIB_SAMPLES = 1 << 20  # values per batch kept for percentiles (torch.quantile limit is 16M)


@dataclass
class LSQConfig:
    act_qmax: int = 127  # input activations 0..act_qmax (fbgemm reduce_range; 255 allowed)
    out_qmax: int = 255  # requantized outputs 0..out_qmax
    percentile: float = 99.99  # calibration range of activations: [100 - p, p] percentiles
    final: set[str] = field(default_factory=set)  # layers whose output stays float
    weight_only: set[str] = field(default_factory=set)  # layers that quantize their weight only (run FP32)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient times g backward."""
    return (x - x * g).detach() + x * g


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, g: float) -> torch.Tensor:
    """Fake-quantize x with a learned step; step and zero point broadcast against x."""
    s = grad_scale(step.clamp_min(1e-8), g)
    q = round_ste(torch.clamp(x / s + zero_point, qmin, qmax))
    return (q - zero_point) * s


class FakeQuant(nn.Module):
    """One LSQ quantizer: per tensor (axis None) or per channel along `axis`.

    mode: "quant" applies it, "calib" records ranges and passes x through, "off" passes through.
    """

    def __init__(self, qmin: int, qmax: int, channels: int | None = None, axis: int | None = None, symmetric: bool = False,
                 percentile: float = 99.99, enabled: bool = True):
        super().__init__()
        self.qmin, self.qmax, self.axis, self.symmetric = qmin, qmax, axis, symmetric
        self.percentile, self.enabled = percentile, enabled
        # a disabled quantizer never runs, so its step gets no gradient: not trainable (DDP waits for
        # a gradient of every trainable parameter)
        self.step = nn.Parameter(torch.ones(channels if channels else ()), requires_grad=enabled)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("lo", torch.zeros(()))  # calibrated range (activations)
        self.register_buffer("hi", torch.zeros(()))
        self.mode = "quant"
        self._seen = 0

    def _shape(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return self.step, self.zero_point
        view = [1] * x.ndim
        view[self.axis] = -1
        return self.step.view(view), self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calib":
            self.observe(x)
            return x
        if self.mode == "off" or not self.enabled:
            return x
        step, zp = self._shape(x)
        if self.axis is None:
            n = x[0].numel() if x.ndim > 1 else x.numel()
        else:
            n = x.numel() // x.shape[self.axis]
        g = 1.0 / (n * self.qmax) ** 0.5
        return lsq_quantize(x, step, zp, self.qmin, self.qmax, g)

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        """LSQ's init, per output channel: 2 mean|w| / sqrt(Qp)."""
        mean_abs = w.abs().flatten(1).mean(1)
        self.step.copy_((2 * mean_abs / self.qmax ** 0.5).clamp_min(1e-8))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Running mean, over calibration batches, of the [100-p, p] percentiles (or min/max)."""
        flat = x.detach().flatten().float()
        if flat.numel() > MAX_CALIB_SAMPLES:
            idx = torch.randint(flat.numel(), (MAX_CALIB_SAMPLES,), generator=torch.Generator().manual_seed(self._seen))
            flat = flat[idx]
        if self.enabled:
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            lo, hi = torch.quantile(flat, q)
        else:  # float output of a final layer: the full range, nothing clipped
            lo, hi = flat.min(), flat.max()
        self._seen += 1
        self.lo += (lo - self.lo) / self._seen
        self.hi += (hi - self.hi) / self._seen

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Step and integer zero point from the recorded range (which always includes 0)."""
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        step = max((hi - lo) / (self.qmax - self.qmin), 1e-8)
        self.step.fill_(step)
        self.zero_point.fill_(float(min(max(round(self.qmin - lo / step), self.qmin), self.qmax)))
        self.mode = "quant"


class _QuantLayer(nn.Module):
    """Shared parts of QuantLinear / QuantConv3d: weight, input and output quantizers."""

    def _make_quantizers(self, out_channels: int, cfg: LSQConfig, final: bool, weight_only: bool) -> None:
        self.w_fq = FakeQuant(-W_QMAX, W_QMAX, channels=out_channels, axis=0, symmetric=True)
        self.w_fq.init_from_weight(self.weight)
        self.in_fq = FakeQuant(0, cfg.act_qmax, percentile=cfg.percentile, enabled=not weight_only)
        self.out_fq = FakeQuant(0, cfg.out_qmax, percentile=cfg.percentile, enabled=not (final or weight_only))
        self.final, self.weight_only = final, weight_only

    def quantized_weight(self) -> torch.Tensor:
        return self.w_fq(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_fq(self.op(self.in_fq(x), self.quantized_weight()))


class QuantLinear(_QuantLayer):
    def __init__(self, linear: nn.Linear, cfg: LSQConfig, final: bool = False, weight_only: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self._make_quantizers(self.out_features, cfg, final, weight_only)

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)


class QuantConv3d(_QuantLayer):
    def __init__(self, conv: nn.Conv3d, cfg: LSQConfig, final: bool = False, weight_only: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("QuantConv3d needs explicit zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._make_quantizers(self.out_channels, cfg, final, weight_only)

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


QUANT_LAYERS = (QuantLinear, QuantConv3d)


@torch.no_grad()
def int8_weight(layer: QuantLinear | QuantConv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float per-output-channel step): the layer's weight on its learned grid, so that
    int8 * step is the weight its fake quantisation computes."""
    step = layer.w_fq.step.detach().clamp_min(1e-8).clone()
    view = [-1] + [1] * (layer.weight.ndim - 1)
    q = torch.clamp(torch.round(layer.weight.detach() / step.view(view)), -W_QMAX, W_QMAX).to(torch.int8)
    return q, step
FilterFn = Callable[[str, nn.Module], bool]


def quantizable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv3d, OneDNNConv3d)


def quantize_(model: nn.Module, cfg: LSQConfig | None = None, filter_fn: FilterFn | None = None) -> nn.Module:
    """Swap, in place, every nn.Linear / nn.Conv3d accepted by filter_fn(name, module) for its LSQ twin
    (weight only for the layers in `cfg.weight_only`)."""
    cfg = cfg or LSQConfig()
    for name, module in list(model.named_modules()):
        if not quantizable(module) or (filter_fn is not None and not filter_fn(name, module)):
            continue
        twin = QuantLinear if isinstance(module, nn.Linear) else QuantConv3d
        set_module(model, name, twin(module, cfg, name in cfg.final, name in cfg.weight_only))
    return model


def fake_quants(model: nn.Module) -> Iterable[FakeQuant]:
    return (m for m in model.modules() if isinstance(m, FakeQuant))


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Initialise activation steps and zero points from a few forward passes; returns batches used.
    Weight-only layers have no activation quantizers to calibrate."""
    acts = [fq for layer in model.modules() if isinstance(layer, QUANT_LAYERS) and not layer.weight_only
            for fq in (layer.in_fq, layer.out_fq)]
    was_training = model.training
    model.eval()
    for fq in acts:
        fq.mode, fq._seen = "calib", 0
        fq.lo.zero_(), fq.hi.zero_()
    n = 0
    for x in batches:
        model(x)
        n += 1
    if n == 0:
        raise ValueError("calibration needs at least one batch")
    for fq in acts:
        fq.finish_calibration()
    model.train(was_training)
    return n


def quant_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
