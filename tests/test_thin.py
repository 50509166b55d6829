import dataclasses

import pytest
import torch

from student.thin import accumulate_taylor_grads, scratch_student, student_spec, thin_with_selection
from engine.losses import segmentation_loss
from model.refineformer3d import ModelSpec, RefineFormer3D, count_params, model_from_spec, preset_spec, scale_width


def tiny_spec(decoder: str = "refine") -> ModelSpec:
    return ModelSpec(decoder=decoder, embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], depths=[1, 2, 1, 1],
                     decoder_dim=16, fuse_dim=16, refine_dim=8)


def tiny_teacher(decoder: str = "refine", seed: int = 0) -> RefineFormer3D:
    torch.manual_seed(seed)
    model = RefineFormer3D(tiny_spec(decoder))
    with torch.no_grad():  # non-trivial norms and biases, so a wrong slice shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("width, params", [(0.25, 318_003), (0.5, 1_178_211)])
def test_segformer3d_student_shape_and_parameter_count(width, params):
    teacher = RefineFormer3D(preset_spec("segformer3d"))
    student, _ = thin_with_selection(teacher, width)
    assert count_params(student) == params
    expected = scale_width(teacher.spec, width).resolve()
    got = student.spec
    assert got.embed_dims == expected.embed_dims == [round(c * width) for c in (32, 64, 160, 256)]
    assert got.num_heads == [1, 2, 5, 8]
    assert got.mlp_hidden == expected.mlp_hidden and got.decoder_dim == expected.decoder_dim
    # only the attention scale differs: the pruned student keeps the teacher's
    assert dataclasses.replace(got, attn_scales=None).resolve() == expected
    assert got.attn_scales == pytest.approx([32 ** -0.5] * 4)


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
def test_surviving_channels_carry_teacher_weights(decoder):
    teacher = tiny_teacher(decoder)
    student, sel = thin_with_selection(teacher, 0.5, floors=False)  # every width halves
    t, s = teacher.state_dict(), student.state_dict()
    r0, r1 = sel.res[0], sel.res[1]
    assert len(r0) == 8 and len(r1) == 16
    # residual stream of stage 1: patch embed reads stage 0's kept channels, writes its own
    assert torch.equal(s["encoder.stages.1.patch_embed.proj.weight"], t["encoder.stages.1.patch_embed.proj.weight"][r1][:, r0])
    b = "encoder.stages.1.blocks.1"
    assert torch.equal(s[f"{b}.norm1.weight"], t[f"{b}.norm1.weight"][r1])
    assert torch.equal(s[f"{b}.mlp.fc2.bias"], t[f"{b}.mlp.fc2.bias"][r1])
    h = sel.hidden[1][1]
    assert len(h) == 64
    assert torch.equal(s[f"{b}.mlp.fc1.weight"], t[f"{b}.mlp.fc1.weight"][h][:, r1])
    assert torch.equal(s[f"{b}.mlp.dwconv.weight"], t[f"{b}.mlp.dwconv.weight"][h])
    assert torch.equal(s[f"{b}.mlp.bn.running_var"], t[f"{b}.mlp.bn.running_var"][h])
    # attention: q and k share per-head dims, v matches proj's input columns; kv input is sr's output
    qk, v, sr = sel.qk[1][1], sel.v[1][1], sel.sr[1][1]
    assert torch.equal(s[f"{b}.attn.q.weight"], t[f"{b}.attn.q.weight"][qk][:, r1])
    kv = t[f"{b}.attn.kv.weight"]
    assert torch.equal(s[f"{b}.attn.kv.weight"][:16], kv[:32][qk][:, sr])
    assert torch.equal(s[f"{b}.attn.kv.weight"][16:], kv[32:][v][:, sr])
    assert torch.equal(s[f"{b}.attn.proj.weight"], t[f"{b}.attn.proj.weight"][r1][:, v])
    assert torch.equal(s[f"{b}.attn.sr.weight"], t[f"{b}.attn.sr.weight"][sr][:, r1])
    # decoder: projection reads the stage's residual channels; fuse input is deepest stage first
    d0, d3 = sel.dec[0], sel.dec[3]
    assert torch.equal(s["decoder.projections.0.proj.weight"], t["decoder.projections.0.proj.weight"][d0][:, r0])
    fuse_t, fuse_s = t["decoder.fuse.weight"][sel.fuse], s["decoder.fuse.weight"]
    assert torch.equal(fuse_s[:, :8], fuse_t[:, d3])  # block 0 of the concatenation is stage 3
    assert torch.equal(fuse_s[:, 24:], fuse_t[:, 48 + d0])
    if decoder == "refine":
        assert torch.equal(s["decoder.head.weight"], t["decoder.head.weight"][:, sel.refine])
        assert torch.equal(s["decoder.head.bias"], t["decoder.head.bias"])
    else:
        assert torch.equal(s["decoder.pred.weight"], t["decoder.pred.weight"][:, sel.fuse])


