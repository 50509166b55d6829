"""ONNX export for ONNX Runtime: FP32, and QDQ INT8 carrying the LSQ-learned scales.

The INT8 graph is exported from the fake-quant model itself: in export mode each LSQ layer emits
QuantizeLinear/DequantizeLinear pairs with its learned steps (activation: per tensor uint8; weight:
per output channel int8), which ORT fuses into QLinearConv / QLinearMatMul. Weight QuantizeLinear
nodes on constants are then folded into int8 initializers, so the file stores int8 weights; a
weight-only layer (`LSQConfig.weight_only`) gets only its weight's pair, and runs float. Both runtimes
mishandle that pattern (DequantizeLinear of a constant -> Conv / MatMul): ORT keeps the DequantizeLinear in
the graph (it must not fold QDQ patterns it may fuse), so every run dequantized those weights again (the
demo student with every layer weight-only: 84 ms per 96x96x64 window against 72 ms for its plain FP32
export, a helper's measurement), and the optimised ORT and OpenVINO sessions computed something else:
logits 0.11-0.13 off (of 20) from the fake quantisation with no INT8 layer at all (a tiny model; folded:
within 1e-4 of the logits' scale, tests/test_quant_onnx.py). `dequantize_weight_only` turns them into
float initializers when a session or compiled model is made, the stored file keeping int8.
Linear weights are exported transposed (in, out) with the channel axis 1, so the DequantizeLinear
feeds MatMul directly (a Transpose in between would stop ORT's QDQ fusion).

`OrtModel` wraps an ORT session as an nn.Module holding the ONNX bytes as a uint8 buffer, so an
artifact of kind "onnx" rebuilds through `common.artifact.build_model`. `onnx_runner` runs the same bytes
in ONNX Runtime or OpenVINO (`pipeline.runtimes` picks between them and PyTorch).
"""
from __future__ import annotations

import contextlib
import functools
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
# What an ONNX Runtime session / OpenVINO model is made from, beyond the stored bytes: 2 = weight-only layers
# folded to float weights (`dequantize_weight_only`). Part of measured-runtime cache keys, so choices timed
# on an older serving path are measured again; raise it whenever that path changes.
SERVING_REVISION = 2


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


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant value of an ONNX graph by name: its initializers and its Constant nodes' outputs."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _channel_shape(node, ndim: int, scale: np.ndarray) -> list[int]:
    """Broadcast shape of a Quantize/DequantizeLinear node's scale over an ndim tensor (its `axis`, default 1)."""
    shape = [1] * ndim
    if scale.ndim:
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
    return shape


def _drop_unused(graph) -> None:
    """Remove initializers and Constant nodes nothing reads any more (ORT warns about each one it finds)."""
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)


def _replace(graph, swaps: list) -> None:
    """Each (node, initializer) pair: the node's output becomes that constant."""
    for node, init in swaps:
        graph.node.remove(node)
        graph.initializer.append(init)
    _drop_unused(graph)


def fold_weight_quantizers(data: bytes) -> bytes:
    """Replace QuantizeLinear(constant float weight) by an int8 initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    consts = _constants(graph)
    swaps = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in consts for n in node.input):
            continue
        w, scale, zp = (consts[n] for n in node.input)
        if w.dtype != np.float32 or zp.dtype != np.int8:
            continue
        shape = _channel_shape(node, w.ndim, scale)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.float32), -128, 127).astype(np.int8)
        swaps.append((node, numpy_helper.from_array(q, node.output[0])))
    _replace(graph, swaps)
    return model.SerializeToString()


def _scope(name: str) -> str:
    """The module a TorchScript-exported node belongs to: its name without the last part
    ("/encoder/stages.0/blocks.0/attn/q/MatMul" -> "/encoder/stages.0/blocks.0/attn/q")."""
    return name.rsplit("/", 1)[0]


def dequantize_weight_only(data: bytes) -> bytes:
    """ONNX bytes whose weight-only layers carry float weights: a DequantizeLinear of an int8 constant is
    replaced by the dequantized float initializer, (q - zero point) * scale per channel, unless one of its
    consumers is an INT8 layer: its activation comes through a DequantizeLinear, and that is its own input
    quantizer (same module) or its output is requantized (an input quantizer the exporter shares between
    two layers reading one tensor, attention's q and kv, sits in the other's module); ORT fuses those into
    QLinearConv / QLinearMatMul-style kernels. A weight-only layer right after an INT8 layer (the two
    parts of a low-rank layer) reads that layer's requantized output and keeps a float output: folded.
    Everything else is left as it is; bytes with nothing to fold come back unchanged."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    consts = _constants(graph)
    produced_by = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def requantized(node) -> bool:  # its output, or its bias Add's, goes into a QuantizeLinear
        outs = [u for o in node.output for u in consumers.get(o, [])]
        outs += [u for a in outs if a.op_type == "Add" for o in a.output for u in consumers.get(o, [])]
        return any(u.op_type == "QuantizeLinear" for u in outs)

    def int8_layer(node) -> bool:
        src = produced_by.get(node.input[0]) if node.input else None
        return src is not None and src.op_type == "DequantizeLinear" and (
            _scope(src.name) == _scope(node.name) or requantized(node))

    swaps = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(n in consts for n in node.input):
            continue  # an activation's, or a weight whose scale or zero point is not a constant
        q, scale = consts[node.input[0]], consts[node.input[1]]
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
        users = consumers.get(node.output[0], [])
        if q.dtype != np.int8 or not users or any(int8_layer(u) for u in users):
            continue
        shape = _channel_shape(node, q.ndim, scale)
        w = (q.astype(np.float32) - zp.reshape(shape).astype(np.float32)) * scale.reshape(shape)
        swaps.append((node, numpy_helper.from_array(w.astype(np.float32), node.output[0])))
    if not swaps:
        return data
    _replace(graph, swaps)
    return model.SerializeToString()


# ----------------------------------------------------------------------------- runtime


ONNX_RUNTIMES = ("onnxruntime", "openvino")


def ort_session(data: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of the bytes, weight-only layers given float weights first
    (`dequantize_weight_only`); no spin-waiting, `threads` intra-op threads when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs: no spin-waiting
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(dequantize_weight_only(data), opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def ov_core():
    """The process's one OpenVINO Core. Its CPU plugin, when created, installs an alternate signal stack on
    the calling thread and, when destroyed, restores the one it found and unmaps its own; with two Cores
    alive and torn down out of order (a compiled model per runtime row), the thread was left on an unmapped
    stack, and the next handled signal killed the process (SIGSEGV, si_code SI_KERNEL, at the first SIGCHLD
    once a DataLoader had installed its handler; found under gdb, OpenVINO 2026.4). One Core for the whole
    process creates that plugin once and never tears it down before exit."""
    import openvino as ov

    return ov.Core()


def ov_compiled(data: bytes, threads: int | None = None):
    """ONNX bytes (FP32, or QDQ INT8: OpenVINO turns Q/DQ pairs into its own INT8 kernels; weight-only
    layers get float weights first, `dequantize_weight_only`) compiled for the CPU by `ov_core`."""
    config = {
        "PERFORMANCE_HINT": "LATENCY",  # one window at a time
        "INFERENCE_PRECISION_HINT": "f32",  # else bf16 by default on AVX512-BF16 / AMX CPUs: not the FP32 model
        "ENABLE_CPU_PINNING": False,  # unpinned like PyTorch and ORT threads: the cores are shared
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov_core()
    return core.compile_model(core.read_model(dequantize_weight_only(data)), "CPU", config)


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
