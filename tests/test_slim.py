"""Latency-aware slimming: the head at 1/4 resolution, a patchifying stem, larger key/value reductions."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from brats.phantom import write_phantom_dataset
from common.artifact import Artifact, build_model
from common.config import Config, ConfigError, SlimConfig
from compress.slim import _sr_kernel, _stem_kernel, choose_steps, main, slim, slim_head, slim_mlp, slim_stem, slim_widths
from model.macs import count_macs, spec_macs
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params
from model.widths import group_magnitude

TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16,
            refine_dim=4)


def tiny(seed: int = 0, **overrides) -> RefineFormer3D:
    torch.manual_seed(seed)
    return RefineFormer3D(ModelSpec(**{**TINY, **overrides})).eval()


def test_head_step_moves_the_head_to_a_quarter_and_widens_what_feeds_it():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slimmed = slim_head(model, SlimConfig(refine_dim=8, head_at="quarter"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is unchanged
    assert (slimmed.spec.head_at, slimmed.spec.refine_dim) == ("quarter", 8)
    assert slimmed.decoder.head.weight.shape == (3, 8, 3, 3, 3)
    # everything before the refine width is the model's own weights
    same = [k for k in before if k.startswith("encoder.") or k.startswith("decoder.fuse")]
    assert same and all(torch.equal(slimmed.state_dict()[k], before[k]) for k in same)
    x = torch.randn(1, 4, 64, 64, 32)
    with torch.no_grad():
        out = slimmed.eval()(x)
        # the same logits as the wide head applied at 1/4 resolution, upsampled: nothing else changed
        wide = slim_head(model, SlimConfig(refine_dim=8, head_at="quarter"))
        dec = wide.decoder
        feats = dec.fused(wide.forward_features(x))
        feats = F.relu(dec.refine_pw_bn(dec.refine_pw(F.relu(dec.refine_dw_bn(dec.refine_dw(feats))))))
        expected = F.interpolate(dec.head(feats), size=x.shape[2:], mode="trilinear", align_corners=False)
    assert out.shape == (1, 3, 64, 64, 32) and torch.allclose(out, expected, atol=1e-6)
    size = (128, 128, 128)
    assert spec_macs(slimmed.spec, size) < 0.65 * spec_macs(model.spec, size)  # the full-resolution head was 42%
    assert spec_macs(slimmed.spec, size) == round(count_macs(slimmed, (1, 4, *size)) * 1e9)
    never_narrower = slim_head(tiny(refine_dim=12), SlimConfig(refine_dim=8, head_at="quarter"))
    assert never_narrower.spec.refine_dim == 12
    for bad in (tiny(decoder="allmlp"), slimmed):
        with pytest.raises(ValueError, match="refine decoder with its head at full resolution"):
            slim_head(bad, SlimConfig())


def test_head_step_at_half_keeps_the_weights_and_moves_only_the_head():
    model = tiny()
    half = slim_head(model, SlimConfig(refine_dim=8))  # the default
    quarter = slim_head(model, SlimConfig(refine_dim=8, head_at="quarter"))
    assert half.spec.head_at == "half" and half.spec.refine_dim == 8
    assert all(torch.equal(v, quarter.state_dict()[k]) for k, v in half.state_dict().items())  # same weights
    size = (128, 128, 128)
    assert spec_macs(quarter.spec, size) < spec_macs(half.spec, size) < spec_macs(model.spec, size)


@pytest.mark.parametrize("kernel", [4, 5, 3, 7])
def test_stem_kernel_keeps_the_grid_and_the_overlapping_taps(kernel):
    """A new stem tap reads the same input voxel as the old tap it was copied from: an old kernel that
    is zero outside the overlap gives the same convolution."""
    torch.manual_seed(0)
    old = torch.randn(8, 4, 7, 7, 7)
    stride, pad_old = 4, 3
    pad_new = (kernel - stride + 1) // 2
    new = _stem_kernel(old, pad_old, pad_new, kernel)
    keep = torch.zeros(7)
    shift = pad_old - pad_new
    keep[[j + shift for j in range(kernel) if 0 <= j + shift < 7]] = 1
    masked = old * keep[:, None, None] * keep[None, :, None] * keep[None, None, :]
    x = torch.randn(1, 4, 32, 32, 16)
    a = F.conv3d(x, masked, stride=stride, padding=pad_old)
    b = F.conv3d(x, new, stride=stride, padding=pad_new)
    assert b.shape == a.shape == (1, 8, 8, 8, 4)  # the grid is kept
    assert torch.allclose(a, b, atol=1e-5)


def test_sr_kernel_gives_the_old_keys_on_a_patchwise_constant_input():
    torch.manual_seed(0)
    old = torch.randn(16, 16, 4, 4, 4)
    new = _sr_kernel(old, 8)
    coarse = torch.randn(1, 16, 2, 2, 2)
    x = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)  # constant on 8^3 patches
    wide = F.conv3d(x, new, stride=8)
    narrow = F.avg_pool3d(F.conv3d(x, old, stride=4), 2)  # the old keys, averaged over each 8^3 patch
    assert wide.shape == narrow.shape == (1, 16, 2, 2, 2) and torch.allclose(wide, narrow, rtol=1e-5, atol=1e-3)


def test_stem_step_rebuilds_with_the_new_kernels_and_checks_what_it_cannot_do():
    model = tiny(sr_ratios=[4, 2, 1, 1])
    cfg = SlimConfig(stem_kernel=4, sr_ratios=[8, 4])
    slimmed = slim_stem(model, cfg)
    s = slimmed.spec
    assert (s.patch_kernels[0], s.patch_paddings[0], s.sr_ratios) == (4, 0, [8, 4, 1, 1])
    assert slimmed.encoder.stages[0].blocks[0].attn.sr.weight.shape[-1] == 8
    x = torch.randn(1, 4, 64, 64, 64)
    with torch.no_grad():
        assert slimmed(x).shape == model(x).shape
    assert spec_macs(s, (128,) * 3) < spec_macs(model.spec, (128,) * 3)
    assert count_params(slimmed) > 0 and build_model(Artifact(stage="slim", spec=s.to_dict(),
                                                               state_dict=slimmed.state_dict())) is not None
    with pytest.raises(ValueError, match="smaller than the stem's stride"):
        slim_stem(model, SlimConfig(stem_kernel=2))
    with pytest.raises(ValueError, match="already"):
        slim_stem(slimmed, cfg)
    with pytest.raises(ValueError, match="cannot drop to 1"):
        slim_stem(model, SlimConfig(sr_ratios=[1]))
    factorised = tiny(ranks={"encoder.stages.0.blocks.0.attn.sr": 4})
    with pytest.raises(ValueError, match="slim before low-rank"):
        slim_stem(factorised, cfg)


def test_a_macs_budget_picks_the_largest_saving_first():
    model = tiny(sr_ratios=[4, 2, 1, 1])
    size = (64, 64, 64)
    cfg = SlimConfig(reference_input=list(size), steps=["head", "stem"])
    steps, saved = choose_steps(model, cfg)
    assert steps == ["head", "stem"] and all(v > 0 for v in saved.values())
    base = spec_macs(model.spec, size)
    best = max(saved, key=saved.get)
    one = dataclasses.replace(cfg, macs_budget=str(int(base - saved[best] * 1e9 + 1)))
    assert choose_steps(model, one)[0] == [best]
    assert choose_steps(model, dataclasses.replace(cfg, macs_budget=str(int(base + 1))))[0] == []
    assert choose_steps(model, dataclasses.replace(cfg, macs_budget="1"))[0] == ["head", "stem"]  # unmet: all
    assert slim(model, dataclasses.replace(cfg, steps=["stem"])).spec.head_at == "full"


def test_widths_step_keeps_the_strongest_channels_of_each_group_and_the_floors():
    model = tiny(decoder_dim=32, fuse_dim=32)
    with torch.no_grad():  # make two fuse channels and one stage-2 projection channel stand out
        model.decoder.fuse.weight[[3, 17]] *= 50
        model.decoder.projections[2].proj.weight[5] *= 50
    slimmed = slim_widths(model, SlimConfig(decoder_dim=24, fuse_dim=24))
    assert (slimmed.spec.decoder_dim, slimmed.spec.fuse_dim) == (24, 24)
    assert torch.equal(slimmed.decoder.fuse_bn.running_mean, model.decoder.fuse_bn.running_mean[
        torch.sort(torch.topk(group_magnitude(model, "fuse"), 24).indices).values])
    assert any(torch.equal(row, model.decoder.projections[2].proj.weight[5]) for row in slimmed.decoder.projections[2].proj.weight)
    big = {3, 17}  # both strong fuse channels survive (their refine_dw filters with them)
    kept = torch.sort(torch.topk(group_magnitude(model, "fuse"), 24).indices).values.tolist()
    assert big <= set(kept)
    x = torch.randn(1, 4, 64, 64, 32)
    with torch.no_grad():
        assert slimmed.eval()(x).shape == (1, 3, 64, 64, 32)
    assert spec_macs(slimmed.spec, (128,) * 3) < spec_macs(model.spec, (128,) * 3)
    with pytest.raises(ValueError, match="below its floor of 24"):
        slim_widths(model, SlimConfig(decoder_dim=16, fuse_dim=None))
    with pytest.raises(ValueError, match="not above the targets"):
        slim_widths(slimmed, SlimConfig(decoder_dim=24, fuse_dim=24))


def test_mlp_step_narrows_the_first_stages_hidden_widths_keeping_the_strongest_channels():
    model = tiny(depths=[2, 1, 1, 1])  # stage 1: two blocks, hidden 32 each (ratio 4)
    with torch.no_grad():  # one hidden channel of block 0 stands out over fc1, dwconv and fc2
        model.encoder.stages[0].blocks[0].mlp.fc1.weight[29] *= 50
    slimmed = slim_mlp(model, SlimConfig(mlp_hidden=[16]))
    assert slimmed.spec.mlp_hidden[0] == [16, 16] and slimmed.spec.mlp_hidden[1:] == model.spec.mlp_hidden[1:]
    kept = torch.sort(torch.topk(group_magnitude(model, "hidden.0.0"), 16).indices).values
    assert 29 in kept.tolist()
    assert torch.equal(slimmed.encoder.stages[0].blocks[0].mlp.fc1.weight, model.encoder.stages[0].blocks[0].mlp.fc1.weight[kept])
    assert torch.equal(slimmed.encoder.stages[0].blocks[0].mlp.fc2.weight,
                       model.encoder.stages[0].blocks[0].mlp.fc2.weight[:, kept])
    size = (64, 64, 64)
    assert spec_macs(slimmed.spec, size) < spec_macs(model.spec, size)
    assert spec_macs(slimmed.spec, size) == round(count_macs(slimmed, (1, 4, *size)) * 1e9)
    with torch.no_grad():
        assert slimmed(torch.randn(1, 4, *size)).shape == (1, 3, *size)
    with pytest.raises(ValueError, match="nothing to change"):
        slim_mlp(slimmed, SlimConfig(mlp_hidden=[16]))
    with pytest.raises(ValueError, match="at most one per stage"):
        slim_mlp(model, SlimConfig(mlp_hidden=[16, 16, 16, 16, 16]))
    assert slim_mlp(model, SlimConfig(mlp_hidden=[None, 8])).spec.mlp_hidden[:2] == [[32, 32], [8]]


def test_slim_command_end_to_end_and_bad_input_before_work(tmp_path, capsys):
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=4, val_cases=0, shape=(48, 48, 32), seed=0)
    teacher = tiny(seed=1, sr_ratios=[4, 2, 1, 1])
    Artifact(stage="teacher", spec=teacher.spec.to_dict(), state_dict=teacher.state_dict(),
             config={"data": {"scheme": "regions"}}).save(tmp_path / "teacher.pt")
    student = tiny(seed=2, sr_ratios=[4, 2, 1, 1])
    lineage = [{"stage": "teacher", "path": str(tmp_path / "teacher.pt")}]
    Artifact(stage="student", spec=student.spec.to_dict(), state_dict=student.state_dict(), lineage=lineage,
             config={"data": {"scheme": "regions"}}).save(tmp_path / "student.pt")
    common = ["--data", str(data), "--set", "data.crop=[32,32,32]", "--set", "data.val_fraction=0.5",
              "--set", "train.window=[32,32,32]", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1",
              "--set", "train.threads=1", "--set", "train.log_images=false", "--set", "slim.reference_input=[64,64,64]",
              "--set", "data.num_workers=0"]
    for bad, message in ((["--steps", "head,nose"], "slim.steps"), (["--steps", "head,head"], "at most once"),
                         (["--steps", "widths"], "not above the targets 32 / 32: nothing to narrow; leave the step"),
                         (["--steps", "stem", "--set", "slim.sr_ratios=[64,64]"], "larger than its token grid"),
                         (["--steps", "head", "--macs-budget", "100G"], "already meets"),
                         (["--macs-budget", "50%"], "a count such as 200k, 1.5M, 3G or 1e9, not a share"),
                         (["--macs-budget", "abc"], "not a count like 200k, 1.5M, 3G or 1e9$"),
                         (["--macs-budget", "0"], "a positive count"),
                         (["--steps", "head", "--macs-budget", "0.01G"],
                          r"below what every step of slim.steps \(head\) reaches together, .* raise it to at least"),
                         (["--set", "slim.head_at=full"], "slim.head_at='full': one of half, quarter"),
                         (["--steps", "head", "--set", "train.overlap=1.0"], r"train\.overlap=1\.0: a fraction"),
                         (["--steps", "head", "--out", str(tmp_path), "--overwrite"],
                          "the folder of the source artifact")):
        with pytest.raises(ConfigError, match=message):
            main([str(tmp_path / "student.pt"), "--out", str(tmp_path / "bad"), *bad, *common])
    assert not (tmp_path / "bad").exists()  # refused before any work
    assert main([str(tmp_path / "student.pt"), "--out", str(tmp_path / "slim"), "--steps", "head,stem", *common]) == 0
    art = Artifact.load(tmp_path / "slim" / "slim.pt")
    assert art.stage == "slim" and [e["stage"] for e in art.lineage] == ["teacher", "student"]
    assert art.spec["head_at"] == "half" == art.extra["slim"]["head_at"] and art.spec["patch_kernels"][0] == 4
    assert art.metrics["gmacs_after"] < art.metrics["gmacs_before"]
    assert art.extra["slim"]["steps"] == ["head", "stem"] and "guard" in art.extra
    assert art.extra["distill"]["kd_dice_weight"] == 1.0
    build_model(art)  # strict
    assert "G multiply-adds" in capsys.readouterr().out
