import math

import pytest
import torch
import torch.nn.functional as F

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, build_model
from brats.labels import to_target
from common.config import Config, ConfigError
from engine.loop import artifact_spec, product_of
import json
from types import SimpleNamespace

import student.distill as distill_module
from student.distill import (DistillModel, DistillStage, adaptive_region_weights, check_distill, dice_gap,
                             distill_record, distill_student, kd_dice_loss, kd_loss, load_teacher, teacher_agrees,
                             teacher_reference, teacher_region_weights)
from student.thin import thin
from model.refineformer3d import RefineFormer3D, count_params, preset_spec

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1],
            decoder_dim=16, fuse_dim=16, refine_dim=8)


def tiny_teacher(seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(preset_spec("refineformer3d", **TINY))


def random_batch(seed: int = 0) -> dict:
    """Two random 4-modality 32^3 crops with random BraTS labels (0/1/2/4)."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 4, 32, 32, 32, generator=g),
            "label": torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (2, 32, 32, 32), generator=g)]}


def test_kd_loss_regions_is_soft_bce_times_t_squared_less_a_constant():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, 4)
    T = 3.0
    assert float(kd_loss(t, t, "regions", T)) == pytest.approx(0.0, abs=1e-6)
    ours = kd_loss(s, t, "regions", T)
    soft_bce = F.binary_cross_entropy(torch.sigmoid(s / T), torch.sigmoid(t / T)) * T * T
    g1, = torch.autograd.grad(ours, s)
    g2, = torch.autograd.grad(soft_bce, s)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert float(ours.detach()) > 0


def test_kd_loss_softmax_is_kl_and_mask_restricts_voxels():
    torch.manual_seed(1)
    s, t = torch.randn(1, 3, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    T = 2.0
    kl = F.kl_div((s / T).log_softmax(1), (t / T).log_softmax(1), log_target=True, reduction="sum") / 8 * T * T
    assert float(kd_loss(s, t, "seed3", T)) == pytest.approx(float(kl), rel=1e-5)
    mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    mask[..., 0, 0, 0] = True
    one = kd_loss(s[..., :1, :1, :1], t[..., :1, :1, :1], "seed3", T)
    assert float(kd_loss(s, t, "seed3", T, mask)) == pytest.approx(float(one), rel=1e-5)


def test_teacher_gets_no_gradient_and_does_not_change_during_a_step():
    teacher = tiny_teacher().train()  # DistillStage must put it in eval mode (BatchNorm stats frozen)
    student = thin(teacher, 0.5).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = Config()
    cfg.distill.feature_weight = 0.5
    stage = DistillStage(teacher, cfg, perturb=True)
    model = DistillModel(student, teacher.spec.embed_dims, seed=0)
    projections = model.projections
    assert [p.in_channels for p in projections] == [8, 16, 16, 16]
    assert [p.out_channels for p in projections] == [16, 32, 32, 32]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = random_batch()
    student_before = student.decoder.fuse.weight.detach().clone()
    loss, logs = stage.loss(model, batch)
    loss.backward()
    opt.step()
    assert set(logs) >= {"loss", "sup", "kd", "kd_dice", "feat"} and logs["kd"] > 0 and logs["feat"] > 0
    assert logs["loss"] == pytest.approx(logs["sup"] + logs["kd"] + logs["kd_dice"] + 0.5 * logs["feat"], rel=1e-5)
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student.decoder.fuse.weight, student_before)
    assert projections[0].weight.grad is not None and projections[0].weight.grad.abs().sum() > 0
    # the projections stay out of the student: an artifact holds the product, the plain model
    assert product_of(model) is student and artifact_spec(model) == student.spec.to_dict()
    # ...they are the wrapper's parameters, trained and checkpointed with it
    extra = {k for k in model.state_dict() if not k.startswith("product.")}
    assert extra == {f"projections.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    with torch.no_grad():  # validation calls the wrapper: the student's logits
        assert torch.equal(model.eval()(batch["image"]), student.eval()(batch["image"]))
    # feature distillation needs the wrapper
    with pytest.raises(TypeError):
        stage.loss(student, batch)


def test_dice_gap_is_teacher_minus_student():
    gap = dice_gap({"dice_wt": 0.9, "dice_tc": 0.8, "dice_et": 0.7, "dice_mean": 0.8},
                   {"dice_wt": 0.85, "dice_tc": 0.8, "dice_et": 0.5, "dice_mean": 0.7166667})
    assert gap["dice_gap_wt"] == pytest.approx(0.05) and gap["dice_gap_et"] == pytest.approx(0.2)
    assert gap["teacher_dice_mean"] == pytest.approx(0.8) and gap["dice_gap_mean"] == pytest.approx(0.0833333)


def test_distill_student_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    teacher = tiny_teacher()
    Artifact(stage="teacher", spec=teacher.spec.to_dict(), state_dict=teacher.state_dict(),
             config={"data": {"scheme": "regions"}},
             metrics={"dice_mean": 0.5, "dice_wt": 0.8, "dice_tc": 0.5, "dice_et": 0.2}).save(tmp_path / "teacher.pt")
    cfg = Config()
    cfg.distill.kd_region_weights = "teacher"  # read from the teacher artifact's metrics, recorded
    cfg.data.dir, cfg.data.crop, cfg.data.val_fraction = str(data), [32, 32, 32], 0.5
    t = cfg.train
    t.window, t.overlap, t.sw_batch = [32, 32, 32], 0.25, 2
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs, t.threads, t.log_images = 1, 1, 2, 0, 1, False
    t.amp = "off"
    cfg.distill.teacher, cfg.distill.width, cfg.distill.feature_weight = str(tmp_path / "teacher.pt"), 0.5, 0.1
    art = distill_student(cfg, tmp_path / "student")
    loaded = Artifact.load(tmp_path / "student" / "student.pt")
    assert loaded.stage == "student"
    # one artifact per stage folder; last.pt is the resumable checkpoint and carries the best epoch
    assert sorted(p.name for p in (tmp_path / "student").glob("*.pt")) == ["last.pt", "student.pt"]
    best = Artifact.load(tmp_path / "student" / "last.pt").extra["train_state"]["best_artifact"]
    assert all(torch.equal(best["state_dict"][k], v) for k, v in loaded.state_dict.items())
    assert [e["stage"] for e in loaded.lineage] == ["teacher"]
    assert loaded.lineage[0]["path"] == str(tmp_path / "teacher.pt")
    for r in ("wt", "tc", "et", "mean"):
        assert math.isclose(loaded.metrics[f"dice_gap_{r}"],
                            loaded.metrics[f"teacher_dice_{r}"] - loaded.metrics[f"dice_{r}"], abs_tol=1e-9)
    student = build_model(loaded)  # strict: no projection weights, no torch-pruning needed
    assert count_params(student) < count_params(teacher) / 2
    assert student.spec.embed_dims == [8, 16, 16, 16]
    assert loaded.extra["width"] == 0.5 and loaded.extra["init"] == "pruned"
    assert art.metrics == loaded.metrics
    # the feature projections trained inside the DistillModel wrapper and were saved in last.pt
    state = Artifact.load(tmp_path / "student" / "last.pt").extra["train_state"]
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["model"]
    saved = state["model"]
    assert tuple(saved["projections.0.weight"].shape) == (16, 8, 1, 1, 1)
    fresh = DistillModel(student, teacher.spec.embed_dims, seed=cfg.train.seed)  # the seeded initial projections
    assert torch.count_nonzero(fresh.projections[0].bias) == 0
    assert not torch.equal(saved["projections.0.bias"], fresh.projections[0].bias)  # starts at 0, was trained
    assert loaded.extra["distill"]["feature_weight"] == 0.1
    assert loaded.extra["distill"]["kd_region_weights"] == "teacher"
    assert loaded.extra["distill"]["region_weights"] == pytest.approx({"tc": 0.5, "wt": 0.8, "et": 0.2})
    frozen = load_teacher(tmp_path / "teacher.pt")
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_perturb_prob_zero_gives_exactly_the_clean_loss_and_is_recorded():
    teacher = tiny_teacher()
    student = thin(teacher, 0.5).eval()  # eval: BatchNorm uses running stats, so two passes agree
    batch = random_batch()
    cfg = Config()
    cfg.distill.perturb.prob = 0.0
    never, _ = DistillStage(teacher, cfg, perturb=True).loss(student, batch)
    clean, _ = DistillStage(teacher, cfg, perturb=False).loss(student, batch)
    assert float(never.detach()) == pytest.approx(float(clean.detach()), rel=1e-6)
    cfg.distill.perturb.prob = 1.0
    always, _ = DistillStage(teacher, cfg, perturb=True).loss(student, batch)
    assert abs(float(always.detach()) - float(clean.detach())) > 1e-4  # the perturbed input changes the loss
    assert distill_record(cfg, perturb=True)["perturb_config"]["prob"] == 1.0
    assert distill_record(cfg, perturb=False)["perturb_config"] is None


def test_teacher_agrees_per_region_channel_and_per_class():
    label = torch.tensor([[0, 2, 1, 4]]).reshape(1, 1, 1, 4)  # (B, D, H, W): background, edema, necrosis, ET
    regions = torch.full((1, 3, 1, 1, 4), -5.0)  # channels [TC, WT, ET]
    regions[0, :, 0, 0, 3] = 5.0  # ET voxel: TC, WT, ET all right
    regions[0, 1, 0, 0, 1] = 5.0  # edema: WT only, right
    regions[0, 1, 0, 0, 2] = 5.0  # necrosis: WT right but TC missed -> wrong
    assert teacher_agrees(regions, label, "regions").flatten().tolist() == [True, True, False, True]
    seed3 = torch.zeros(1, 3, 1, 1, 4)  # classes 0 bg, 1 core, 2 edema
    seed3[0, [0, 2, 1, 2], 0, 0, [0, 1, 2, 3]] = 5.0  # ET voxel called edema -> wrong
    assert teacher_agrees(seed3, label, "seed3").flatten().tolist() == [True, True, True, False]


class _Fixed(torch.nn.Module):
    """A 'teacher' that answers every input with the same logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_kd_gate_correct_leaves_out_the_teachers_errors():
    """A teacher wrong on every voxel teaches nothing under the gate: the loss is the supervised part;
    a teacher right everywhere gives the ungated loss; an unknown gate is refused."""
    teacher = tiny_teacher()
    student = thin(teacher, 0.5).eval()
    batch = random_batch()
    cfg = Config()
    cfg.distill.kd_gate = "correct"
    stage = DistillStage(teacher, cfg, perturb=False)
    wrong = (1 - 2 * to_target(batch["label"], "regions")) * 6.0  # every channel on the wrong side
    stage.teacher = _Fixed(wrong)
    total, parts = stage.loss(student, batch)
    assert parts["kd"] == 0.0 and parts["kd_dice"] == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(parts["sup"], rel=1e-6)
    right = -wrong
    stage.teacher = _Fixed(right)
    gated, _ = stage.loss(student, batch)
    cfg_all = Config()
    ungated_stage = DistillStage(teacher, cfg_all, perturb=False)
    ungated_stage.teacher = _Fixed(right)
    ungated, _ = ungated_stage.loss(student, batch)
    assert float(gated) == pytest.approx(float(ungated), rel=1e-6) and float(gated) > parts["sup"]
    cfg.distill.kd_gate = "sometimes"
    with pytest.raises(ConfigError, match="kd_gate must be one of all, correct"):
        DistillStage(teacher, cfg, perturb=False)


def test_kd_dice_weighs_a_small_region_like_a_large_one():
    """The voxel-mean KD barely sees a missed small region; the soft-Dice term sees it fully."""
    t = torch.full((1, 3, 16, 16, 16), -8.0)
    t[:, 0, :12] = 8.0  # a large region (most voxels)
    t[:, 2, :1, :2, :2] = 8.0  # a 4-voxel "ET"
    miss_small = t.clone()
    miss_small[:, 2] = -8.0  # the student misses ET entirely
    assert float(kd_dice_loss(t, t, "regions")) == pytest.approx(0.0, abs=1e-3)
    dice_miss = float(kd_dice_loss(miss_small, t, "regions"))
    assert dice_miss == pytest.approx(1 / 3, abs=0.01)  # one region of three lost: a third of the term
    assert float(kd_loss(miss_small, t, "regions", 1.0)) < 0.01 * dice_miss  # the voxel mean hardly notices
    mask = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    mask[..., 4:, :, :] = True  # ET lies outside the valid region: nothing to match there
    assert float(kd_dice_loss(miss_small, t, "regions", mask)) == pytest.approx(0.0, abs=1e-3)


def test_kd_region_weights_scale_each_regions_terms_and_come_from_the_teachers_dice():
    """Weights of 1 give the unweighted terms exactly; a weight of 0 leaves a region's disagreement out of
    both KD terms; `teacher` takes the teacher artifact's dice_tc / dice_wt / dice_et in channel order."""
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 3, 8, 8, 8, generator=g), torch.randn(2, 3, 8, 8, 8, generator=g)
    ones = torch.ones(3)
    assert torch.allclose(kd_loss(s_logits, t_logits, "regions", 2.0, weights=ones), kd_loss(s_logits, t_logits, "regions", 2.0))
    assert torch.allclose(kd_dice_loss(s_logits, t_logits, "regions", weights=ones), kd_dice_loss(s_logits, t_logits, "regions"))
    agree = s_logits.clone()
    agree[:, 2] = t_logits[:, 2]  # the student matches the teacher on ET, not on TC and WT
    no_tc_wt = torch.tensor([0.0, 0.0, 1.0])
    assert kd_loss(agree, t_logits, "regions", 2.0, weights=no_tc_wt) < 1e-6
    assert kd_dice_loss(agree, t_logits, "regions", weights=no_tc_wt) < 1e-6
    assert kd_loss(agree, t_logits, "regions", 2.0) > 0.01 and kd_dice_loss(agree, t_logits, "regions") > 0.01
    w = teacher_region_weights({"dice_wt": 0.9, "dice_tc": 0.7, "dice_et": 0.25, "dice_mean": 0.6})
    assert w.tolist() == pytest.approx([0.7, 0.9, 0.25])  # [TC, WT, ET]
    with pytest.raises(ConfigError, match="records no usable dice_et"):
        teacher_region_weights({"dice_wt": 0.9, "dice_tc": 0.7})
    cfg = Config()
    assert cfg.distill.kd_region_weights == "equal"  # the default
    cfg.distill.kd_region_weights = "teacher"
    check_distill(cfg)
    cfg.distill.kd_region_weights = "dice"
    with pytest.raises(ConfigError, match="kd_region_weights must be one of equal, teacher, adaptive"):
        check_distill(cfg)


