"""Progressive growth: function-preserving widening, gradient scoring, budget selection, schedule."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, ArtifactError
from common.config import Config, ConfigError, GrowConfig
from compress.grow import (
    _selection_line,
    GROWN,
    GradientScorer,
    best_of,
    best_phase,
    check_config,
    dice_stalled,
    gradient_scores,
    grow_step,
    grown_width,
    growable_units,
    main,
    phase_decision,
    parse_count,
    select_units,
    spec_params,
    rank_units,
    unit_macs,
    unit_parameters,
    unit_width,
    widen,
)
from engine.loop import LAST, Stage, SupervisedStage, TrainingWrapper
from engine.runner import StageDef, run_stage
from model.layers import LowRankConv3d, LowRankLinear
from model.macs import count_macs, spec_macs
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
    scorer = GradientScorer(units)
    scorer.bind(model)
    for target in ["fuse_dim", "mlp_hidden.2.0", "mlp_hidden.2.0", "mlp_hidden.2.0"]:
        model.zero_grad(set_to_none=True)
        _unit_push_loss(model, target, 10.0).backward()
        scorer.record()
    scores = scorer.scores()
    # three of four steps pushed mlp_hidden.2.0 with gradient 10 (mean squared gradient 100 * 3/4)
    assert max(scores, key=scores.get) == "mlp_hidden.2.0"
    assert scores["mlp_hidden.2.0"] == pytest.approx(75.0, rel=0.05)
    assert scores["fuse_dim"] < 30.0
    assert len(scorer.history["fuse_dim"]) == 4


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
    quarter = RefineFormer3D(dataclasses.replace(tiny("refine", True).spec, head_at="quarter"))  # head at 1/4
    assert spec_macs(quarter.spec, size) == fvcore(quarter, size)
    half = RefineFormer3D(dataclasses.replace(quarter.spec, head_at="half"))  # head at 1/2
    assert spec_macs(half.spec, size) == fvcore(half, size) > spec_macs(quarter.spec, size)
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


def test_phase_decision():
    g = GrowConfig(min_delta=0.002, stop_after=2, max_events=2)
    grown, held = {"grown": [1]}, {"grown": []}
    assert phase_decision([], {"dice": 0.3}, g, epochs_left=4)[0] == "grow"
    assert phase_decision([{**grown, "dice": 0.3}], {"dice": 0.4}, g, 4)[0] == "grow"
    # two phases in a row without a 0.002 gain over the best before them
    assert phase_decision([{**grown, "dice": 0.5}, {**grown, "dice": 0.501}], {"dice": 0.5015}, g, 4) == (
        "stop", "Dice did not improve by 0.002 over 2 phase(s)")
    assert phase_decision([{**grown, "dice": 0.1}, {**grown, "dice": 0.2}], {"dice": 0.3}, g, 4)[1] == (
        "2 growth event(s) done")
    assert phase_decision([{**held, "dice": 0.1}], {"dice": 0.3}, g, 0) == ("stop", "train.epochs used up")


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
        ("window", 0, "grow.window must be >= 1"),
        ("patience", 0, "grow.patience must be >= 1"),
        ("top_k", 0, "grow.top_k must be >= 1"),
        ("factor", 1.0, "grow.factor must be > 1"),
        ("init", "bogus", "grow.init must be one of copy, random"),
        ("kinds", ["bogus"], "grow.kinds"),
        ("kinds", [], "grow.kinds"),
        ("max_events", -1, "grow.max_events and grow.noise must be >= 0"),
    ],
)
def test_bad_grow_config_fails_before_training(field, value, message):
    cfg = GrowConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        check_config(cfg, tiny("refine").spec)


class _Inner(Stage):
    """A stand-in for DistillStage: mean squared output."""

    def loss(self, model, batch):
        loss = model(batch["image"]).square().mean()
        return loss, {"loss": float(loss.detach())}

    def artifact_extra(self):
        return {"kd": 1}


def test_gradient_scores_pick_what_grow_step_widens_and_the_function_is_kept():
    model = tiny("allmlp")
    cfg = GrowConfig(top_k=2, factor=2.0)
    batches = [{"image": x_input()} for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = gradient_scores(model, model, _Inner(), batches)
    assert set(scores) == set(growable_units(model.spec)) and max(scores.values()) > 0
    assert all(p.grad is None for p in model.parameters())  # no step, no gradient left behind
    growth = grow_step(model, cfg, scores)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is unchanged
    grown = growth.model
    # default cost "macs": ranked by score per multiply-add of an added channel at 128^3
    per_mac = {u: s / unit_macs(model.spec, u, (128, 128, 128)) for u, s in scores.items()}
    assert [u for u, _, _ in growth.grown] == sorted(per_mac, key=per_mac.get, reverse=True)[:2]
    for unit, old, new in growth.grown:
        assert unit_width(grown.spec, unit) == new > old == unit_width(model.spec, unit)
    x = x_input()
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    full = GrowConfig(top_k=2, factor=2.0, budget=str(count_params(model)))
    assert grow_step(model, full, scores).grown == [] and grow_step(model, full, scores).model is model


def test_main_reports_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="nope.pt"):
        main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out"), "--config", "configs/grow.yaml"])


class _InterruptAfter(Stage):
    """Supervised loss; raises KeyboardInterrupt on loss call `n + 1` (a kill mid-epoch)."""

    def __init__(self, n: int | None = None):
        self.sup, self.n, self.calls = SupervisedStage(), n, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.n is not None and self.calls > self.n:
            raise KeyboardInterrupt
        return self.sup.loss(model, batch)


class _Killable(Stage):
    """Supervised loss; a kill (KeyboardInterrupt) on loss call `n + 1` of the whole run."""

    def __init__(self, counter: list, n: int | None = None):
        self.sup, self.n, self.counter = SupervisedStage(), n, counter

    def loss(self, model, batch):
        self.counter.append(1)
        if self.n is not None and len(self.counter) > self.n:
            raise KeyboardInterrupt
        return self.sup.loss(model, batch)


class _FlatValidation(TrainingWrapper):
    """Validation Dice never moves (all-background logits in eval), so with patience 1 every phase
    ends after one epoch and its best epoch is its start."""

    def forward(self, x):
        return self.product(x) if self.training else torch.zeros(x.shape[0], 3, *x.shape[2:])


def test_growth_is_fits_around_widenings_and_a_killed_run_resumes_exactly(tmp_path):
    """Three one-epoch phases, growth after the first two; killed in phase 1, the resumed run finds
    the grown model in phase1/last.pt and ends where the straight run ends: same units, same weights."""
    write_phantom_dataset(tmp_path / "data", cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    cfg = Config()
    cfg.data.dir, cfg.data.crop, cfg.data.val_fraction, cfg.data.max_val_cases = str(tmp_path / "data"), [32] * 3, 0.5, 1
    t = cfg.train
    t.window, t.overlap, t.sw_batch, t.threads, t.amp = [32] * 3, 0.25, 1, 1, "off"  # pinned: exact resume
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs, t.lr = 3, 2, 2, 0, 3e-3
    t.val_at_start, t.log_images = True, False
    cfg.grow = GrowConfig(top_k=1, window=2, patience=1, min_delta=-1.0, max_events=2, reference_input=[32] * 3)
    torch.manual_seed(0)
    micro = RefineFormer3D(ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
                                     decoder_dim=8, fuse_dim=8, refine_dim=4))
    Artifact(stage="student", spec=micro.spec.to_dict(), state_dict=micro.state_dict(),
             config={"data": {"scheme": "regions"}}).save(tmp_path / "student.pt")

    def run(out, n=None, resume=False):
        counter: list = []
        stage = StageDef("grown", step=GROWN.step, finetune=lambda m, ctx: (_FlatValidation(m), _Killable(counter, n)),
                         train=GROWN.train, finish=GROWN.finish, check=GROWN.check, resume_file=GROWN.resume_file)
        return run_stage(tmp_path / "student.pt", stage, copy.deepcopy(cfg), tmp_path / out, resume=resume)

    straight = run("straight")
    events = straight.extra["growth"]
    assert [(e["event"], e["epochs"], e["action"]) for e in events] == [(0, 1, "grow"), (1, 1, "grow"), (2, 1, "stop")]
    assert all(len(e["grown"]) == 1 for e in events[:2]) and events[2]["reason"] == "2 growth event(s) done"
    # validation Dice tied across phases: the earliest (smallest) best epoch is kept, and marked so
    assert ModelSpec.from_dict(straight.spec) == micro.spec
    assert [e["kept"] for e in events] == [True, False, False]
    assert straight.metrics["params_after"] == straight.metrics["params_before"]
    last = {run: Artifact.load(tmp_path / run / "phase2" / LAST) for run in ("straight",)}
    assert ModelSpec.from_dict(last["straight"].spec) != micro.spec  # phase 2 trained the twice-grown model
    assert count_params(model_from_spec(last["straight"].spec)) == events[1]["params_after"]
    assert sorted(p.name for p in (tmp_path / "straight").iterdir() if p.name != ".lock") == [
        "grown.pt", "growth.json", "phase0", "phase1", "phase2"]
    assert (tmp_path / "straight" / "phase1" / "start.pt").is_file()

    with pytest.raises(KeyboardInterrupt):  # phase 0: 2 steps + 2 scoring passes; dies in phase 1's epoch
        run("resumed", n=5)
    assert (tmp_path / "resumed" / "phase1" / LAST).is_file() and not (tmp_path / "resumed" / "phase2").exists()
    resumed = run("resumed", resume=True)
    assert [[g["unit"] for g in e["grown"]] for e in resumed.extra["growth"]] == [
        [g["unit"] for g in e["grown"]] for e in events]
    final = Artifact.load(tmp_path / "resumed" / "phase2" / LAST)
    assert final.spec == last["straight"].spec
    for k, v in final.state_dict.items():
        assert torch.equal(v, last["straight"].state_dict[k]), k  # fp32, same kernels and threads: bit for bit
    assert [e["dice"] for e in resumed.extra["growth"]] == pytest.approx([e["dice"] for e in events], abs=1e-6)
    with pytest.raises(ArtifactError, match="nothing to resume"):
        run("never", resume=True)
    # a new run in the same folder (--overwrite) leaves no phase of the old one to be resumed later
    cfg.grow.max_events = 0
    again = run("straight")
    assert [e["action"] for e in again.extra["growth"]] == ["stop"]
    assert sorted(p.name for p in (tmp_path / "straight").iterdir() if p.name != ".lock") == ["grown.pt", "growth.json", "phase0"]


def test_a_grown_phase_is_kept_only_when_it_beats_the_earlier_ones_by_min_delta():
    from engine.loop import FitResult

    def phases(*dice: float) -> list:
        return [FitResult(None, Path(f"p{i}"), {"pooled_dice_mean": d}, [{"epoch": 1, "val": {"pooled_dice_mean": d}}])
                for i, d in enumerate(dice)]

    # +0.0005 over the un-grown phase is noise: the smaller model stays; +0.003 is a gain: the grown one wins
    assert best_phase(phases(0.8921, 0.8926), "pooled_dice_mean", 0.002) == 0
    assert best_phase(phases(0.8921, 0.8926, 0.8930), "pooled_dice_mean", 0.002) == 0
    assert best_phase(phases(0.890, 0.893, 0.894), "pooled_dice_mean", 0.002) == 1
    assert best_phase(phases(0.890, 0.895), "pooled_dice_mean", 0.0) == 1
    # a tie keeps the earlier (smaller) model whatever min_delta, a negative one included
    assert best_phase(phases(0.89, 0.89), "pooled_dice_mean", -1.0) == 0
    assert best_phase(phases(0.89, 0.88), "pooled_dice_mean", -1.0) == 0
    result = best_of(phases(0.890, 0.893, 0.894), 1)
    assert result.best_metrics == {"pooled_dice_mean": 0.893} and result.last_path == Path("p2")
    assert [h["phase"] for h in result.history] == [0, 1, 2]


def test_the_closing_line_names_the_kept_phase_its_epoch_and_the_selecting_figure():
    """The grow CLI's last line: which phase and which of its epochs the artifact is, by which figure (the
    line once printed a within-phase epoch beside the per-case mean only, not the figure that chose it)."""
    art = Artifact(stage="grown", spec={}, state_dict={},
                   metrics={"pooled_dice_mean": 0.91234, "dice_mean": 0.93456},
                   extra={"best_epoch": 7, "growth": [{"kept": False}, {"kept": True}, {"kept": False}]})
    assert _selection_line(art, "pooled_dice_mean") == "phase 1, its epoch 7: pooled_dice_mean 0.9123, dice_mean 0.9346"
    assert _selection_line(art, "dice_mean") == "phase 1, its epoch 7: dice_mean 0.9346"
    art.extra["best_epoch"] = 0
    assert _selection_line(art, "dice_mean").startswith("phase 1, its epoch 0 (its start, before fine-tuning): ")
    art.extra = {}
    assert _selection_line(art, "dice_mean") == "no fine-tune: dice_mean 0.9346"
