"""Where an artifact runs: PyTorch eager, ONNX Runtime or OpenVINO, and which of them is fastest here.

    model = runtime_model(art, served, "openvino")           # served = pipeline.predict.inference_model(art)
    choice, model = choose_runtime(art, served, window, "auto", path=artifact_path)
    print(choice.line())

What runs in each runtime (one ONNX export path, `compress.quant.onnx_export.export_onnx`):

| artifact kind | torch                                     | onnxruntime, openvino                      |
|---------------|-------------------------------------------|--------------------------------------------|
| fp32          | the exact rewrites (`inference_graph`)    | those rewrites exported to ONNX, per window |
| onnx (INT8)   | - (the artifact is an ONNX graph)         | its stored QDQ graph (the QAT's LSQ scales) |
| int8-qat      | the fake-quant model                      | its QDQ export                              |
| int8-torch    | PyTorch's quantized kernels               | - (no ONNX export of those kernels)         |

`auto` measures every runtime the artifact can use on one window (interleaved medians, one warm-up)
and takes the fastest; the choice and its timings are cached per artifact (content hash), window,
machine (CPU model, ATen capability, torch, threads) and runtime versions in
~/.cache/refineformer3d/runtimes.json, like the INT8 decisions, so later runs on the same machine do
not measure again. Nothing is hard-coded: which runtime wins depends on the CPU (AVX2 or AVX-512,
VNNI, AMX) and the model. A runtime that is not installed, or that fails on the model, is skipped
with a one-line note.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from common.artifact import Artifact
from common.cache import cache_file, read_cache, write_cache
from common.cli import RUNTIME_CHOICES
from compress.quant.decide import machine_key
from compress.quant.onnx_export import (ONNX_RUNTIMES, SERVING_REVISION, OrtModel, export_onnx, onnx_runner,
                                        run_items)
from compress.quant.qat import KIND as QAT_KIND
from pipeline.latency import window_latencies_ms

CHOICES = RUNTIME_CHOICES  # auto, then every runtime
RUNTIMES = CHOICES[1:]
EXPORTABLE_KINDS = ("fp32", QAT_KIND)  # kinds whose PyTorch model exports to ONNX (FP32 or QDQ)
RUNS = 5  # timed rounds of `auto`, after one warm-up


class RuntimeUnavailable(Exception):
    """Why an artifact cannot run in a runtime on this machine (one line)."""


class OnnxModel(nn.Module):
    """An artifact's ONNX graph in ONNX Runtime or OpenVINO as a module: (B, C, *window) -> logits.

    `graph(shape)` gives the ONNX bytes for a (1, C, *window) input; each window size is built on first use.
    """

    def __init__(self, graph: Callable[[tuple[int, ...]], bytes], runtime: str, threads: int | None = None):
        super().__init__()
        self.graph, self.runtime, self.threads = graph, runtime, threads
        self._runs: dict[tuple[int, ...], Callable] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, *map(int, x.shape[1:]))
        if shape not in self._runs:
            self._runs[shape] = onnx_runner(self.graph(shape), self.runtime, self.threads)
        return run_items(self._runs[shape], x)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _none_usable(notes: dict[str, str]) -> RuntimeUnavailable:
    return RuntimeUnavailable("no runtime can run this artifact here: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))


def _importable(runtime: str) -> None:
    try:
        importlib.import_module(runtime)
    except Exception as e:  # ImportError, or a shared library that does not load on this machine
        raise RuntimeUnavailable(f"{runtime} does not import here ({_one_line(e)}); pip install {runtime}") from None


def _stored_graph(model: OrtModel) -> Callable[[tuple[int, ...]], bytes]:
    data = model.onnx_bytes()

    def graph(shape: tuple[int, ...]) -> bytes:
        model.check_shape(shape)
        return data

    return graph


def runtime_model(art: Artifact, served: nn.Module, runtime: str, threads: int | None = None) -> nn.Module:
    """The artifact's model in `runtime`; `served` is it as PyTorch serves it (`inference_model`).
    RuntimeUnavailable says why not (ValueError for a name that is no runtime)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    kind = art.spec.get("kind", "fp32")
    if runtime == "torch":
        if isinstance(served, OrtModel):
            raise RuntimeUnavailable("an ONNX artifact (kind onnx) has no PyTorch graph")
        return served
    _importable(runtime)
    threads = threads or torch.get_num_threads()
    if isinstance(served, OrtModel):
        return OnnxModel(_stored_graph(served), runtime, threads)
    if kind not in EXPORTABLE_KINDS:
        raise RuntimeUnavailable(f"kind {kind}: PyTorch's quantized kernels do not export to ONNX; "
                                 "quantize.py --backend onnxruntime writes the QDQ graph (same QAT) that ONNX "
                                 "Runtime and OpenVINO run")
    return OnnxModel(lambda shape: export_onnx(served, shape), runtime, threads)


def measure_runtimes(art: Artifact, served: nn.Module, size: Sequence[int], runs: int = RUNS, warmup: int = 1,
                     threads: int | None = None, runtimes: Sequence[str] = RUNTIMES
                     ) -> tuple[dict[str, nn.Module], dict[str, float], dict[str, str]]:
    """({runtime: model}, {runtime: median ms per (1, C, *size) window}, {runtime: why it was skipped}) over
    `runtimes`; every runtime is built and run once on the window (its first warm-up) before the interleaved
    timing, so one that fails (an operator it lacks, too little memory) is a note, not an error."""
    models, notes = {}, {}
    for name in runtimes:
        try:
            models[name] = ready_model(art, served, name, size, threads)
        except RuntimeUnavailable as e:
            notes[name] = str(e)
    # the run in ready_model was each model's first warm-up
    ms = window_latencies_ms(models, size, runs, max(0, warmup - 1), _in_chans(art)) if models else {}
    return models, ms, notes