def pooled(tc: float, wt: float, et: float) -> dict:
    return {"pooled_dice_tc": tc, "pooled_dice_wt": wt, "pooled_dice_et": et}


def test_adaptive_kd_switches_a_region_off_where_the_student_reaches_the_teacher_and_back_on(capsys):
    """Weights in channel order [TC, WT, ET]: 0 where the student's pooled validation Dice is at or above
    the teacher's, 1 below; re-decided at every validation, logged per epoch, said when they change, and
    carried through the stage's state (a resumed run continues with the weights it had)."""
    assert adaptive_region_weights(pooled(0.5, 0.9, 0.3), pooled(0.6, 0.9, 0.2)).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="pooled_dice_et"):
        adaptive_region_weights({"pooled_dice_tc": 0.5, "pooled_dice_wt": 0.5}, pooled(0.6, 0.9, 0.2))
    teacher = tiny_teacher()
    student = thin(teacher, 0.5).eval()
    batch = random_batch()
    cfg = Config()
    stage = DistillStage(teacher, cfg, perturb=False, reference=pooled(0.6, 0.9, 0.2))
    plain = DistillStage(teacher, cfg, perturb=False)
    _, logs = stage.loss(student, batch)
    _, plain_logs = plain.loss(student, batch)
    assert (logs["kd_w_tc"], logs["kd_w_wt"], logs["kd_w_et"]) == (1.0, 1.0, 1.0)  # before any validation
    assert logs["kd"] == pytest.approx(plain_logs["kd"]) and "kd_w_et" not in plain_logs
    stage.on_validation(pooled(0.5, 0.95, 0.2))  # WT above, ET level: both off, TC still taught
    assert stage.region_weights.tolist() == [1.0, 0.0, 0.0]
    assert "WT pooled Dice 0.950 >= the teacher's 0.900: taught by the labels alone from the next epoch" \
        in capsys.readouterr().out
    _, logs = stage.loss(student, batch)
    assert (logs["kd_w_tc"], logs["kd_w_wt"], logs["kd_w_et"]) == (1.0, 0.0, 0.0)
    assert logs["kd"] < plain_logs["kd"] and logs["kd_dice"] < plain_logs["kd_dice"]
    stage.on_validation(pooled(0.5, 0.85, 0.25))  # WT fell below again: distilled again
    assert stage.region_weights.tolist() == [1.0, 1.0, 0.0]
    assert "WT pooled Dice 0.850 < the teacher's 0.900: distilled again" in capsys.readouterr().out
    stage.on_validation(pooled(0.7, 0.95, 0.1), log=False)  # a resume restoring what the run said: quiet
    assert stage.region_weights.tolist() == [0.0, 0.0, 1.0] and capsys.readouterr().out == ""
    plain.on_validation(pooled(0.9, 0.9, 0.9))  # no reference: nothing adapts
    assert plain.region_weights is None