def test_heads_keep_dims_of_their_own_head():
    teacher = tiny_teacher()
    _, sel = thin_with_selection(teacher, 0.5)
    qk = sel.qk[2][0]  # 2 heads of 16 dims -> 2 heads of 8 dims
    assert len(qk) == 16
    assert ((qk[:8] >= 0) & (qk[:8] < 16)).all() and ((qk[8:] >= 16) & (qk[8:] < 32)).all()


def test_magnitude_keeps_the_strong_channels():
    teacher = tiny_teacher()
    with torch.no_grad():
        fc1 = teacher.encoder.stages[0].blocks[0].mlp.fc1
        fc1.weight[[5, 40]] *= 100  # must survive
        fc1.weight[[7, 9]] = 0  # weak in fc1 only, but fc2 / dwconv / bn still carry them
        teacher.encoder.stages[0].patch_embed.proj.weight[3] *= 100
        q = teacher.encoder.stages[0].blocks[0].attn.q
        q.weight[11] *= 100
    _, sel = thin_with_selection(teacher, 0.25)
    assert {5, 40} <= set(sel.hidden[0][0].tolist())
    assert 3 in sel.res[0].tolist()
    assert 11 in sel.qk[0][0].tolist()


def test_full_width_is_the_same_function_and_rebuilds_from_plain_spec():
    teacher = tiny_teacher().eval()
    student, _ = thin_with_selection(teacher, 1.0)
    x = torch.randn(1, 4, 32, 32, 32)
    assert torch.equal(student.eval()(x), teacher(x))
    thin, _ = thin_with_selection(teacher, 0.5)
    rebuilt = model_from_spec(thin.spec.to_dict())  # plain data, no torch-pruning involved
    rebuilt.load_state_dict(thin.state_dict(), strict=True)
    assert torch.equal(rebuilt.eval()(x), thin.eval()(x))


def test_taylor_ranks_by_weight_times_gradient():
    teacher = tiny_teacher()
    batch = {"image": torch.randn(2, 4, 32, 32, 32), "label": torch.randint(0, 3, (2, 32, 32, 32))}
    n = accumulate_taylor_grads(teacher, [batch, batch], lambda y, lab: segmentation_loss(y, lab, "regions")[0])
    assert n == 2 and teacher.decoder.fuse.weight.grad.abs().sum() > 0
    for p in teacher.parameters():  # only fc1 rows 20..35 get a gradient: Taylor must keep exactly those
        p.grad = torch.zeros_like(p)
    fc1 = teacher.encoder.stages[0].blocks[0].mlp.fc1
    fc1.weight.grad[20:36] = 1.0
    _, taylor = thin_with_selection(teacher, 0.25, importance="taylor")
    assert taylor.hidden[0][0].tolist() == list(range(20, 36))
    _, magnitude = thin_with_selection(teacher, 0.25, importance="magnitude")
    assert magnitude.hidden[0][0].tolist() != list(range(20, 36))


