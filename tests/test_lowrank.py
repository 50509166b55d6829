"""Low-rank surgery: exactness at full rank, optimal truncation, rank selection, budget, round-trip."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, ArtifactError, build_model
from common.config import ConfigError, LowRankConfig
from compress.lowrank import (
    REGION_TAIL,
    BudgetError,
    Candidate,
    budget_ranks,
    candidates,
    factorise_,
    factorise_layer,
    format_table,
    lowrank_params,
    main,
    max_saving_rank,
    parse_count,
    rank_for_energy,
    rank_for_ratio,
    saves_params,
    search_share,
    selection,
)
from model.layers import LowRankConv3d, LowRankLinear
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16, refine_dim=4)


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lowrank.yaml"


def tiny_model(seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(ModelSpec(**TINY)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- one layer


def test_linear_full_rank_reproduces_output():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(12, 20))
    x = torch.randn(5, 12)
    ref = seq(x)
    new = factorise_layer(seq, "0", 12)
    assert isinstance(seq[0], LowRankLinear) and new.rank == 12
    assert new.down.weight.shape == (12, 12) and new.up.weight.shape == (20, 12)
    assert rel_err(seq(x), ref) < 1e-5


@pytest.mark.parametrize(
    "in_ch, out_ch, kernel, stride, padding, size",
    [(4, 16, 7, 4, 3, 16), (8, 6, 3, 1, 1, 6), (6, 10, 2, 2, 0, 8)],
)
def test_conv3d_full_rank_reproduces_output(in_ch, out_ch, kernel, stride, padding, size):
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding))
    x = torch.randn(2, in_ch, size, size, size)
    ref = seq(x)
    full = min(out_ch, in_ch * kernel**3)
    new = factorise_layer(seq, "0", full)
    assert isinstance(new, LowRankConv3d)
    assert new.down.weight.shape == (full, in_ch, kernel, kernel, kernel)
    assert new.up.weight.shape == (out_ch, full, 1, 1, 1)
    assert new.down.stride == (stride,) * 3 and new.down.padding == (padding,) * 3
    out = seq(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_truncation_error_is_the_dropped_spectrum():
    """Eckart-Young: the rank-r product misses W by exactly sqrt(sum of dropped S^2) in Frobenius."""
    torch.manual_seed(2)
    conv = nn.Conv3d(5, 12, 3, padding=1)
    w = conv.weight.detach().reshape(12, -1).clone()
    s = torch.linalg.svdvals(w.double())
    seq = nn.Sequential(conv)
    new = factorise_layer(seq, "0", 4)
    product = (new.up.weight.reshape(12, 4) @ new.down.weight.reshape(4, -1)).detach()  # (o, i*k^3)
    err = float((product.double() - w.double()).norm())
    assert err == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-5)
    # sqrt(S) on both sides: both factors carry the same spectrum, so their norms are equal.
    assert float(new.up.weight.detach().norm()) == pytest.approx(float(new.down.weight.detach().norm()), rel=1e-5)
    assert torch.equal(new.up.bias, conv.bias)


# ----------------------------------------------------------------------------- arithmetic and ranks


def test_parameter_arithmetic():
    # Conv3d 4 -> 16, kernel 7: in_dim = 4 * 343 = 1372; full weight 21,952.
    assert lowrank_params(16, 1372, 8) == 8 * (1372 + 16) == 11_104
    assert saves_params(16, 1372, 15) and not saves_params(16, 1372, 16)  # 15*1388=20,820 < 21,952 < 22,208
    assert max_saving_rank(16, 1372) == 15
    # square 32 x 32: r * 64 < 1024 -> r <= 15; with min_saving 0.5 -> r * 64 < 512 -> r <= 7
    assert max_saving_rank(32, 32) == 15
    assert max_saving_rank(32, 32, min_saving=0.5) == 7
    assert max_saving_rank(3, 1) == 0  # a 1 -> 3 map cannot shrink


def test_rank_selection_on_a_constructed_spectrum():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # S^2: 16, 9, 4, 1, 0 (total 30)
    assert rank_for_energy(s, 0.5) == 1  # 16/30 = 0.533
    assert rank_for_energy(s, 0.6) == 2  # 25/30 = 0.833
    assert rank_for_energy(s, 0.9) == 3  # 29/30 = 0.967
    assert rank_for_energy(s, 0.97) == 4
    assert rank_for_energy(s, 1.0) == 4  # the zero singular value is never needed
    assert rank_for_ratio(64, 0.5) == 32
    assert rank_for_ratio(5, 0.3) == 2  # 1.5 rounds up
    assert rank_for_ratio(3, 0.01) == 1
    with pytest.raises(ConfigError, match="energy"):
        rank_for_energy(s, 1.5)


def test_parse_count():
    assert parse_count("200k") == 200_000
    assert parse_count("1.5M") == 1_500_000
    assert parse_count("350000") == 350_000
    with pytest.raises(ConfigError, match="12q"):
        parse_count("12q")
    assert parse_count("65%", 320_255) == 208_166  # 208,165.75 rounded
    assert parse_count("12.5%", 1000) == 125
    with pytest.raises(ConfigError, match="needs the model's parameter count"):
        parse_count("65%")
    with pytest.raises(ConfigError, match="strictly between 0% and 100%"):
        parse_count("100%", 1000)


def test_rule_precedence_and_bad_values():
    assert selection(LowRankConfig(energy=0.9, ratio=0.5, params="1.2M")) == {"mode": "params", "params": 1_200_000}
    assert selection(LowRankConfig(params=None, energy=0.9, ratio=0.5)) == {"mode": "ratio", "ratio": 0.5}
    assert selection(LowRankConfig(params=None, energy=0.9)) == {"mode": "energy", "energy": 0.9}
    # the default: a share chosen on validation; a share budget resolves once the model's size is known
    assert selection(LowRankConfig()) == {"mode": "auto", "shares": [0.25, 0.35, 0.5, 0.65, 0.8], "tolerance": 0.005}
    assert selection(LowRankConfig(params="65%")) == {"mode": "params", "params": None, "params_share": 0.65}
    assert selection(LowRankConfig(params="65%"), 320_255) == {"mode": "params", "params": 208_166, "params_share": 0.65}
    with pytest.raises(ConfigError, match="set one of energy, ratio or params"):
        selection(LowRankConfig(params=None))
    with pytest.raises(ConfigError, match="leaves no parameter"):
        selection(LowRankConfig(params="0.01%"), 1000)
    with pytest.raises(ConfigError, match="min_saving"):
        selection(LowRankConfig(min_saving=1.0))
    with pytest.raises(ConfigError, match="positive"):
        selection(LowRankConfig(params="0k"))


def _cand(name: str, out_dim: int, in_dim: int, s: list[float]) -> Candidate:
    return Candidate(name, "linear", [out_dim, in_dim], out_dim, in_dim, 0, torch.tensor(s, dtype=torch.float64))


def test_budget_greedy_takes_cheapest_energy_per_parameter():
    # Two 10 x 10 layers (100 weights each, rank r costs 20 r; max saving rank 4).
    flat = _cand("flat", 10, 10, [1.0] * 10)  # energy spread evenly: expensive to cut
    steep = _cand("steep", 10, 10, [10.0, 1.0] + [0.1] * 8)  # almost rank 1: cheap to cut
    total = 1000
    # steep's best move is to rank 2 (0.08/101.08 lost for 60 saved); only 20 are needed, so it stops at 4.
    assert budget_ranks([flat, steep], total, 980) == {"steep": 4}
    assert budget_ranks([flat, steep], total, 950) == {"steep": 2}  # rank 3 would leave 960
    # steep goes on to rank 1 (1/101 lost per 20 saved) before flat moves at all (best: 0.9 per 80).
    assert budget_ranks([flat, steep], total, 920) == {"steep": 1}
    assert budget_ranks([flat, steep], total, 900) == {"steep": 1, "flat": 4}
    assert budget_ranks([flat, steep], total, 880) == {"steep": 1, "flat": 3}
    # Floor: rank 1 everywhere leaves 1000 - 2 * (100 - 20) = 840.
    assert budget_ranks([flat, steep], total, 840) == {"steep": 1, "flat": 1}
    with pytest.raises(BudgetError, match="budget 839 is unreachable.*leaves 840"):
        budget_ranks([flat, steep], total, 839)
    assert budget_ranks([flat, steep], total, 1000) == {}


# ----------------------------------------------------------------------------- whole model


def test_depthwise_untouched_and_unsaving_layers_skipped():
    model = tiny_model()
    names = {c.name for c in candidates(model)}
    assert "encoder.stages.0.blocks.0.mlp.dwconv" not in names
    assert "decoder.refine_dw" not in names
    assert "encoder.stages.0.patch_embed.proj" in names and "decoder.fuse" in names
    _, table = factorise_(model, LowRankConfig(params=None, ratio=1.0))
    rows = {r["layer"]: r for r in table}
    # Full rank never saves: nothing is factorised, nothing changes.
    assert not any(r["factorised"] for r in table) and model.spec.ranks == {}
    assert isinstance(model.encoder.stages[0].blocks[0].mlp.dwconv, nn.Conv3d)
    # decoder.head: Conv3d 4 -> 3, k3: in_dim 108, full rank 3; rank 3 would cost 333 > 324.
    assert rows["decoder.head"]["full_rank"] == 3 and rows["decoder.head"]["params_after"] == 324 + 3
    assert "dwconv" not in format_table(table)


def test_min_saving_threshold():
    model = tiny_model()
    _, table = factorise_(model, LowRankConfig(params=None, ratio=0.5, min_saving=0.4))
    rows = {r["layer"]: r for r in table}
    # patch_embed 0: 16 x 1372, rank 8 -> 11,104 of 21,952 weights: saves 49.4% > 40%
    assert rows["encoder.stages.0.patch_embed.proj"]["rank"] == 8
    # decoder.fuse 1x1 64 -> 16, rank 8 -> 640 of 1,024: saves 37.5%, kept whole
    assert not rows["decoder.fuse"]["factorised"] and rows["decoder.fuse"]["rank"] is None
    assert isinstance(model.decoder.fuse, nn.Conv3d) and "decoder.fuse" not in model.spec.ranks
    # square q 16 x 16 at rank 8 saves nothing
    assert not rows["encoder.stages.0.blocks.0.attn.q"]["factorised"]


def test_factorise_tiny_model_ratio_and_table():
    model = tiny_model()
    before = count_params(model)
    _, table = factorise_(model, LowRankConfig(params=None, ratio=0.25))
    rows = {r["layer"]: r for r in table}
    fc1 = rows["encoder.stages.1.blocks.0.mlp.fc1"]  # Linear 32 -> 128: full rank 32, rank 8
    assert (fc1["rank"], fc1["full_rank"], fc1["shape"]) == (8, 32, [128, 32])
    assert fc1["params_before"] == 128 * 32 + 128 and fc1["params_after"] == 8 * (32 + 128) + 128
    assert 0.25 < fc1["energy_kept"] < 1.0
    assert isinstance(model.get_submodule("encoder.stages.1.blocks.0.mlp.fc1"), LowRankLinear)
    assert model.spec.ranks["encoder.stages.1.blocks.0.mlp.fc1"] == 8
    assert set(model.spec.ranks) == {r["layer"] for r in table if r["factorised"]}
    saved = sum(r["params_before"] - r["params_after"] for r in table)
    assert count_params(model) == before - saved > 0
    lines = format_table(table).splitlines()
    assert lines[-1].split()[-3:] == [f"{sum(r['params_before'] for r in table):,}",
                                      f"{sum(r['params_before'] for r in table) - saved:,}",
                                      f"{100 * saved / sum(r['params_before'] for r in table):.1f}%"]
    # Columns are aligned: the "params" header ends where every params figure ends.
    end = lines[0].index("params") + len("params")
    assert all(l[end - 1].isdigit() for l in lines[2:-2])


def test_factorise_with_filter_and_budget():
    model = tiny_model()
    before = count_params(model)
    only_linear = lambda m, name: isinstance(m, nn.Linear)  # noqa: E731
    _, table = factorise_(model, LowRankConfig(energy=None, params=str(before - 5000)), filter=only_linear)
    assert all(r["kind"] == "linear" for r in table)
    assert before - 5000 - 200 < count_params(model) <= before - 5000  # a move saves at most a few hundred here
    with pytest.raises(BudgetError, match="unreachable"):
        factorise_(tiny_model(), LowRankConfig(params="10k"))


def test_share_budget_is_a_share_of_the_model():
    model = tiny_model()
    before = count_params(model)
    _, table = factorise_(model, LowRankConfig(params="80%"))
    budget = round(0.8 * before)  # 140,070
    # under budget by less than 1%: a layer's first factorisation may save more than is needed
    assert budget - 0.01 * before < count_params(model) <= budget
    assert count_params(model) == before - sum(r["params_before"] - r["params_after"] for r in table)


def test_energy_mode_keeps_energy_per_layer():
    model = tiny_model()
    _, table = factorise_(model, LowRankConfig(params=None, energy=0.5))
    done = [r for r in table if r["factorised"]]
    assert done and all(r["energy_kept"] >= 0.5 for r in done)
    # ... and the smallest such rank: one singular value fewer would fall short (the layers feeding
    # the logits: at least one direction per region, 3)
    original = tiny_model()
    for r in done:
        s = _spectrum(original, r["layer"])
        floor = 3 if r["layer"] in REGION_TAIL else 1
        assert r["rank"] == max(floor, rank_for_energy(s, 0.5))
        if r["rank"] > floor:
            assert float((s[: r["rank"] - 1] ** 2).sum() / (s**2).sum()) < 0.5


def _spectrum(model: nn.Module, name: str) -> torch.Tensor:
    w = model.get_submodule(name).weight.detach()
    return torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())


def test_round_trip_through_artifact(tmp_path):
    model = tiny_model()
    factorise_(model, LowRankConfig(params=None, ratio=0.5))
    assert model.spec.ranks
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
    art = Artifact(stage="lowrank", spec=model.spec.to_dict(), state_dict=model.state_dict())
    path = art.save(tmp_path / "lowrank.pt")
    loaded = Artifact.load(path)  # weights_only=True
    rebuilt = build_model(loaded).eval()
    assert loaded.spec["ranks"] == model.spec.ranks
    assert isinstance(rebuilt.get_submodule("decoder.fuse"), LowRankConv3d)
    assert count_params(rebuilt) == count_params(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ref)
    # A second pass leaves the already factorised layers alone.
    names = {c.name for c in candidates(rebuilt)}
    assert not any(n.startswith("decoder.fuse") for n in names)
    assert math.isfinite(float(ref.abs().sum()))


# ----------------------------------------------------------------------------- the command


def _save_pair(folder) -> tuple:
    """A tiny 'teacher' artifact and a 'student' artifact descended from it (same weights)."""
    model = tiny_model()
    teacher = Artifact(stage="teacher", spec=model.spec.to_dict(), state_dict=model.state_dict())
    teacher.save(folder / "teacher.pt")
    student = Artifact(stage="student", spec=model.spec.to_dict(), state_dict=model.state_dict(),
                       metrics={"dice_mean": 0.5}, lineage=teacher.child_lineage())
    student.save(folder / "student.pt")
    return model, student


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two small synthetic BraTS cases, written once for the command tests (writing takes seconds)."""
    root = tmp_path_factory.mktemp("data")
    write_phantom_dataset(root, 2, 0, (64, 64, 32), 0)
    return root