def test_adaptive_reference_is_the_sources_score_or_the_teacher_scored_on_the_same_cases(tmp_path, monkeypatch,
                                                                                          capsys):
    """The student stage reuses its source's score of this run (the source is the teacher); a later stage
    (its source a student) scores the teacher on the same validation cases, once per run, said once."""
    scored = []
    teacher_scores = pooled(0.6, 0.9, 0.2)
    monkeypatch.setattr(distill_module, "evaluate",
                        lambda model, cache, ids, cfg, desc: scored.append(ids) or teacher_scores)
    teacher_pt = tmp_path / "teacher.pt"
    data = SimpleNamespace(cache=None, val_ids=["Brats17_A_1", "Brats17_B_1"])
    single = SimpleNamespace(enabled=False, main=True)
    same = SimpleNamespace(teacher_path=str(tmp_path / "." / "teacher.pt"), source=SimpleNamespace(path=teacher_pt),
                           source_metrics=pooled(0.5, 0.8, 0.3), data=data, cfg=Config(), device=torch.device("cpu"),
                           dist=single, teacher_scores=None)
    assert teacher_reference(tiny_teacher(), same) == pooled(0.5, 0.8, 0.3) and scored == []
    other = SimpleNamespace(**{**vars(same), "source": SimpleNamespace(path=tmp_path / "student.pt"),
                               "teacher_scores": None})
    capsys.readouterr()
    assert teacher_reference(tiny_teacher(), other) == teacher_scores and scored == [data.val_ids]
    assert teacher_reference(tiny_teacher(), other) == teacher_scores and len(scored) == 1  # once (growth's phases)
    assert capsys.readouterr().out.count("below the teacher's (TC 0.600, WT 0.900, ET 0.200)") == 1