def test_scratch_student_and_bad_input():
    spec = tiny_spec()
    s = scratch_student(spec, 0.5)
    assert s.spec.attn_scales == pytest.approx([8 ** -0.5, 8 ** -0.5, 8 ** -0.5, 8 ** -0.5])
    assert student_spec(spec, 0.5).attn_scales == pytest.approx([16 ** -0.5] * 4)
    with pytest.raises(ValueError, match="width"):
        student_spec(spec, 1.5)
    with pytest.raises(ValueError, match="low-rank"):
        student_spec(dataclasses.replace(spec, ranks={"decoder.fuse": 2}), 0.5)
    with pytest.raises(ValueError, match="importance"):
        thin_with_selection(tiny_teacher(), 0.5, importance="random")


def test_head_floors_keep_channels_per_region_and_say_why():
    from student.thin import width_plan

    spec = ModelSpec(embed_dims=[32, 64, 160, 256], decoder_dim=16, fuse_dim=64, refine_dim=16)
    rows = {r["layer"]: r for r in width_plan(spec, 0.25)}
    # refine tail: 16 x 0.25 = 4 -> floor 4 channels x 3 regions = 12; decoder 4 -> min(16, 24) = 16
    assert (rows["refine_dim"]["scaled"], rows["refine_dim"]["student"]) == (4, 12)
    assert rows["refine_dim"]["rule"] == "floor 4 x 3 regions"
    assert (rows["decoder_dim"]["scaled"], rows["decoder_dim"]["student"]) == (4, 16)
    assert (rows["fuse_dim"]["student"], rows["fuse_dim"]["rule"]) == (24, "floor 8 x 3 regions")
    s = student_spec(spec, 0.25)
    assert (s.refine_dim, s.decoder_dim, s.fuse_dim, s.embed_dims) == (12, 16, 24, [8, 16, 40, 64])
    assert student_spec(spec, 0.25, floors=False).refine_dim == 4  # the plain multiplier
    assert student_spec(spec, 1.0) == dataclasses.replace(spec, attn_scales=None).resolve()  # width 1: the teacher


def _tail_teacher() -> RefineFormer3D:
    """A teacher whose ET logit reads only refine channel 5, a channel of tiny weights."""
    teacher = tiny_teacher("refine")
    with torch.no_grad():
        head = teacher.decoder.head.weight
        head.zero_()
        head[0, 0], head[1, 1], head[2, 5] = 1.0, 1.0, 1.0
        teacher.decoder.refine_pw.weight[5] *= 1e-3
        teacher.decoder.refine_pw_bn.weight[5] = 1e-3
    return teacher


def test_region_balanced_tail_keeps_the_small_regions_channel():
    teacher = _tail_teacher()
    # 4 of 8 refine channels kept: magnitude alone would drop channel 5 (its weights are 1000x smaller)
    _, sel = thin_with_selection(teacher, 0.5, floors=False)
    assert len(sel.refine) == 4 and 5 in sel.refine.tolist()
    assert {0, 1} <= set(sel.refine.tolist())  # every region's own channel


def test_taylor_keeps_a_small_magnitude_channel_the_loss_needs():
    teacher = tiny_teacher("refine")
    with torch.no_grad():
        teacher.decoder.fuse.weight[3] *= 1e-3  # fuse channel 3: tiny weights ...
        teacher.decoder.fuse_bn.weight[3] = 1e-3
    for p in teacher.parameters():
        p.grad = torch.zeros_like(p)
    teacher.decoder.fuse.weight.grad[3] = 1e6  # ... but a large loss gradient (|w * dL/dw| is large)
    teacher.decoder.fuse_bn.weight.grad[3] = 1e6
    _, by_taylor = thin_with_selection(teacher, 0.5, importance="taylor", floors=False)
    _, by_magnitude = thin_with_selection(teacher, 0.5, importance="magnitude", floors=False)
    assert 3 in by_taylor.fuse.tolist() and 3 not in by_magnitude.fuse.tolist()
