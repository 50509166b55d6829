"""Latency-aware slimming: cut multiply-adds where a thinned student spends them, then distil.

Thinning scales every width, but a width-0.25 student still spends most of its multiply-adds where
no width acts (fvcore by module, 128^3, the demo student: 4.24 G in all): the full-resolution 3x3x3
head 2.04 G (48 %), the 7x7x7 stem 0.36 G, stage-1 attention over 32^3 tokens with 8^3 keys 0.65 G.
Four steps, each `step(model, cfg) -> model` (cfg: common.config.SlimConfig) on a copy:

    head     the refine head moves to 1/4 or 1/2 resolution (`slim.head_at`) and its logits are
             upsampled (at 1/4 as SegFormer3D predicts; `ModelSpec.head_at`); the channels feeding it
             (refine_dim) are widened to `slim.refine_dim` first, function-preservingly (Net2Net,
             `compress.grow.widen`), because small regions such as ET need them.
    stem     stage 1 gets a patchifying stem (`slim.stem_kernel`, stride kept, the padding that keeps
             the grid) and the first stages larger key/value reductions (`slim.sr_ratios`); the new
             kernels start from the old ones (the overlapping taps of the stem; the reduction conv
             resampled and scaled, so a smooth input gives the same keys).
    widths   the decoder's projection and fusion widths (`slim.decoder_dim`, `slim.fuse_dim`; a
             width-0.25 student keeps 64 of each, and at 1/4 resolution they cost more than the
             encoder's first stage) narrowed by group magnitude over `model.widths`' groups, never
             below the region floors of `student.thin.HEAD_FLOORS`.
    mlp      stage 1's Mix-FFN hidden width (`slim.mlp_hidden`, per stage) narrowed by group magnitude.
             Not in the default steps: on the demo it saves 0.047 G but under 1 % of latency (configs/slim.yaml).

No step is exact: the stage fine-tunes the result by distillation from the teacher in the
lineage (the teacher's full decoder is the target). With `slim.macs_budget` the steps are chosen
from the model's own spec (`model.macs.spec_macs` at `slim.reference_input`), largest saving first,
until the budget is met; the artifact records what each step saved.

    python -m compress.slim runs/student/student.pt --out runs/slim [--steps head,stem,widths] [--macs-budget 1G]
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from common.artifact import Artifact
from common.cli import add_strict, config_from_args, data_given, main_rank, out_dir, run_main, stage_parser
from common.config import Config, ConfigError, SlimConfig, parse_count
from compress.grow import widen
from engine.runner import StageContext, StageDef, exit_code, run_stage
from model.macs import spec_macs
from model.refineformer3d import HEAD_AT, ModelSpec, RefineFormer3D, count_params, rebuilt
from model.widths import group_magnitude, group_slices, slice_state
from student.thin import HEAD_FLOORS
from student.distill import distill_trainer

STAGE = "slim"
SLIM_HEAD_AT = tuple(h for h in HEAD_AT if h != "full")  # where step head moves the refine head


def _copy_into(model: RefineFormer3D, spec: ModelSpec, new_weights: dict[str, torch.Tensor]) -> RefineFormer3D:
    """`RefineFormer3D(spec)` with `model`'s weights, `new_weights` replacing those that changed shape."""
    return rebuilt(model, spec, {**model.state_dict(), **new_weights})


def slim_head(model: RefineFormer3D, cfg: Any) -> RefineFormer3D:
    """The refine head at `cfg.head_at` ("quarter" or "half") resolution, `refine_dim` first widened to
    `cfg.refine_dim` (never narrowed). ValueError for an allmlp decoder (it predicts at 1/4 already)
    or a head that is not at full resolution."""
    spec = model.spec
    if spec.decoder != "refine" or spec.head_at != "full":
        raise ValueError(f"slim head: needs a refine decoder with its head at full resolution "
                         f"(decoder {spec.decoder!r}, head_at {spec.head_at!r})")
    if cfg.refine_dim > spec.refine_dim:
        model = widen(model, "refine_dim", cfg.refine_dim)
    return _copy_into(model, ModelSpec.from_dict({**model.spec.to_dict(), "head_at": cfg.head_at}), {})


