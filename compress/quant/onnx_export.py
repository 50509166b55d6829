"""ONNX export for ONNX Runtime: FP32, and QDQ INT8 carrying the LSQ-learned scales.

The INT8 graph is exported from the fake-quant model itself: in export mode each LSQ layer emits
QuantizeLinear/DequantizeLinear pairs with its learned steps (activation: per tensor uint8; weight:
per output channel int8), which ORT fuses into QLinearConv / QLinearMatMul. Weight QuantizeLinear
nodes on constants are then folded into int8 initializers, so the file stores int8 weights; a
weight-only layer (`LSQConfig.weight_only`) gets only its weight's pair, and runs float after ORT
dequantizes it.
Linear weights are exported transposed (in, out) with the channel axis 1, so the DequantizeLinear
feeds MatMul directly (a Transpose in between would stop ORT's QDQ fusion).

`OrtModel` wraps an ORT session as an nn.Module holding the ONNX bytes as a uint8 buffer, so an
artifact of kind "onnx" rebuilds through `common.artifact.build_model`. `onnx_runner` runs the same bytes
in ONNX Runtime or OpenVINO (`pipeline.runtimes` picks between them and PyTorch).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.artifact import register_builder
from compress.quant.lsq import QuantConv3d, QuantLinear, int8_weight

OPSET = 17


# ----------------------------------------------------------------------------- export


def _int_weight(layer: QuantLinear | QuantConv3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight on the INT8 grid, per-channel step), as plain tensors the tracer bakes as constants."""
    q, step = int8_weight(layer)
    return q.float() * step.view([-1] + [1] * (q.ndim - 1)), step


