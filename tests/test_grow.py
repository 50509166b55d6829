"""Progressive growth: function-preserving widening, gradient scoring, budget selection, schedule."""
from __future__ import annotations

import copy

import pytest
import torch

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, ArtifactError
from common.config import Config, ConfigError, GrowConfig
from compress.grow import (
    GradientScorer,
    GrowStage,
    GrowthSchedule,
    check_config,
    dice_stalled,
    grown_width,
    growable_units,
    is_plateau,
    main,
    parse_count,
    select_units,
    spec_params,
    rank_units,
    spec_macs,
    unit_macs,
    unit_parameters,
    unit_width,
    widen,
)
from engine.loop import Stage, SupervisedStage, fit
from model.layers import LowRankConv3d, LowRankLinear
from model.macs import count_macs
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params, get_module, model_from_spec

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
@pytest.mark.parametrize("factorised", [False, True])
def test_every_widening_preserves_output_and_rebuilds(decoder, factorised):
    """Copy and random init alternate over the units, shifted between decoders, so every unit
    shared by both decoders is checked with both."""
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
        unit_init = ("copy", "random")[(k + (decoder == "allmlp")) % 2]
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
    chosen = select_units(model, scores, top_k=2, factor=2.0, budget=None, cost="params")
    assert chosen == [("mlp_hidden.3.0", 128, 256), ("mlp_hidden.0.0", 64, 128)]
    # per new MLP channel: fc1 row + bias, dwconv 27 + bias, bn 2, fc2 column: 128 * 95 and 64 * 63
    cost3 = spec_params(widen(model, "mlp_hidden.3.0", 256).spec) - n
    cost0 = spec_params(widen(model, "mlp_hidden.0.0", 128).spec) - n
    assert (cost3, cost0) == (12_160, 4_032)
    chosen = select_units(model, scores, top_k=2, factor=2.0, budget=n + 5_000, cost="params")
    assert [c[0] for c in chosen] == ["mlp_hidden.0.0", "refine_dim"]  # the top unit does not fit
    assert select_units(model, scores, top_k=2, factor=2.0, budget=n, cost="params") == []
    # units without gradient signal never grow, even with room left
    assert len(select_units(model, scores, top_k=5, factor=2.0, cost="params")) == 3


def test_spec_macs_and_unit_costs_match_count_macs():
    """The analytic count equals fvcore's on tiny models (dense refine, low-rank allmlp, a non-cubic
    input), and a unit's per-channel cost times the channels added equals
    count_macs(widened) - count_macs(model)."""

    def fvcore(m, size):
        return round(count_macs(m, (1, 4, *size)) * 1e9)

    size = (32, 32, 64)
    for decoder, factorised in [("refine", False), ("allmlp", True)]:
        model = tiny(decoder, factorised)
        assert spec_macs(model.spec, size) == fvcore(model, size), (decoder, factorised)
    model = tiny("refine", factorised=True)
    base = fvcore(model, size)
    assert spec_macs(model.spec, size) == base
    # dense MLP with low-rank fc1/fc2, low-rank q/kv/proj, a rank, the fusion (low-rank fuse), the refine width
    units = ["mlp_hidden.1.0", "attn_dims.2", "ranks.decoder.head", "fuse_dim", "refine_dim"]
    for unit in units:
        old, new = unit_width(model.spec, unit), grown_width(model, unit, 2.0)
        delta = fvcore(widen(model, unit, new), size) - base
        assert delta > 0 and unit_macs(model.spec, unit, size) * (new - old) == delta, unit


def test_unit_costs_by_hand():
    """Tiny refine model at 32^3: stage grids 8^3, 4^3, 2^3, 1^3 tokens; embed 16, 32, 32, 32."""
    spec, size = tiny("refine").spec, (32, 32, 32)
    # refine_dim: refine_pw row (fuse 16 x 512 voxels), its BN (2 x 512), trilinear x4 (8 x 32^3),
    # head 3x3x3 input column (27 x 3 classes x 32^3): full resolution dominates
    assert unit_macs(spec, "refine_dim", size) == 16 * 512 + 2 * 512 + 8 * 32**3 + 27 * 3 * 32**3 == 2_925_568
    # an MLP hidden channel on stage 3's single token: fc1 row 32 + dwconv 27 + BN 2 + fc2 column 32
    assert unit_macs(spec, "mlp_hidden.3.0", size) == 93
    assert unit_macs(spec, "mlp_hidden.2.0", size) == 8 * 93
    # attention dim of stage 1 (64 tokens, keys/values from 8): q row, k and v rows, q.k and p.v, proj column
    assert unit_macs(spec, "attn_dims.1", size) == 32 * 64 + 2 * 32 * 8 + 2 * 64 * 8 + 32 * 64 == 5_632


