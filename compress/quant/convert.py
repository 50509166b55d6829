"""Real INT8 layers (PyTorch quantized kernels) from LSQ layers, and the "int8-torch" model builder.

An INT8 layer quantizes its float input (quint8, the LSQ input step and zero point), runs the INT8
kernel (per-channel qint8 weights: scale = the LSQ weight step), requantizes the output (the LSQ
output step; for the logits layer the calibrated full range) and dequantizes, so float neighbours
see float tensors: mixed precision per layer.

A weight-only LSQ layer (it runs FP32 because FP32 measured faster) becomes an `Int8WeightLinear` /
`Int8WeightConv3d`: a float layer whose weight is stored as int8 with its learned step and
dequantised after loading (weight = int8 * step), the weight its fake quantisation trained. So the
artifact's size does not depend on which layers run INT8: every Linear/Conv3d weight is int8.

Storage: the quantized kernels' packed parameters are TorchScript objects that
`torch.load(weights_only=True)` rejects, so the state_dict holds plain tensors (int8 weights, float
scales, zero points) and the packed parameters are rebuilt after every load.

torch 2.13 deprecates the quantized dtypes (quint8, qint8; pytorch#184982) and warns once per process
at the first quantized tensor, from `quantize_per_channel` at packing as from `quantize_per_tensor` in
every forward. These kernels still need them: oneDNN's plain-dtype kernels (`onednn::qconv_pointwise`,
`qlinear_pointwise`) give the same integers, but torch has no fused non-deprecated float -> uint8
quantize, and the same rounding from eager ops costs more than many INT8 layers save. So the
quantized tensors stay, created inside `_quantized_dtypes()`, which silences that one warning.

Spec (kind "int8-torch"): the FP32 base, the rewrites, `int8_layers` (run INT8) and `int8_weights`
(run FP32 on int8-stored weights). An artifact written before `int8_weights` existed stores those
layers' weights in FP32 and still loads as it was written.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from common.artifact import register_builder
from engine.runtime import int8_engine
from compress.quant.lsq import QUANT_LAYERS, QuantConv3d, QuantLinear, int8_weight, quantizable
from model.refineformer3d import get_module, model_from_spec as fp32_from_spec, set_module
from model.rewrites import OneDNNConv3d, inference_graph, polyphase_head


_DTYPE_DEPRECATION = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"


@contextlib.contextmanager
def _quantized_dtypes() -> Iterator[None]:
    """Create quantized tensors without torch's dtype deprecation warning (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DTYPE_DEPRECATION, category=UserWarning)
        yield


def set_engine() -> str:
    """Select the quantized engine `engine.runtime.int8_engine` picks for this build; return its name."""
    engine = int8_engine()
    torch.backends.quantized.engine = engine
    return engine


