"""The one artifact format every stage reads and writes.

An artifact is a `torch.save`d dict of plain data and tensors, so it loads with
`torch.load(..., weights_only=True)`:

    format   "refineformer3d-artifact"
    version  1
    stage    teacher | student | lowrank | grown | int8 | ...
    spec     plain-data model spec; spec["kind"] says which builder rebuilds it
    state_dict
    config   the run's config as a dict
    metrics  validation figures (dice_wt, dice_tc, dice_et, dice_mean, ...)
    lineage  list of ancestors, oldest first: {"stage", "path", "metrics"}
    extra    stage-specific plain data (low-rank table, growth history, INT8 decisions,
             training state in last.pt, ...)

`build_model(artifact)` dispatches on spec["kind"] to the builder its model module registered with
`@register_builder(kind)` when it was imported, so this module depends on no model code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.atomic import atomic_write
from common.errors import UserInputError

FORMAT = "refineformer3d-artifact"
VERSION = 1

# spec["kind"] -> builder(spec) -> nn.Module, filled bottom-up: each model module registers its own
# kind on import (`@register_builder("fp32")`), so this module names nothing above it.
BUILDERS: dict[str, Callable[[dict], torch.nn.Module]] = {}
# where the kinds this project ships are registered, for the error message only
KNOWN_PROVIDERS = {"fp32": "model", "int8-torch": "compress.quant", "int8-qat": "compress.quant",
                   "onnx": "compress.quant"}


class ArtifactError(UserInputError, RuntimeError):
    """An artifact that is missing, unreadable, or not what the caller needs."""


class SpecError(ArtifactError, ValueError):
    """An artifact whose spec its kind's builder cannot build (a ValueError, as builders raise)."""


@dataclass
class Artifact:
    stage: str
    spec: dict
    state_dict: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    lineage: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    path: Path | None = None  # where it was loaded from; not saved

    def save(self, path: str | Path) -> Path:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "stage": self.stage,
            "spec": self.spec,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "config": self.config,
            "metrics": self.metrics,
            "lineage": self.lineage,
            "extra": self.extra,
            "created": self.created,
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such artifact file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise ArtifactError(f"{path}: not a readable artifact (corrupted or truncated?): {e}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ArtifactError(
                f"{path}: not a {FORMAT} file (a bare state_dict? use model.segformer_import for "
                "official SegFormer3D checkpoints)"
            )
        if payload.get("version") != VERSION:
            raise ArtifactError(f"{path}: artifact version {payload.get('version')}, expected {VERSION}")
        missing = [k for k in ("stage", "spec", "state_dict") if k not in payload]
        if missing:
            raise ArtifactError(f"{path}: artifact lacks {', '.join(missing)}")
        return cls(
            stage=payload["stage"],
            spec=payload["spec"],
            state_dict=payload["state_dict"],
            config=payload.get("config", {}),
            metrics=payload.get("metrics", {}),
            lineage=payload.get("lineage", []),
            extra=payload.get("extra", {}),
            created=payload.get("created", ""),
            path=path,
        )

    def child_lineage(self) -> list[dict]:
        """Lineage for an artifact derived from this one."""
        # absolute, so a later stage finds its ancestors (the teacher to distil from) from any folder
        here = {"stage": self.stage, "path": str(Path(self.path).resolve()) if self.path else None,
                "metrics": dict(self.metrics)}
        return [*self.lineage, here]

    def ancestor(self, stage: str) -> str | None:
        """Path of the nearest ancestor of the given stage (e.g. the teacher), or None."""
        for entry in reversed(self.lineage):
            if entry.get("stage") == stage and entry.get("path"):
                return entry["path"]
        return None


def register_builder(kind: str):
    """Decorator: `builder(spec) -> nn.Module` rebuilds artifacts whose spec["kind"] is `kind`."""
    def register(builder: Callable[[dict], torch.nn.Module]) -> Callable[[dict], torch.nn.Module]:
        BUILDERS[kind] = builder
        return builder
    return register


def build_model(artifact: Artifact, strict: bool = True) -> torch.nn.Module:
    """Rebuild the model an artifact describes and load its weights.

    ArtifactError when no imported package registered the kind, the spec does not build, or the weights
    do not fit."""
    kind = artifact.spec.get("kind", "fp32")
    if kind not in BUILDERS:
        hint = f"; import {KNOWN_PROVIDERS[kind]} first" if kind in KNOWN_PROVIDERS else ""
        raise ArtifactError(f"{artifact.path}: no builder registered for model kind {kind!r} "
                            f"(registered: {', '.join(sorted(BUILDERS)) or 'none'}{hint})")
    try:
        model = BUILDERS[kind](artifact.spec)
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"{artifact.path}: its {kind!r} spec does not describe a model: "
                            f"{type(e).__name__}: {e}") from None
    try:
        model.load_state_dict(artifact.state_dict, strict=strict)
    except RuntimeError as e:
        raise ArtifactError(f"{artifact.path}: weights do not fit the stored spec: {e}") from None
    return model


def load_model(path: str | Path) -> tuple[torch.nn.Module, Artifact]:
    art = Artifact.load(path)
    return build_model(art), art

