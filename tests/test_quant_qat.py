"""QAT checkpoints are self-describing ("int8-qat"): they rebuild, load strictly, reproduce the fake-quant
outputs, and quantize.py resumes an interrupted QAT fine-tune; LSQ steps get no weight decay."""
import copy
import math

import pytest
import torch

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, ArtifactError, build_model
from common.config import Config, ConfigError
from compress.quant.convert import convert
from compress.quant.lsq import QUANT_LAYERS
from compress.quant.qat import is_quantizer_param, qat_spec
from compress.quant.stage import quantize_step, run_quantize
from engine.loop import artifact_spec, no_decay_parameters
from engine.loop import LAST, best_epoch
from model.refineformer3d import ModelSpec, RefineFormer3D

TINY = dict(embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)
SHAPE = (1, 4, 32, 32, 32)


def tiny_fp32(seed: int = 0, decoder: str = "refine") -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(ModelSpec(decoder=decoder, **TINY)).eval()


STEM_INT8 = {"encoder.stages.0.patch_embed.proj": "int8"}  # FP32 unless forced; these tests quantize everything


def tiny_qat(decoder="refine", reassoc=True, act_qmax=127, force=None):
    cfg = Config()
    cfg.quant.decide, cfg.quant.force = "all", {**STEM_INT8, **(force or {})}
    cfg.quant.reassoc, cfg.quant.act_qmax = reassoc, act_qmax
    calib = [torch.randn(SHAPE) for _ in range(2)]
    qat, rows = quantize_step(tiny_fp32(decoder=decoder), cfg, calib, shape=SHAPE)
    with torch.no_grad():  # as after some fine-tuning: weights and steps away from their initial values
        gen = torch.Generator().manual_seed(1)
        for name, p in qat.named_parameters():
            scale = 0.2 if name.endswith(".step") else 0.05
            p.mul_(1 + scale * torch.rand(p.shape, generator=gen))
    return qat, rows


@pytest.mark.parametrize("decoder, reassoc, act_qmax, force", [
    ("refine", True, 127, {"decoder.head": "int8"}),  # every layer, the logits one with a float output
    ("allmlp", False, 255, {"decoder.fuse": "fp32"}),
])
def test_qat_checkpoint_rebuilds_the_fake_quant_model(tmp_path, decoder, reassoc, act_qmax, force):
    qat, rows = tiny_qat(decoder, reassoc, act_qmax, force)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = qat(x)
    spec = artifact_spec(qat)  # what the engine records: the fake-quant model describes itself
    assert spec["kind"] == "int8-qat"
    Artifact(stage="int8-qat", spec=spec, state_dict=qat.state_dict()).save(tmp_path / "best.pt")

    art = Artifact.load(tmp_path / "best.pt")  # weights_only=True
    rebuilt = build_model(art)  # strict load
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    names = [n for n, m in rebuilt.named_modules() if isinstance(m, QUANT_LAYERS)]
    int8 = [n for n, m in rebuilt.named_modules() if isinstance(m, QUANT_LAYERS) and not m.weight_only]
    chosen = [r["layer"] for r in rows if r["choice"] == "int8"]
    assert art.spec["kind"] == "int8-qat" and names == art.spec["quant_layers"]
    assert sorted(int8) == sorted(chosen)  # decisions are in execution order, modules in definition order
    assert art.spec["lsq"]["weight_only"] == sorted(set(names) - set(chosen))  # the rest: weights only
    # every Linear/Conv3d. encoder: 4 stems + 4 x (q, kv, proj, fc1, dwconv, fc2) + 2 sr = 30; refine decoder
    # (re-associated): 4 projections + 4 fuse_parts + refine_dw, refine_pw, head, all INT8; allmlp:
    # 4 projections INT8, fuse (forced fp32) and the logits layer pred (float unless forced) weight only
    assert len(names) == 30 + (11 if decoder == "refine" else 6)
    assert len(int8) == 30 + (11 if decoder == "refine" else 4)
    assert art.spec["lsq"]["act_qmax"] == act_qmax and art.spec["reassoc"] is reassoc
    assert art.spec["lsq"]["final"] == (["decoder.head"] if decoder == "refine" else ["decoder.pred"])
    assert {m.in_fq.qmax for m in rebuilt.modules() if isinstance(m, QUANT_LAYERS)} == {act_qmax}
    assert qat_spec(rebuilt) == spec  # a rebuilt model describes itself identically (resume checks this)
    # the rebuilt logits layer keeps its float output, every inner one requantizes
    if decoder == "refine":
        assert not rebuilt.decoder.head.out_fq.enabled and rebuilt.decoder.refine_pw.out_fq.enabled


