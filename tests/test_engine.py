import math
from pathlib import Path

import numpy as np
import pytest
import torch

from brats.inference import predict_case
from brats.metrics import score_case
from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, ArtifactError, build_model
from common.config import Config, ConfigError
from brats.overlay import contour_overlay
from engine.data import make_data
from engine.loop import (BEST, LAST, Stage, SupervisedStage, Trainer, TrainingWrapper, artifact_spec, ended_rising, fit,
                         lr_factor, product_of, still_rising)
from engine.runtime import rng_state, set_rng_state
from engine.losses import segmentation_loss
from model.refineformer3d import RefineFormer3D, preset_spec

TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
            decoder_dim=16, fuse_dim=16, refine_dim=4)


def make_phantom(root: Path) -> Path:
    """Four 48x48x32 synthetic cases (about 41x41x28 after the brain crop)."""
    write_phantom_dataset(root, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    return root


def tiny_cfg(data_dir: Path, **train) -> Config:
    cfg = Config()
    cfg.data.dir = str(data_dir)
    cfg.data.crop = [32, 32, 32]
    cfg.data.val_fraction = 0.5  # 2 train, 2 val
    cfg.model.overrides = dict(TINY)
    t = cfg.train
    t.window, t.overlap, t.sw_batch = [32, 32, 32], 0.25, 2
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs = 2, 2, 2, 1
    t.lr, t.min_lr, t.threads, t.amp = 3e-3, 1e-5, 1, "off"  # pinned: resume must be exact in fp32
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def tiny_model(seed: int = 0, **overrides) -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(preset_spec("refineformer3d", **{**TINY, **overrides}))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def straight(phantom, tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by several tests."""
    out = tmp_path_factory.mktemp("straight")
    model = tiny_model()
    result = fit(model, SupervisedStage(), tiny_cfg(phantom), out, stage_name="teacher")
    return out, model, result


# ----------------------------------------------------------------------------- pieces


def test_lr_factor_warmup_then_cosine():
    # 4 warm-up steps of 14 in all, min ratio 0.1
    f = [lr_factor(s, 4, 14, 0.1) for s in range(15)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_rng_state_roundtrip_is_weights_only(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_contour_overlay_draws_edges_only():
    flair = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 2  # edema square: WT only
    pred = np.zeros((8, 8), np.uint8)
    rgb = contour_overlay(flair, truth, pred)
    assert rgb.shape == (3, 8, 16) and rgb.dtype == np.uint8
    left = rgb[:, :, :8]
    green = (left[0] == 0) & (left[1] == 255) & (left[2] == 0)
    ring = np.zeros((8, 8), bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False
    assert np.array_equal(green, ring)  # a 4x4 square's contour: its 12 border pixels
    assert np.array_equal(rgb[0, :, 8:], rgb[1, :, 8:])  # empty prediction: grey only


# ----------------------------------------------------------------------------- fit


def test_make_data_split_and_crops(phantom):
    data = make_data(tiny_cfg(phantom))
    assert len(data.train_ids) == 2 and len(data.val_ids) == 2
    assert not set(data.train_ids) & set(data.val_ids)
    item = data.train_set[0]
    assert item["image"].shape == (4, 32, 32, 32) and item["label"].shape == (32, 32, 32)
    cfg = tiny_cfg(phantom)
    cfg.data.max_val_cases = 1
    assert len(make_data(cfg).val_ids) == 1


def test_fit_writes_best_and_last(straight, phantom):
    out, model, result = straight
    assert result.best_path == out / BEST and result.last_path == out / LAST
    assert len(result.history) == 2 and [h["step"] for h in result.history] == [2, 4]
    dice = [h["val"]["dice_mean"] for h in result.history]
    pooled = [h["val"]["pooled_dice_mean"] for h in result.history]  # train.select's default
    assert result.best_metrics["pooled_dice_mean"] == max(pooled)
    assert result.best_metrics["val_cases"] == 2
    assert 0.0 <= result.best_metrics["dice_mean"] <= 1.0
    for h in result.history:  # mean Dice is the mean of the three regions
        v = h["val"]
        assert v["dice_mean"] == pytest.approx((v["dice_wt"] + v["dice_tc"] + v["dice_et"]) / 3)

    best, last = Artifact.load(out / BEST), Artifact.load(out / LAST)
    assert best.stage == last.stage == "teacher"
    assert best.metrics == result.best_metrics
    assert best.config["train"]["epochs"] == 2 and best.spec == model.spec.to_dict()
    state = last.extra["train_state"]
    assert state["epoch"] == 2 and state["global_step"] == 4
    assert state["best_score"] == pytest.approx(max(pooled)) and state["select"] == "pooled_dice_mean"
    assert last.metrics == result.history[-1]["val"]
    # last.pt holds the final weights
    for k, v in model.state_dict().items():
        assert torch.equal(last.state_dict[k], v.cpu()), k

    # best.pt's weights reproduce its own metrics when re-scored from scratch
    rebuilt = build_model(best).eval()
    data = make_data(tiny_cfg(phantom))
    rows = []
    with torch.no_grad():
        for case in data.val_ids:
            image = torch.from_numpy(np.asarray(data.cache.image(case), dtype=np.float32))
            truth = np.asarray(data.cache.label(case))
            pred = predict_case(rebuilt, image, "regions", (32, 32, 32), 0.25, 2)
            rows.append(score_case(pred, truth, data.cache.meta(case).spacing)["dice_mean"])
    assert float(np.mean(rows)) == pytest.approx(best.metrics["dice_mean"], abs=1e-6)


def test_training_lowers_the_loss(phantom, tmp_path):
    cfg = tiny_cfg(phantom, epochs=3, steps_per_epoch=4, val_every=3, log_images=False)
    result = fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    losses = [h["train"]["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.05, losses
    # validation only every 3rd epoch (here: the last)
    assert [h["val"] is not None for h in result.history] == [False, False, True]


def test_tensorboard_holds_val_dice(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, result = straight
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    events = acc.Scalars("val/dice_mean")
    assert [e.step for e in events] == [2, 4]
    assert [e.value for e in events] == pytest.approx([h["val"]["dice_mean"] for h in result.history], abs=1e-6)
    assert len(acc.Scalars("train/loss")) == 4 and "train/lr" in tags["scalars"]
    assert "val/hd95_wt" in tags["scalars"] and len(tags["images"]) == 2  # one image tag per logged case


class InterruptAfter(SupervisedStage):
    """Raise KeyboardInterrupt on loss call number `n + 1` (a kill in the middle of an epoch)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_resume_matches_an_uninterrupted_run(straight, phantom, tmp_path):
    out, model, result = straight
    cfg = tiny_cfg(phantom)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), InterruptAfter(3), cfg, tmp_path, stage_name="teacher")  # dies in epoch 2
    assert Artifact.load(tmp_path / LAST).extra["train_state"]["epoch"] == 1
    resumed_model = tiny_model(seed=123)  # weights come from last.pt
    resumed = fit(resumed_model, SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    assert resumed.best_metrics.keys() == result.best_metrics.keys()
    for k, v in result.best_metrics.items():
        assert resumed.best_metrics[k] == pytest.approx(v, abs=1e-6), k
    assert [h["val"]["dice_mean"] for h in resumed.history] == pytest.approx(
        [h["val"]["dice_mean"] for h in result.history], abs=1e-6)
    final = model.state_dict()
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, final[k]), k  # fp32, same kernels and threads: bit for bit