class _Int8Layer(nn.Module):
    """Buffers: weight_int8, weight_scale (per out channel), bias, in/out scale and zero point."""

    def _init_buffers(self, weight_shape: tuple[int, ...], has_bias: bool) -> None:
        out = weight_shape[0]
        self.register_buffer("weight_int8", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.register_buffer("bias", torch.zeros(out) if has_bias else None)
        for name in ("in_scale", "out_scale"):
            self.register_buffer(name, torch.ones(()))
        for name in ("in_zero_point", "out_zero_point"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        self.register_buffer("in_qmax", torch.full((), 255, dtype=torch.int64))
        self._packed = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.pack())

    @torch.no_grad()
    def set_from(self, layer: QuantLinear | QuantConv3d) -> "_Int8Layer":
        """Copy the LSQ-learned quantisation of a fake-quant layer."""
        q, step = int8_weight(layer)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(step)
        if self.bias is not None:
            self.bias.copy_(layer.bias)
        self.in_scale.fill_(float(layer.in_fq.step.clamp_min(1e-8)))
        self.in_zero_point.fill_(int(layer.in_fq.zero_point))
        self.in_qmax.fill_(int(layer.in_fq.qmax))
        self.out_scale.fill_(float(layer.out_fq.step.clamp_min(1e-8)))
        self.out_zero_point.fill_(int(layer.out_fq.zero_point))
        self.pack()
        return self

    def qweight(self) -> torch.Tensor:
        zeros = torch.zeros(self.weight_scale.numel(), dtype=torch.int64)
        w = self.weight_int8.float() * self.weight_scale.view([-1] + [1] * (self.weight_int8.ndim - 1))
        with _quantized_dtypes():
            return torch.quantize_per_channel(w, self.weight_scale.double(), zeros, 0, torch.qint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.pack()
        scale, zp, qmax = float(self.in_scale), int(self.in_zero_point), int(self.in_qmax)
        if qmax < 255:  # reduce_range: the fake quantisation clipped at qmax, quint8 would not
            x = x.clamp(-zp * scale, (qmax - zp) * scale)
        with _quantized_dtypes():  # the input and the kernel's output
            qx = torch.quantize_per_tensor(x.contiguous(), scale, zp, torch.quint8)
            return self.run(qx).dequantize()

    def _extra_repr_q(self) -> str:
        return f"in_scale={float(self.in_scale):.4g}, out_scale={float(self.out_scale):.4g}"


class Int8Linear(_Int8Layer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), bias)

    def pack(self) -> None:
        set_engine()
        self._packed = torch.ops.quantized.linear_prepack(self.qweight(), self.bias)

    def run(self, qx: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear(qx, self._packed, float(self.out_scale), int(self.out_zero_point))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, " + self._extra_repr_q()


class Int8Conv3d(_Int8Layer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = True):
        super().__init__()
        t = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3  # noqa: E731
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = t(kernel_size), t(stride), t(padding), t(dilation)
        self._init_buffers((out_channels, in_channels // groups, *self.kernel_size), bias)

    def pack(self) -> None:
        set_engine()
        self._packed = torch.ops.quantized.conv3d_prepack(
            self.qweight(), self.bias, list(self.stride), list(self.padding), list(self.dilation), self.groups
        )

    def run(self, qx: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.conv3d(qx, self._packed, float(self.out_scale), int(self.out_zero_point))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, " + self._extra_repr_q())


class _Int8Weight:
    """Mixin for nn.Linear / nn.Conv3d: the weight is stored as `weight_int8` (int8) and `weight_scale`
    (per output channel) and rebuilt as the float `weight` (a buffer left out of the state_dict) after
    every load; the float layer's own forward runs on it."""

    def _store_int8(self) -> None:
        shape = tuple(self.weight.shape)
        del self.weight
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(shape[0]))
        self.register_buffer("weight", torch.zeros(shape), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.dequantize_weight())

    def dequantize_weight(self) -> None:
        self.weight = self.weight_int8.float() * self.weight_scale.view([-1] + [1] * (self.weight_int8.ndim - 1))

    @torch.no_grad()
    def set_from(self, layer: QuantLinear | QuantConv3d):
        """Store the weight of a (weight-only) fake-quant layer on its learned grid."""
        q, step = int8_weight(layer)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(step)
        if self.bias is not None:
            self.bias.copy_(layer.bias)
        self.dequantize_weight()
        return self


class Int8WeightLinear(_Int8Weight, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self._store_int8()


class Int8WeightConv3d(_Int8Weight, OneDNNConv3d):  # oneDNN where OneDNNConv3d says so (kernels > 1, groups 1)
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._store_int8()


def empty_int8_weight_like(layer: nn.Module) -> _Int8Weight:
    """A float layer with int8 weight storage, of the geometry of a float or fake-quant Linear/Conv3d."""
    if isinstance(layer, (nn.Linear, QuantLinear)):
        return Int8WeightLinear(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, (nn.Conv3d, QuantConv3d)):
        return Int8WeightConv3d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                layer.padding, layer.dilation, layer.groups, layer.bias is not None)
    raise TypeError(f"no int8-stored layer for a {type(layer).__name__}")


def empty_int8_like(layer: nn.Module) -> _Int8Layer:
    """An INT8 layer with the geometry of a float or fake-quant Linear/Conv3d (values to be loaded)."""
    if isinstance(layer, (nn.Linear, QuantLinear)):
        return Int8Linear(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, (nn.Conv3d, QuantConv3d)):
        return Int8Conv3d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None)
    raise TypeError(f"no INT8 layer for a {type(layer).__name__}")


def convert(model: nn.Module) -> nn.Module:
    """Swap, in place, every QuantLinear / QuantConv3d for its real INT8 layer, or a weight-only one
    for its float layer with int8-stored weights; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANT_LAYERS):
            empty = empty_int8_weight_like(module) if module.weight_only else empty_int8_like(module)
            set_module(model, name, empty.set_from(module))
    return model.eval()


def int8_weight_layers(model: nn.Module) -> list[str]:
    """Names of the layers that run FP32 on int8-stored weights (`int8_spec`'s `int8_weights`)."""
    return [name for name, m in model.named_modules() if isinstance(m, _Int8Weight)]


def prepare_float(model: nn.Module, reassoc: bool = True, channels_last: bool = True) -> nn.Module:
    """The exact graph rewrites every backend gets (`model.rewrites.inference_graph`: BatchNorm folding,
    decoder re-association, the decoder tail in channels_last_3d), on a copy; `model` is unchanged.
    Without the polyphase head: a head at 1/2 resolution stays a module call, so the INT8 decisions time
    it, quant.force can name it and QAT swaps it; the built INT8 model gets it last (`model_from_spec`)."""
    return inference_graph(model, reassoc=reassoc, channels_last=channels_last, polyphase=False)


def int8_spec(base_spec: dict, int8_layers: list[str], reassoc: bool, engine: str,
              int8_weights: list[str] = ()) -> dict[str, Any]:
    """Spec of kind "int8-torch": `int8_layers` run INT8 kernels, `int8_weights` run FP32 on int8-stored
    weights (`int8_weight_layers` of the converted model)."""
    return {"kind": "int8-torch", "base": dict(base_spec), "int8_layers": list(int8_layers),
            "int8_weights": list(int8_weights), "fold_bn": True, "reassoc": reassoc, "engine": engine}


@register_builder("int8-torch")
def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Builder for kind "int8-torch": the float base, the same rewrites, empty INT8 and int8-stored
    layers to load into. ValueError for a spec naming a layer that is no Linear/Conv3d of its base."""
    model = prepare_float(fp32_from_spec(spec["base"]), reassoc=spec.get("reassoc", True))
    int8_layers, int8_weights = list(spec["int8_layers"]), list(spec.get("int8_weights", ()))
    candidates = {name for name, m in model.named_modules() if quantizable(m)}
    unknown = sorted(set(int8_layers + int8_weights) - candidates)
    if unknown:
        raise ValueError(f"int8-torch spec names layers that are not Linear/Conv3d of its base model: {unknown}")
    twice = sorted(set(int8_layers) & set(int8_weights))
    if twice:
        raise ValueError(f"int8-torch spec lists layers both as INT8 and as FP32 on int8 weights: {twice}")
    for names, empty in ((int8_layers, empty_int8_like), (int8_weights, empty_int8_weight_like)):
        for name in names:
            set_module(model, name, empty(get_module(model, name)))
    return polyphase_head(model).eval()  # a float (or int8-stored, float-computed) head at 1/2 runs polyphase


def int8_state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