def ready_model(art: Artifact, served: nn.Module, runtime: str, size: Sequence[int],
                threads: int | None = None) -> nn.Module:
    """`runtime_model`, run once on a (1, C, *size) window; RuntimeUnavailable, one line, when that fails."""
    model = runtime_model(art, served, runtime, threads)
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros((1, _in_chans(art), *map(int, size))))
    except Exception as e:  # an operator the runtime lacks, too little memory, a window the graph was not made for
        raise RuntimeUnavailable(f"failed on this model ({_one_line(e)})") from None
    return model


def _in_chans(art: Artifact) -> int:
    spec = art.spec.get("base") if isinstance(art.spec.get("base"), dict) else art.spec
    return int(spec.get("in_chans", 4))


@dataclass
class RuntimeChoice:
    """The runtime a command uses, and how it was chosen."""

    runtime: str
    window: list[int]
    how: str  # "asked" | "measured" | "cached"
    ms: dict[str, float] = field(default_factory=dict)  # runtime -> median ms per window (auto)
    notes: dict[str, str] = field(default_factory=dict)  # runtime -> why it was skipped
    runs: int = RUNS
    threads: int = 0

    def line(self) -> str:
        size = "x".join(map(str, self.window))
        if self.how == "asked":
            text = f"runtime: {self.runtime} (as asked)"
        else:
            timed = ", ".join(f"{name} {self.ms[name]:.1f} ms" for name in RUNTIMES if name in self.ms)
            source = "measured now" if self.how == "measured" else f"measured earlier, cached in {runtime_cache()}"
            text = (f"runtime: {self.runtime}, the fastest here per {size} window ({timed}; median of {self.runs}, "
                    f"interleaved, {self.threads} thread(s); {source})")
        by_reason: dict[str, list[str]] = {}  # one reason shared by several runtimes is said once
        for name, why in self.notes.items():
            by_reason.setdefault(why, []).append(name)
        skipped = "; ".join(f"{' and '.join(names)} skipped: {why}" for why, names in by_reason.items())
        return text + (f"; {skipped}" if skipped else "")

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "window": self.window, "how": self.how, "ms": self.ms, "notes": self.notes,
                "runs": self.runs, "threads": self.threads}


def runtime_cache() -> Path:
    return cache_file("runtimes.json")


def _versions() -> str:
    found = []
    for name in ONNX_RUNTIMES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return "|".join(found)


def _file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(path: str | Path, window: Sequence[int], threads: int) -> str:
    """The artifact's content, the window, the machine, the runtimes' versions, how ONNX graphs are served
    (`SERVING_REVISION`) and threads."""
    return "|".join([_file_hash(path), "x".join(map(str, window)), machine_key(), _versions(),
                     f"onnx serving {SERVING_REVISION}", f"runtime threads {threads}"])


def choose_runtime(art: Artifact, served: nn.Module, window: Sequence[int], requested: str = "auto", *,
                   path: str | Path | None = None, runs: int = RUNS, threads: int | None = None
                   ) -> tuple[RuntimeChoice, nn.Module]:
    """(the choice, the model to run): `requested` itself, or for "auto" the fastest runtime measured on one
    window here; with the artifact's `path` the choice is cached (a cached runtime that no longer runs is
    measured again). RuntimeUnavailable when the requested runtime cannot run the artifact, or none can."""
    if requested not in CHOICES:
        raise ValueError(f"runtime must be one of {', '.join(CHOICES)}, got {requested!r}")
    window = [int(w) for w in window]
    threads = threads or torch.get_num_threads()
    if requested != "auto":
        return RuntimeChoice(requested, window, "asked", threads=threads), runtime_model(art, served, requested, threads)
    store, key = {}, None
    if path is not None:
        store, key = read_cache(runtime_cache()), cache_key(path, window, threads)
        hit = store.get(key)
        if isinstance(hit, dict) and hit.get("runtime") in RUNTIMES:
            try:
                model = ready_model(art, served, hit["runtime"], window, threads)
            except RuntimeUnavailable:
                pass  # uninstalled or broken since: measure again
            else:
                return RuntimeChoice(hit["runtime"], window, "cached", dict(hit.get("ms") or {}),
                                     dict(hit.get("notes") or {}), int(hit.get("runs", runs)), threads), model
    models, ms, notes = measure_runtimes(art, served, window, runs, threads=threads)
    if not ms:
        raise _none_usable(notes)
    fastest = min(ms, key=ms.get)
    choice = RuntimeChoice(fastest, window, "measured", ms, notes, runs, threads)
    if key is not None:
        store[key] = {**choice.to_dict(), "artifact": str(path)}
        write_cache(runtime_cache(), store)
    return choice, models[fastest]


def pick_runtime(ms: dict[str, float], requested: str, notes: dict[str, str]) -> tuple[str, str | None]:
    """(runtime, note) among measured ones: `requested` when it was measured, else the fastest (the note says
    why the requested one was not used)."""
    if not ms:
        raise _none_usable(notes)
    if requested in ms:
        return requested, None
    fastest = min(ms, key=ms.get)
    if requested == "auto":
        return fastest, None
    return fastest, f"{requested} asked for, not usable ({notes.get(requested, 'not measured')}); the fastest used"
