"""Latency-aware mixed precision: which layers run INT8, decided by measuring them on this CPU.

Each candidate (every nn.Linear / nn.Conv3d) is timed at its real input shape for the model's input
size and in its real input layout (the encoder hands its convs channels_last_3d views of the token
grid, and ATen's FP32 kernels differ by 10x and more between layouts), in FP32 and as a real INT8
layer (including the quantize / dequantize around it, which a float neighbour forces), by the kernels
that will run it: PyTorch's (backend "torch"), or, for the ONNX Runtime backend, the layer's own ONNX
graph in ONNX Runtime, FP32 against its QDQ form (ORT fuses it into QLinearConv / QLinearMatMul-style
kernels of its own, whose speed PyTorch's timings do not predict). Measurements
are cached per CPU model, torch version, thread count and layer signature (with the ONNX Runtime
version for that backend) in
~/.cache/refineformer3d/int8_decisions.json (REFINEFORMER3D_CACHE overrides the folder), so identical
layers and later runs cost nothing.

Modes: measure (INT8 where it is at least `min_speedup` faster), all, none, table (only the forced
table: unlisted layers stay FP32). A forced {layer: int8 | fp32} entry always wins. The layers in
`final` (the logits conv) stay FP32 unless forced: an INT8 kernel would requantize the logits onto
255 steps, and the logits stay float ("Dice-aware"); their timings are still reported. So does the
input layer (`first`, the stem): its few output channels (8 in a width-0.25 student) share one
activation scale before a LayerNorm, and INT8 there took the demo's grown student from WT Dice 0.959
to 0.22 (`quantize.py ... --set quant.decide=table --set 'quant.force={encoder.stages.0.patch_embed.proj:
int8}'`; every other layer INT8 together: 0.956). Speed never chose it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.cache import cache_file, read_cache, write_cache
from common.progress import bar_off
from common.timing import median_seconds
from compress.quant.convert import empty_int8_like
from compress.quant.lsq import LSQConfig, calibrate, quantizable, quantize_
from engine.runtime import probe_cpu

MODES = ("measure", "all", "none", "table")
BACKENDS = ("torch", "onnxruntime")  # whose kernels a decision is timed with (quantize.py --backend)


def cache_path() -> Path:
    return cache_file("int8_decisions.json")


CHANNELS_LAST = "channels_last_3d"


def input_layout(x: torch.Tensor) -> str:
    """"channels_last_3d" for a 5-D tensor in that layout and not also contiguous (a size-1 grid is both),
    else "contiguous" (what any other strided input is timed as)."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return CHANNELS_LAST
    return "contiguous"