def _stem_kernel(weight: torch.Tensor, pad_old: int, pad_new: int, k_new: int) -> torch.Tensor:
    """A k_new^3 kernel that sees the same input offsets as the old one where they overlap: new tap j
    reads the input at stride * i - pad_new + j, which the old kernel read with tap j + pad_old - pad_new."""
    k_old = weight.shape[-1]
    out = weight.new_zeros(*weight.shape[:2], k_new, k_new, k_new)
    shift = pad_old - pad_new
    src = [j + shift for j in range(k_new)]
    keep = [j for j, s in enumerate(src) if 0 <= s < k_old]
    idx_new, idx_old = torch.tensor(keep), torch.tensor([src[j] for j in keep])
    out[:, :, idx_new[:, None, None], idx_new[None, :, None], idx_new[None, None, :]] = \
        weight[:, :, idx_old[:, None, None], idx_old[None, :, None], idx_old[None, None, :]]
    return out


def _sr_kernel(weight: torch.Tensor, sr_new: int) -> torch.Tensor:
    """The spatial-reduction conv (kernel = stride = sr) resampled to sr_new, nearest tap, scaled by
    (sr / sr_new)^3: on an input constant over the larger patch it gives the old conv's output."""
    sr = weight.shape[-1]
    idx = torch.tensor([a * sr // sr_new for a in range(sr_new)])
    return weight[:, :, idx[:, None, None], idx[None, :, None], idx[None, None, :]] * (sr / sr_new) ** 3


def slim_stem(model: RefineFormer3D, cfg: Any) -> RefineFormer3D:
    """The stem and the early stages' token mixing: stage-1 patch-embedding kernel `cfg.stem_kernel`
    (stride kept; padding (k - stride + 1) // 2, so a size divisible by the stride keeps its grid) and
    key/value reductions `cfg.sr_ratios` for the first stages (stages without a reduction keep none).
    ValueError when those layers are factorised, a reduction would drop to 1, or nothing would change."""
    spec = model.spec
    stride, k_old, pad_old = spec.patch_strides[0], spec.patch_kernels[0], spec.patch_paddings[0]
    k_new = int(cfg.stem_kernel)
    if k_new < stride:
        raise ValueError(f"slim stem: stem_kernel {k_new} is smaller than the stem's stride {stride} (voxels skipped)")
    if len(cfg.sr_ratios) > len(spec.sr_ratios) or any(int(r) < 1 for r in cfg.sr_ratios):
        raise ValueError(f"slim stem: sr_ratios {list(cfg.sr_ratios)} must be >= 1, at most one per stage "
                         f"({len(spec.sr_ratios)})")
    sr_new = [int(r) if old > 1 else 1 for r, old in zip(cfg.sr_ratios, spec.sr_ratios)]
    changed = [i for i, r in enumerate(sr_new) if r != spec.sr_ratios[i]]
    if any(sr_new[i] < 2 for i in changed):
        raise ValueError(f"slim stem: a key/value reduction cannot drop to 1 (asked {list(cfg.sr_ratios)})")
    touched = ("encoder.stages.0.patch_embed", *(f"encoder.stages.{i}.blocks" for i in changed))
    factorised = [n for n in spec.ranks if n.startswith(touched) and (".patch_embed" in n or ".attn.sr" in n)]
    if factorised:
        raise ValueError(f"slim stem: layers to change are factorised ({', '.join(factorised)}): slim before low-rank")
    if k_new == k_old and not changed:
        raise ValueError(f"slim stem: nothing to change: the stem kernel is {k_old} and the reductions are "
                         f"{spec.sr_ratios} already")
    pad_new = (k_new - stride + 1) // 2
    d = spec.to_dict()
    d["patch_kernels"][0], d["patch_paddings"][0] = k_new, pad_new
    state = model.state_dict()
    new = {"encoder.stages.0.patch_embed.proj.weight":
           _stem_kernel(state["encoder.stages.0.patch_embed.proj.weight"], pad_old, pad_new, k_new)}
    for i in changed:
        d["sr_ratios"][i] = sr_new[i]
        for j in range(len(spec.mlp_hidden[i])):
            key = f"encoder.stages.{i}.blocks.{j}.attn.sr.weight"
            new[key] = _sr_kernel(state[key], sr_new[i])
    return _copy_into(model, ModelSpec.from_dict(d), new)


def slim_widths(model: RefineFormer3D, cfg: Any) -> RefineFormer3D:
    """The decoder's widths narrowed: `decoder_dim` (every stage projection) and `fuse_dim` to
    `cfg.decoder_dim` / `cfg.fuse_dim` (None or not smaller: kept), keeping in each width group
    (`model.widths`) the channels of largest group magnitude. ValueError below the region floors
    (`student.thin.HEAD_FLOORS` x regions) or when nothing would change."""
    spec = model.spec
    floors = {k: per * spec.num_classes for k, per in HEAD_FLOORS.items()}
    targets = {k: int(v) for k in ("decoder_dim", "fuse_dim")
               if (v := getattr(cfg, k)) is not None and int(v) < getattr(spec, k)}
    for k, v in targets.items():
        if v < floors[k]:
            raise ValueError(f"slim widths: {k} {v} is below its floor of {floors[k]} "
                             f"({HEAD_FLOORS[k]} per region, so small regions keep channels)")
    if not targets:
        raise ValueError(f"slim widths: decoder_dim {spec.decoder_dim} and fuse_dim {spec.fuse_dim} are "
                         f"not above the targets {cfg.decoder_dim} / {cfg.fuse_dim}: nothing to narrow; leave the "
                         "step out (--steps head,stem) or set lower slim.decoder_dim / slim.fuse_dim")

    def top(group: str, k: int) -> torch.Tensor:
        return torch.sort(torch.topk(group_magnitude(model, group), k).indices).values

    kept = {}
    if "decoder_dim" in targets:
        kept.update({f"decoder.{i}": top(f"decoder.{i}", targets["decoder_dim"]) for i in range(len(spec.embed_dims))})
    if "fuse_dim" in targets:
        kept["fuse"] = top("fuse", targets["fuse_dim"])
    state = slice_state(model.state_dict(), group_slices(spec, kept))
    return _copy_into(model, ModelSpec.from_dict({**spec.to_dict(), **targets}), state)


def slim_mlp(model: RefineFormer3D, cfg: Any) -> RefineFormer3D:
    """The Mix-FFN hidden widths of the first stages narrowed to `cfg.mlp_hidden` (one width per stage from
    stage 1; None or not smaller: kept), keeping in each block's hidden group (`model.widths`) the channels
    of largest group magnitude. Stage 1's MLPs run on 32^3 tokens at 128^3, where their 3x3x3 depthwise
    conv is the largest encoder cost of a slimmed student (0.094 of its 0.61 G at ratio 4). ValueError when
    a width is below 1, more widths than stages are given, those layers are factorised, or nothing changes."""
    spec = model.spec
    widths = list(cfg.mlp_hidden or [])
    if len(widths) > len(spec.mlp_hidden) or any(w is not None and int(w) < 1 for w in widths):
        raise ValueError(f"slim mlp: mlp_hidden {widths} must be >= 1 (or null), at most one per stage "
                         f"({len(spec.mlp_hidden)})")
    kept, hidden = {}, [list(h) for h in spec.mlp_hidden]
    for i, w in enumerate(widths):
        for j, old in enumerate(spec.mlp_hidden[i]):
            if w is not None and int(w) < old:
                kept[f"hidden.{i}.{j}"] = torch.sort(torch.topk(group_magnitude(model, f"hidden.{i}.{j}"), int(w)).indices).values
                hidden[i][j] = int(w)
    if not kept:
        raise ValueError(f"slim mlp: nothing to change: the MLP hidden widths are {spec.mlp_hidden} "
                         f"(asked {widths})")
    factorised = [n for n in spec.ranks
                  if any(n.startswith(f"encoder.stages.{g.split('.')[1]}.blocks.{g.split('.')[2]}.mlp") for g in kept)]
    if factorised:
        raise ValueError(f"slim mlp: layers to change are factorised ({', '.join(factorised)}): slim before low-rank")
    state = slice_state(model.state_dict(), group_slices(spec, kept))
    return _copy_into(model, ModelSpec.from_dict({**spec.to_dict(), "mlp_hidden": hidden}), state)


STEPS: dict[str, Callable[[RefineFormer3D, Any], RefineFormer3D]] = {
    "head": slim_head, "stem": slim_stem, "widths": slim_widths, "mlp": slim_mlp}


def _gmacs(spec: ModelSpec, size: Sequence[int]) -> float:
    return spec_macs(spec, size) / 1e9


def choose_steps(model: RefineFormer3D, cfg: Any) -> tuple[list[str], dict[str, float]]:
    """The steps to apply and the G multiply-adds each saves at `cfg.reference_input` (alone, from the
    input model). Without `cfg.macs_budget`: `cfg.steps`. With it: of `cfg.steps`, largest saving first,
    as few as reach the budget (all of them when even all do not; the stage refuses such a budget first)."""
    size = tuple(cfg.reference_input)
    base = _gmacs(model.spec, size)
    savings = {name: base - _gmacs(STEPS[name](model, cfg).spec, size) for name in cfg.steps}
    budget = parse_count(cfg.macs_budget, what="slim.macs_budget", share=False)
    if budget is None:
        return list(cfg.steps), savings
    chosen: list[str] = []
    for name in sorted(savings, key=savings.get, reverse=True):
        if base - sum(savings[c] for c in chosen) <= budget / 1e9:
            break
        chosen.append(name)
    return [s for s in cfg.steps if s in chosen], savings


def slim(model: RefineFormer3D, cfg: Any, steps: Sequence[str] | None = None) -> RefineFormer3D:
    """`steps` (default: `cfg.steps`, or those `choose_steps` picks for `cfg.macs_budget`) applied in
    order; a copy."""
    for name in choose_steps(model, cfg)[0] if steps is None else steps:
        model = STEPS[name](model, cfg)
    return model


# ----------------------------------------------------------------------------- the stage


def check_config(cfg: Any) -> None:
    """Fail before any work on a bad `slim` section (cfg: common.config.SlimConfig)."""
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown or not cfg.steps or len(set(cfg.steps)) != len(cfg.steps):
        raise ConfigError(f"slim.steps={list(cfg.steps)}: each one of {', '.join(STEPS)} at most once, at least one")
    budget = parse_count(cfg.macs_budget, what="slim.macs_budget", share=False)
    if budget is not None and budget <= 0:
        raise ConfigError(f"slim.macs_budget={cfg.macs_budget!r}: a positive count of multiply-adds such as 1G")
    if cfg.head_at not in SLIM_HEAD_AT:
        raise ConfigError(f"slim.head_at={cfg.head_at!r}: one of {', '.join(SLIM_HEAD_AT)}")
    if cfg.refine_dim < 1 or cfg.stem_kernel < 1 or any(r < 1 for r in cfg.sr_ratios):
        raise ConfigError("slim.refine_dim, slim.stem_kernel and slim.sr_ratios must be >= 1")
    if len(cfg.reference_input) != 3 or any(n < 1 for n in cfg.reference_input):
        raise ConfigError(f"slim.reference_input must be three positive sizes, got {list(cfg.reference_input)}")


def _check(art: Artifact, cfg: Config) -> None:
    """Before any work: the `slim` section, every step on the source's spec (one that cannot apply, or
    would add multiply-adds, fails here), the new reductions on the training crops and windows, a
    budget that leaves something to do."""
    check_config(cfg.slim)
    try:
        probe = RefineFormer3D(ModelSpec.from_dict(art.spec))
        steps, savings = choose_steps(probe, cfg.slim)
        slimmed = slim(probe, cfg.slim, steps)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{art.path}: {e}") from None
    worse = [name for name, saved in savings.items() if saved <= 0]
    if worse:
        raise ConfigError(f"{art.path}: slim step(s) {', '.join(worse)} would not save multiply-adds with these settings "
                          f"({', '.join(f'{k} {-v:+.3f} G' for k, v in savings.items())}); leave them out of --steps")
    if not steps:
        raise ConfigError(f"{art.path}: the model already meets slim.macs_budget={cfg.slim.macs_budget}: nothing to do")
    budget = parse_count(cfg.slim.macs_budget, what="slim.macs_budget", share=False)
    reached = _gmacs(slimmed.spec, tuple(cfg.slim.reference_input))
    if budget is not None and reached * 1e9 > budget:
        raise ConfigError(f"{art.path}: slim.macs_budget={cfg.slim.macs_budget} is below what every step of "
                          f"slim.steps ({', '.join(cfg.slim.steps)}) reaches together, {reached:.3f} G at "
                          f"{'x'.join(map(str, cfg.slim.reference_input))}: raise it to at least {reached:.3f}G, add "
                          "steps, or leave it out to apply them all")
    s = slimmed.spec
    for what, size in (("data.crop", cfg.data.crop), ("train.window", cfg.train.window)):
        grid = list(size)
        for i, (stride, sr) in enumerate(zip(s.patch_strides, s.sr_ratios)):
            grid = [g // stride for g in grid]
            if sr > 1 and any(g < sr for g in grid):
                raise ConfigError(f"slim: stage {i + 1}'s key/value reduction {sr} is larger than its token grid "
                                  f"{grid} for {what}={list(size)}: lower slim.sr_ratios")


def slim_step(model: RefineFormer3D, ctx: StageContext) -> RefineFormer3D:
    """Step of the slim stage: the chosen steps; what each saved goes into ctx.extra["slim"]."""
    c, size = ctx.cfg.slim, tuple(ctx.cfg.slim.reference_input)
    steps, savings = choose_steps(model, c)
    slimmed = slim(model, c, steps)
    before, after = _gmacs(model.spec, size), _gmacs(slimmed.spec, size)
    budget = parse_count(c.macs_budget, what="slim.macs_budget", share=False)
    ctx.extra["slim"] = {"steps": steps, "gmacs_saved_alone": savings, "reference_input": list(size),
                         "macs_budget": budget, "head_at": slimmed.spec.head_at, "refine_dim": slimmed.spec.refine_dim,
                         "stem_kernel": slimmed.spec.patch_kernels[0], "sr_ratios": list(slimmed.spec.sr_ratios),
                         "mlp_hidden": [list(h) for h in slimmed.spec.mlp_hidden]}
    ctx.metrics.update(params_before=count_params(model), params_after=count_params(slimmed),
                       gmacs_before=before, gmacs_after=after)
    if ctx.dist.main:
        print(f"slim: {', '.join(steps)}: {before:.3f} -> {after:.3f} G multiply-adds at "
              f"{'x'.join(map(str, size))} (each alone: " + ", ".join(f"{k} {-v:+.3f}" for k, v in savings.items()) + ")")
    return slimmed


SLIM = StageDef(STAGE, step=slim_step, finetune=distill_trainer, needs_teacher=True, check=_check)


def slim_stage(artifact: str | Path, cfg: Config, out: str | Path, teacher: str | None = None,
               resume: bool = False, data_given: bool = True) -> Artifact:
    """Artifact -> slimmed model -> distillation fine-tune from the lineage's teacher -> `<out>/slim.pt`."""
    return run_stage(artifact, SLIM, cfg, out, teacher=teacher or cfg.slim.teacher, resume=resume,
                     data_given=data_given)


def main(argv: Sequence[str] | None = None) -> int:
    p = stage_parser("python -m compress.slim",
                     "Cut multiply-adds where a student spends them (head at 1/2 or 1/4 resolution, a patchifying stem and "
                     "larger stage-1/2 key/value reductions, narrower decoder widths), then distil from the teacher.",
                     default_config="configs/slim.yaml", default_out="runs/slim")
    p.add_argument("artifact", help="model artifact (.pt) to slim, e.g. runs/student/student.pt")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated steps of {', '.join(STEPS)} (default: slim.steps, {', '.join(SlimConfig().steps)})")
    p.add_argument("--macs-budget", default=None,
                   help="G multiply-adds at slim.reference_input to reach, e.g. 1G: the steps are chosen, largest "
                   "saving first (default: slim.macs_budget, none: every step in --steps)")
    p.add_argument("--teacher", default=None, help="teacher artifact (default: slim.teacher, then the lineage's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>/last.pt")
    add_strict(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.steps is not None:
        cfg.slim.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if args.macs_budget is not None:
        cfg.slim.macs_budget = args.macs_budget
    art = slim_stage(args.artifact, cfg, out_dir(args), teacher=args.teacher, resume=args.resume,
                     data_given=data_given(args))
    m = art.metrics
    if main_rank():  # under torchrun, once
        print(f"wrote {art.path}: {m['gmacs_before']:.3f} -> {m['gmacs_after']:.3f} G multiply-adds, "
              f"{m['params_before']:,} -> {m['params_after']:,} parameters, "
              f"dice_mean {m.get('dice_mean', math.nan):.4f}")
    return exit_code(art)


def cli() -> None:
    """The `rf3d-slim` console script: user errors are one line and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
