import math

import pytest
import torch

from common.config import PerturbConfig
from student.perturb import Geometric, apply_geometric, apply_intensity, perturb_batch, sample_geometric

NO_INTENSITY = PerturbConfig(intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, blur_prob=0,
                             modality_dropout=0)


def batch(spatial=(8, 8, 6)):
    g = torch.Generator().manual_seed(0)
    label = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (2, *spatial), generator=g)]
    # channel 0 of the image spells the label, so image and label must move together
    image = torch.randn(2, 4, *spatial, generator=g)
    image[:, 0] = label.float()
    logits = torch.randn(2, 3, *spatial, generator=g)
    return image, logits, label


def test_known_flip_and_rot90_move_input_targets_and_labels_together():
    image, logits, label = batch()
    g = Geometric(flips=(2,), rot_k=1, rot_axes=(0, 1))  # flip W, then a quarter turn in the D-H plane
    p = perturb_batch(image, logits, label, NO_INTENSITY, torch.Generator(), geometric=[g, Geometric()])
    want_t = torch.rot90(torch.flip(logits[0], [3]), 1, [1, 2])
    want_l = torch.rot90(torch.flip(label[0], [2]), 1, [0, 1])
    assert torch.equal(p.target[0], want_t)
    assert torch.equal(p.label[0], want_l)
    assert torch.equal(p.image[0, 0], want_l.float())
    # a hand-checked voxel: after flip W then rot90 (D, H), out[d, h, w] = in[h, D-1-d, W-1-w]
    assert p.label[0, 1, 2, 0] == label[0, 2, 8 - 1 - 1, 6 - 1 - 0]
    assert torch.equal(p.label[1], label[1]) and torch.equal(p.target[1], logits[1])
    assert p.mask.all()


def test_affine_keeps_labels_aligned_and_marks_outside_voxels():
    image, logits, label = batch((12, 12, 12))
    cfg = PerturbConfig(flip_prob=0, rot90_prob=0, affine_prob=1.0, affine_degrees=20, affine_scale=0.2)
    g = sample_geometric(cfg, torch.Generator().manual_seed(3), (12, 12, 12))
    assert g.theta is not None
    p = perturb_batch(image, logits, label, NO_INTENSITY, torch.Generator(), geometric=[g, g])
    assert set(p.label.unique().tolist()) <= {0, 1, 2, 4}  # nearest: no blended label values
    # labels (nearest) and the image channel spelling them (linear) agree wherever no blending happened
    exact = p.image[:, 0] == p.image[:, 0].round()
    assert (p.label[exact] == p.image[:, 0][exact].long()).float().mean() > 0.99
    assert 0.3 < p.mask.float().mean() < 1.0  # corners pulled from outside the crop are invalid
    assert torch.isfinite(p.target).all()


