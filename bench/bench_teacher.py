"""Teacher presets on this machine: parameters, G multiply-adds, forward / forward+backward time
in fp32 and bf16 autocast, and peak memory, all measured in one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_teacher.py [--sizes 96 128] [--runs 3]

Timings are medians over interleaved runs (fp32 and bf16 alternate), so machine noise hits both
alike; compare ratios, not absolute numbers, on a shared machine. Each (preset, size) row runs in a
fresh process, so its peak memory is its own: the peak resident set size of that process (CPU), or
torch.cuda.max_memory_allocated (GPU). On CUDA, cuDNN autotuning is on, as the engine trains.

Measured on one NVIDIA H200 (torch 2.11.0+cu130), `--device cuda --sizes 128 --runs 5 --batch 2
--modes fp32 fp16 bf16`: fwd+bwd segformer3d 41 / 27 / 27 ms, refineformer3d 58 / 36 / 38 ms (fp32 with
cuDNN's TF32 / fp16 / bf16 autocast), peak 1.6 / 2.2 GB. Before autotuning was set here (batch 1), fp16
fwd+bwd took 0.28 / 0.42 s against 0.043 / 0.050 s in fp32: cuDNN's untuned fp16 kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.macs import count_macs  # noqa: E402
from model.refineformer3d import RefineFormer3D, count_params, preset_spec  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(preset: str, size: int, runs: int, device: str, modes: list[str], batch: int = 1) -> dict:
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the engine trains: fixed shapes, cuDNN's fastest kernels
    model = RefineFormer3D(preset_spec(preset)).to(device)
    x = torch.randn(batch, 4, size, size, size, device=device)
    row = {"preset": preset, "size": size, "batch": batch, "params": count_params(model),
           "gmacs": count_macs(model, (1, 4, size, size, size))}
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def forward(mode):
        model.eval()
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=amp_dtype[mode], enabled=mode != "fp32"):
            model(x)

    def train_step(mode):
        model.train()
        with torch.autocast(device.split(":")[0], dtype=amp_dtype[mode], enabled=mode != "fp32"):
            loss = model(x).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {f"{m}_{k}": [] for m in modes for k in ("fwd", "fwdbwd")}
    for mode in modes:  # warm-up
        forward(mode)
        train_step(mode)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(runs):
        for mode in modes:
            times[f"{mode}_fwd"].append(_time(lambda: forward(mode), device))
            times[f"{mode}_fwdbwd"].append(_time(lambda: train_step(mode), device))
    for key, values in times.items():
        row[f"{key}_s"] = statistics.median(values)
    if device.startswith("cuda"):
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mem_mb"] = _peak_rss_mb()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--presets", nargs="+", default=["segformer3d", "refineformer3d"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="crops per step (the teacher recipe trains 2)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], help="fp32 bf16 fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", nargs=2, metavar=("PRESET", "SIZE"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(bench(args.one[0], int(args.one[1]), args.runs, args.device, args.modes, args.batch)))
        return
    print(f"device={args.device} threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
          f" native_bf16={torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("GMACs: fvcore convention (1 multiply-add = 1), attention and trilinear upsampling included")
    cols = ["preset", "size", "batch", "params", "gmacs"] + [f"{m}_{k}_s" for m in args.modes for k in ("fwd", "fwdbwd")] + ["peak_mem_mb"]
    print(" | ".join(cols))
    for size in args.sizes:
        for preset in args.presets:
            child = [sys.executable, __file__, "--one", preset, str(size), "--runs", str(args.runs),
                     "--device", args.device, "--modes", *args.modes, "--batch", str(args.batch)]
            row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols), flush=True)
            for mode in (m for m in args.modes if "fp32" in args.modes and m != "fp32"):  # ratios need fp32
                print(f"   {mode}/fp32 time ratio: fwd {row[f'{mode}_fwd_s'] / row['fp32_fwd_s']:.2f}x,"
                      f" fwd+bwd {row[f'{mode}_fwdbwd_s'] / row['fp32_fwdbwd_s']:.2f}x")


if __name__ == "__main__":
    main()
