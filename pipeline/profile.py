"""Where a window's forward time goes: per operator and per module, with multiply-adds and achieved rate.

    peak = gemm_peak()["gmacs_per_s"]                    # this CPU's fp32 GEMM rate, G multiply-adds/s
    prof = profile_window(served, counted, (1, 4, 128, 128, 128), peak)
    prof = profile_artifact(art, served, (1, 4, 128, 128, 128), peak)   # any artifact (or why not)

`profile_window` runs one forward of the model as served in PyTorch eager (after warm-up) under
`torch.profiler`, with a named range around every module's forward. Operators are the ATen calls the
model's own code makes (`aten::conv3d`, `aten::layer_norm`, a layout copy in `aten::reshape`...), each
with the time of everything it dispatches to, so their shares add up to at most the forward. Modules get
their total time and their self time (the total less their child modules': the operators a module calls
itself), so self shares add up to the forward exactly. Multiply-adds come from fvcore on `counted` (the
same graph, module for module; `model.macs` conventions and handlers), per module (self: the total less
the child modules') and per operator family; achieved G multiply-adds/s is multiply-adds over time, set
against the CPU's measured fp32 GEMM peak, which is what a well-blocked large matrix product reaches here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.autograd.profiler import record_function

from common.artifact import Artifact
from common.timing import median_seconds
from compress.quant.onnx_export import OrtModel
from model.macs import fvcore_count
from model.rewrites import inference_graph
from pipeline.predict import FP32_KINDS, fp32_model

GEMM_N = 2048  # large enough that packing and threading overheads vanish on a CPU
GEMM_RUNS = 5
TOP = 10  # rows per table
MODULE = "module::"  # profiler range names of module forwards
ROOT = "(model)"
# profiler operator (without "aten::") -> fvcore's operator key, where they differ (fvcore's convolution
# handler names its count "conv"). Not conv2d: the model has none; the polyphase head's border faces are
# its only 2-D convs (a few M multiply-adds), which an even split would have given half the head's count.
FVCORE_OP = {"conv1d": "conv", "conv3d": "conv", "convolution": "conv", "mkldnn_convolution": "conv"}


def gemm_peak(n: int = GEMM_N, runs: int = GEMM_RUNS) -> dict[str, Any]:
    """This CPU's fp32 matrix-product rate: G multiply-adds/s of an n x n x n `torch.mm` (median of `runs`
    after one warm-up), at the current torch thread count."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    s = median_seconds(lambda: torch.mm(a, b, out=out), runs, warmup=1)
    return {"gmacs_per_s": n ** 3 / s / 1e9, "n": n, "runs": runs, "ms": 1e3 * s,
            "threads": torch.get_num_threads()}


def module_macs(model: nn.Module, shape: Sequence[int]) -> dict[str, dict[str, float]]:
    """{module name: {fvcore operator key: G multiply-adds}} of one forward at `shape`, each module's
    including its children's, as `model.macs.count_macs` counts them ("" is the whole model)."""
    counts = fvcore_count(model, tuple(shape), lambda analysis: analysis.by_module_and_operator())
    return {name: {op: n / 1e9 for op, n in ops.items()} for name, ops in counts.items()}


def self_macs(by_module: dict[str, dict[str, float]], model: nn.Module) -> dict[str, dict[str, float]]:
    """Per module and operator, the multiply-adds less its direct children's: those of the operators the
    module calls itself."""
    out = {}
    for name, module in model.named_modules():
        children = [by_module.get(f"{name}.{c}" if name else c, {}) for c, _ in module.named_children()]
        own = {op: n - sum(child.get(op, 0.0) for child in children) for op, n in by_module.get(name, {}).items()}
        out[name] = {op: n for op, n in own.items() if n > 1e-12}  # a container's difference is 0 up to rounding
    return out


def fold_uncalled(own: dict[str, dict[str, float]], called: set[str]) -> None:
    """Move, in place, the own multiply-adds of every module the forward never called as a module (its
    weights used by a parent's code: the polyphase head of `model.rewrites.polyphase_head` runs inside
    the decoder's forward) into its nearest called ancestor, so the time and the multiply-adds of that
    code land on the same row ("" is the model)."""
    for name in [n for n in own if n and n not in called and own[n]]:
        parent = name.rpartition(".")[0]
        while parent and parent not in called:
            parent = parent.rpartition(".")[0]
        target = own.setdefault(parent, {})
        for op, n in own.pop(name).items():
            target[op] = target.get(op, 0.0) + n


def _op_key(op: str) -> str:
    short = op.split("::")[-1]
    return FVCORE_OP.get(short, short)


class _ModuleRanges:
    """A profiler range `module::<name>` around every module's forward, while in use."""

    def __init__(self, model: nn.Module):
        self.model, self.handles, self.open = model, [], []

    def __enter__(self) -> "_ModuleRanges":
        for name, module in self.model.named_modules():
            def enter(module, args, label=MODULE + (name or ROOT)):
                self.open.append(record_function(label).__enter__())

            def leave(module, args, output):
                self.open.pop().__exit__(None, None, None)

            self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _is_module(event) -> bool:
    return event.name.startswith(MODULE)