def test_seeded_draws_repeat_and_differ_by_seed():
    image, logits, label = batch((8, 8, 8))
    cfg = PerturbConfig(flip_prob=0.5, rot90_prob=1.0, affine_prob=0.5)
    a = perturb_batch(image, logits, label, cfg, torch.Generator().manual_seed(1))
    b = perturb_batch(image, logits, label, cfg, torch.Generator().manual_seed(1))
    c = perturb_batch(image, logits, label, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert not torch.equal(a.image, c.image)


def test_rot90_only_in_square_planes():
    cfg = PerturbConfig(flip_prob=0, rot90_prob=1.0, affine_prob=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = sample_geometric(cfg, gen, (96, 96, 64))
        assert g.rot_k in (1, 2, 3) and g.rot_axes == (0, 1)
    x = torch.randn(2, 16, 16, 8)
    assert apply_geometric(x, g).shape == x.shape


def test_intensity_changes_are_bounded_and_dropout_zeroes_one_modality():
    x = torch.rand(4, 6, 6, 6) + 1.0
    cfg = PerturbConfig(intensity_scale=0.2, intensity_shift=0.1, gamma=0, noise_std=0, blur_prob=0,
                        modality_dropout=0)
    y = apply_intensity(x, cfg, torch.Generator().manual_seed(0))
    ratio = (y - y.flatten(1).mean(1).view(4, 1, 1, 1)) / (x - x.flatten(1).mean(1).view(4, 1, 1, 1))
    scale = ratio.flatten(1).median(1).values
    assert ((scale >= 0.8 - 1e-5) & (scale <= 1.2 + 1e-5)).all()  # one scale per modality
    offset = y - scale.view(4, 1, 1, 1) * x  # y = scale * x + shift, one pair per modality
    assert (offset.flatten(1).std(1) < 1e-4).all() and (offset.flatten(1).mean(1).abs() <= 0.1 + 1e-5).all()
    drop = PerturbConfig(intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, blur_prob=0,
                         modality_dropout=1.0)
    z = apply_intensity(x, drop, torch.Generator().manual_seed(0))
    zeroed = [c for c in range(4) if (z[c] == 0).all()]
    assert len(zeroed) == 1 and torch.equal(z[[c for c in range(4) if c != zeroed[0]]],
                                             x[[c for c in range(4) if c != zeroed[0]]])
    blur = PerturbConfig(intensity_scale=0, intensity_shift=0, gamma=0, noise_std=0, blur_prob=1.0,
                         modality_dropout=0)
    spike = torch.zeros(1, 9, 9, 9)
    spike[0, 4, 4, 4] = 1.0
    b = apply_intensity(spike, blur, torch.Generator().manual_seed(0))
    assert math.isclose(float(b.sum()), 1.0, rel_tol=1e-4) and float(b.max()) < 0.5


def test_prob_perturbs_each_sample_with_that_chance_and_leaves_the_rest_clean():
    spatial = (8, 8, 8)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(64, 4, *spatial, generator=g)
    logits = torch.randn(64, 3, *spatial, generator=g)
    label = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (64, *spatial), generator=g)]
    # every perturbed sample changes for sure: its intensities are scaled and shifted
    cfg = PerturbConfig(prob=0.25, intensity_scale=0.2, intensity_shift=0.2, flip_prob=0.5)
    p = perturb_batch(image, logits, label, cfg, torch.Generator().manual_seed(5))
    clean = [b for b in range(64) if torch.equal(p.image[b], image[b])]
    for b in clean:  # untouched samples keep their own targets and labels, all voxels valid
        assert torch.equal(p.target[b], logits[b]) and torch.equal(p.label[b], label[b])
    assert p.mask[clean].all()
    # the same seeded generator decides the same samples: the first draw per sample is U(0,1) >= prob
    gen = torch.Generator().manual_seed(5)
    expect = []
    for b in range(64):
        skip = float(torch.rand(1, generator=gen)) >= 0.25
        expect.append(skip)
        if not skip:  # replay this sample's draws to keep the generator in step
            x = apply_geometric(image[b], sample_geometric(cfg, gen, spatial))
            apply_intensity(x, cfg, gen)
    assert clean == [b for b in range(64) if expect[b]]
    assert 36 <= len(clean) <= 60  # ~48 of 64 clean at prob 0.25
    none = perturb_batch(image, logits, label, PerturbConfig(prob=0.0), torch.Generator().manual_seed(5))
    assert torch.equal(none.image, image) and torch.equal(none.label, label)
    every = perturb_batch(image, logits, label, PerturbConfig(prob=1.0, intensity_scale=0.2),
                          torch.Generator().manual_seed(5))
    assert not any(torch.equal(every.image[b], image[b]) for b in range(64))
    with pytest.raises(ValueError, match="perturb.prob"):
        perturb_batch(image, logits, label, PerturbConfig(prob=1.5), torch.Generator())


def test_rotations_stay_in_the_axial_plane_by_default():
    cfg = PerturbConfig(rot90_prob=1.0, affine_prob=1.0, affine_degrees=30.0)
    assert cfg.rotation_planes == "axial"
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = sample_geometric(cfg, gen, (16, 16, 16))
        assert g.rot_k > 0 and g.rot_axes == (0, 1)
        # the affine maps Z onto Z: grid axis x (voxel axis 2) is untouched by the rotation
        assert torch.allclose(g.theta[0, :3] * g.theta[0, 0].sign(), torch.tensor([g.theta[0, 0].abs(), 0.0, 0.0]),
                              atol=1e-6)
    planes = {sample_geometric(PerturbConfig(rot90_prob=1.0, rotation_planes="all"), gen, (16, 16, 16)).rot_axes
              for _ in range(60)}
    assert planes == {(0, 1), (0, 2), (1, 2)}
    with pytest.raises(ValueError, match="rotation_planes"):
        sample_geometric(PerturbConfig(rotation_planes="coronal"), gen, (16, 16, 16))


def test_perturbation_warms_up_from_clean():
    from common.config import Config
    from student.distill import DistillStage
    from model.refineformer3d import RefineFormer3D, preset_spec

    cfg = Config()
    cfg.distill.perturb.prob, cfg.distill.perturb.warmup_epochs = 0.8, 4
    teacher = RefineFormer3D(preset_spec("refineformer3d", embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1],
                                         depths=[1, 1, 1, 1], decoder_dim=8, fuse_dim=8, refine_dim=4))
    stage = DistillStage(teacher, cfg)
    assert stage.perturb_config().prob == 0.8  # outside the engine: no epoch, no ramp
    probs = []
    for epoch in range(6):
        stage.set_epoch(epoch)  # the engine calls it before each epoch
        probs.append(stage.perturb_config().prob)
    assert probs == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8])