def _assert_same(a, b, where: str) -> None:
    """Exact, recursive equality of saved and restored state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_right_after_resume_every_state_equals_what_was_saved(phantom, tmp_path):
    """Model, optimiser, scheduler, RNG states, epoch and step are restored exactly (no tolerance)."""
    cfg = tiny_cfg(phantom, log_images=False)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), InterruptAfter(3), cfg, tmp_path, stage_name="teacher")
    saved = Artifact.load(tmp_path / LAST)
    state = saved.extra["train_state"]
    torch.manual_seed(99)  # RNG states far from the saved ones, so restoring them is visible
    np.random.seed(99)
    trainer = Trainer(tiny_model(seed=5), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    try:
        trainer.load_last()
        _assert_same(state["rng"], rng_state(), "rng")
        _assert_same(state["optimizer"], trainer.optimizer.state_dict(), "optimizer")
        _assert_same(state["scheduler"], trainer.scheduler.state_dict(), "scheduler")
        _assert_same(saved.state_dict, trainer.model.state_dict(), "model")
        assert (trainer.epoch, trainer.global_step) == (state["epoch"], state["global_step"]) == (1, 2)
        assert trainer.history == state["history"] and trainer.best_score == state["best_score"]
    finally:
        trainer.close()
    assert saved.extra["runtime"]["train_precision"] == "fp32"  # pinned by tiny_cfg, recorded in the artifact


def test_resume_errors(straight, phantom, tmp_path):
    out, _, _ = straight
    cfg = tiny_cfg(phantom)
    with pytest.raises(ArtifactError, match="nothing to resume"):
        fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    (tmp_path / LAST).write_bytes((out / LAST).read_bytes())
    with pytest.raises(ArtifactError, match="architecture.*embed_dims"):
        fit(tiny_model(embed_dims=[8, 16, 32, 16]), SupervisedStage(), cfg, tmp_path, stage_name="teacher",
            resume=True)
    with pytest.raises(ArtifactError, match="stage 'teacher'"):
        fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="student", resume=True)
    (tmp_path / LAST).write_bytes((out / LAST).read_bytes()[:5000])  # truncated
    with pytest.raises(ArtifactError, match="not a readable artifact \\(a torch file, corrupted or truncated\\)"):
        fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)


class ZerosInEval(TrainingWrapper):
    """Validation sees the same (all-background) logits every epoch: Dice never improves."""

    def forward(self, x):
        if self.training:
            return self.product(x)
        return torch.zeros(x.shape[0], 3, *x.shape[2:])


def test_resume_refuses_another_source_but_not_a_moved_one(phantom, tmp_path):
    cfg = tiny_cfg(phantom, log_images=False)
    source = [{"stage": "teacher", "path": "/runs/t3/best.pt", "metrics": {"dice_mean": 0.61}}]
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), InterruptAfter(3), cfg, tmp_path, stage_name="student", lineage=source)
    other = [{"stage": "teacher", "path": "/runs/t4/best.pt", "metrics": {"dice_mean": 0.72}}]
    with pytest.raises(ArtifactError, match=r"started from teacher /runs/t3/best\.pt, not from teacher "
                                            r"/runs/t4/best\.pt"):
        fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="student", lineage=other, resume=True)
    moved = [{**source[0], "path": "/elsewhere/t3/best.pt"}]  # the same artifact, its folder moved
    result = fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="student", lineage=moved, resume=True)
    assert result.history[-1]["epoch"] == cfg.train.epochs


def test_patience_stops_after_validations_without_a_better_dice(phantom, tmp_path):
    cfg = tiny_cfg(phantom, epochs=6, val_every=1, log_images=False, patience=2)
    result = fit(ZerosInEval(tiny_model()), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    assert len(result.history) == 3  # best at epoch 1, then 2 stale validations: epochs is only a maximum
    state = Artifact.load(tmp_path / LAST).extra["train_state"]
    assert state["stopped"] is True and state["stale"] == 2
    again = fit(ZerosInEval(tiny_model()), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    assert len(again.history) == 3  # a stopped run stays stopped
    cfg.train.patience = None
    assert len(fit(ZerosInEval(tiny_model()), SupervisedStage(), cfg, tmp_path / "all",
                   stage_name="teacher").history) == 6


class Counting(SupervisedStage):
    """Records the engine's calls: `to` once, `set_epoch` before every epoch, `on_validation` after every
    validation (with what it scored, before the next epoch); checks clipped gradients."""

    def __init__(self, clip: float):
        super().__init__()
        self.clip, self.devices, self.epochs, self.steps = clip, [], [], 0
        self.trained, self.validations = None, []

    def on_validation(self, metrics, log=True):
        assert log
        self.validations.append((len(self.epochs), metrics["pooled_dice_mean"]))

    def to(self, device):
        self.devices.append(device)

    def set_epoch(self, epoch):
        if self.trained is not None:  # the previous epoch's last step was clipped to grad_clip
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.trained.parameters() if p.grad is not None]))
            assert norm <= self.clip + 1e-4
        self.epochs.append(epoch)

    def loss(self, model, batch):
        self.trained, self.steps = model, self.steps + 1
        return super().loss(model, batch)


def test_stage_calls(phantom, tmp_path):
    stage = Counting(clip=tiny_cfg(phantom).train.grad_clip)
    result = fit(tiny_model(), stage, tiny_cfg(phantom, epochs=3, val_every=2, val_at_start=True, log_images=False),
                 tmp_path, stage_name="teacher")
    assert [d.type for d in stage.devices] == ["cpu"] and stage.epochs == [0, 1, 2] and stage.steps == 6
    # the start, epoch 2 and the last epoch are validated; each is handed to the stage after its epoch
    scored = [(h["epoch"], h["val"]["pooled_dice_mean"]) for h in result.history if h["val"]]
    assert [e for e, _ in scored] == [0, 2, 3]
    assert stage.validations == scored


def test_base_stage_needs_a_loss_and_a_model_that_describes_itself(phantom, tmp_path):
    with pytest.raises(NotImplementedError):
        Stage().loss(None, {})
    with pytest.raises(TypeError, match="artifact_spec"):
        artifact_spec(torch.nn.Conv3d(4, 3, 1))
    wrapped = TrainingWrapper(tiny_model())
    assert product_of(wrapped) is wrapped.product and artifact_spec(wrapped) == wrapped.product.spec.to_dict()


# ----------------------------------------------------------------------------- fine-tune hooks


class Ascent(SupervisedStage):
    """Gradient ascent on the supervised loss (training only makes Dice worse)."""

    def __init__(self, interrupt_after: int | None = None):
        super().__init__()
        self.calls, self.interrupt_after, self.validations = 0, interrupt_after, []

    def on_validation(self, metrics, log=True):
        self.validations.append((metrics["dice_mean"], log))

    def loss(self, model, batch):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        loss, logs = super().loss(model, batch)
        return -loss, logs


class CountsValidation(TrainingWrapper):
    def __init__(self, product):
        super().__init__(product)
        self.eval_calls = 0

    def forward(self, x):
        self.eval_calls += not self.training
        return self.product(x)


def test_val_at_start_keeps_the_initial_weights_and_is_not_repeated_on_resume(phantom, tmp_path):
    cfg = tiny_cfg(phantom, val_at_start=True, lr=2e-2, log_images=False)
    model = CountsValidation(tiny_model())
    initial = {k: v.clone() for k, v in model.product.state_dict().items()}
    result = fit(model, Ascent(), cfg, tmp_path / "a", stage_name="lowrank")
    assert [(h["epoch"], h.get("start", False)) for h in result.history] == [(0, True), (1, False), (2, False)]
    start = result.history[0]
    assert start["step"] == 0 and start["train"] == {}
    dice = [h["val"]["dice_mean"] for h in result.history]
    assert dice[1] < dice[0] and dice[2] < dice[0], dice  # the premise: training made it worse
    assert model.eval_calls == 3 * 4  # start + 2 epochs, 4 windows each
    best = Artifact.load(tmp_path / "a" / BEST)
    assert best.metrics == start["val"] == result.best_metrics and best.extra["epoch"] == 0
    for k, v in initial.items():
        assert torch.equal(best.state_dict[k], v), k

    # killed in epoch 2, resumed: the start is not validated again and the run matches
    with pytest.raises(KeyboardInterrupt):
        fit(CountsValidation(tiny_model()), Ascent(interrupt_after=3), cfg, tmp_path / "b", stage_name="lowrank")
    again, stage = CountsValidation(tiny_model(seed=9)), Ascent()
    resumed = fit(again, stage, cfg, tmp_path / "b", stage_name="lowrank", resume=True)
    assert again.eval_calls == 4  # epoch 2 only
    # the stage sees the last validation before (epoch 1's, quietly: the run said it) and after epoch 2
    assert stage.validations == [(pytest.approx(dice[1], abs=1e-6), False), (pytest.approx(dice[2], abs=1e-6), True)]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert [h["val"]["dice_mean"] for h in resumed.history] == pytest.approx(dice, abs=1e-6)
    assert resumed.best_metrics == pytest.approx(result.best_metrics, abs=1e-6)


class NormsUndecayed(RefineFormer3D):
    """A product that names parameters to train without weight decay (the timm convention)."""

    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(".bias") or ".norm" in n}


class Gain(TrainingWrapper):
    """Logits times a learnable per-region gain: trained with the model, never part of its artifact."""

    def __init__(self, product):
        super().__init__(product)
        self.gain = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.product(x) * self.gain.view(1, 3, 1, 1, 1)


def undecayed_model(seed: int = 0) -> NormsUndecayed:
    torch.manual_seed(seed)
    return NormsUndecayed(preset_spec("refineformer3d", **TINY))


def test_weight_decay_groups(phantom, tmp_path):
    cfg = tiny_cfg(phantom, weight_decay=0.1, lr=1e-2)
    model = Gain(undecayed_model())
    trainer = Trainer(model, SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["model", "model_no_decay"]
    assert [g["weight_decay"] for g in groups.values()] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {f"product.{n}" for n in model.product.no_weight_decay()}
    assert {names[id(p)] for p in groups["model_no_decay"]["params"]} == exempt
    assert {names[id(p)] for p in groups["model"]["params"]} == set(names.values()) - exempt
    assert len(exempt) > 10 and "product.encoder.stages.0.patch_embed.norm.weight" in exempt and "gain" in {
        names[id(p)] for p in groups["model"]["params"]}
    # one AdamW step on zero gradients is pure decoupled weight decay: p *= 1 - lr * wd
    params = trainer.trainable_parameters()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    lr = trainer.optimizer.param_groups[0]["lr"]  # warm-up step 0: lr / 2
    assert lr == pytest.approx(0.5e-2)
    for p, old in zip(params, before):
        expected = old if names[id(p)] in exempt else old * (1 - lr * 0.1)
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7), names[id(p)]


class InterruptAfterSteps(SupervisedStage):
    def __init__(self, interrupt_after: int | None = None):
        super().__init__()
        self.calls, self.interrupt_after = 0, interrupt_after

    def loss(self, model, batch):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_a_training_wrapper_trains_saves_and_resumes_but_only_its_product_ships(phantom, tmp_path):
    cfg = tiny_cfg(phantom, log_images=False)
    model = Gain(tiny_model())
    result = fit(model, SupervisedStage(), cfg, tmp_path / "a", stage_name="teacher")
    assert not torch.equal(model.gain.detach(), torch.ones(3))  # it trained
    assert result.model is model.product
    state = Artifact.load(tmp_path / "a" / LAST).extra["train_state"]
    assert torch.equal(state["model"]["gain"], model.gain.detach())
    best = Artifact.load(tmp_path / "a" / BEST)
    assert set(best.state_dict) == set(model.product.state_dict())  # the product only
    build_model(best)  # strict: rebuilds as a plain model

    with pytest.raises(KeyboardInterrupt):
        fit(Gain(tiny_model()), InterruptAfterSteps(3), cfg, tmp_path / "b", stage_name="teacher")
    resumed_model = Gain(tiny_model(seed=4))
    fit(resumed_model, SupervisedStage(), cfg, tmp_path / "b", stage_name="teacher", resume=True)
    assert torch.allclose(resumed_model.gain, model.gain, atol=1e-6)
    for k, v in resumed_model.state_dict().items():
        assert torch.allclose(v, model.state_dict()[k], atol=1e-6), k
    # a plain run's last.pt holds no wrapper state to resume a wrapped model from
    fit(tiny_model(), SupervisedStage(), tiny_cfg(phantom, epochs=1, log_images=False), tmp_path / "a2",
        stage_name="teacher")
    with pytest.raises(ArtifactError, match="no training wrapper state"):
        fit(Gain(tiny_model()), SupervisedStage(), cfg, tmp_path / "a2", stage_name="teacher", resume=True)


def test_crops_the_model_cannot_train_on_are_rejected_early():
    from common.config import ConfigError, load_config
    from engine.loop import _check_crop
    from model.refineformer3d import ModelSpec, RefineFormer3D

    model = RefineFormer3D(ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                                     decoder_dim=8, fuse_dim=8, refine_dim=4))
    with pytest.raises(ConfigError, match=r"multiple of 32"):
        _check_crop(load_config(None, ["data.crop=[48,64,64]"]), model)
    for bad, message in ((["data.crop=[32,32]"], r"data\.crop=\[32, 32\]: three sizes"),
                         (["data.crop=[32,32,32]", "train.window=[0,32,32]"], r"train\.window=\[0, 32, 32\]"),
                         (["data.crop=[32,32,32]", "train.overlap=1.0"], r"train\.overlap=1\.0: a fraction")):
        with pytest.raises(ConfigError, match=message):
            _check_crop(load_config(None, bad), model)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        _check_crop(load_config(None, ["data.crop=[32,32,32]", "train.batch_size=1"]), model)
    assert _check_crop(load_config(None, ["data.crop=[32,32,32]", "train.batch_size=2"]), model) == 1
    assert _check_crop(load_config(None, ["data.crop=[64,64,32]", "train.batch_size=1"]), model) == 4


def test_loader_workers_are_clamped_to_the_cpus_and_the_plan_is_said(phantom, tmp_path, monkeypatch, capsys):
    from engine import loop

    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loop.loader_workers(4) == 1 and "data.num_workers=4 on 2 CPU(s)" in capsys.readouterr().out
    assert loop.loader_workers(1) == 1 and loop.loader_workers(0) == 0
    cfg = tiny_cfg(phantom, epochs=1, log_images=False)
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    out = capsys.readouterr().out
    assert "teacher: plan 1 epoch(s) x 2 step(s) of 2 crop(s) 32x32x32, validation every 1 epoch(s) on 2 case(s)" in out
    assert "min of training steps left" in out


def test_a_crop_larger_than_the_cases_is_a_warning_with_the_sizes(capsys):
    from engine.loop import warn_large_crop

    assert warn_large_crop([128, 128, 128], [(96, 100, 60), (80, 110, 64)])
    out = capsys.readouterr().out
    assert "data.crop=[128, 128, 128] is larger than the brain-cropped training cases (largest [96, 110, 64])" in out
    assert "73% or more of every crop is padding" in out  # 96 x 100 x 60 filled of 128^3: 27% at best
    assert not warn_large_crop([64, 64, 64], [(96, 100, 60), (80, 110, 64)])  # fits the largest
    assert not warn_large_crop([64, 64, 64], [(87, 87, 57)])  # the demo: 11% padding along z only
    assert warn_large_crop([64, 64, 64], [(30, 40, 57)])
    assert capsys.readouterr().out.count("warning") == 1


@pytest.mark.parametrize("select, best_epoch", [("pooled_dice_mean", 2), ("dice_mean", 1)])
def test_train_select_chooses_the_best_epoch_and_patience_counts_it(phantom, tmp_path, monkeypatch, select, best_epoch):
    """Epoch 1 scores the BraTS per-case mean higher (an empty ET scored 1 on the cases without ET), epoch 2
    the pooled Dice: `train.select` decides which one best.pt keeps."""
    scripted = iter([{"dice_wt": 0.7, "dice_tc": 0.6, "dice_et": 0.5, "dice_mean": 0.60, "pooled_dice_mean": 0.40},
                     {"dice_wt": 0.8, "dice_tc": 0.7, "dice_et": 0.2, "dice_mean": 0.57, "pooled_dice_mean": 0.55}])
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(next(scripted)))
    cfg = tiny_cfg(phantom, epochs=2, val_every=1, log_images=False, select=select)
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    best = Artifact.load(tmp_path / BEST)
    assert best.extra["epoch"] == best_epoch
    assert Artifact.load(tmp_path / LAST).extra["train_state"]["stale"] == (0 if best_epoch == 2 else 1)


@pytest.mark.parametrize("select, rising", [("pooled_dice_mean", True), ("dice_mean", False)])
def test_a_run_that_ends_while_still_improving_says_so(phantom, tmp_path, monkeypatch, capsys, select, rising):
    """Its last validation was its best: the epochs ran out, not the patience. Printed at the end, and
    readable from the artifact alone (the report lists such stages); not when an earlier epoch was best."""
    scripted = iter([{"dice_wt": 0.7, "dice_tc": 0.6, "dice_et": 0.5, "dice_mean": 0.60, "pooled_dice_mean": 0.40},
                     {"dice_wt": 0.8, "dice_tc": 0.7, "dice_et": 0.2, "dice_mean": 0.57, "pooled_dice_mean": 0.55}])
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(next(scripted)))
    cfg = tiny_cfg(phantom, epochs=2, val_every=1, log_images=False, select=select)
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    out = capsys.readouterr().out
    assert ("note: teacher: validation pooled_dice_mean was still rising when train.epochs=2 ran out "
            "(0.4000 -> 0.5500 at the last validation)" in out) is rising
    record = ended_rising(Artifact.load(tmp_path / BEST))  # best.pt re-saved with the record
    assert record == ({"epoch": 2, "epochs": 2, "select": "pooled_dice_mean", "earlier": 0.40, "last": 0.55}
                      if rising else None)
    assert ended_rising(Artifact.load(tmp_path / LAST)) is None  # a resumable checkpoint, not a product


def test_a_resumed_run_that_stops_rising_drops_the_record_from_best_pt(phantom, tmp_path, monkeypatch):
    regions = {"dice_wt": 0.5, "dice_tc": 0.5, "dice_et": 0.5, "dice_mean": 0.5}
    scripted = iter([{**regions, "pooled_dice_mean": v} for v in (0.40, 0.55, 0.50, 0.52)])
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(next(scripted)))
    cfg = tiny_cfg(phantom, epochs=2, val_every=1, log_images=False)
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    assert ended_rising(Artifact.load(tmp_path / BEST))["last"] == 0.55
    cfg.train.epochs = 4  # two more epochs, neither better than epoch 2
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    best = Artifact.load(tmp_path / BEST)
    assert best.extra["epoch"] == 2 and ended_rising(best) is None


def test_still_rising_needs_a_last_validation_better_than_every_earlier_one():
    val = lambda v: {"val": {"pooled_dice_mean": v}}  # noqa: E731
    assert still_rising([val(0.5), {"val": None}, val(0.6)], "pooled_dice_mean") == (0.5, 0.6)
    start = {"start": True, "val": {"pooled_dice_mean": 0.3}}  # the compressed model before its fine-tune
    assert still_rising([start, val(0.6)], "pooled_dice_mean") is None  # recovery, not a rise cut short
    assert still_rising([start, val(0.5), val(0.6)], "pooled_dice_mean") == (0.5, 0.6)
    assert still_rising([val(0.7), val(0.5), val(0.6)], "pooled_dice_mean") is None  # below epoch 1's
    assert still_rising([val(0.6), val(0.6)], "pooled_dice_mean") is None  # a tie is not a rise
    # a foreign data set's slim run: 0.6425 -> 0.6401 -> 0.6440 is noise at the schedule's end, not a rise
    assert still_rising([val(0.6425), val(0.6401), val(0.6440)], "pooled_dice_mean") is None
    assert still_rising([val(0.6425), val(0.6440)], "pooled_dice_mean", min_gain=0.001) == (0.6425, 0.6440)
    assert still_rising([val(0.6)], "pooled_dice_mean") is None  # one validation: nothing to compare
    assert still_rising([val(0.5), val(0.6)], "dice_mean") is None  # not the figure that selects


def test_ended_rising_reads_the_record_and_ignores_what_is_not_one():
    record = {"epoch": 20, "epochs": 20, "select": "pooled_dice_mean", "earlier": 0.559, "last": 0.674}
    art = Artifact(stage="student", spec={}, state_dict={}, extra={"rising": record})
    assert ended_rising(art) == record
    assert ended_rising(Artifact(stage="student", spec={}, state_dict={}, extra={"epoch": 20})) is None  # older artifact
    assert ended_rising(Artifact(stage="student", spec={}, state_dict={}, extra={"rising": {"epoch": "?"}})) is None
    assert ended_rising(Artifact(stage="student", spec={}, state_dict={},
                                 extra={"rising": record, "train_state": {}})) is None  # a last.pt


def test_an_unknown_train_select_is_refused_before_training(phantom, tmp_path):
    with pytest.raises(ConfigError, match="train.select='dice'.*pooled_dice_mean, dice_mean"):
        fit(tiny_model(), SupervisedStage(), tiny_cfg(phantom, select="dice"), tmp_path, stage_name="teacher")
    assert not (tmp_path / LAST).exists()


def test_resuming_a_run_from_before_train_select_keeps_its_own_figure(phantom, tmp_path, monkeypatch, capsys):
    """A last.pt written before train.select existed: its best epoch was chosen by dice_mean and its
    validations have no pooled Dice, so the resumed run goes on choosing by dice_mean (a later, worse
    epoch must not replace best.pt because the old best has no pooled figure to compare)."""
    regions = {"dice_wt": 0.5, "dice_tc": 0.5, "dice_et": 0.5}
    scripted = iter([{**regions, "dice_mean": 0.60}, {**regions, "dice_mean": 0.50, "pooled_dice_mean": 0.90}])
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(next(scripted)))
    cfg = tiny_cfg(phantom, epochs=1, val_every=1, log_images=False, select="dice_mean")  # the old rule
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    last = Artifact.load(tmp_path / LAST)
    del last.extra["train_state"]["select"]  # as written before the key existed
    last.save(tmp_path / LAST)
    cfg.train.epochs, cfg.train.select = 2, "pooled_dice_mean"  # today's default
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    assert "goes on choosing by dice_mean" in capsys.readouterr().out
    assert Artifact.load(tmp_path / BEST).extra["epoch"] == 1
    last = Artifact.load(tmp_path / LAST)
    assert last.extra["train_state"]["select"] == last.config["train"]["select"] == "dice_mean"  # what it did


def test_resuming_with_another_train_select_says_so_and_rescores_the_best(phantom, tmp_path, monkeypatch, capsys):
    regions = {"dice_wt": 0.5, "dice_tc": 0.5, "dice_et": 0.5}
    scripted = iter([{**regions, "dice_mean": 0.60, "pooled_dice_mean": 0.40},
                     {**regions, "dice_mean": 0.50, "pooled_dice_mean": 0.45}])
    monkeypatch.setattr(Trainer, "validate", lambda self, epoch: dict(next(scripted)))
    cfg = tiny_cfg(phantom, epochs=1, val_every=1, log_images=False, select="dice_mean")
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher")
    cfg.train.epochs, cfg.train.select = 2, "pooled_dice_mean"
    fit(tiny_model(), SupervisedStage(), cfg, tmp_path, stage_name="teacher", resume=True)
    assert "resuming with train.select=pooled_dice_mean (the run chose by dice_mean so far)" in capsys.readouterr().out
    assert Artifact.load(tmp_path / BEST).extra["epoch"] == 2  # 0.45 beats the first epoch's 0.40, by the new figure


class NanAfter(SupervisedStage):
    """The supervised loss, then from step `at` on a NaN in its Dice part (as a term can overflow)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, model, batch):
        self.calls += 1
        loss, logs = super().loss(model, batch)
        if self.calls >= self.at:
            loss, logs = loss * float("nan"), {**logs, "dice": float("nan")}
        return loss, logs


def test_a_nan_loss_stops_the_run_naming_the_step_its_cases_and_terms_and_last_pt_keeps_the_epoch_before(
        phantom, tmp_path):
    cfg = tiny_cfg(phantom, epochs=2, log_images=False)
    with pytest.raises(FloatingPointError) as err:
        fit(tiny_model(), NanAfter(at=3), cfg, tmp_path, stage_name="student")  # step 3: epoch 2's first
    msg = str(err.value)
    assert msg.startswith("student: loss is nan at epoch 2, step 2 (cases ['Brats17_")
    assert "terms: dice nan, ce " in msg and "set train.amp=off" in msg
    state = Artifact.load(tmp_path / LAST).extra["train_state"]
    assert state["epoch"] == 1 and state["global_step"] == 2  # the reproducer: --resume runs that step again