def test_macs_ranking_picks_the_cheaper_unit():
    model, size = tiny("refine"), (32, 32, 32)
    ratio = unit_macs(model.spec, "refine_dim", size) / unit_macs(model.spec, "mlp_hidden.3.0", size)

    def first(scores: dict, cost: str) -> str:
        return select_units(model, scores, top_k=1, factor=2.0, cost=cost, input_size=size)[0][0]

    equal = {"refine_dim": 1.0, "mlp_hidden.3.0": 1.0}
    assert first(equal, "macs") == "mlp_hidden.3.0"
    # params ranks by score alone: a slightly larger gradient wins; macs needs it larger than the cost ratio
    assert first({**equal, "refine_dim": 2.0}, "params") == "refine_dim"
    assert first({**equal, "refine_dim": 0.99 * ratio}, "macs") == "mlp_hidden.3.0"
    assert first({**equal, "refine_dim": 1.01 * ratio}, "macs") == "refine_dim"
    ranked = rank_units(model.spec, {**equal, "fuse_dim": 1.0}, "macs", size)
    assert [u for u, _ in ranked] == ["mlp_hidden.3.0", "fuse_dim", "refine_dim"]
    assert ranked[0][1] == pytest.approx(1 / 93)
    with pytest.raises(ValueError, match="flops"):
        rank_units(model.spec, equal, "flops", size)


def test_macs_budget_blocks_a_widening_that_exceeds_it():
    model, size = tiny("refine"), (32, 32, 32)
    base = spec_macs(model.spec, size)
    scores = {"mlp_hidden.3.0": 1.0, "mlp_hidden.2.0": 1.0}  # costs 93 and 744 per channel, 128 channels each

    def chosen(macs_budget):
        return [u for u, _, _ in select_units(model, scores, top_k=2, factor=2.0, macs_budget=macs_budget,
                                              input_size=size)]

    assert chosen(None) == ["mlp_hidden.3.0", "mlp_hidden.2.0"]
    assert chosen(base + 128 * (93 + 744)) == ["mlp_hidden.3.0", "mlp_hidden.2.0"]  # exactly at the budget
    assert chosen(base + 128 * (93 + 744) - 1) == ["mlp_hidden.3.0"]  # both together exceed it by one
    assert chosen(base + 128 * 93 - 1) == []
    assert chosen(base + 128 * 93) == ["mlp_hidden.3.0"]
    # the best-ranked unit does not fit, the next one does
    scores["mlp_hidden.2.0"] = 10.0  # 10 / 744 per MAC beats 1 / 93
    assert chosen(None) == ["mlp_hidden.2.0", "mlp_hidden.3.0"]
    assert chosen(base + 128 * 744 - 1) == ["mlp_hidden.3.0"]


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
    "text, expected",
    [("500k", 500_000), ("1.2M", 1_200_000), ("3G", 3_000_000_000), ("30000", 30_000), (None, None), (7, 7)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_parse_count_rejects_garbage():
    with pytest.raises(ValueError, match="12q"):
        parse_count("12q")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("cost", "flops", "grow.cost must be one of params, macs"),
        ("macs_budget", "3Q", "grow.macs_budget '3Q' is not a count"),
        ("budget", "-5k", "grow.budget '-5k' is not a count"),
        ("reference_input", [128, 128], "three positive sizes"),
        ("reference_input", [96, 128, 100], r"\[96, 128, 100\] must be multiples of the model's stride 32"),
    ],
)
def test_bad_grow_config_fails_before_training(field, value, message):
    cfg = GrowConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, tiny("refine").spec)
    if field != "reference_input" or len(value) != 3:  # the stride check needs the model
        with pytest.raises(ConfigError, match=message):
            GrowStage(_Inner(), cfg)


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
    # default cost "macs": ranked by score per multiply-add of an added channel at 128^3
    per_mac = {u: s / unit_macs(model.spec, u, (128, 128, 128)) for u, s in scores.items()}
    assert [g["unit"] for g in event["grown"]] == sorted(per_mac, key=per_mac.get, reverse=True)[:2]
    assert [g["macs_per_channel"] for g in event["grown"]] == [unit_macs(model.spec, g["unit"], (128,) * 3)
                                                             for g in event["grown"]]
    assert scores[event["grown"][0]["unit"]] > 0
    assert event["gmacs"] == spec_macs(model.spec, (128,) * 3) / 1e9
    assert event["gmacs_after"] == spec_macs(grown.spec, (128,) * 3) / 1e9 > event["gmacs"]
    assert len(stage.scorer.history[event["grown"][0]["unit"]]) == 2  # the window restarted: one epoch since growth
    state = copy.deepcopy(stage.state_dict())
    other = GrowStage(_Inner(), cfg)
    other.load_state_dict(state)
    assert other.history == history and other.schedule.growths == 1


def test_main_reports_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="nope.pt"):
        main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out"), "--config", "configs/grow.yaml"])


