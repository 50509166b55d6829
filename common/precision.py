"""IEEE fp32 for measurements on CUDA.

cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa on Ampere and later), so a Dice
measured on a GPU would not be the Dice `predict.py` gives back on a CPU. Every scoring pass
(validation, stage figures, the ET rule's calibration: `brats.scoring`) runs inside `exact_fp32()`;
training keeps the faster default. On a machine without CUDA the context changes nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products inside the block, restored after.

    Uses the `fp32_precision` switches of PyTorch >= 2.9. Inside the block the older TF32 queries
    (`torch.backends.cudnn.allow_tf32`, `torch.get_float32_matmul_precision()`) raise RuntimeError in
    torch 2.13 (the two APIs may not be mixed): nothing here reads them."""
    if not torch.cuda.is_available():
        yield
        return
    switches = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    saved = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = "ieee"
        yield
    finally:
        for s, old in zip(switches, saved):
            s.fp32_precision = old