def test_wrong_weights_for_a_qat_spec_are_refused(tmp_path):
    qat, _ = tiny_qat()
    state = qat.state_dict()
    del state["decoder.refine_pw.w_fq.step"]
    Artifact(stage="int8-qat", spec=qat_spec(qat), state_dict=state).save(tmp_path / "bad.pt")
    with pytest.raises(ArtifactError, match="w_fq.step"):
        build_model(Artifact.load(tmp_path / "bad.pt"))
    spec = {**qat_spec(qat), "quant_layers": ["decoder.no_such"]}
    with pytest.raises(ValueError, match="no_such"):
        build_model(Artifact(stage="int8-qat", spec=spec, state_dict=state))


def test_lsq_steps_get_no_weight_decay():
    qat, rows = tiny_qat()
    exempt = no_decay_parameters(qat)  # what the engine's AdamW groups exempt
    no_decay = [n for n, p in qat.named_parameters() if id(p) in exempt]
    assert len(no_decay) == 3 * len(rows)  # w_fq, in_fq, out_fq steps of every layer (the head's: weight only)
    assert all(n.endswith(("w_fq.step", "in_fq.step", "out_fq.step")) for n in no_decay)
    assert id(qat.decoder.refine_pw.weight) not in exempt
    assert is_quantizer_param("module.encoder.stages.0.blocks.0.attn.q.in_fq.zero_point")  # DDP prefix
    assert not is_quantizer_param("decoder.fuse_bias")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    return root


def _quant_cfg(data_dir, epochs: int) -> Config:
    cfg = Config()
    cfg.data.dir, cfg.data.crop, cfg.data.val_fraction = str(data_dir), [32, 32, 32], 0.5
    t = cfg.train
    t.window, t.overlap, t.sw_batch = [32, 32, 32], 0.25, 1
    t.epochs, t.steps_per_epoch, t.batch_size, t.warmup_epochs = epochs, 1, 2, 0  # 32^3 crops: batch >= 2
    t.lr, t.min_lr, t.threads, t.log_images, t.amp = 1e-3, 1e-5, 1, False, "off"
    cfg.quant.decide, cfg.quant.calib, cfg.quant.force = "all", 1, dict(STEM_INT8)
    return cfg