def test_command_without_finetune_writes_a_rebuildable_artifact(tmp_path, monkeypatch, capsys, tiny_data):
    monkeypatch.chdir(tmp_path)
    model, student = _save_pair(tmp_path)
    before = count_params(model)
    small = ["data.max_val_cases=1", "data.crop=[32,32,32]", "train.window=[32,32,32]", "train.sw_batch=1"]
    argv = ["student.pt", "--ratio", "0.25", "--epochs", "0", "--out", "out", "--config", str(CONFIG),
            "--data", str(tiny_data)]
    for item in small:
        argv += ["--set", item]
    assert main(argv) == 0
    art = Artifact.load(tmp_path / "out" / "lowrank.pt")
    rebuilt = build_model(art)
    assert art.stage == "lowrank"
    assert [e["stage"] for e in art.lineage] == ["teacher", "student"]
    assert art.lineage[-1]["metrics"] == {"dice_mean": 0.5}
    assert art.metrics["params_before"] == before
    assert art.metrics["params_after"] == count_params(rebuilt) < before
    # no fine-tune: the metrics are those of the factorised model itself
    assert art.metrics["dice_mean"] == art.metrics["dice_mean_before_finetune"]
    table = art.extra["lowrank"]["table"]
    assert art.extra["lowrank"]["mode"] == "ratio"
    assert {r["layer"]: r["rank"] for r in table if r["factorised"]} == art.spec["ranks"]
    assert before - sum(r["params_before"] - r["params_after"] for r in table) == art.metrics["params_after"]
    assert "encoder.stages.1.blocks.0.mlp.fc1" in capsys.readouterr().out