def layer_inputs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """(input shape, `input_layout`) of every Linear / Conv3d for one forward pass of a (1, C, *spatial)
    zero tensor."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, (tuple(args[0].shape), input_layout(args[0])))
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if quantizable(m)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def signature(module: nn.Module, shape: tuple[int, ...], layout: str = "contiguous", backend: str = "torch",
              threads: int | None = None) -> str:
    """Cache key of one layer's timings: geometry @ input shape, then @cl (PyTorch, channels-last input)
    or, for ONNX Runtime (which takes its input contiguous), the runtime, its version and its intra-op
    `threads` (when they differ from PyTorch's, which `machine_key` holds) first."""
    if isinstance(module, nn.Linear):
        geo = f"linear{module.in_features}x{module.out_features}"
    else:
        geo = (f"conv{module.in_channels}x{module.out_channels}k{module.kernel_size[0]}s{module.stride[0]}"
               f"p{module.padding[0]}g{module.groups}")
    sig = f"{geo}@{'x'.join(map(str, shape))}"
    if backend == "onnxruntime":
        import onnxruntime

        own = f" threads {threads}" if threads and threads != torch.get_num_threads() else ""
        return f"onnxruntime {onnxruntime.__version__}{own}:{sig}"
    return sig + ("@cl" if layout == CHANNELS_LAST else "")


def machine_key() -> str:
    """Cache key: timings depend on the CPU, the kernels ATen may use (ATEN_CPU_CAPABILITY), torch and threads."""
    cpu = probe_cpu()
    isa = f"|onednn {cpu.onednn_max_isa}" if cpu.onednn_max_isa else ""
    # "conv3d onednn": FP32 Conv3d timings of `model.rewrites.onednn_convs` layers (older entries timed ATen's choice)
    return (f"{cpu.model}|{cpu.capability}{isa}|torch {torch.__version__}|threads {torch.get_num_threads()}"
            "|conv3d onednn")


def _median_ms(fn, x: torch.Tensor, runs: int) -> float:
    with torch.no_grad():  # one warm-up call: weight packing, allocation
        return 1000 * median_seconds(lambda: fn(x), runs, warmup=1)


@torch.no_grad()
def measure_layer(module: nn.Module, shape: tuple[int, ...], runs: int = 5,
                  layout: str = "contiguous") -> tuple[float, float]:
    """(fp32 ms, int8 ms) of one layer at one input shape and layout (`input_layout`); INT8 scales come
    from the data's range."""
    x = torch.randn(shape)
    if layout == CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    int8 = empty_int8_like(module)
    w = module.weight
    int8.weight_scale.copy_(w.abs().flatten(1).amax(1).clamp_min(1e-8) / 127)
    int8.weight_int8.copy_(torch.round(w / int8.weight_scale.view([-1] + [1] * (w.ndim - 1))).to(torch.int8))
    if module.bias is not None:
        int8.bias.copy_(module.bias)
    int8.in_scale.fill_(float(x.abs().max()) / 63.5)
    int8.in_zero_point.fill_(64)
    int8.in_qmax.fill_(127)
    y = module(x)
    int8.out_scale.fill_(float(y.abs().max()) / 127.5 + 1e-8)
    int8.out_zero_point.fill_(128)
    int8.pack()
    fp32, q = [], []
    for _ in range(2):  # interleaved A/B rounds
        fp32.append(_median_ms(module, x, runs))
        q.append(_median_ms(int8, x, runs))
    return min(fp32), min(q)


@torch.no_grad()
def measure_layer_onnxruntime(module: nn.Module, shape: tuple[int, ...], runs: int = 5,
                              threads: int | None = None) -> tuple[float, float]:
    """(fp32 ms, int8 ms) of one layer in ONNX Runtime: its FP32 ONNX graph against its QDQ graph (LSQ
    fake quantisation calibrated on the input, exported as `compress.quant.onnx_export` writes the
    artifact's), each in its own session with `threads` intra-op threads (the artifact's quant.threads;
    None: this process's thread count), interleaved."""
    from compress.quant.onnx_export import export_onnx, ort_session

    x = torch.randn(shape)
    layer = nn.Sequential(copy.deepcopy(module)).eval()  # a root to export and to swap the layer in
    graphs = [export_onnx(layer, shape)]
    quantize_(layer, LSQConfig())
    calibrate(layer, [x])
    graphs.append(export_onnx(layer, shape))
    sessions = [ort_session(g, threads or torch.get_num_threads()) for g in graphs]
    feed = {"image": x.numpy()}
    times: list[list[float]] = [[], []]
    for _ in range(2):  # interleaved A/B rounds
        for session, t in zip(sessions, times):
            t.append(1000 * median_seconds(lambda s=session: s.run(None, feed), runs, warmup=1))
    return min(times[0]), min(times[1])


def _timings(entry: Any) -> bool:
    """Whether a cache entry is usable: (fp32 ms, int8 ms), two positive numbers."""
    return (isinstance(entry, list) and len(entry) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in entry))


