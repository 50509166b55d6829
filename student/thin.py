"""Thin a trained RefineFormer3D to a narrower student that starts from the teacher's weights.

The student's shape is exactly `scale_width(teacher_spec, width)`: every embed dim, attention dim,
MLP hidden size and decoder width scales, head counts stay (so the head size shrinks). Which channels
survive is decided per coupled channel group:

- torch-pruning's dependency graph finds the coupled groups of the plain channel kinds (the residual
  stream of each stage, each MLP hidden layer, each spatial-reduction output, each decoder projection,
  the fusion output, the refine output) and its importance criteria (magnitude or Taylor) rank their
  channels. The graph is traced from the teacher, so a residual channel is the same index in every
  layer that reads or writes it (patch embed, every norm, attention proj out, fc2 out, the next
  stage's patch embed input, the decoder projection input).
- Attention dims are ranked here, per head: the graph sees scaled-dot-product attention as an
  element-wise op, so it cannot tell that q and k pair up dim by dim inside a head. q/k dims are
  chosen together (score of q row + k row), v dims together with proj's input columns, and every head
  keeps the same number of dims.

The index selection and weight slicing are done here, so the student is a plain `RefineFormer3D`
built from a plain spec (it needs no torch-pruning to rebuild) whose surviving channels carry the
teacher's weights exactly.

Attention scale: by default the student keeps the teacher's `attn_scales` (1/sqrt(teacher head
size)). The kept q/k dims are the high-magnitude ones, so the truncated dot product keeps most of the
teacher's logit range; multiplying it by the larger 1/sqrt(student head size) would sharpen every
attention map at initialisation. `keep_attn_scale=False` uses the student's own default scale
(what `--init scratch` always uses).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from model.refineformer3d import ModelSpec, RefineFormer3D, rebuilt, scale_width
from model.widths import Slices, group_slices, slice_state

IMPORTANCE = ("magnitude", "taylor")

# kept indices per dim of a tensor; None keeps the whole dim


@dataclass
class Selection:
    """Kept teacher channel indices (sorted, int64) for every coupled group of the student.

    res[i]        residual stream of stage i                     (embed_dims[i])
    sr[i][j]      spatial-reduction output, block j (sr > 1)     (embed_dims[i])
    qk[i][j]      q and k dims, head-major                        (attn_dims[i])
    v[i][j]       v dims = proj input columns, head-major        (attn_dims[i])
    hidden[i][j]  MLP hidden channels                             (mlp_hidden[i][j])
    dec[i]        decoder projection i output                     (decoder_dim)
    fuse          fusion output                                   (fuse_dim)
    refine        refine_pw output (refine decoder only)          (refine_dim)
    """

    res: list[torch.Tensor]
    sr: list[list[torch.Tensor | None]]
    qk: list[list[torch.Tensor]]
    v: list[list[torch.Tensor]]
    hidden: list[list[torch.Tensor]]
    dec: list[torch.Tensor]
    fuse: torch.Tensor
    refine: torch.Tensor | None


# Channels per output region that the layers next to the output keep at least (never more than the
# teacher has). Measured on a held-out phantom family (issue #13): at width 0.25 the refine tail
# scaled 16 -> 4 kept no ET-selective channel (student mean Dice 0.58, ET 0 on every case); kept at 8
# it reached 0.911, at the teacher's 16, 0.931.
HEAD_FLOORS = {"refine_dim": 4, "fuse_dim": 8, "decoder_dim": 8}


def width_plan(teacher_spec: ModelSpec, width: float, floors: bool = True) -> list[dict]:
    """What each decoder width of the student gets and why: rows {layer, teacher, scaled, student, rule}.

    Every width scales by `width` (`scale_width`); the decoder widths next to the output have a floor
    of HEAD_FLOORS[layer] x num_classes channels (capped at the teacher's), so a small region such as
    ET cannot lose all its channels to a uniform multiplier. `floors=False`: the plain multiplier.
    """
    t = teacher_spec.resolve()
    scaled = scale_width(t, width)
    rows = []
    for layer, per_region in HEAD_FLOORS.items():
        teacher_w, scaled_w = getattr(t, layer), getattr(scaled, layer)
        if layer == "refine_dim" and t.decoder != "refine":
            continue
        floor = min(teacher_w, per_region * t.num_classes) if floors else 0
        student_w = max(scaled_w, floor)
        rule = (f"floor {per_region} x {t.num_classes} regions" if student_w > scaled_w
                else f"width {width:g}")
        rows.append({"layer": layer, "teacher": teacher_w, "scaled": scaled_w, "student": student_w, "rule": rule})
    return rows


def student_spec(teacher_spec: ModelSpec, width: float, keep_attn_scale: bool = True,
                 floors: bool = True) -> ModelSpec:
    """The thinned spec: `scale_width(teacher_spec, width)` with the head floors of `width_plan`,
    optionally with the teacher's attention scales. ValueError for a width outside (0, 1] or a
    teacher that is not a dense fp32 model."""
    t = teacher_spec.resolve()
    if not 0.0 < width <= 1.0:
        raise ValueError(f"thin: width must be in (0, 1], got {width}")
    if t.ranks:
        raise ValueError(f"thin: the teacher has low-rank layers ({', '.join(t.ranks)}); thin a dense model")
    if t.kind != "fp32":
        raise ValueError(f"thin: cannot thin a model of kind {t.kind!r} (only fp32)")
    s = scale_width(t, width)
    s = dataclasses.replace(s, **{r["layer"]: r["student"] for r in width_plan(t, width, floors)})
    if keep_attn_scale:
        s = dataclasses.replace(s, attn_scales=list(t.attn_scales))
    return s.resolve()


# ----------------------------------------------------------------------------- importance


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    raise ValueError(f"thin: unknown importance {kind!r} (known: {', '.join(IMPORTANCE)})")


def _param_score(kind: str, p: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-index score of tensor `p` along `dim`: sum of w^2 (magnitude) or |w * dL/dw| (taylor)."""
    if kind == "magnitude":
        x = p.detach() ** 2
    else:
        if p.grad is None:
            raise ValueError("thin: taylor importance needs gradients (pass calibration batches)")
        x = (p.detach() * p.grad).abs()
    return x.transpose(0, dim).reshape(x.shape[dim], -1).sum(1)


def _attention_scores(kind: str, attn: nn.Module, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, head size) scores for the q/k dims and the v dims of one attention layer."""
    a = attn.q.out_features
    qk = _param_score(kind, attn.q.weight, 0) + _param_score(kind, attn.kv.weight, 0)[:a]
    v = _param_score(kind, attn.kv.weight, 0)[a:] + _param_score(kind, attn.proj.weight, 1)
    if attn.q.bias is not None:
        qk = qk + _param_score(kind, attn.q.bias, 0) + _param_score(kind, attn.kv.bias, 0)[:a]
        v = v + _param_score(kind, attn.kv.bias, 0)[a:]
    return qk.reshape(heads, -1), v.reshape(heads, -1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (ties: lower index first)."""
    if k > scores.numel():
        raise ValueError(f"thin: cannot keep {k} of {scores.numel()} channels")
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values.to(torch.int64)


def _top_per_head(scores: torch.Tensor, k_per_head: int) -> torch.Tensor:
    """Head-major flat indices: the best `k_per_head` dims of every head. scores: (heads, head size)."""
    hs = scores.shape[1]
    return torch.cat([h * hs + _top(row, k_per_head) for h, row in enumerate(scores)])


def accumulate_taylor_grads(
    model: nn.Module, batches: Iterable[dict], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> int:
    """Sum dL/dw over calibration batches into `.grad` (for Taylor importance); returns the batch count."""
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # BatchNorm statistics must not move while ranking
    n = 0
    for batch in batches:
        loss_fn(model(batch["image"]), batch["label"]).backward()
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("thin: taylor importance needs at least one calibration batch")
    return n


def select_channels(teacher: RefineFormer3D, target: ModelSpec, importance: str = "magnitude") -> Selection:
    """Rank the teacher's channels and pick, per coupled group, the ones the target spec keeps."""
    t = teacher.spec
    scorer = _importance(importance)
    example = torch.zeros(1, t.in_chans, *(2 * t.downsample,) * 3, device=next(teacher.parameters()).device)
    was_training = teacher.training
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(True)  # the graph is traced through autograd (a frozen teacher has none)
    try:
        graph = tp.DependencyGraph().build_dependency(teacher, example_inputs=example)
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)

    def scores(module: nn.Module) -> torch.Tensor:
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv3d) else tp.prune_linear_out_channels
        n = module.out_channels if isinstance(module, nn.Conv3d) else module.out_features
        group = graph.get_pruning_group(module, fn, idxs=list(range(n)))
        return scorer(group).detach().cpu()

    def ranked(module: nn.Module, keep: int) -> torch.Tensor:
        return _top(scores(module), keep)

    enc, dec = teacher.encoder, teacher.decoder
    res, sr, qk, v, hidden = [], [], [], [], []
    for i, stage in enumerate(enc.stages):
        res.append(ranked(stage.patch_embed.proj, target.embed_dims[i]))
        head_dims = target.attn_dims[i] // target.num_heads[i]
        sr_i, qk_i, v_i, hid_i = [], [], [], []
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            sr_i.append(ranked(attn.sr, target.embed_dims[i]) if attn.sr_ratio > 1 else None)
            s_qk, s_v = _attention_scores(importance, attn, t.num_heads[i])
            qk_i.append(_top_per_head(s_qk.cpu(), head_dims))
            v_i.append(_top_per_head(s_v.cpu(), head_dims))
            hid_i.append(ranked(block.mlp.fc1, target.mlp_hidden[i][j]))
        sr.append(sr_i), qk.append(qk_i), v.append(v_i), hidden.append(hid_i)
    return Selection(
        res=res, sr=sr, qk=qk, v=v, hidden=hidden,
        dec=[ranked(p.proj, target.decoder_dim) for p in dec.projections],
        fuse=ranked(dec.fuse, target.fuse_dim),
        refine=_region_balanced(dec, torch.sort(scores(dec.refine_pw).float(), descending=True, stable=True).indices,
                                target.refine_dim) if t.decoder == "refine" else None,
    )


