"""The width declaration (`model.widths`) against Torch-Pruning's dependency graph, thinning and growth."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from compress.grow import widen
from model.refineformer3d import ModelSpec, RefineFormer3D
from model.widths import group_keys, width_uses


def tiny(decoder: str) -> RefineFormer3D:
    torch.manual_seed(0)
    return RefineFormer3D(ModelSpec(decoder=decoder, embed_dims=[8, 16, 16, 16], num_heads=[1, 2, 2, 2],
                                    depths=[2, 1, 1, 1], sr_ratios=[4, 2, 1, 1], decoder_dim=16, fuse_dim=16,
                                    refine_dim=8)).eval()


def declared(model: RefineFormer3D, group: str) -> set[tuple[str, str]]:
    """(module, out | in) of a width group: dim 0 of a weight, bias or norm vector is "out", dim 1 "in"."""
    keys = dict(model.state_dict())
    return {(u.key.rsplit(".", 1)[0], "out" if u.dim == 0 else "in")
            for u in width_uses(model.spec)[group] if u.key in keys}


def pruned_together(model: RefineFormer3D, graph, producer: str) -> set[tuple[str, str]]:
    """What Torch-Pruning prunes with the output channels of `producer` (named modules only)."""
    module = model.get_submodule(producer)
    conv = isinstance(module, nn.Conv3d)
    fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
    n = module.out_channels if conv else module.out_features
    names = {m: name for name, m in model.named_modules()}
    found = set()
    for dep, _ in graph.get_pruning_group(module, fn, idxs=list(range(n))):
        name = names.get(dep.target.module)
        if name is not None:  # op nodes (reshape, add, concat) are not modules
            found.add((name, "in" if "in_channels" in dep.handler.__name__ else "out"))
    return found


@pytest.mark.parametrize("decoder", ["refine", "allmlp"])
def test_every_width_group_is_what_torch_pruning_prunes_together(decoder):
    model = tiny(decoder)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 4, 64, 64, 64))
    producers = {f"embed.{i}": f"encoder.stages.{i}.patch_embed.proj" for i in range(4)}
    producers.update({f"hidden.{i}.{j}": f"encoder.stages.{i}.blocks.{j}.mlp.fc1"
                      for i, d in enumerate([2, 1, 1, 1]) for j in range(d)})
    producers.update({f"sr.{i}.{j}": f"encoder.stages.{i}.blocks.{j}.attn.sr" for i, j in [(0, 0), (0, 1), (1, 0)]})
    producers.update({f"decoder.{i}": f"decoder.projections.{i}.proj" for i in range(4)})
    producers["fuse"] = "decoder.fuse"
    if decoder == "refine":
        producers["refine"] = "decoder.refine_pw"
    # attention's qk and v groups are coupled by the attention product, which Torch-Pruning does not see
    assert set(width_uses(model.spec)) - set(producers) == {
        f"{g}.{i}.{j}" for g in ("qk", "v") for i, d in enumerate([2, 1, 1, 1]) for j in range(d)}
    for group, producer in producers.items():
        assert declared(model, group) == pruned_together(model, graph, producer), group


@pytest.mark.parametrize("unit, groups", [("mlp_hidden.0.1", ["hidden.0.1"]), ("attn_dims.0", ["qk.0.0", "v.0.0", "qk.0.1", "v.0.1"]),
                                          ("fuse_dim", ["fuse"]), ("refine_dim", ["refine"])])
def test_growth_changes_exactly_the_declared_entries(unit, groups):
    model = tiny("refine")
    before = {k: v.shape for k, v in model.state_dict().items()}
    width = {"mlp_hidden.0.1": 64, "attn_dims.0": 16, "fuse_dim": 24, "refine_dim": 12}[unit]
    grown = widen(model, unit, width)
    changed = {k for k, v in grown.state_dict().items() if v.shape != before[k]}
    assert changed == set(group_keys(model.spec, groups, set(before))), unit


def test_factorised_layers_are_indexed_on_their_factors_and_unknown_groups_fail():
    spec = ModelSpec(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16,
                     fuse_dim=16, refine_dim=4, ranks={"encoder.stages.1.blocks.0.mlp.fc1": 4})
    keys = group_keys(spec, ["hidden.1.0"])
    assert "encoder.stages.1.blocks.0.mlp.fc1.up.weight" in keys and "encoder.stages.1.blocks.0.mlp.fc1.weight" not in keys
    assert "encoder.stages.1.blocks.0.mlp.fc1.down.weight" in group_keys(spec, ["embed.1"])
    with pytest.raises(KeyError, match="no width group"):
        group_keys(spec, ["refine.9"])