def test_distill_student_with_adaptive_kd_records_the_teachers_reference_and_follows_it(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    teacher = tiny_teacher()
    Artifact(stage="teacher", spec=teacher.spec.to_dict(), state_dict=teacher.state_dict(),
             config={"data": {"scheme": "regions"}}, metrics={}).save(tmp_path / "teacher.pt")
    cfg = Config()
    cfg.distill.kd_region_weights = "adaptive"
    cfg.data.dir, cfg.data.crop, cfg.data.val_fraction = str(data), [32, 32, 32], 0.5
    t = cfg.train
    t.window, t.overlap, t.sw_batch, t.val_every = [32, 32, 32], 0.25, 2, 1
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs, t.threads, t.log_images = 2, 1, 2, 0, 1, False
    t.amp, t.patience = "off", None
    cfg.distill.teacher, cfg.distill.width = str(tmp_path / "teacher.pt"), 0.5
    art = distill_student(cfg, tmp_path / "student")
    reference = art.extra["distill"]["teacher_pooled_dice"]
    assert set(reference) == {"tc", "wt", "et"} and all(0.0 <= v <= 1.0 for v in reference.values())
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    first, second = [h for h in history if not h.get("start")]
    assert [first["train"][f"kd_w_{r}"] for r in ("tc", "wt", "et")] == [1.0, 1.0, 1.0]
    expected = adaptive_region_weights(first["val"], {f"pooled_dice_{r}": v for r, v in reference.items()})
    assert [second["train"][f"kd_w_{r}"] for r in ("tc", "wt", "et")] == expected.tolist()
