"""Every machine-dependent choice, resolved in one place: device, precision, threads, INT8 engine;
and the rest of a run's process state: RNG seeding and snapshots, the torchrun process group.

    rt = resolve_runtime(device="auto", amp="auto", threads=None)
    print(rt.line())            # runtime: cpu | precision fp32 (train) / fp32 (eval) | 2 threads | ...
    artifact.extra["runtime"] = rt.to_dict()

The rules, by CPU kind (the queries live in `probe_cpu`, so tests fake them for every kind):

| machine                                   | train.amp=auto        | evaluation |
|-------------------------------------------|-----------------------|------------|
| CUDA                                      | fp16 + GradScaler     | fp32       |
| any CPU (AVX2, AVX-512/VNNI, AMX)          | fp32                  | fp32       |

bf16 autocast on a CPU is there when asked for (`train.amp=bf16`), never by default. Native bf16
(AMX) does not pay for these models: measured on an Intel Xeon with AMX and AVX512-BF16 (2 threads,
one training step of 2 crops of 64^3, forward + backward + SGD, 7 interleaved runs, medians), bf16
autocast ran at 0.83x the speed of fp32 for the demo-recipe teacher, 0.73x for the width-0.25 student
and 0.50x for the slim model (their 8-64-channel convolutions pay bf16's casts and layout reorders and
gain little from the AMX tiles). So `auto` is fp32 on every CPU kind. (In one bench_chain run on that
machine in bf16, 2 of 8 trainings also stopped on a NaN loss; one, resumed in fp32 from its last
checkpoint, hit it again at the same step: the state bf16 training had reached and that batch, not
bf16 rounding at the step. Cause not found; no fp32 run of this project has stopped on one.)

oneDNN reports bf16 support (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) on any AVX-512 CPU,
where bf16 is *emulated*: measured on an Intel Xeon with AVX-512/VNNI and no AVX512_BF16, bf16
autocast training was slower than fp32 and not reproducible (three identical runs: validation Dice
0.038 / 0.026 / 0.027; fp32 runs bit-identical). So whether an asked-for bf16 is native or emulated
(said in the plan line) is read from the CPU's own flags (`torch.cpu._is_avx512_bf16_supported`,
`_is_amx_tile_supported`), and counts only when neither `ATEN_CPU_CAPABILITY` nor `ONEDNN_MAX_CPU_ISA`
limits the kernels below it.

Evaluation (validation, best-checkpoint choice, report, predict) always runs in fp32, so the Dice
that `best.pt` records is the Dice a user gets back from `predict.py`/`report.py`.

Threads: `train.threads` if set, else `OMP_NUM_THREADS` if set, else the CPUs this process may use
divided by the local ranks sharing them. INT8: the `x86` quantized engine (FBGEMM on AVX2/AVX-512
with oneDNN where it is faster) wherever this build has it, else `fbgemm`, `onednn`, `qnnpack`.
The inference rewrites (BatchNorm folding, re-association, the channels-last decoder tail) are not a
runtime switch: `model.rewrites.inference_graph` applies them where a model is served (predict,
report, quantize).
"""
from __future__ import annotations

import os
import platform
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.config import AMP_CHOICES, ConfigError
from common.machine import usable_cpus

INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # preference order
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that still allow native bf16 kernels
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
              "AVX10_1_512_AMX_FP16", "AVX10_2_512_AMX_2", "ALL")


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU and this torch build offer (all from `probe_cpu`; fake it in tests)."""

    model: str  # /proc/cpuinfo "model name"
    avx2: bool
    avx512: bool
    vnni: bool
    avx512_bf16: bool
    amx: bool
    capability: str  # ATen's kernel level: DEFAULT | AVX2 | AVX512 (ATEN_CPU_CAPABILITY lowers it)
    onednn_max_isa: str | None = None  # ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, upper case

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware, and no environment limit keeps oneDNN/ATen below it."""
        isa_ok = self.onednn_max_isa is None or self.onednn_max_isa in _BF16_ISAS
        return (self.avx512_bf16 or self.amx) and self.capability == "AVX512" and isa_ok

    @property
    def kind(self) -> str:
        """Short name of the CPU class the rules distinguish."""
        if self.amx:
            return "amx"
        if self.avx512_bf16:
            return "avx512-bf16"
        if self.avx512:
            return "avx512-vnni" if self.vnni else "avx512"
        return "avx2" if self.avx2 else "basic"


