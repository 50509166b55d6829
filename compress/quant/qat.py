"""The fake-quant (QAT) model as a self-describing artifact: kind "int8-qat".

The QAT fine-tune's checkpoint (`<out>/qat/last.pt`, its best epoch inside) holds a float model with LSQ layers.
Their spec names everything needed to rebuild it before loading the weights strictly:

    {"kind": "int8-qat", "base": <FP32 ModelSpec dict>, "fold_bn": True, "reassoc": bool,
     "quant_layers": [layer names with LSQ fake quantisation], "lsq": {LSQConfig as plain data}}

(`lsq["weight_only"]`: the layers that fake-quantize only their weight; absent in older checkpoints.)

`model_from_spec(spec)` replays the same surgery on a fresh FP32 model: the exact rewrites
(`prepare_float`), then `quantize_` of exactly `quant_layers`. Calibration is not replayed: the
steps, zero points and ranges are all in the state_dict.

The fake-quant model is a `QATRefineFormer3D`, so the engine trains it like any model: it describes
itself with that spec (`artifact_spec`), and names its quantizers' parameters in `no_weight_decay`
(decaying a step size shrinks the quantisation range for no reason).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from common.artifact import register_builder
from compress.quant.convert import prepare_float
from compress.quant.lsq import QUANT_LAYERS, LSQConfig, quantizable, quantize_
from model.refineformer3d import ModelSpec, RefineFormer3D, rebuilt
from model.rewrites import ReassociatedDecoder, bn_pairs

KIND = "int8-qat"
QUANTIZER_FIELDS = ("step", "zero_point", "lo", "hi")  # FakeQuant's learned / calibrated values


def _one(values: set, what: str, default: Any) -> Any:
    if len(values) > 1:
        raise ValueError(f"the fake-quant layers use different {what} ({sorted(values)}); "
                         "one LSQConfig cannot rebuild them")
    return next(iter(values)) if values else default


def lsq_config_of(model: nn.Module) -> LSQConfig:
    """The LSQConfig that `quantize_` was given, read back from the model's LSQ layers."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
    default = LSQConfig()
    return LSQConfig(
        act_qmax=_one({m.in_fq.qmax for m in layers.values()}, "input ranges (act_qmax)", default.act_qmax),
        out_qmax=_one({m.out_fq.qmax for m in layers.values()}, "output ranges (out_qmax)", default.out_qmax),
        percentile=_one({m.in_fq.percentile for m in layers.values()}, "calibration percentiles", default.percentile),
        final={name for name, m in layers.items() if m.final},
        weight_only={name for name, m in layers.items() if m.weight_only},
    )


def qat_spec(model: nn.Module) -> dict[str, Any]:
    """Spec of a fake-quant model made by `prepare_float` + `quantize_` (read from the model itself)."""
    if not hasattr(model, "spec"):
        raise TypeError(f"a QAT spec needs a RefineFormer3D (with .spec), got {type(model).__name__}")
    if bn_pairs(model):
        raise ValueError("the model still has unfolded BatchNorm: QAT models are made by prepare_float first")
    lsq = lsq_config_of(model)
    return {
        "kind": KIND,
        "base": model.spec.to_dict(),
        "fold_bn": True,
        "reassoc": isinstance(model.decoder, ReassociatedDecoder),
        "quant_layers": [name for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)],
        "lsq": {"act_qmax": lsq.act_qmax, "out_qmax": lsq.out_qmax, "percentile": lsq.percentile,
                "final": sorted(lsq.final), "weight_only": sorted(lsq.weight_only)},
    }


class QATRefineFormer3D(RefineFormer3D):
    """A RefineFormer3D made for fake quantisation (`as_qat_model`, then `prepare_float` + `quantize_`):
    an artifact of it is kind "int8-qat", and its quantizers train without weight decay."""

    def artifact_spec(self) -> dict[str, Any]:
        return qat_spec(self)

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if is_quantizer_param(name)}


def as_qat_model(model: RefineFormer3D) -> QATRefineFormer3D:
    """A `QATRefineFormer3D` copy of an FP32 `model` (same spec, weights, device and mode)."""
    return rebuilt(model, model.spec, model.state_dict(), QATRefineFormer3D)


@register_builder("int8-qat")
def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Builder for kind "int8-qat": FP32 base, the exact rewrites, LSQ layers (values to be loaded)."""
    model = prepare_float(QATRefineFormer3D(ModelSpec.from_dict(spec["base"])), reassoc=spec.get("reassoc", True))
    lsq = dict(spec.get("lsq", {}))
    cfg = LSQConfig(**{**lsq, "final": set(lsq.get("final", ())), "weight_only": set(lsq.get("weight_only", ()))})
    wanted = list(spec["quant_layers"])
    candidates = {name for name, m in model.named_modules() if quantizable(m)}
    unknown = sorted(set(wanted) - candidates)
    if unknown:
        raise ValueError(f"int8-qat spec names layers that are not Linear/Conv3d in its base model: {unknown}")
    chosen = set(wanted)
    quantize_(model, cfg, lambda name, m: name in chosen)
    return model.eval()


def is_quantizer_param(name: str) -> bool:
    """True for a FakeQuant's step (and zero point / range, should they ever become parameters)."""
    return name.rsplit(".", 1)[-1] in QUANTIZER_FIELDS
