"""CPU latency figures: medians of repeated runs, with the threading setup they were taken under.

On a shared machine OpenMP spin-waiting makes timings erratic (see REFERENCE.md), so every figure
carries the thread count and the `OMP_WAIT_POLICY` it ran with; compare ratios, not absolutes.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from common.timing import interleaved_medians


def runtime_note() -> dict:
    """Threading conditions a latency figure depends on."""
    return {
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default: spin)"),
        "torch": torch.__version__,
    }


def window_latency_ms(model: nn.Module, size: Sequence[int], runs: int, warmup: int = 1,
                      in_chans: int = 4) -> float:
    """Median ms of one forward pass on a (1, in_chans, *size) zero input, no autograd."""
    return window_latencies_ms({"model": model}, size, runs, warmup, in_chans)["model"]


def window_latencies_ms(models: dict[str, nn.Module], size: Sequence[int], runs: int, warmup: int = 1,
                        in_chans: int = 4) -> dict[str, float]:
    """Median ms per model of one forward pass on the same (1, in_chans, *size) zero input, the models
    called in turn (A B C A B C ...) so that a machine getting busier hits them alike."""
    x = torch.zeros((1, in_chans, *[int(s) for s in size]))
    for model in models.values():
        model.eval()

    def call(model: nn.Module):
        def forward() -> None:
            with torch.inference_mode():
                model(x)
        return forward

    seconds = interleaved_medians({name: call(m) for name, m in models.items()}, runs, warmup)
    return {name: 1e3 * s for name, s in seconds.items()}
