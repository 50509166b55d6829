"""Two CPU processes (gloo) through the engine, as `torchrun --nproc_per_node=2` would start them
(`check_two_ranks` also serves tests/test_cuda.py's NCCL run)."""
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from common.artifact import Artifact
from engine.loop import BEST, LAST, SupervisedStage, fit
from test_engine import make_phantom, tiny_cfg, tiny_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data_dir: str, out: str, results: str, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    saves: list[str] = []
    original = Artifact.save

    def counting_save(self, path):
        saves.append(Path(path).name)
        return original(self, path)

    Artifact.save = counting_save
    # different initial weights per rank: DDP must broadcast rank 0's
    model = tiny_model(seed=rank)
    cfg = tiny_cfg(Path(data_dir))
    cfg.train.device = device
    cfg.data.samples_per_epoch = 4  # 2 crops per rank and step (BatchNorm needs > 1 value at 1/32 scale)
    result = fit(model, SupervisedStage(), cfg, out, stage_name="teacher")
    torch.save({"state": model.state_dict(), "best": result.best_metrics,
                "history": [h["val"]["dice_mean"] for h in result.history], "saves": saves,
                "group_left": not torch.distributed.is_initialized()},
               Path(results) / f"rank{rank}.pt")


def test_two_ranks_train_identically(tmp_path):
    check_two_ranks(tmp_path, "cpu")


def check_two_ranks(tmp_path: Path, device: str) -> None:
    """Two ranks through `fit` on `device` (cpu: gloo, cuda: NCCL, one GPU per rank) agree on everything."""
    data = make_phantom(tmp_path / "phantom")
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(data), str(out), str(results), device), nprocs=WORLD, join=True)
    r0 = torch.load(results / "rank0.pt", weights_only=True)
    r1 = torch.load(results / "rank1.pt", weights_only=True)

    # only rank 0 writes checkpoints: best + last after each of 2 epochs (best may not improve)
    assert r1["saves"] == []
    assert r0["saves"].count(LAST) == 2 and 1 <= r0["saves"].count(BEST) <= 2
    assert r0["group_left"] and r1["group_left"]

    # identical weights and BatchNorm statistics on both ranks
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the checkpoint is that model
    last = Artifact.load(out / LAST)
    for k, v in r0["state"].items():
        assert torch.equal(last.state_dict[k], v), k

    # each rank scored one of the 2 validation cases; the gathered means agree
    assert r0["best"] == r1["best"] and r0["history"] == r1["history"]
    assert r0["best"]["val_cases"] == 2
    assert Artifact.load(out / BEST).metrics == r0["best"]
    # steps_per_epoch counts steps of every rank together (each on its own share of crops)
    assert last.extra["train_state"]["global_step"] == 4
