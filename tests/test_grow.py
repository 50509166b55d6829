"""Progressive growth: function-preserving widening, gradient scoring, budget selection, schedule."""
from __future__ import annotations

import copy

import pytest
import torch

from common.config import GrowConfig
from compress.grow import (
    GradientScorer,
    GrowStage,
    GrowthSchedule,
    dice_stalled,
    grown_width,
    growable_units,
    is_plateau,
    parse_count,
    select_units,
    spec_params,
    unit_parameters,
    unit_width,
    widen,
)
from teacher.engine import Stage
from teacher.layers import LowRankConv3d, LowRankLinear
from teacher.model import ModelSpec, RefineFormer3D, count_params, get_module, model_from_spec

RANKS_COMMON = {
    "encoder.stages.0.patch_embed.proj": 4,  # LowRankConv3d, kernel 7
    "encoder.stages.0.blocks.0.attn.sr": 4,  # LowRankConv3d inside attention (embed width, not grown)
    "encoder.stages.1.blocks.0.mlp.fc1": 4,
    "encoder.stages.1.blocks.0.mlp.fc2": 4,
    "encoder.stages.2.blocks.0.attn.q": 4,
    "encoder.stages.2.blocks.0.attn.kv": 4,
    "encoder.stages.2.blocks.0.attn.proj": 4,
    "decoder.fuse": 8,
}
RANKS = {
    "refine": {**RANKS_COMMON, "decoder.refine_pw": 2, "decoder.head": 2},
    "allmlp": {**RANKS_COMMON, "decoder.pred": 2},
}


