"""engine.runtime: the machine-dependent choices, checked for every CPU kind by faking the queries."""
import dataclasses

import pytest
import torch

from common.config import ConfigError
from engine import runtime
from engine.runtime import CpuFeatures, int8_engine, resolve_precision, resolve_runtime, resolve_threads

AVX2 = CpuFeatures("AMD EPYC (fake)", avx2=True, avx512=False, vnni=False, avx512_bf16=False, amx=False,
                   capability="AVX2")
AVX512_VNNI = CpuFeatures("Intel Xeon (fake, no bf16)", avx2=True, avx512=True, vnni=True, avx512_bf16=False,
                          amx=False, capability="AVX512")
AVX512_BF16 = dataclasses.replace(AVX512_VNNI, model="Intel Xeon (fake, Cooper Lake)", avx512_bf16=True)
AMX = dataclasses.replace(AVX512_VNNI, model="Intel Xeon (fake, Sapphire Rapids)", avx512_bf16=True, amx=True)


@pytest.mark.parametrize("cpu, kind, native", [
    (AVX2, "avx2", False),
    (AVX512_VNNI, "avx512-vnni", False),  # oneDNN says "bf16 supported" here, but it is emulated
    (AVX512_BF16, "avx512-bf16", True),
    (AMX, "amx", True),  # native bf16, yet slower than fp32 for these models and NaN-prone: fp32 (runtime.py)
])
def test_auto_precision_is_fp32_on_every_cpu_kind(cpu, kind, native):
    assert cpu.kind == kind and cpu.native_bf16 == native
    assert resolve_precision("auto", "cpu", cpu) == ("fp32", "auto: fp32 on a CPU")
    assert resolve_precision("off", "cpu", cpu) == ("fp32", "train.amp=off")
    assert resolve_precision("bf16", "cpu", cpu)[0] == "bf16"  # asked for: honoured, and said if emulated
    assert ("emulated" in resolve_precision("bf16", "cpu", cpu)[1]) == (not native)
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_precision("fp16", "cpu", cpu)


def test_auto_precision_ignores_onednns_emulated_bf16_claim(monkeypatch):
    """The bug this module fixes: mkldnn's bf16 flag is True on any AVX-512 CPU."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu", AVX512_VNNI)[0] == "fp32"


@pytest.mark.parametrize("limit", [
    {"capability": "AVX2"},  # ATEN_CPU_CAPABILITY=avx2
    {"onednn_max_isa": "AVX2"},  # ONEDNN_MAX_CPU_ISA=AVX2
    {"onednn_max_isa": "AVX512_CORE_VNNI"},
])
def test_environment_limits_take_native_bf16_away(limit):
    assert AMX.native_bf16
    assert not dataclasses.replace(AMX, **limit).native_bf16
    assert resolve_precision("auto", "cpu", dataclasses.replace(AMX, **limit))[0] == "fp32"
    assert dataclasses.replace(AMX, onednn_max_isa="AVX512_CORE_AMX").native_bf16


def test_cuda_precision_and_unknown_values():
    assert resolve_precision("auto", "cuda", AVX2)[0] == "fp16"
    assert resolve_precision("fp16", "cuda:1", AVX2)[0] == "fp16"
    with pytest.raises(ConfigError, match="amp"):
        resolve_precision("int8", "cpu", AVX2)


@pytest.mark.parametrize("gpus, message", [(0, "no CUDA device is visible: train.device=cpu"),
                                           (1, "local rank 1, but this machine has 1 CUDA device.*--nproc_per_node=1")])
def test_more_local_ranks_than_gpus_is_refused_before_nccl(monkeypatch, gpus, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(ConfigError, match=message):
        runtime.init_distributed("cuda")


def test_exact_fp32_turns_tf32_off_and_restores_it(monkeypatch):
    from common.precision import exact_fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the switches exist on a CPU build too
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with exact_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_probe_reads_the_environment_limits(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert runtime.probe_cpu().onednn_max_isa == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx512_core_amx")
    assert runtime.probe_cpu().onednn_max_isa == "AVX512_CORE_AMX"
    cpu = runtime.probe_cpu()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()


def test_threads_rule(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads(None) == 4
    assert resolve_threads(None, local_world=2) == 2
    assert resolve_threads(None, local_world=8) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3
    assert resolve_threads(5) == 5  # the config wins
    with pytest.raises(ConfigError, match="threads"):
        resolve_threads(-1)


def test_int8_engine_preference():
    assert int8_engine(["qnnpack", "onednn", "x86", "fbgemm"]) == "x86"
    assert int8_engine(["qnnpack", "fbgemm"]) == "fbgemm"
    assert int8_engine(["qnnpack"]) == "qnnpack"
    with pytest.raises(ConfigError, match="quantized engine"):
        int8_engine([])


def test_resolve_runtime_applies_and_describes_itself():
    before = torch.get_num_threads()
    try:
        rt = resolve_runtime("cpu", "auto", 1, cpu=AVX512_VNNI)
        assert torch.get_num_threads() == 1 and torch.backends.quantized.engine == rt.int8_engine
        assert (rt.train_precision, rt.eval_precision, rt.autocast_dtype, rt.grad_scaler) == ("fp32", "fp32", None, False)
        assert rt.cpu_kind == "avx512-vnni" and rt.torch == torch.__version__
        line = rt.line("teacher")
        for part in ("teacher:", "device cpu", "precision fp32 train", "1 thread", "avx512-vnni", "torch "):
            assert part in line, part
        serving = rt.line("predict", training=False)  # inference: no training precision, no train.amp reason
        assert "| precision fp32 |" in serving and "train" not in serving
        assert rt.to_dict()["threads"] == 1
        assert resolve_runtime("cpu", "auto", 1, cpu=AMX, apply=False).autocast_dtype is None
        bf16 = resolve_runtime("cpu", "bf16", 1, cpu=AMX, apply=False)
        assert bf16.autocast_dtype == torch.bfloat16 and bf16.eval_precision == "fp32"
    finally:
        torch.set_num_threads(before)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_runtime("cuda", "auto", 1)


def test_aten_capability_follows_the_environment():
    """The AVX2 pass of `make test` is real: ATEN_CPU_CAPABILITY=avx2 lowers the kernels torch picks."""
    import subprocess
    import sys

    code = "from engine.runtime import probe_cpu; c = probe_cpu(); print(c.capability, c.onednn_max_isa, c.native_bf16)"
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "AVX2", "False"]
