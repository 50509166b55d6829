"""IEEE fp32 for measurements on CUDA.

cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa on Ampere and later), so a Dice
measured on a GPU would not be the Dice `predict.py` gives back on a CPU. Every scoring pass
(validation, stage figures, the ET rule's calibration) runs inside `exact_fp32()`; training keeps
the faster default. On a CPU-only build the context changes nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products inside the block, restored after.

    Uses the `fp32_precision` switches of PyTorch >= 2.9 where present (mixing them with the older
    `allow_tf32` flags is an error there), else `allow_tf32`."""
    if not torch.cuda.is_available():
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        switches = [(conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        value = "ieee"
    else:
        switches = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        value = False
    saved = [getattr(obj, name) for obj, name in switches]
    try:
        for obj, name in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name), old in zip(switches, saved):
            setattr(obj, name, old)