def decide(
    model: nn.Module,
    input_shape: tuple[int, ...],
    mode: str = "measure",
    force: dict[str, str] | None = None,
    runs: int = 5,
    min_speedup: float = 1.05,
    cache: Path | None = None,
    progress: bool = False,
    final: set[str] | frozenset[str] = frozenset(),
    first: str | None = None,
    backend: str = "torch",
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One row per candidate layer: layer, type, shape, fp32_ms, int8_ms, choice, why. `first`: the input
    layer (the stem conv, or its low-rank parts under that name), which stays FP32 unless forced, as `final`.
    `backend`: whose kernels time the layers (`BACKENDS`); ValueError for another. `threads`: ONNX Runtime's
    intra-op threads for that backend (quant.threads; None: PyTorch's)."""
    force = dict(force or {})
    check_settings(mode, force)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    shapes = layer_inputs(model, input_shape)
    unknown = sorted(set(force) - set(shapes))
    if unknown:
        raise ValueError(f"quant.force names layers the model does not have (or never runs): {unknown}")
    path = cache or cache_path()
    store = read_cache(path) if mode == "measure" else {}
    machine = store.get(machine_key()) if mode == "measure" else {}
    if not isinstance(machine, dict):  # a damaged or hand-edited cache: measured again
        machine = store[machine_key()] = {}
    rows, dirty, measured = [], False, 0
    names = list(shapes)
    for name in tqdm(names, desc="int8 decisions", disable=bar_off(progress), leave=False):
        module = model.get_submodule(name)
        shape, layout = shapes[name]
        if backend == "onnxruntime":
            layout = "contiguous"  # ONNX Runtime takes every input as a contiguous array
        row: dict[str, Any] = {"layer": name, "type": type(module).__name__, "shape": list(shape),
                               "layout": layout, "fp32_ms": None, "int8_ms": None}
        if mode == "measure":
            sig = signature(module, shape, layout, backend, threads)
            if not _timings(machine.get(sig)):  # absent, or not two numbers (a damaged entry)
                machine[sig] = list(measure_layer(module, shape, runs, layout) if backend == "torch"
                                    else measure_layer_onnxruntime(module, shape, runs, threads))
                dirty, measured = True, measured + 1
            row["fp32_ms"], row["int8_ms"] = machine[sig]
        if name in force:
            row["choice"], row["why"] = force[name], "forced"
        elif name in final:
            row["choice"], row["why"] = "fp32", "logits stay float"
        elif first is not None and (name == first or name.startswith(first + ".")):
            row["choice"], row["why"] = "fp32", "stem stays float"
        elif mode == "measure":
            fast = row["int8_ms"] * min_speedup <= row["fp32_ms"]
            row["choice"], row["why"] = ("int8" if fast else "fp32"), "measured"
        else:
            row["choice"], row["why"] = ("int8" if mode == "all" else "fp32"), mode
        rows.append(row)
    if dirty:
        write_cache(path, store)
    if progress and mode == "measure":
        tqdm.write(f"int8 decisions: {measured} layer(s) measured on this CPU ({backend} kernels), "
                   f"{len(names) - measured} reused from the cache {path}")
    return rows


def check_settings(mode: str, force: dict[str, str]) -> None:
    """ValueError unless `mode` is one of MODES and every `force` value is int8 or fp32 (quant.decide,
    quant.force); the layer names in `force` are checked against a model (`decide`, the stage's check)."""
    if mode not in MODES:
        raise ValueError(f"quant.decide must be one of {', '.join(MODES)}, got {mode!r}")
    bad = {k: v for k, v in force.items() if v not in ("int8", "fp32")}
    if bad:
        raise ValueError(f"quant.force values must be int8 or fp32: {bad}")


def int8_layers(rows: list[dict]) -> list[str]:
    return [r["layer"] for r in rows if r["choice"] == "int8"]


def format_table(rows: list[dict]) -> str:
    """Plain-text decision table."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'input shape':<22} {'fp32 ms':>8} {'int8 ms':>8} {'x':>5}  choice"]
    for r in rows:
        ratio = "-" if not r["int8_ms"] else f"{r['fp32_ms'] / r['int8_ms']:.2f}"
        shape = "x".join(map(str, r["shape"])) + (" cl" if r.get("layout") == CHANNELS_LAST else "")
        lines.append(f"{r['layer']:<{width}}  {shape:<22} {ms(r['fp32_ms']):>8} {ms(r['int8_ms']):>8} {ratio:>5}  "
                     f"{r['choice']} ({r['why']})")
    return "\n".join(lines)