def cpu_model() -> str:
    """The CPU's model name (cache key of measured decisions), e.g. 'Intel(R) Xeon(R) ...'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_cpu() -> CpuFeatures:
    """Ask this machine and torch build what they offer."""
    cpu = torch.cpu
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuFeatures(
        model=cpu_model(),
        avx2=bool(cpu._is_avx2_supported()),
        avx512=bool(cpu._is_avx512_supported()),
        vnni=bool(cpu._is_vnni_supported()),
        avx512_bf16=bool(cpu._is_avx512_bf16_supported()),
        amx=bool(cpu._is_amx_tile_supported()),
        capability=str(torch.backends.cpu.get_cpu_capability()),
        onednn_max_isa=isa.strip().upper() if isa else None,
    )


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: cuda:<local_rank> when CUDA is available, else cpu. Raises ConfigError for
    a CUDA request without CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}, but CUDA is not available")
    return device


def resolve_precision(amp: str, device: torch.device | str, cpu: CpuFeatures | None = None) -> tuple[str, str]:
    """(training precision "fp32" | "bf16" | "fp16", why) for `train.amp` on `device`.

    Raises ConfigError for an unknown value or fp16 on a CPU.
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ConfigError(f"train.amp={amp!r}: expected one of {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return "fp32", "train.amp=off"
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 or off on CPU")
        return "fp16", "train.amp=fp16"
    if amp == "bf16":
        why = "train.amp=bf16"
        if device.type == "cpu" and not (cpu or probe_cpu()).native_bf16:
            why += " (emulated on this CPU: slow and not bit-reproducible)"
        return "bf16", why
    if device.type == "cuda":
        return "fp16", "auto: CUDA"
    return "fp32", "auto: fp32 on a CPU"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None: plain fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_threads(requested: int | None = None, local_world: int = 1) -> int:
    """`requested` if given, else OMP_NUM_THREADS if set, else usable CPUs // local ranks (>= 1)."""
    if requested:
        if requested < 1:
            raise ConfigError(f"threads={requested}: must be >= 1")
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // max(1, local_world))


def int8_engine(supported: list[str] | tuple[str, ...] | None = None) -> str:
    """The quantized engine to use: the first of INT8_ENGINES this build supports."""
    supported = list(torch.backends.quantized.supported_engines if supported is None else supported)
    for engine in INT8_ENGINES:
        if engine in supported:
            return engine
    raise ConfigError("this PyTorch build has no quantized engine")


@dataclass(frozen=True)
class Runtime:
    """What one command resolved; `to_dict()` is stored in every artifact as extra["runtime"]."""

    device: str
    train_precision: str  # fp32 | bf16 | fp16
    eval_precision: str  # always fp32: validation measures what report/predict give back
    precision_why: str
    threads: int
    cpu: str
    cpu_kind: str
    capability: str
    int8_engine: str
    torch: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.train_precision)

    @property
    def grad_scaler(self) -> bool:
        return self.train_precision == "fp16"

    def line(self, command: str = "runtime", training: bool = True) -> str:
        """One line for the start of a command's output (`training` False: inference only, no training
        precision nor its train.amp reason)."""
        precision = (f"precision {self.train_precision} train, {self.eval_precision} eval ({self.precision_why})"
                     if training else f"precision {self.eval_precision}")
        return (f"{command}: device {self.device} | {precision} | {self.threads} thread(s) | "
                f"CPU {self.cpu} [{self.cpu_kind}, ATen {self.capability}] | int8 {self.int8_engine} | "
                f"torch {self.torch}")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_runtime(device: str = "auto", amp: str = "auto", threads: int | None = None, *,
                    local_rank: int = 0, local_world: int = 1, apply: bool = True,
                    cpu: CpuFeatures | None = None) -> Runtime:
    """Resolve every machine-dependent choice; with `apply`, set torch's thread count and INT8 engine.

    Raises ConfigError for a request this machine cannot honour.
    """
    cpu = cpu or probe_cpu()
    dev = resolve_device(device, local_rank)
    precision, why = resolve_precision(amp, dev, cpu)
    n_threads = resolve_threads(threads, local_world)
    engine = int8_engine()
    if apply:
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        torch.backends.quantized.engine = engine
    return Runtime(
        device=str(dev), train_precision=precision, eval_precision="fp32", precision_why=why,
        threads=n_threads, cpu=cpu.model, cpu_kind=cpu.kind, capability=cpu.capability, int8_engine=engine,
        torch=str(torch.__version__),
    )


def runtime_summary(info: dict | None) -> str:
    """Short form of a stored `Runtime.to_dict()` for a report row, e.g. 'fp32 / 2 thr / avx512-vnni'."""
    if not info:
        return "-"
    return f"{info.get('train_precision', '?')} / {info.get('threads', '?')} thr / {info.get('cpu_kind', '?')}"


# ----------------------------------------------------------------------------- RNG and process group


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group if the environment describes one (nccl on CUDA, gloo on CPU).

    Raises ConfigError for a CUDA run with more local ranks than GPUs (NCCL cannot share one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError(f"train.device={device_name} under torchrun, but no CUDA device is visible: "
                              "train.device=cpu (gloo) or auto")
        if local_rank >= gpus:  # NCCL needs a GPU of its own per rank
            raise ConfigError(f"torchrun started local rank {local_rank}, but this machine has {gpus} CUDA "
                              f"device(s): NCCL needs one per rank; use --nproc_per_node={gpus}, or "
                              "train.device=cpu (gloo) for more ranks than GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, owns_group=True)