def test_a_parameter_budget_the_model_already_meets_is_refused_before_work(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    model, _ = _save_pair(tmp_path)
    argv = ["student.pt", "--epochs", "0", "--out", "out", "--config", str(CONFIG), "--data", str(tiny_data)]
    with pytest.raises(ConfigError, match=f"has {count_params(model):,} parameters, within lowrank.params=10M: "
                                          "nothing to do"):
        main(argv + ["--params", "10M"])
    assert not (tmp_path / "out").exists()


def test_command_needs_a_teacher_to_finetune(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    Artifact(stage="student", spec=model.spec.to_dict(), state_dict=model.state_dict()).save(tmp_path / "orphan.pt")
    with pytest.raises(ArtifactError, match="orphan.pt: no teacher in its lineage.*--teacher"):
        main(["orphan.pt", "--epochs", "1", "--out", "out", "--config", str(CONFIG)])
    assert not (tmp_path / "out" / "lowrank.pt").exists()


def test_finetune_scores_the_start_once_and_records_it(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    _save_pair(tmp_path)
    tiny = ["data.max_val_cases=1", "data.crop=[32,32,32]", "data.samples_per_epoch=2", "data.num_workers=0",
            "train.window=[32,32,32]", "train.sw_batch=1", "train.log_images=false", "train.threads=1",
            "train.amp=off", "train.warmup_epochs=0", "train.lr=1.0"]  # lr 1: the one epoch wrecks the weights
    argv = ["student.pt", "--params", "70%", "--epochs", "1", "--out", "out", "--config", str(CONFIG),
            "--data", str(tiny_data)]
    for item in tiny:
        argv += ["--set", item]
    assert main(argv) == 0
    art = Artifact.load(tmp_path / "out" / "lowrank.pt")
    info = art.extra["lowrank"]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    start = [e for e in history if e.get("start")]
    assert len(start) == 1  # configs/lowrank.yaml sets train.val_at_start
    assert info["metrics_before_finetune"]["dice_mean"] == pytest.approx(start[0]["val"]["dice_mean"])
    assert info["params_share"] == 0.7 and info["params"] == round(0.7 * art.metrics["params_before"])
    assert len(art.extra["val_cases"]) == 1  # kept for the next stage's changed-data check (it was dropped)
    assert art.metrics["params_after"] <= info["params"]
    after = history[-1]["val"]["dice_mean"]
    # the better of the factorised weights and the fine-tuned ones is kept, and says which it is
    assert art.metrics["dice_mean"] == pytest.approx(max(after, info["dice_mean_before_finetune"]))
    assert info["best_epoch"] == (0 if info["dice_mean_before_finetune"] >= after else 1)


@pytest.mark.parametrize("rule", [dict(params="40%"), dict(params=None, ratio=0.1), dict(params=None, energy=0.3)])
def test_layers_feeding_the_logits_keep_a_direction_per_region(rule):
    """Issue 13: truncation drops the smallest singular directions first, and with fewer directions
    than regions one region (ET, small, little energy) loses its own. The logits layer is never
    factorised (3 rows: only a rank below 3 would save anything), refine_pw keeps rank >= 3."""
    model = tiny_model()
    model.decoder.refine_pw = nn.Conv3d(16, 8, 1, bias=False)  # a tail wide enough to factorise
    model.spec.refine_dim = 8
    model.decoder.head = nn.Conv3d(8, 3, 3, padding=1)
    found = {c.name: c for c in candidates(model)}
    assert found["decoder.head"].min_rank == found["decoder.refine_pw"].min_rank == 3
    assert found["encoder.stages.0.patch_embed.proj"].min_rank == 1
    _, table = factorise_(model, LowRankConfig(**{"energy": None, **rule}))
    rows = {r["layer"]: r for r in table}
    assert not rows["decoder.head"]["factorised"]
    assert rows["decoder.refine_pw"]["rank"] is None or rows["decoder.refine_pw"]["rank"] >= 3
    assert any(r["factorised"] and r["rank"] < 3 for r in table)  # elsewhere the rule goes below 3


# ----------------------------------------------------------------------------- params: auto


REF = {"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.7}


def test_auto_budget_is_the_smallest_share_that_keeps_every_region():
    """The search tries shares smallest first and stops at the first whose factorised model keeps
    every region within the tolerance: a drop on ET alone (the mean moves by a third of it) disqualifies."""
    model = tiny_model()
    total = count_params(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def score(m: nn.Module) -> dict:  # ET falls once fewer than 45 % of the parameters remain
        return {**REF, "dice_et": 0.7 if count_params(m) >= 0.45 * total else 0.66, "hd95_wt": 3.0}

    cfg = LowRankConfig(params="auto", auto_shares=[0.8, 0.3, 0.5, 0.4], auto_tolerance=0.005)
    out, rows, chosen = search_share(model, cfg, score, REF)
    assert [r["share"] for r in rows] == [0.3, 0.4, 0.5]  # sorted, stopped at the first within
    assert [r["within"] for r in rows] == [False, False, True] and chosen == 2
    assert rows[0]["drop"] == pytest.approx(0.04) and rows[2]["drop"] == pytest.approx(0.0)
    assert count_params(out) == rows[2]["params_after"] <= rows[2]["params"] == round(0.5 * total)
    assert out.spec.ranks and out is not model
    assert count_params(model) == total and not model.spec.ranks  # the source model is left alone
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_auto_budget_without_a_share_in_tolerance_factorises_nothing():
    """A budget that costs more Dice than the tolerance everywhere is not what auto asked for: the model
    comes back whole (a user feeding an already factorised model got WT 0.958 -> 0.068 at the least drop)."""
    model = tiny_model()
    total = count_params(model)

    def score(m: nn.Module) -> dict:  # every share costs TC, less the more parameters stay
        return {**REF, "dice_tc": 0.8 - 0.1 * (1 - count_params(m) / total)}

    cfg = LowRankConfig(params="auto", auto_shares=[0.4, 0.6], auto_tolerance=0.001)
    out, rows, chosen = search_share(model, cfg, score, REF)
    assert [r["within"] for r in rows] == [False, False] and rows[1]["drop"] < rows[0]["drop"]
    assert chosen == -1 and out is model and count_params(out) == total and not model.spec.ranks


def test_auto_budget_skips_shares_no_factorisation_reaches():
    model = tiny_model()
    cfg = LowRankConfig(params="auto", auto_shares=[0.01, 0.6], auto_tolerance=0.0)
    out, rows, chosen = search_share(model, cfg, lambda m: dict(REF), REF)
    assert [r["share"] for r in rows] == [0.6] and chosen == 0 and rows[0]["within"]
    with pytest.raises(BudgetError, match=r"auto_shares \[0.01\]: none is reachable .* add shares of at least"):
        search_share(model, LowRankConfig(params="auto", auto_shares=[0.01]), lambda m: dict(REF), REF)
    # a share too small to be a whole parameter count is unreachable too, not a parse error of '1e-07%'
    out, rows, _ = search_share(model, LowRankConfig(params="auto", auto_shares=[1e-9, 0.6, 0.6]),
                                lambda m: dict(REF), REF)
    assert [r["share"] for r in rows] == [0.6]


def test_unreachable_auto_shares_are_refused_before_work(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    _save_pair(tmp_path)
    argv = ["student.pt", "--params", "auto", "--epochs", "0", "--out", "out", "--config", str(CONFIG),
            "--data", str(tiny_data), "--set", "lowrank.auto_shares=[0.01,0.02]"]
    with pytest.raises(ConfigError, match=r"student.pt: lowrank.auto_shares \[0.01, 0.02\]: none is reachable"):
        main(argv)
    assert not (tmp_path / "out").exists()  # refused before the folder, the data and the source's score
    with pytest.raises(ConfigError, match="or auto"):
        main(["student.pt", "--params", "auto%", "--epochs", "0", "--out", "out", "--config", str(CONFIG)])


def test_auto_settings_are_checked():
    from common.config import Config, check_values

    for key, value, match in [("auto_shares", [0.5, 1.0], "lowrank.auto_shares"), ("auto_shares", [], "lowrank.auto_shares"),
                              ("auto_tolerance", -0.1, "lowrank.auto_tolerance")]:
        cfg = Config()
        setattr(cfg.lowrank, key, value)
        with pytest.raises(ConfigError, match=match):
            check_values(cfg)
    with pytest.raises(ValueError, match="search_share"):
        factorise_(tiny_model(), LowRankConfig(params="auto"))


def test_command_with_an_auto_budget_records_the_search(tmp_path, monkeypatch, capsys, tiny_data):
    monkeypatch.chdir(tmp_path)
    _save_pair(tmp_path)
    argv = ["student.pt", "--params", "auto", "--epochs", "0", "--out", "out", "--config", str(CONFIG),
            "--data", str(tiny_data)]
    for item in ["data.max_val_cases=1", "data.crop=[32,32,32]", "train.window=[32,32,32]", "train.sw_batch=1",
                 "lowrank.auto_shares=[0.3,0.6]", "lowrank.auto_tolerance=1.0"]:
        argv += ["--set", item]
    assert main(argv) == 0
    art = Artifact.load(tmp_path / "out" / "lowrank.pt")
    info = art.extra["lowrank"]
    assert info["mode"] == "auto" and info["shares"] == [0.3, 0.6] and info["tolerance"] == 1.0
    # tolerance 1: the smallest share is within, and is what the artifact holds
    assert [r["share"] for r in info["search"]] == [0.3] and info["params_share"] == 0.3
    assert art.metrics["params_after"] == info["search"][0]["params_after"] <= info["params"]
    assert count_params(build_model(art)) == art.metrics["params_after"]
    # no fine-tune: the stage's score of its product is the search's score of the same model
    assert art.metrics["dice_mean"] == pytest.approx(info["search"][0]["metrics"]["dice_mean"])
    assert set(info["reference"]) == {"dice_wt", "dice_tc", "dice_et"}
    assert info["search"][0]["drop"] == pytest.approx(max(info["reference"][k] - info["search"][0]["metrics"][k]
                                                           for k in info["reference"]))
    assert "lowrank.params=auto" in capsys.readouterr().out


def test_command_with_no_share_in_tolerance_writes_the_model_unfactorised(tmp_path, monkeypatch, capsys, tiny_data):
    monkeypatch.chdir(tmp_path)
    model, _ = _save_pair(tmp_path)
    import compress.lowrank as lowrank

    real = lowrank.evaluate

    def harsh(m, cache, ids, cfg, desc="evaluate"):  # every factorised copy loses a tenth of ET
        out = real(m, cache, ids, cfg, desc)
        return {**out, "dice_et": out["dice_et"] - 0.1} if desc == "low-rank share" else out

    monkeypatch.setattr(lowrank, "evaluate", harsh)
    argv = ["student.pt", "--epochs", "0", "--out", "out", "--config", str(CONFIG), "--data", str(tiny_data)]
    for item in ["data.max_val_cases=1", "data.crop=[32,32,32]", "train.window=[32,32,32]", "train.sw_batch=1",
                 "lowrank.auto_shares=[0.4,0.6]"]:
        argv += ["--set", item]
    assert main(argv) == 0
    art = Artifact.load(tmp_path / "out" / "lowrank.pt")
    info = art.extra["lowrank"]
    assert [r["within"] for r in info["search"]] == [False, False] and info["params_share"] is None
    assert art.metrics["params_after"] == art.metrics["params_before"] == count_params(model)
    assert not art.spec["ranks"] and not any(r["factorised"] for r in info["table"])
    out = capsys.readouterr().out
    assert "the model is left unfactorised" in out