def test_quantize_resumes_an_interrupted_qat_run(phantom, tmp_path):
    fp32 = tiny_fp32(decoder="refine")
    src = Artifact(stage="student", spec=fp32.spec.to_dict(), state_dict=fp32.state_dict(),
                   metrics={"dice_mean": 0.5}).save(tmp_path / "student.pt")
    out = tmp_path / "int8"
    run_quantize(src, _quant_cfg(phantom, epochs=1), out)  # "interrupted" after epoch 1 of 2
    first = Artifact.load(out / "qat" / LAST)
    assert first.extra["train_state"]["epoch"] == 1

    path = run_quantize(src, _quant_cfg(phantom, epochs=2), out, resume=True)
    last = Artifact.load(out / "qat" / LAST)
    assert last.extra["train_state"]["epoch"] == 2 and len(last.extra["train_state"]["history"]) == 2
    assert last.spec == first.spec  # same layers and LSQ settings, taken from the checkpoint
    groups = last.extra["train_state"]["optimizer"]["param_groups"]
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    steps = [k for k in last.state_dict if k.endswith(".step")]
    # every layer INT8 but the head, weight only: its activation steps are not trained
    assert len(no_decay) == 1 and len(no_decay[0]["params"]) == len(steps) - 2 == 3 * 41 - 2
    moved = [k for k, v in first.state_dict.items() if not torch.equal(v, last.state_dict[k])]
    assert any(k.endswith(".step") for k in moved) and any(k.endswith(".weight") for k in moved)
    int8 = Artifact.load(path)
    assert int8.extra["int8"]["decisions"] == first.extra["int8"]["decisions"]
    assert 0.0 <= int8.metrics["dice_mean"] <= 1.0
    assert int8.extra["val_cases"] == last.extra["val_cases"]  # the case list, as every stage's artifact has it
    # the FP32 figure is measured in this run on the same cases (not the 0.5 stored in the source artifact)
    source_dice = int8.extra["guard"]["source_dice"]
    assert math.isclose(int8.metrics["fp32_dice_mean"], sum(source_dice.values()) / 3, rel_tol=1e-9)
    assert int8.extra["guard"]["source"] == "student" and set(int8.extra["guard"]["drops"]) == {"wt", "tc", "et"}
    # the best QAT epoch (carried in qat/last.pt; no best.pt beside it) rebuilds and converts to the saved INT8 model
    assert sorted(p.name for p in out.rglob("*.pt")) == ["int8.pt", "last.pt"]
    best = build_model(best_epoch(last))
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = build_model(int8)(x)
        assert torch.allclose(convert(copy.deepcopy(best))(x), expected, atol=1e-5)

    other = tiny_fp32(decoder="allmlp")
    src2 = Artifact(stage="student", spec=other.spec.to_dict(), state_dict=other.state_dict()).save(tmp_path / "o.pt")
    with pytest.raises(ArtifactError, match="another architecture"):
        run_quantize(src2, _quant_cfg(phantom, epochs=2), out, resume=True)
    # decisions timed for one backend and input size are not resumed for others (they were, silently)
    with pytest.raises(ArtifactError, match=r"decided for backend torch, not onnxruntime; resume with the same"):
        run_quantize(src, _quant_cfg(phantom, epochs=2), out, backend="onnxruntime", resume=True)
    bigger = _quant_cfg(phantom, epochs=2)
    bigger.quant.input = [64, 32, 32]
    with pytest.raises(ArtifactError, match=r"decided for input \(quant.input, else train.window\) \(32, 32, 32\), "
                                            r"not \(64, 32, 32\)"):
        run_quantize(src, bigger, out, resume=True)


def test_quant_input_is_checked_before_any_work(phantom, tmp_path):
    """quant.input is the size the layers are timed at and, for ONNX Runtime, the graph's only input: a size
    the model cannot take, or (onnxruntime) one the stage would not score with, is refused up front (they
    failed in a traceback after data loading, or after the fine-tune)."""
    fp32 = tiny_fp32(decoder="refine")
    src = Artifact(stage="student", spec=fp32.spec.to_dict(), state_dict=fp32.state_dict()).save(tmp_path / "s.pt")
    for size, backend, why in (([48, 32, 32], "torch", r"quant.input=\[48, 32, 32\]: three sizes, each a positive "
                                                       r"multiple of 32"),
                               ([0, 32, 32], "torch", r"quant.input=\[0, 32, 32\]"),
                               ([64, 32, 32], "onnxruntime", r"quant.input=\[64, 32, 32\] differs from train.window="
                                                             r"\[32, 32, 32\]: the ONNX graph takes only quant.input.*"
                                                             r"--set train.window=\[64,32,32\]")):
        cfg = _quant_cfg(phantom, epochs=0)
        cfg.quant.input = size
        with pytest.raises(ConfigError, match=why):
            run_quantize(src, cfg, tmp_path / "q", backend=backend)
        assert not (tmp_path / "q").exists()