def _region_balanced(decoder: nn.Module, order: torch.Tensor, keep: int) -> torch.Tensor:
    """Refine-tail channels to keep: first, in turns, each output region's strongest channels by the
    head's weights into that region (sum |w| over the 3x3x3 kernel), then the rest in `order` (all
    teacher channels, best first by the group importance). So no region loses all the
    channels that feed it to channels that serve large regions (issue #13: ET did)."""
    head = decoder.head.weight.detach().abs().flatten(2).sum(2).cpu()  # (K, refine)
    per_region = [torch.sort(row, descending=True, stable=True).indices.tolist() for row in head]
    chosen: list[int] = []
    k = len(per_region)  # about half the tail goes to the regions in turns (one each at least), the rest by importance
    quota = max(1, keep // (2 * k)) if keep >= k else 0
    for _ in range(quota):
        for region_order in per_region:
            chosen.append(next(c for c in region_order if c not in chosen))
    for c in order.tolist():
        if len(chosen) == keep:
            break
        if c not in chosen:
            chosen.append(c)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


# ----------------------------------------------------------------------------- slicing


def group_indices(sel: Selection) -> dict[str, torch.Tensor]:
    """The teacher indices each width group (`model.widths`) keeps."""
    out: dict[str, torch.Tensor] = {}
    for i, res in enumerate(sel.res):
        out[f"embed.{i}"] = res
        for j, hid in enumerate(sel.hidden[i]):
            if sel.sr[i][j] is not None:
                out[f"sr.{i}.{j}"] = sel.sr[i][j]
            out[f"qk.{i}.{j}"], out[f"v.{i}.{j}"], out[f"hidden.{i}.{j}"] = sel.qk[i][j], sel.v[i][j], hid
        out[f"decoder.{i}"] = sel.dec[i]
    out["fuse"] = sel.fuse
    if sel.refine is not None:
        out["refine"] = sel.refine
    return out


def parameter_slices(teacher_spec: ModelSpec, sel: Selection) -> dict[str, Slices]:
    """For every state_dict entry of the student: the teacher indices kept along each dim (None: all),
    from the width groups of `model.widths` (one declaration of the wiring for thinning and growth)."""
    return group_slices(teacher_spec, group_indices(sel))


def slice_state_dict(
    teacher_state: dict[str, torch.Tensor], teacher_spec: ModelSpec, sel: Selection
) -> dict[str, torch.Tensor]:
    """The student's state_dict: every teacher tensor restricted to the kept indices."""
    try:
        return slice_state(teacher_state, parameter_slices(teacher_spec, sel))
    except KeyError as e:
        raise KeyError(f"thin: teacher {e.args[0]}") from None


# ----------------------------------------------------------------------------- the step


def thin_with_selection(
    teacher: RefineFormer3D,
    width: float,
    *,
    importance: str = "magnitude",
    keep_attn_scale: bool = True,
    floors: bool = True,
) -> tuple[RefineFormer3D, Selection]:
    """Thin `teacher` to `width` (head floors of `width_plan` unless `floors=False`); Taylor
    importance reads the gradients already in `.grad`."""
    if not isinstance(teacher, RefineFormer3D):
        raise TypeError(f"thin: expected a RefineFormer3D, got {type(teacher).__name__}")
    target = student_spec(teacher.spec, width, keep_attn_scale, floors)
    sel = select_channels(teacher, target, importance)
    return rebuilt(teacher, target, slice_state_dict(teacher.state_dict(), teacher.spec, sel)), sel


def thin(teacher: RefineFormer3D, width: float, **kwargs) -> RefineFormer3D:
    """`step(model, width) -> model`: the teacher thinned to `width`, keeping its most important channels."""
    return thin_with_selection(teacher, width, **kwargs)[0]


def scratch_student(teacher_spec: ModelSpec, width: float, seed: int = 0, floors: bool = True) -> RefineFormer3D:
    """The same student shape from random weights (for comparison), with its own attention scale."""
    torch.manual_seed(seed)
    return RefineFormer3D(student_spec(teacher_spec, width, keep_attn_scale=False, floors=floors))
