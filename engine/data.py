"""The training data of a run: preprocessing cache, split fold, random-crop dataset.

    data = make_data(cfg)   # data.cache, data.train_ids, data.val_ids, data.train_set
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from brats.cache import Cache, open_cache
from brats.dataset import CropDataset
from brats.splits import load_or_create_splits
from brats.synthetic import resolve_data
from common.config import Config, ConfigError


@dataclass
class TrainData:
    cache: Cache
    train_ids: list[str]
    val_ids: list[str]
    train_set: Dataset


def stack_batches(items: Sequence[dict], batch_size: int,
                  device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Crops ({"image": (C, D, H, W), "label": (D, H, W)}, as the datasets give them) stacked into batches
    of `batch_size` on `device`; the last batch may be smaller."""
    return [{key: torch.stack([c[key] for c in items[i: i + batch_size]]).to(device) for key in ("image", "label")}
            for i in range(0, len(items), batch_size)]


def make_data(cfg: Config) -> TrainData:
    """Cache (synthetic cases when `cfg.data.dir` is None), split fold, training crop dataset.

    Under an initialised process group, rank 0 prepares the cache and draws the split while the
    other ranks wait, then they read what rank 0 wrote.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    paths: list = [None]
    if rank == 0:
        paths = [resolve_data(cfg.data, progress=True)]
    if distributed:
        dist.broadcast_object_list(paths, src=0)
    _, cache_dir = paths[0]
    cache = open_cache(cache_dir)
    split_file = Path(cfg.data.split_file) if cfg.data.split_file else Path(cache_dir) / "splits.json"

    def say(line: str) -> None:
        tqdm.write(f"note: {line}")

    def splits():
        return load_or_create_splits(split_file, cache.grades(), cfg.data.val_fraction, cfg.data.folds,
                                     cfg.data.split_seed, note=say if rank == 0 else None)

    folds = splits() if rank == 0 else None
    if distributed:
        dist.barrier()
    if folds is None:
        folds = splits()
    if not 0 <= cfg.data.fold < len(folds):
        raise ConfigError(f"data.fold={cfg.data.fold}, but {split_file} has {len(folds)} fold(s)")
    fold = folds[cfg.data.fold]
    train_ids, val_ids = list(fold.train), list(fold.val)
    if cfg.data.max_val_cases is not None:
        val_ids = val_ids[: cfg.data.max_val_cases]
    if not val_ids:
        raise ConfigError(
            f"fold {cfg.data.fold} of {split_file} has no validation cases; checkpoints are chosen on "
            "held-out cases (raise data.val_fraction or edit the split file)"
        )
    train_set = CropDataset(
        cache, train_ids, cfg.data.crop, cfg.data.fg_ratio, samples=cfg.data.samples_per_epoch, seed=cfg.train.seed
    )
    return TrainData(cache, train_ids, val_ids, train_set)
