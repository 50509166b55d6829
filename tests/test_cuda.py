"""CUDA: fp16 AMP with a GradScaler through the engine and every stage's command line, scoring in
IEEE fp32 (no TF32, so a GPU-measured Dice is the Dice a CPU gives back), artifacts that a CPU-only
process loads, and NCCL with one GPU per rank.

Skipped without CUDA (CI has none); `scripts/gpu_check.sh` runs them on a GPU machine.
"""
import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from common.artifact import Artifact
from common.precision import exact_fp32
from engine.data import make_data
from engine.loop import BEST, LAST, SupervisedStage, Trainer, fit
from engine.runtime import resolve_runtime
from brats.scoring import evaluate
from test_ddp import check_two_ranks
from test_engine import InterruptAfter, _assert_same, make_phantom, tiny_cfg, tiny_model
from test_pipeline import STAGES, run_chain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # a process that sees no GPU, as on the hospital machine


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("phantom"))


def test_auto_runtime_on_cuda_is_fp16_with_a_grad_scaler():
    rt = resolve_runtime("auto", "auto", 1, apply=False)
    assert (rt.device, rt.train_precision, rt.eval_precision, rt.grad_scaler) == ("cuda:0", "fp16", "fp32", True)
    assert resolve_runtime("cuda", "bf16", 1, apply=False).grad_scaler is False


def test_scoring_on_cuda_is_the_cpus_fp32(phantom):
    cfg = tiny_cfg(phantom)
    data = make_data(cfg)
    model = tiny_model().eval()
    gpu = copy.deepcopy(model).cuda()
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad(), exact_fp32():
        cpu_out, gpu_out = model(x), gpu(x.cuda()).cpu()
    assert (cpu_out - gpu_out).abs().max().item() < 1e-4  # TF32 would be ~1e-3 relative
    on_cpu = evaluate(model, data.cache, data.val_ids, cfg)
    on_gpu = evaluate(gpu, data.cache, data.val_ids, cfg)
    for key in ("dice_wt", "dice_tc", "dice_et", "dice_mean"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=1e-3), key


def test_fp16_training_resumes_with_its_grad_scaler(phantom, tmp_path, monkeypatch):
    cfg = tiny_cfg(phantom, device="cuda", amp="auto")
    scaler = torch.amp.GradScaler
    huge = 2.0 ** 60  # the first steps overflow in fp16 for sure, so the scaler skips them
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: scaler(device, init_scale=huge))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("always")
        fit(tiny_model(), InterruptAfter(3), cfg, tmp_path, stage_name="teacher")  # dies in epoch 2
    saved = Artifact.load(tmp_path / LAST)
    state = saved.extra["train_state"]
    assert saved.extra["runtime"]["device"] == "cuda:0" and saved.extra["runtime"]["train_precision"] == "fp16"
    assert state["scaler"] and 0 < state["scaler"]["scale"] < huge  # steps were skipped
    # skipped steps still advance the schedule, without torch's warning about the order of the two calls
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    trainer = Trainer(tiny_model(seed=5), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    try:
        trainer.load_last()
        _assert_same(state["scaler"], trainer.scaler.state_dict(), "scaler")
        _assert_same(state["optimizer"], trainer.optimizer.state_dict(), "optimizer")
        _assert_same(saved.state_dict, trainer.model.state_dict(), "model")
    finally:
        trainer.close()
    resumed = fit(tiny_model(seed=5), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    assert Artifact.load(tmp_path / LAST).extra["train_state"]["global_step"] == 4
    assert all(math.isfinite(resumed.best_metrics[k]) for k in ("dice_wt", "dice_tc", "dice_et"))
    assert all(math.isfinite(v) for h in resumed.history for v in h["train"].values())
    assert resumed.history[-1]["train"]  # the resumed epoch trained


def test_the_whole_chain_trains_on_cuda_and_serves_on_a_cpu(tmp_path):
    tmp = run_chain(tmp_path, train=("train.device=cuda", "train.amp=auto"), serve_env=CPU_ONLY)
    paths = ["teacher/best.pt", "student/student.pt", "slim/slim.pt", "lowrank/lowrank.pt", "grow/grown.pt",
             "int8/int8.pt"]
    for stage, path in zip(STAGES, paths):
        art = Artifact.load(tmp / "runs" / path)
        runtime = art.extra["runtime"]
        assert (runtime["device"], runtime["train_precision"], runtime["eval_precision"]) == ("cuda:0", "fp16", "fp32"), stage
        assert all(math.isfinite(art.metrics[k]) for k in ("dice_wt", "dice_tc", "dice_et")), stage
    # every shipped artifact loads with plain torch.load in a process that sees no GPU
    probe = ("import sys, torch\n"
             "for p in sys.argv[1:]: torch.load(p, weights_only=True)\n"
             "assert not torch.cuda.is_available()\n")
    proc = subprocess.run([sys.executable, "-c", probe, *(str(tmp / "runs" / p) for p in paths)],
                          env={**os.environ, **CPU_ONLY}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp / "report" / "report.md").stat().st_size > 0 and len(list((tmp / "pred_val").glob("*.nii.gz"))) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")
def test_two_ranks_train_identically_over_nccl(tmp_path):
    check_two_ranks(tmp_path, "cuda")