def tiny(decoder: str, factorised: bool = False, seed: int = 0) -> RefineFormer3D:
    """Tiny model with every weight, bias and BN running stat random (so zeros are not free)."""
    torch.manual_seed(seed)
    spec = ModelSpec(
        decoder=decoder, embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1],
        decoder_dim=16, fuse_dim=16, refine_dim=4, ranks=dict(RANKS[decoder]) if factorised else {},
    )
    model = RefineFormer3D(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def x_input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 32, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
@pytest.mark.parametrize("factorised, init", [(False, "copy"), (False, "random"), (True, "mixed")])
def test_every_widening_preserves_output_and_rebuilds(decoder, factorised, init):
    model = tiny(decoder, factorised)
    x = x_input()
    units = growable_units(model.spec)
    if factorised:
        assert {u for u in units if u.startswith("ranks.")} == {f"ranks.{n}" for n in RANKS[decoder]}
        # only the units whose layers are factorised here (the others are covered unfactorised)
        units = [u for u in units if u.split(".")[0] in ("ranks", "fuse_dim", "refine_dim")
                 or u in ("mlp_hidden.1.0", "attn_dims.2")]
    assert ("refine_dim" in units) == (decoder == "refine")
    with torch.no_grad():  # a train-mode forward updates running stats: run it on a copy
        ref_eval = model.eval()(x)
        ref_train = copy.deepcopy(model).train()(x)
    for k, unit in enumerate(units):
        unit_init = ("copy", "random")[k % 2] if init == "mixed" else init
        old = unit_width(model.spec, unit)
        width = grown_width(model, unit, 2.0)
        assert width is not None and width > old, unit
        new = widen(model, unit, width, init=unit_init, generator=torch.Generator().manual_seed(3))
        assert unit_width(new.spec, unit) == width
        assert count_params(new) > count_params(model), unit
        assert new.spec.attn_scales == model.spec.attn_scales  # scores keep their scale
        with torch.no_grad():
            torch.testing.assert_close(new.eval()(x), ref_eval, atol=1e-5, rtol=1e-5, msg=f"{unit} eval")
            torch.testing.assert_close(new.train()(x), ref_train, atol=1e-5, rtol=1e-5, msg=f"{unit} train")
        # the grown model rebuilds from its plain-data spec and loads strictly
        rebuilt = model_from_spec(new.spec.to_dict())
        rebuilt.load_state_dict(new.state_dict(), strict=True)
        assert count_params(rebuilt) == count_params(new)


def test_widths_and_new_channels_are_trainable():
    model = tiny("refine")
    new = widen(model, "mlp_hidden.1.0", 256, init="random")
    mlp = get_module(new, "encoder.stages.1.blocks.0.mlp")
    assert mlp.fc1.weight.shape == (256, 32) and mlp.fc2.weight.shape == (32, 256)
    assert mlp.dwconv.weight.shape[0] == 256 and mlp.bn.running_var.shape == (256,)
    assert torch.equal(mlp.fc2.weight[:, 128:], torch.zeros(32, 128))  # outgoing side zero
    assert mlp.fc1.weight[128:].abs().sum() > 0  # incoming side not dead
    assert torch.equal(mlp.bn.running_var[128:], torch.ones(128))  # identity-ish BN in random init
    new(x_input()).square().mean().backward()
    assert mlp.fc2.weight.grad[:, 128:].abs().sum() > 0  # the new channels receive gradient

    # attention: head blocks grow 16 -> 24 each; head h's old dims stay at h*24 + [0, 16)
    attn_old = get_module(model, "encoder.stages.1.blocks.0.attn")
    grown = widen(model, "attn_dims.1", 48, init="copy")
    attn = get_module(grown, "encoder.stages.1.blocks.0.attn")
    assert attn.q.weight.shape == (48, 32) and attn.kv.weight.shape == (96, 32) and attn.proj.weight.shape == (32, 48)
    assert torch.equal(attn.q.weight[24:40], attn_old.q.weight[16:32])  # head 1's old dims
    k_new = attn.kv.weight[:48].reshape(2, 24, 32)[:, 16:]
    assert torch.equal(k_new, torch.zeros_like(k_new))  # new key dims zero -> scores unchanged
    assert torch.equal(attn.proj.weight[:, 16:24], torch.zeros(32, 8))

    # rank grows up to the full rank, then the unit is no longer growable
    fact = tiny("refine", factorised=True)
    fc1 = "ranks.encoder.stages.1.blocks.0.mlp.fc1"  # Linear 32 -> 128: full rank 32
    assert grown_width(fact, fc1, 2.0) == 8 and grown_width(fact, fc1, 100.0) == 32
    full = widen(fact, fc1, 32)
    assert isinstance(get_module(full, fc1[6:]), LowRankLinear) and grown_width(full, fc1, 2.0) is None
    assert isinstance(get_module(fact, "encoder.stages.0.patch_embed.proj"), LowRankConv3d)
    with pytest.raises(ValueError, match="full rank"):
        widen(fact, fc1, 33)
    with pytest.raises(ValueError, match="cannot widen"):
        widen(model, "fuse_dim", 16)
    with pytest.raises(ValueError, match="not divisible"):
        widen(model, "attn_dims.1", 33)


def _unit_push_loss(model, unit: str, weight: float) -> torch.Tensor:
    params = dict(model.named_parameters())
    return model(x_input()).mean() + weight * sum(params[n].sum() for n in unit_parameters(model, unit))


def test_scorer_ranks_the_unit_with_the_largest_gradient():
    model = tiny("refine")
    units = growable_units(model.spec)
    scorer = GradientScorer(units, window=3)
    scorer.bind(model)
    for target in ["fuse_dim", "mlp_hidden.2.0", "mlp_hidden.2.0", "mlp_hidden.2.0"]:
        model.zero_grad(set_to_none=True)
        _unit_push_loss(model, target, 10.0).backward()
        scorer.record()
    scores = scorer.scores()
    # the window (3) forgot the fuse_dim step: every kept step pushed mlp_hidden.2.0 with gradient 10
    assert max(scores, key=scores.get) == "mlp_hidden.2.0"
    assert scores["mlp_hidden.2.0"] == pytest.approx(100.0, rel=0.05)
    assert scores["fuse_dim"] < 1.0
    assert len(scorer.history["fuse_dim"]) == 3


def test_select_units_respects_top_k_and_budget():
    model = tiny("refine")
    assert spec_params(model.spec) == count_params(model)
    scores = {u: 0.0 for u in growable_units(model.spec)}
    scores.update({"mlp_hidden.3.0": 3.0, "mlp_hidden.0.0": 2.0, "refine_dim": 1.0})
    n = count_params(model)
    chosen = select_units(model, scores, top_k=2, factor=2.0, budget=None)
    assert chosen == [("mlp_hidden.3.0", 128, 256), ("mlp_hidden.0.0", 64, 128)]
    # per new MLP channel: fc1 row + bias, dwconv 27 + bias, bn 2, fc2 column: 128 * 95 and 64 * 63
    cost3 = spec_params(widen(model, "mlp_hidden.3.0", 256).spec) - n
    cost0 = spec_params(widen(model, "mlp_hidden.0.0", 128).spec) - n
    assert (cost3, cost0) == (12_160, 4_032)
    chosen = select_units(model, scores, top_k=2, factor=2.0, budget=n + 5_000)
    assert [c[0] for c in chosen] == ["mlp_hidden.0.0", "refine_dim"]  # the top unit does not fit
    assert select_units(model, scores, top_k=2, factor=2.0, budget=n) == []


@pytest.mark.parametrize(
    "losses, patience, expected",
    [
        ([1.0, 0.9], 2, False),  # too short
        ([1.0, 0.9, 0.8], 2, False),  # 20% better
        ([1.0, 0.995, 0.999], 2, True),  # < 1% better over 2 epochs
        ([1.0, 1.02, 1.01], 2, True),  # worse counts as flat
        ([1.0, 0.995, 0.98], 2, False),  # exactly 2% better in the window
        ([2.0, 1.0, 0.999], 1, True),  # only the last step counts with patience 1
    ],
)
def test_is_plateau(losses, patience, expected):
    assert is_plateau(losses, patience, 0.01) is expected


@pytest.mark.parametrize(
    "dice, stop_after, expected",
    [
        ([0.5, 0.6], 2, False),  # not enough events yet
        ([0.5, 0.6, 0.7], 2, False),
        ([0.5, 0.501, 0.5015], 2, True),  # gains below min_delta 0.002
        ([0.5, 0.49, 0.503], 2, False),  # the last event beats 0.5 by 0.003
        ([0.7, 0.6, 0.65], 2, True),  # fell below the earlier best
        ([0.5, 0.6, 0.6], 1, True),
    ],
)
def test_dice_stalled(dice, stop_after, expected):
    assert dice_stalled(dice, 0.002, stop_after) is expected


@pytest.mark.parametrize(
    "steps, expected",
    [
        # (loss, dice) per epoch -> actions; patience 2, min_rel 1%, min_delta 0.002, stop_after 2, max_events 2
        ([(1.0, 0.1), (0.8, 0.2), (0.6, 0.3)], ["train", "train", "train"]),
        ([(1.0, 0.1), (1.0, 0.2), (1.0, 0.3)], ["train", "train", "grow"]),
        # after an event the window restarts: two more flat epochs before the next one, Dice fell -> hold
        ([(1.0, 0.1), (1.0, 0.2), (1.0, 0.3), (1.0, 0.3), (1.0, 0.29)], ["train", "train", "grow", "train", "hold"]),
        # Dice stalls over two events after the first -> stop
        ([(1, .3)] * 7, ["train", "train", "grow", "train", "hold", "train", "stop"]),
        # max_events 2 growths, then the next plateau stops
        ([(1, .1), (1, .1), (1, .2), (1, .2), (1, .3), (1, .3), (1, .4)],
         ["train", "train", "grow", "train", "grow", "train", "stop"]),
    ],
)
def test_growth_schedule(steps, expected):
    schedule = GrowthSchedule(patience=2, min_rel_change=0.01, min_delta=0.002, stop_after=2, max_events=2)
    assert [schedule.step(loss, dice)[0] for loss, dice in steps] == expected


@pytest.mark.parametrize(
    "text, expected", [("500k", 500_000), ("1.2M", 1_200_000), ("30000", 30_000), (None, None), (7, 7)]
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_parse_count_rejects_garbage():
    with pytest.raises(ValueError, match="12q"):
        parse_count("12q")


class _Inner(Stage):
    """A stand-in for DistillStage: mean squared output."""

    def loss(self, model, batch):
        loss = model(batch["image"]).square().mean()
        return loss, {"loss": float(loss.detach())}

    def artifact_extra(self):
        return {"kd": 1}


class _Trainer:
    def __init__(self, model):
        self.model = model
        self.replaced = []

    def replace_model(self, new):
        self.model = new
        self.replaced.append(new)


def test_grow_stage_grows_at_a_plateau_and_records_history():
    model = tiny("allmlp")
    cfg = GrowConfig(top_k=2, factor=2.0, window=4, patience=1, min_rel_change=0.5, max_events=1)
    stage = GrowStage(_Inner(), cfg)
    trainer = _Trainer(model)
    stage.setup(trainer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = {"image": x_input()}
    x = batch["image"]
    actions = []
    for epoch, dice in enumerate([0.2, 0.3, 0.3]):
        for _ in range(2):
            opt.zero_grad()
            loss, _ = stage.loss(trainer.model, batch)
            loss.backward()
            stage.after_backward(trainer)
        before = trainer.model
        with torch.no_grad():
            out_before = before.eval()(x)
        stop = stage.on_epoch_end(trainer, epoch, {"dice_mean": dice})
        actions.append(stop)
        if trainer.model is not before:  # grown: same function, more parameters
            with torch.no_grad():
                torch.testing.assert_close(trainer.model.eval()(x), out_before, atol=1e-5, rtol=1e-5)
            opt = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
        trainer.model.train()
    # lr 0: flat loss -> with patience 1 an event at epoch 1 (grow) and epoch 2 (max_events reached -> stop)
    assert actions == [False, False, True]
    assert len(trainer.replaced) == 1
    grown = trainer.model
    history = stage.artifact_extra()["growth"]
    assert stage.artifact_extra()["kd"] == 1
    assert [(e["epoch"], e["action"]) for e in history] == [(1, "grow"), (2, "stop")]
    event = history[0]
    assert len(event["grown"]) == 2 and event["params"] == count_params(model)
    assert event["params_after"] == count_params(grown)
    for g in event["grown"]:
        assert unit_width(grown.spec, g["unit"]) == g["new"] > g["old"] == unit_width(model.spec, g["unit"])
    assert stage.artifact_spec(grown) == grown.spec.to_dict()
    # the scorer follows the new model, and the units grown were the two best scored before growth
    assert stage.scorer.model is grown
    scores = event["scores"]
    assert [g["unit"] for g in event["grown"]] == sorted(scores, key=scores.get, reverse=True)[:2]
    assert scores[event["grown"][0]["unit"]] > 0
    assert len(stage.scorer.history[event["grown"][0]["unit"]]) == 2  # the window restarted: one epoch since growth
    state = copy.deepcopy(stage.state_dict())
    other = GrowStage(_Inner(), cfg)
    other.load_state_dict(state)
    assert other.history == history and other.schedule.growths == 1


def test_main_reports_missing_artifact(tmp_path):
    from common.artifact import ArtifactError
    from compress.grow import main

    with pytest.raises(ArtifactError, match="nope.pt"):
        main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out"), "--config", "configs/grow.yaml"])
