"""Load a foreign SegFormer3D state_dict built from the official key names (REFERENCE.md shapes)."""
import pytest
import torch

from common.artifact import ArtifactError, load_model
from model.segformer_import import import_checkpoint, load_segformer3d_state, main, map_key

DIMS, HEADS, SR, KERNELS = [32, 64, 160, 256], [1, 2, 5, 8], [4, 2, 1, 1], [7, 3, 3, 3]


def official_state_dict(num_classes=3, seed=0):
    """The official SegFormer3D parameter names and shapes, written out independently of our model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def put(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    def layer_norm(name, c):
        put(f"{name}.weight", c)
        put(f"{name}.bias", c)

    def batch_norm(name, c):
        layer_norm(name, c)
        sd[f"{name}.running_mean"] = torch.zeros(c)
        sd[f"{name}.running_var"] = torch.ones(c)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    cin = 4
    for s, (c, k, sr) in enumerate(zip(DIMS, KERNELS, SR), start=1):
        e = f"segformer_encoder.embed_{s}"
        put(f"{e}.patch_embeddings.weight", c, cin, k, k, k)
        put(f"{e}.patch_embeddings.bias", c)
        layer_norm(f"{e}.norm", c)
        for b in range(2):
            t = f"segformer_encoder.tf_block{s}.{b}"
            layer_norm(f"{t}.norm1", c)
            put(f"{t}.attention.query.weight", c, c)
            put(f"{t}.attention.query.bias", c)
            put(f"{t}.attention.key_value.weight", 2 * c, c)
            put(f"{t}.attention.key_value.bias", 2 * c)
            put(f"{t}.attention.proj.weight", c, c)
            put(f"{t}.attention.proj.bias", c)
            if sr > 1:
                put(f"{t}.attention.sr.weight", c, c, sr, sr, sr)
                put(f"{t}.attention.sr.bias", c)
                layer_norm(f"{t}.attention.sr_norm", c)
            layer_norm(f"{t}.norm2", c)
            put(f"{t}.mlp.fc1.weight", 4 * c, c)
            put(f"{t}.mlp.fc1.bias", 4 * c)
            put(f"{t}.mlp.dwconv.dwconv.weight", 4 * c, 1, 3, 3, 3)
            put(f"{t}.mlp.dwconv.dwconv.bias", 4 * c)
            batch_norm(f"{t}.mlp.dwconv.bn", 4 * c)
            put(f"{t}.mlp.fc2.weight", c, 4 * c)
            put(f"{t}.mlp.fc2.bias", c)
        layer_norm(f"segformer_encoder.norm{s}", c)
        cin = c
    for s, c in enumerate(DIMS, start=1):
        put(f"segformer_decoder.linear_c{s}.proj.weight", 256, c)
        put(f"segformer_decoder.linear_c{s}.proj.bias", 256)
        layer_norm(f"segformer_decoder.linear_c{s}.bn", 256)
    put("segformer_decoder.linear_fuse.0.weight", 256, 1024, 1, 1, 1)
    batch_norm("segformer_decoder.linear_fuse.1", 256)
    put("segformer_decoder.linear_pred.weight", num_classes, 256, 1, 1, 1)
    put("segformer_decoder.linear_pred.bias", num_classes)
    return sd


def test_every_official_key_lands_in_the_right_place():
    foreign = official_state_dict()
    assert sum(v.numel() for k, v in foreign.items() if "running" not in k and "num_batches" not in k) == 4_525_251
    model = load_segformer3d_state(foreign)
    ours = model.state_dict()
    kv = foreign["segformer_encoder.tf_block2.1.attention.key_value.weight"]
    assert torch.equal(ours["encoder.stages.1.blocks.1.attn.kv.weight"], kv)
    assert torch.equal(ours["decoder.projections.3.proj.weight"], foreign["segformer_decoder.linear_c4.proj.weight"])
    assert torch.equal(ours["decoder.fuse_bn.weight"], foreign["segformer_decoder.linear_fuse.1.weight"])
    assert torch.equal(ours["encoder.stages.0.blocks.0.mlp.bn.weight"], foreign["segformer_encoder.tf_block1.0.mlp.dwconv.bn.weight"])
    for key, value in foreign.items():
        assert torch.equal(ours[map_key(key)], value), key


def test_ddp_prefix_and_attention_scale_switch():
    foreign = {f"module.{k}": v for k, v in official_state_dict().items()}
    model = load_segformer3d_state(foreign, attn_scale="num_heads")
    scales = [stage.blocks[0].attn.scale for stage in model.encoder.stages]
    assert scales == pytest.approx([h ** -0.5 for h in HEADS])
    default = load_segformer3d_state(official_state_dict())
    assert default.encoder.stages[3].blocks[0].attn.scale == pytest.approx(32 ** -0.5)


def test_mismatches_are_reported_by_key():
    foreign = official_state_dict()
    del foreign["segformer_encoder.norm3.bias"]
    foreign["segformer_encoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ArtifactError, match=r"extra_head.*encoder\.stages\.2\.norm\.bias"):
        load_segformer3d_state(foreign, source="x.pth")
    foreign = official_state_dict()
    foreign["segformer_encoder.tf_block1.0.attention.query.weight"] = torch.zeros(16, 32)
    with pytest.raises(ArtifactError, match=r"attn\.q\.weight: shape \(16, 32\)"):
        load_segformer3d_state(foreign)


def test_import_writes_a_teacher_artifact(tmp_path):
    torch.save(official_state_dict(num_classes=3), tmp_path / "official.pth")
    import_checkpoint(tmp_path / "official.pth", tmp_path / "teacher.pt")
    model, art = load_model(tmp_path / "teacher.pt")
    model.eval()
    assert art.stage == "teacher" and art.spec["decoder"] == "allmlp"
    assert model(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_help_says_which_scale_the_published_weights_need(capsys):
    assert len(official_state_dict()) == 232  # the entry count the help quotes
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "published SegFormer3D weights (BraTS 2017)" in text and "--attn-scale num_heads" in text
    assert "all 232 state_dict entries map" in text and "any size divisible by 32" in text