def _child_modules(event) -> list:
    """The nearest module ranges below `event` (through any operator that a child module runs inside)."""
    found, todo = [], list(event.cpu_children)
    while todo:
        child = todo.pop()
        if _is_module(child):
            found.append(child)
        else:
            todo += child.cpu_children
    return found


def _rate(gmacs: float | None, ms: float, peak: float | None) -> tuple[float | None, float | None]:
    """(achieved G multiply-adds/s, its fraction of the GEMM peak); None where nothing is counted."""
    if not gmacs or ms <= 0:
        return None, None
    rate = gmacs / (ms / 1e3)
    return rate, (rate / peak if peak else None)


def profile_window(model: nn.Module, counted: nn.Module, shape: Sequence[int], peak: float | None = None,
                   top: int = TOP, warmup: int = 1) -> dict[str, Any]:
    """Operator and module time tables of one (after `warmup`) forward of `model` on a zero input of
    `shape`; multiply-adds from `counted`, whose module names are `model`'s (the float graph of an INT8
    model). `peak`: G multiply-adds/s to compare with (`gemm_peak`). Times in ms, shares of the forward.
    An operator call gets the multiply-adds its module's own calls of that kind have in `counted` (split
    evenly over them), so a quantized::conv3d of an INT8 layer gets its float twin's count."""
    x = torch.zeros(tuple(shape))
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        with _ModuleRanges(model), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events = list(prof.events())
    root = next(e for e in events if e.name == MODULE + ROOT)
    forward_ms = root.cpu_time_total / 1e3
    by_module = module_macs(counted, shape)
    own = self_macs(by_module, counted)
    types = {name or ROOT: type(m).__name__ for name, m in model.named_modules()}

    modules: dict[str, dict[str, Any]] = {}
    ops: dict[str, dict[str, Any]] = {}
    calls: dict[tuple[str, str], list[dict]] = {}  # (module, fvcore key) -> an op row per call there
    for e in events:
        if _is_module(e):
            name = e.name[len(MODULE):]
            row = modules.setdefault(name, {"module": name, "type": types.get(name, "?"), "calls": 0,
                                            "total_ms": 0.0, "self_ms": 0.0})
            total = e.cpu_time_total / 1e3
            row["calls"] += 1
            row["total_ms"] += total
            row["self_ms"] += total - sum(c.cpu_time_total for c in _child_modules(e)) / 1e3
        elif e.cpu_parent is None or _is_module(e.cpu_parent):  # called by the model's own code
            row = ops.setdefault(e.name, {"op": e.name, "calls": 0, "total_ms": 0.0, "gmacs": None})
            row["calls"] += 1
            row["total_ms"] += e.cpu_time_total / 1e3
            module = e.cpu_parent.name[len(MODULE):] if e.cpu_parent is not None else ROOT
            calls.setdefault(("" if module == ROOT else module, _op_key(e.name)), []).append(row)

    fold_uncalled(own, {"" if name == ROOT else name for name in modules})
    for (module, key), rows in calls.items():
        n = own.get(module, {}).get(key)
        for row in rows if n else ():
            row["gmacs"] = (row["gmacs"] or 0.0) + n / len(rows)
    for row in modules.values():
        key = "" if row["module"] == ROOT else row["module"]
        row["gmacs_self"] = sum(own[key].values()) if key in own else None
        row["gmacs_total"] = sum(by_module[key].values()) if key in by_module else None
        row["self_share"], row["total_share"] = row["self_ms"] / forward_ms, row["total_ms"] / forward_ms
        row["gmacs_per_s"], row["peak_share"] = _rate(row["gmacs_self"], row["self_ms"], peak)
    for row in ops.values():
        row["share"] = row["total_ms"] / forward_ms
        row["gmacs_per_s"], row["peak_share"] = _rate(row["gmacs"], row["total_ms"], peak)

    return {
        "input": list(shape),
        "forward_ms": forward_ms,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "gmacs": sum(by_module.get("", {}).values()),
        "peak_gmacs_per_s": peak,
        "ops": sorted(ops.values(), key=lambda r: -r["total_ms"])[:top],
        "modules": sorted(modules.values(), key=lambda r: -r["self_ms"])[:top],
        "ops_count": len(ops),
        "modules_count": len(modules),
    }


def profile_artifact(art: Artifact, served: nn.Module, shape: Sequence[int], peak: float | None = None,
                     top: int = TOP) -> dict[str, Any]:
    """`profile_window` of an artifact as PyTorch serves it (`served`: `pipeline.predict.inference_model`),
    its multiply-adds counted on its float graph under the same module names; {"error": why} for an ONNX
    artifact, whose graph runs inside ONNX Runtime, where PyTorch's profiler sees no operator."""
    if isinstance(served, OrtModel):
        return {"error": "an ONNX artifact runs inside ONNX Runtime / OpenVINO, where PyTorch's profiler sees one "
                         "opaque call per window and no operator or module; profile its FP32 source (or the "
                         "int8-qat checkpoint, whose fake-quant graph runs in PyTorch) instead"}
    if art.spec.get("kind", "fp32") in FP32_KINDS:
        counted = served
    else:  # INT8 layers replace float ones under the same names: count on the float graph
        counted = inference_graph(fp32_model(art), reassoc=art.spec.get("reassoc", True))
    return profile_window(served, counted, shape, peak, top)
