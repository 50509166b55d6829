"""Load a state_dict saved by the official SegFormer3D implementation into the `segformer3d` preset.

Every foreign key must map to one of ours and every shape must match; anything left over on either
side is an error that lists the keys. The official code's first release scaled attention scores by
1/sqrt(num_heads) instead of 1/sqrt(head_dim): `attn_scale="num_heads"` reproduces that model.

    python -m model.segformer_import official.pth --out runs/segformer3d/teacher.pt --attn-scale num_heads

The only published SegFormer3D weights (BraTS 2017) predate the official code's switch to
`scaled_dot_product_attention`: they were trained with the 1/sqrt(num_heads) scale, so import them
with --attn-scale num_heads (the default, head_dim, is today's official code). The import was
checked against them: all 232 state_dict entries map, and outputs agree to 1e-6 (relative) with
the matching official version. That official file no longer imports under torch 2.13 and takes
only cubic inputs; this model takes any size divisible by 32 per axis.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from common.artifact import Artifact, ArtifactError
from common.cli import run_main
from model.refineformer3d import ModelSpec, RefineFormer3D, preset_spec

# (foreign pattern, our template); groups: stage number (1-based), block index.
_RULES: list[tuple[str, str]] = [
    (r"segformer_encoder\.embed_(\d)\.patch_embeddings\.(.+)", "encoder.stages.{s}.patch_embed.proj.{0}"),
    (r"segformer_encoder\.embed_(\d)\.norm\.(.+)", "encoder.stages.{s}.patch_embed.norm.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.attention\.query\.(.+)", "encoder.stages.{s}.blocks.{b}.attn.q.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.attention\.key_value\.(.+)", "encoder.stages.{s}.blocks.{b}.attn.kv.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.attention\.proj\.(.+)", "encoder.stages.{s}.blocks.{b}.attn.proj.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.attention\.sr\.(.+)", "encoder.stages.{s}.blocks.{b}.attn.sr.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.attention\.sr_norm\.(.+)", "encoder.stages.{s}.blocks.{b}.attn.sr_norm.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.norm([12])\.(.+)", "encoder.stages.{s}.blocks.{b}.norm{0}.{1}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.mlp\.fc([12])\.(.+)", "encoder.stages.{s}.blocks.{b}.mlp.fc{0}.{1}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "encoder.stages.{s}.blocks.{b}.mlp.dwconv.{0}"),
    (r"segformer_encoder\.tf_block(\d)\.(\d+)\.mlp\.dwconv\.bn\.(.+)", "encoder.stages.{s}.blocks.{b}.mlp.bn.{0}"),
    (r"segformer_encoder\.norm(\d)\.(.+)", "encoder.stages.{s}.norm.{0}"),
    (r"segformer_decoder\.linear_c(\d)\.proj\.(.+)", "decoder.projections.{s}.proj.{0}"),
    (r"segformer_decoder\.linear_c(\d)\.bn\.(.+)", "decoder.projections.{s}.norm.{0}"),
    (r"segformer_decoder\.linear_fuse\.0\.(.+)", "decoder.fuse.{0}"),
    (r"segformer_decoder\.linear_fuse\.1\.(.+)", "decoder.fuse_bn.{0}"),
    (r"segformer_decoder\.linear_pred\.(.+)", "decoder.pred.{0}"),
]
_COMPILED = [(re.compile(p + "$"), t) for p, t in _RULES]


def map_key(key: str) -> str | None:
    """Our name for an official SegFormer3D key, or None if it is not one."""
    key = key.removeprefix("module.")
    for pattern, template in _COMPILED:
        m = pattern.match(key)
        if not m:
            continue
        groups = list(m.groups())
        stage = block = None
        if "{s}" in template:
            stage = int(groups.pop(0)) - 1
        if "{b}" in template:
            block = int(groups.pop(0))
        return template.format(*groups, s=stage, b=block)
    return None


def segformer3d_spec(attn_scale: str = "head_dim", num_classes: int = 3, **overrides) -> ModelSpec:
    spec = preset_spec("segformer3d", num_classes=num_classes, **overrides)
    if attn_scale == "num_heads":
        spec.attn_scales = [h ** -0.5 for h in spec.num_heads]
    elif attn_scale != "head_dim":
        raise ValueError(f"attn_scale must be 'head_dim' or 'num_heads', got {attn_scale!r}")
    return spec


def load_segformer3d_state(
    foreign: dict[str, torch.Tensor], attn_scale: str = "head_dim", source: str = "state_dict"
) -> RefineFormer3D:
    """Build the `segformer3d` preset and load an official state_dict into it, strictly."""
    if "state_dict" in foreign and isinstance(foreign["state_dict"], dict):
        foreign = foreign["state_dict"]
    pred = foreign.get("segformer_decoder.linear_pred.weight", foreign.get("module.segformer_decoder.linear_pred.weight"))
    num_classes = pred.shape[0] if pred is not None else 3
    model = RefineFormer3D(segformer3d_spec(attn_scale, num_classes=num_classes))
    ours = model.state_dict()
    mapped, unmapped = {}, []
    for key, value in foreign.items():
        name = map_key(key)
        if name is None:
            unmapped.append(key)
        else:
            mapped[name] = value
    problems = []
    if unmapped:
        problems.append(f"keys with no counterpart: {unmapped[:10]}{' ...' if len(unmapped) > 10 else ''}")
    missing = sorted(set(ours) - set(mapped))
    if missing:
        problems.append(f"our keys not provided: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    extra = sorted(set(mapped) - set(ours))
    if extra:
        problems.append(f"mapped keys the preset lacks (another depth/width?): {extra[:10]}")
    for name in sorted(set(mapped) & set(ours)):
        if mapped[name].shape != ours[name].shape:
            problems.append(f"{name}: shape {tuple(mapped[name].shape)} != expected {tuple(ours[name].shape)}")
    if problems:
        raise ArtifactError(f"{source}: not a SegFormer3D (segformer3d preset) state_dict: " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)
    return model


def import_checkpoint(path: str | Path, out: str | Path, attn_scale: str = "head_dim") -> Artifact:
    try:
        foreign = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{path}: cannot read checkpoint: {e}") from None
    model = load_segformer3d_state(foreign, attn_scale, source=str(path))
    art = Artifact(
        stage="teacher",
        spec=model.spec.to_dict(),
        state_dict=model.state_dict(),
        config={"data": {"scheme": "regions"}},
        lineage=[{"stage": "segformer3d-official", "path": str(path), "metrics": {}}],
        extra={"imported_from": str(path), "attn_scale": attn_scale},
    )
    art.save(out)
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.segformer_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="state_dict saved by the official SegFormer3D code")
    p.add_argument("--out", required=True, help="artifact to write (usable as --teacher)")
    p.add_argument("--attn-scale", choices=["head_dim", "num_heads"], default="head_dim",
                   help="attention scale 1/sqrt(head_dim) (default; today's official code) or 1/sqrt(num_heads) "
                        "(the first official release): the published BraTS 2017 weights need num_heads")
    args = p.parse_args(argv)
    import_checkpoint(args.checkpoint, args.out, args.attn_scale)
    print(f"wrote {args.out}")
    return 0


def cli() -> None:
    """The `rf3d-import-segformer` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