def test_grow_stage_state_survives_last_pt_and_a_rebuilt_model(tmp_path):
    """What a resumed run needs: schedule, history, score window, pending losses and the growth
    noise generator round-trip through a weights-only checkpoint, and a rebuilt model keeps the window."""
    model = tiny("refine")
    cfg = GrowConfig(window=4, patience=2, min_rel_change=0.5)
    stage = GrowStage(_Inner(), cfg, seed=5)
    trainer = _Trainer(model)
    stage.setup(trainer)
    batch = {"image": x_input()}
    for _ in range(3):
        model.zero_grad()
        stage.loss(trainer.model, batch)[0].backward()
        stage.after_backward(trainer)
    assert stage.on_epoch_end(trainer, 0, {"dice_mean": 0.1}) is False  # one loss: no event yet
    stage.loss(trainer.model, batch)  # a step into the next epoch: a pending loss
    torch.randn(3, generator=stage.gen)  # advance the generator (as a growth event does)
    torch.save(stage.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    other = GrowStage(_Inner(), cfg, seed=0)
    other.load_state_dict(state)  # before setup, as the engine does when it rebuilds the model
    rebuilt = model_from_spec(model.spec.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    other.setup(_Trainer(rebuilt))
    assert other.scorer.model is rebuilt
    assert other.scorer.scores() == stage.scorer.scores() and max(stage.scorer.scores().values()) > 0
    assert len(other.scorer.history["refine_dim"]) == 3
    assert other._losses == stage._losses and len(other._losses) == 1
    assert other.schedule.losses == stage.schedule.losses and len(other.schedule.losses) == 1
    assert torch.equal(torch.randn(5, generator=other.gen), torch.randn(5, generator=stage.gen))
    # loaded into a stage that already scores a model: the window is replaced, then kept on rebinding
    third = GrowStage(_Inner(), cfg)
    third.setup(_Trainer(tiny("refine", seed=1)))
    third.load_state_dict(state)
    third._bind(rebuilt)
    assert third.scorer.scores() == stage.scorer.scores()
    assert GrowStage.rebuild_on_resume is True


class _InterruptAfter(Stage):
    """Supervised loss; raises KeyboardInterrupt on loss call `n + 1` (a kill mid-epoch)."""

    def __init__(self, n: int | None = None):
        self.sup, self.n, self.calls = SupervisedStage(), n, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.n is not None and self.calls > self.n:
            raise KeyboardInterrupt
        return self.sup.loss(model, batch)


def test_resumed_growth_run_matches_an_uninterrupted_one(tmp_path):
    """Grow at epochs 2 and 3 of 3; killed in epoch 3 (after one growth), the resumed run rebuilds
    the grown model from last.pt and ends where the straight run ends: same units, same weights."""
    write_phantom_dataset(tmp_path / "data", cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    cfg = Config()
    cfg.data.dir, cfg.data.crop, cfg.data.val_fraction, cfg.data.max_val_cases = str(tmp_path / "data"), [32] * 3, 0.5, 1
    t = cfg.train
    t.window, t.overlap, t.sw_batch, t.threads, t.amp = [32] * 3, 0.25, 1, 1, "off"  # pinned: exact resume
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs, t.lr = 3, 2, 2, 0, 3e-3
    # every validated epoch after the first is a plateau, every event may grow: growth at epochs 2 and 3
    grow = GrowConfig(top_k=1, window=4, patience=1, min_rel_change=10.0, min_delta=-1.0, max_events=2,
                      reference_input=[32, 32, 32])

    def micro() -> RefineFormer3D:
        torch.manual_seed(0)
        return RefineFormer3D(ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                                        decoder_dim=8, fuse_dim=8, refine_dim=4))

    def run(out, n=None, resume=False):
        stage = GrowStage(_InterruptAfter(n), grow, seed=0)
        return fit(micro(), stage, cfg, tmp_path / out, stage_name="grown", resume=resume), stage

    straight, s_stage = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("resumed", n=5)  # dies in epoch 3
    last = Artifact.load(tmp_path / "resumed" / "last.pt")
    assert last.extra["train_state"]["epoch"] == 2 and len(last.extra["growth"]) == 1
    resumed, r_stage = run("resumed", resume=True)
    grown = [[g["unit"] for g in e["grown"]] for e in s_stage.history]
    assert len(grown) == 2 and all(len(g) == 1 for g in grown)
    assert [[g["unit"] for g in e["grown"]] for e in r_stage.history] == grown
    assert resumed.model.spec == straight.model.spec != micro().spec
    final = straight.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, final[k]), k  # fp32, same kernels and threads: bit for bit
    assert [h["val"]["dice_mean"] for h in resumed.history] == pytest.approx(
        [h["val"]["dice_mean"] for h in straight.history], abs=1e-6)