def _export_forward(layer: QuantLinear | QuantConv3d, x: torch.Tensor) -> torch.Tensor:
    """The layer's fake quantisation written with ops the ONNX exporter maps to Q/DQ."""
    w, step = layer._export_w, layer._export_step
    def act(fq, t: torch.Tensor) -> torch.Tensor:
        if not fq.enabled:
            return t
        s, zp = float(fq.step.clamp_min(1e-8)), int(fq.zero_point)
        if fq.qmax < 255:  # same clip as the LSQ range; Q/DQ itself is 0..255
            t = t.clamp(-zp * s, (fq.qmax - zp) * s)
        return torch.fake_quantize_per_tensor_affine(t, s, zp, 0, 255)

    zeros = torch.zeros(step.numel(), dtype=torch.int32)
    x = act(layer.in_fq, x)
    if isinstance(layer, QuantLinear):
        y = x @ torch.fake_quantize_per_channel_affine(w, step, zeros, 1, -128, 127)  # w is (in, out)
        if layer.bias is not None:
            y = y + layer.bias
    else:
        wq = torch.fake_quantize_per_channel_affine(w, step, zeros, 0, -128, 127)
        y = F.conv3d(x, wq, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return act(layer.out_fq, y)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv3d))]
    for m in layers:
        w, step = _int_weight(m)
        # Buffers, not plain tensors: the tracer would constant-fold a fake quantisation of a
        # plain tensor into float weights, and ORT would then re-quantize them per tensor.
        m.register_buffer("_export_w", w.t().contiguous() if isinstance(m, QuantLinear) else w)
        m.register_buffer("_export_step", step)
        m.forward = lambda x, m=m: _export_forward(m, x)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for m in layers:
            del m.forward, m._export_w, m._export_step


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of a float or fake-quant model for a fixed (B, C, D, H, W) input (TorchScript exporter)."""
    buf = io.BytesIO()
    model = model.eval()
    with export_mode(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(input_shape),), buf, opset_version=OPSET, dynamo=False,
                          input_names=["image"], output_names=["logits"], do_constant_folding=True)
    return fold_weight_quantizers(buf.getvalue())


def fold_weight_quantizers(data: bytes) -> bytes:
    """Replace QuantizeLinear(constant float weight) by an int8 initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    drop, new_inits = [], []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in consts for n in node.input):
            continue
        w, scale, zp = (consts[n] for n in node.input)
        if w.dtype != np.float32 or zp.dtype != np.int8:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.float32), -128, 127).astype(np.int8)
        new_inits.append(numpy_helper.from_array(q, node.output[0]))
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    graph.initializer.extend(new_inits)
    used = {n for node in graph.node for n in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model.SerializeToString()


# ----------------------------------------------------------------------------- runtime


ONNX_RUNTIMES = ("onnxruntime", "openvino")


def ort_session(data: bytes, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs: no spin-waiting
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def ov_compiled(data: bytes, threads: int | None = None):
    """ONNX bytes (FP32, or QDQ INT8: OpenVINO turns Q/DQ pairs into its own INT8 kernels) compiled for the CPU."""
    import openvino as ov

    config = {
        "PERFORMANCE_HINT": "LATENCY",  # one window at a time
        "INFERENCE_PRECISION_HINT": "f32",  # else bf16 by default on AVX512-BF16 / AMX CPUs: not the FP32 model
        "ENABLE_CPU_PINNING": False,  # unpinned like PyTorch and ORT threads: the cores are shared
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    return core.compile_model(core.read_model(data), "CPU", config)


def onnx_runner(data: bytes, runtime: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """(1, C, *window) float32 array -> logits array, by ONNX Runtime or OpenVINO on the CPU."""
    if runtime == "onnxruntime":
        session = ort_session(data, threads)
        return lambda image: session.run(None, {"image": image})[0]
    if runtime == "openvino":
        request = ov_compiled(data, threads).create_infer_request()
        return lambda image: request.infer({0: image})[0]  # copied out of the request (share_outputs=False)
    raise ValueError(f"ONNX runtime must be one of {', '.join(ONNX_RUNTIMES)}, got {runtime!r}")


def run_items(run: Callable[[np.ndarray], np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """(B, C, *window) tensor -> logits, one item at a time (the graphs are exported for batch 1)."""
    outs = [run(np.ascontiguousarray(item[None].detach().float().numpy())) for item in x]
    return torch.from_numpy(np.concatenate(outs))


class OrtModel(nn.Module):
    """An ONNX Runtime session as a module: (B, C, *window) float tensor -> logits, one item at a time."""

    def __init__(self, nbytes: int, input_shape: list[int], threads: int | None = None):
        super().__init__()
        self.input_shape, self.threads = list(input_shape), threads
        self.register_buffer("onnx", torch.zeros(nbytes, dtype=torch.uint8))
        self._run = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_run", None))

    @classmethod
    def from_bytes(cls, data: bytes, input_shape: list[int], threads: int | None = None) -> "OrtModel":
        m = cls(len(data), input_shape, threads)
        m.onnx.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return m

    def onnx_bytes(self) -> bytes:
        return self.onnx.numpy().tobytes()

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """ValueError unless a (B, *shape[1:]) input fits the window this graph was exported for."""
        expected = tuple(self.input_shape[1:])
        if tuple(shape[1:]) != expected:
            raise ValueError(f"this ONNX model was exported for inputs (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(shape)}; use the same window size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_shape(tuple(x.shape))
        if self._run is None:
            self._run = onnx_runner(self.onnx_bytes(), "onnxruntime", self.threads)
        return run_items(self._run, x)


def onnx_spec(input_shape: list[int], nbytes: int, base_spec: dict, precision: str, threads: int | None = None) -> dict[str, Any]:
    return {"kind": "onnx", "input_shape": list(input_shape), "nbytes": nbytes, "base": dict(base_spec),
            "precision": precision, "threads": threads}


@register_builder("onnx")
def model_from_spec(spec: dict[str, Any]) -> OrtModel:
    """Builder for kind "onnx"."""
    return OrtModel(spec["nbytes"], spec["input_shape"], spec.get("threads"))
