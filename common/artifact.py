"""The one artifact format every stage reads and writes.

An artifact is a `torch.save`d dict of plain data and tensors, so it loads with
`torch.load(..., weights_only=True)`:

    format   "refineformer3d-artifact"
    version  5 (4: the record fields stored as they are and the byte planes as one tensor each; 3: no
             "digest"; 2: buffers stored as tensors, no checksum; 1: the state_dict as a dict of tensors;
             all read)
    stage    the stage that wrote it ("teacher", "student", "int8", ...)
    state    the weights, packed: {"index": zlib-compressed UTF-8 JSON [[name, dtype, shape], ...] in
             state_dict order, "buffers": {dtype: [[codec, nbytes], ...]}, "data": one uint8 tensor holding
             every plane's stored bytes in that order, "byteorder": "little", "sha256"}: each dtype's tensors
             flattened and concatenated in index order, then split into byte planes (byte i of every
             element, least significant first on any machine), each plane entropy-coded where that pays
             ("zlib", or "lzma": raw LZMA2 with a 1 MiB dictionary, LZMA_DECODE; the smaller) or kept
             ("raw"); "sha256" of the index and the decoded planes, checked at load (it catches damage and
             edits that do not recompute it; it is not a signature). Decoding is strict (each plane exactly
             the length the index gives, no bytes after a stream, no other keys), so no stored byte escapes
             both. Every tensor torch.save writes costs ~300 bytes (zip record, 64-byte alignment, pickled
             storage reference): stored one by one, the demo's 250k-parameter INT8 artifact's 316 tensors
             were 402,267 bytes (305,786 packed as flat tensors, version 2); version 5 writes two tensors
             in all (the planes and the record). The byte planes are lossless entropy coding, as in Deep
             Compression (Han et al., ICLR 2016, after pruning and quantisation): int8 weights shrink to
             ~60 %, float32 ones to ~85 % (their sign/exponent byte to ~40 %). `Artifact.state_dict` is the
             unpacked dict.
    record   [codec, uint8 tensor]: the fields below that are plain JSON data (spec, config, metrics,
             lineage, extra, created), as one UTF-8 JSON object, compressed where that pays. A field that
             JSON would not give back exactly (a tensor in last.pt's training state, a tuple, an int dict
             key) is stored beside it as it is. Pickled one by one these fields were a quarter of the demo's
             INT8 file (~27 kB; ~5 kB as compressed JSON).
    spec     the model as plain data (every width explicit)
    config   the run's config as a dict
    metrics  validation figures (dice_wt, dice_tc, dice_et, dice_mean, ...)
    lineage  list of ancestors, oldest first: {"stage", "path", "metrics"}
    extra    stage-specific plain data (low-rank table, growth history, INT8 decisions,
             training state in last.pt, ...)
    digest   SHA-256 of every other field as stored (the weights through their own "sha256"), checked at
             load: a flipped byte in the config, metrics or ET rule is refused like one in the weights;
             so is a record whose bytes decode to anything but a JSON object of the fields above

`build_model(artifact)` dispatches on spec["kind"] to the builder its model module registered with
`@register_builder(kind)` when it was imported, so this module depends on no model code.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.atomic import atomic_write
from common.errors import UserInputError

FORMAT = "refineformer3d-artifact"
VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
RECORD_FIELDS = ("spec", "config", "metrics", "lineage", "extra", "created")  # version 5's "record" holds these
# the payload's fields and their types (checked at load: a hand-edited file fails here, naming the field)
FIELD_TYPES = {"stage": str, "spec": dict, "state_dict": dict, "state": dict, "config": dict, "metrics": dict,
               "lineage": list, "extra": dict, "created": str}

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
        record, kept = encode_record({f: getattr(self, f) for f in RECORD_FIELDS})
        payload = {"format": FORMAT, "version": VERSION, "stage": self.stage, "state": pack_state(self.state_dict),
                   "record": record, **kept}
        payload["digest"] = record_digest(payload)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        self.path = Path(path)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such artifact file" + (" (a folder)" if path.is_dir() else ""))
        if path.stat().st_size == 0:
            raise ArtifactError(f"{path}: an empty file (0 bytes), not an artifact")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            kind, torch_file = _file_kind(path)
            if not torch_file:  # torch's own words would be noise (or advice that does not apply)
                raise ArtifactError(f"{path}: not a readable artifact ({kind})") from None
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path}: not a readable artifact ({kind}): {type(e).__name__}: {why}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a {FORMAT} file ({_what_instead(payload)})")
        version = payload.get("version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(f"{path}: artifact version {version!r}, expected one of {READABLE_VERSIONS}"
                                + (" (written by a newer release of this project?)" if isinstance(version, int)
                                   and version > VERSION else ""))
        try:
            digest = record_digest(payload) if version >= 4 else None
        except Exception as e:  # a value _feed cannot read (a sparse tensor...): not a file this code wrote
            raise ArtifactError(f"{path}: its record cannot be checked: {type(e).__name__}: {e}") from None
        if version >= 4 and payload.get("digest") != digest:
            raise ArtifactError(f"{path}: its record (spec, config, metrics, lineage, extra: the ET rule among them) "
                                "does not match the SHA-256 written with it: the file was damaged, or edited without "
                                "recomputing it, after it was saved")
        fields = dict(payload)
        if version >= 5:
            try:
                record = decode_record(payload.get("record"))
            except ValueError as e:
                raise ArtifactError(f"{path}: its record is malformed: {e}") from None
            twice = sorted(set(record) & set(payload))
            if twice:
                raise ArtifactError(f"{path}: {', '.join(twice)} stored both in its record and beside it")
            fields.update(record)
        weights = "state_dict" if version == 1 else "state"
        missing = [k for k in ("stage", "spec", weights) if k not in fields]
        if missing:
            raise ArtifactError(f"{path}: artifact lacks {', '.join(missing)}")
        for key, kind in FIELD_TYPES.items():  # a hand-edited field of the wrong type: say so here, not deep inside
            if key in fields and not isinstance(fields[key], kind):
                raise ArtifactError(f"{path}: its {key!r} is a {type(fields[key]).__name__}, expected a "
                                    f"{kind.__name__}")
        try:
            state_dict = fields["state_dict"] if version == 1 else unpack_state(fields["state"], version)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{path}: its packed weights are malformed: {type(e).__name__}: {e}") from None
        return cls(
            stage=fields["stage"],
            spec=fields["spec"],
            state_dict=state_dict,
            config=fields.get("config", {}),
            metrics=fields.get("metrics", {}),
            lineage=fields.get("lineage", []),
            extra=fields.get("extra", {}),
            created=fields.get("created", ""),
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


def _file_kind(path: Path) -> tuple[str, bool]:
    """(what an unreadable file looks like from its first bytes, whether it looks like a torch file) for
    the error message."""
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "a torch file, corrupted or truncated", True
    if head.startswith(b"\x80"):
        return "a pickle or legacy torch file that does not load", True
    if path.suffix == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head):  # ModelProto: ir_version first
        return ("an ONNX graph, not an artifact: pass the .pt artifact written beside it (quantize.py "
                "--backend onnxruntime writes int8.pt, which holds int8.onnx)"), False
    for magic, kind in ((b"\x1f\x8b", "a gzip file (a .nii.gz image?)"), (b"\x93NUMPY", "a NumPy .npy file"),
                        (b"\x89HDF", "an HDF5 file"), (b"\x08\x00", "a protobuf file?")):
        if head.startswith(magic):
            return f"not a torch file: {kind}", False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "corrupted, truncated or not a torch file", False
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file, not a torch file; it begins {first!r}", False


def _what_instead(payload: object) -> str:
    """What a loaded file that is not an artifact looks like, for the error message."""
    if isinstance(payload, dict) and "format" in payload:
        return (f"its format tag reads {payload['format']!r}: another tool's file, or an artifact damaged "
                "after it was saved")
    hint = "use model.segformer_import for official SegFormer3D checkpoints"
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return f"a bare state_dict; {hint}"
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        return f"a training checkpoint with a 'state_dict' (keys {_keys(payload)}); {hint}"
    if isinstance(payload, dict):
        return f"a dict with keys {_keys(payload)}" if payload else "an empty dict"
    return f"a {type(payload).__name__}"


def _keys(d: dict) -> str:
    return ", ".join(map(repr, list(d)[:6])) + (" ..." if len(d) > 6 else "")


# Byte planes of a flat buffer (byte i of every element, then byte i + 1...) compress where the weights'
# values do: the sign/exponent byte of float32 weights (to ~40 %), int8 weights that QAT left near zero
# (to ~60 %); the low mantissa bytes are noise. A plane is entropy-coded when a probe of its first
# PROBE_BYTES shrinks to under PROBE_RATIO, else stored raw (so noise costs no compression time).
PROBE_BYTES = 1 << 16
PROBE_RATIO = 0.95
SMALL_PLANE = 1 << 20  # planes up to this size get zlib level 9 and LZMA, the smaller kept; larger: zlib level 1
# The "lzma" codec is raw LZMA2 (no xz container: its header and check cost ~60 bytes a plane, and the
# file's SHA-256 checks the data) with a 1 MiB dictionary. Raw LZMA2 does not record its dictionary size,
# so LZMA_DECODE is part of the format; the encoder's preset may change, its dictionary may not grow.
# Preset 6: on the demo student's 324 kB exponent plane 125 kB in ~0.1 s, against zlib level 9's 133 kB.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": SMALL_PLANE}]
LZMA_DECODE = [{"id": lzma.FILTER_LZMA2, "dict_size": SMALL_PLANE}]
CODECS = ("raw", "zlib", "lzma")
MAX_RECORD = 64 << 20  # a record or weight index decoding to more is refused (the demo INT8 file's: ~20 kB, ~1 kB)
STATE_KEYS = {"index", "byteorder", "buffers", "data", "sha256"}  # version 5's "state"; nothing else is accepted


def _byte_planes(flat: torch.Tensor) -> list[torch.Tensor]:
    """(element_size) uint8 tensors: byte i of every element of the 1-D `flat`, least significant first
    (little-endian order on any machine, so a file reads the same on both byte orders)."""
    size = flat.element_size()
    planes = list(flat.view(torch.uint8).reshape(-1, size).t()) if flat.numel() else [flat.view(torch.uint8)] * size
    return planes[::-1] if sys.byteorder == "big" else planes


def _compress(data: bytes) -> tuple[str, bytes]:
    """(codec, stored bytes) of one plane or record: the smallest of raw, zlib and (up to SMALL_PLANE)
    LZMA; a probe of the first PROBE_BYTES decides whether compressing is tried at all."""
    probe = data[:PROBE_BYTES]
    if not probe or len(zlib.compress(probe, 1)) >= PROBE_RATIO * len(probe):
        return "raw", data
    # the demo teacher's 18 MB: level 1 0.4 s, 15.66 MB; level 6 1.5 s, 15.52 MB
    tries = [("raw", data), ("zlib", zlib.compress(data, 9 if len(data) <= SMALL_PLANE else 1))]
    if len(data) <= SMALL_PLANE:
        tries.append(("lzma", lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)))
    return min(tries, key=lambda t: len(t[1]))


def _decompress(codec: object, data: "bytes | memoryview", size: int | None, what: str) -> bytes:
    """`_compress`'s inverse for one stored item (`what` names it in messages): exactly `size` bytes
    when given (a byte plane, whose length the weight index fixes), else at most MAX_RECORD. ValueError
    for an unknown codec, bytes that do not decompress, a stream cut short or followed by other bytes, or
    another length. Never more than the limit is decompressed, so a crafted file cannot fill the memory."""
    if codec not in CODECS:
        raise ValueError(f"{what} coded {codec!r}; expected one of {', '.join(CODECS)}")
    limit = MAX_RECORD if size is None else size
    if codec == "raw":
        out = bytes(data[: limit + 1])
    else:
        stream = zlib.decompressobj() if codec == "zlib" else \
            lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_DECODE)
        try:
            out = stream.decompress(data, limit + 1)
        except (zlib.error, lzma.LZMAError) as e:
            raise ValueError(f"{what} ({codec}) does not decompress (damaged): {e}") from None
        if len(out) <= limit and not (stream.eof and not stream.unused_data):
            raise ValueError(f"{what} ({codec}) is " + ("followed by bytes that belong to no stream"
                                                         if stream.eof else "cut short (damaged)"))
    if len(out) > limit:
        raise ValueError(f"{what} decodes to more than {limit:,} bytes" + ("; its index says so many" if size else ""))
    if size is not None and len(out) != size:
        raise ValueError(f"{what} decodes to {len(out):,} bytes; its index says {size:,}")
    return out


def _uint8(data: "bytes | bytearray") -> torch.Tensor:
    """Bytes as a 1-D uint8 tensor: torch.save pickles `bytes` as latin-1 text (up to 2 bytes per byte)
    but writes a tensor's storage as it is."""
    data = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _stored(entry: object, what: str, codecs: tuple[str, ...] = CODECS) -> tuple[str, memoryview]:
    """(codec, bytes) of a [codec, 1-D uint8 tensor] entry (a version 3-4 byte plane, a version 5
    record). ValueError naming `what` and what it holds instead."""
    if not (isinstance(entry, list) and len(entry) == 2):
        raise ValueError(f"{what} is a {type(entry).__name__}"
                         + (f" of {len(entry)}" if isinstance(entry, list) else "") + "; expected [codec, uint8 tensor]")
    codec, data = entry
    if not isinstance(codec, str) or codec not in codecs:
        raise ValueError(f"{what} coded {codec!r}; expected one of {', '.join(codecs)}")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        kind = f"a {data.dtype} tensor of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else \
            f"a {type(data).__name__}"
        raise ValueError(f"{what} holds {kind}; expected a 1-D uint8 tensor")
    return codec, memoryview(data.numpy())


def _exactly_json(value: object) -> bool:
    """Whether `value` comes back from JSON as the same plain data: same types all the way down (a tuple
    comes back a list, an int dict key a str, a numpy float a float: not exact), NaN as NaN."""
    def same(a: object, b: object) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            return a == b or (math.isnan(a) and math.isnan(b))
        if isinstance(a, list):
            return len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, dict):
            return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        return a == b
    try:
        return same(json.loads(json.dumps(value, allow_nan=True)), value)
    except (TypeError, ValueError, RecursionError):  # a tensor, bytes, a circular reference...
        return False


def encode_record(fields: dict) -> tuple[list, dict]:
    """([codec, uint8 tensor] of the UTF-8 JSON object of the fields that are exactly JSON (`_compress`'d:
    small ones stay raw), the other fields as they are): version 5's "record" and what is stored beside
    it. Inverse: `decode_record`."""
    plain = {k: v for k, v in fields.items() if _exactly_json(v)}
    codec, data = _compress(json.dumps(plain, allow_nan=True, separators=(",", ":")).encode())
    return [codec, _uint8(data)], {k: v for k, v in fields.items() if k not in plain}


def decode_record(entry: object) -> dict:
    """The fields a version 5 "record" holds (only RECORD_FIELDS). ValueError when it is not a
    [codec, 1-D uint8 tensor] whose bytes decode to a UTF-8 JSON object of those fields."""
    if entry is None:
        raise ValueError("a version 5 file without its record")
    codec, data = _stored(entry, "the record")
    try:
        fields = json.loads(_decompress(codec, data, None, "the record").decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"the record is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ValueError("the record's JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the record is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"the record is a JSON {type(fields).__name__}, expected an object")
    unknown = sorted(set(fields) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"the record holds {', '.join(map(repr, unknown))}, which it never holds "
                         f"(only {', '.join(RECORD_FIELDS)})")
    return fields


def _digest(index: bytes, planes: dict[str, list[bytes]]) -> str:
    """SHA-256 of the index and every dtype's byte planes (little-endian order), each part length-prefixed."""
    h = hashlib.sha256(len(index).to_bytes(8, "little") + index)
    for dtype in sorted(planes):
        h.update(len(dtype).to_bytes(8, "little") + dtype.encode())
        for plane in planes[dtype]:
            h.update(len(plane).to_bytes(8, "little") + plane)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", obj: object) -> None:
    """Feed `obj` (plain data and tensors, as artifacts hold) to `h` unambiguously: a type tag and a
    length before every value; dict entries in a fixed order; tensors as dtype, shape and bytes."""
    def put(tag: bytes, data: bytes) -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)
    if obj is None or isinstance(obj, bool):
        put(b"c", repr(obj).encode())
    elif isinstance(obj, int):
        put(b"i", int.__repr__(obj).encode())
    elif isinstance(obj, float):
        put(b"f", float.__repr__(obj).encode())  # repr round-trips a float exactly
    elif isinstance(obj, str):
        put(b"s", obj.encode())
    elif isinstance(obj, (bytes, bytearray)):
        put(b"b", bytes(obj))
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        t = t.int_repr() if t.is_quantized else t
        put(b"t", f"{obj.dtype}{tuple(t.shape)}".encode())
        put(b"d", t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        put(b"l", len(obj).to_bytes(8, "little"))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        put(b"m", len(obj).to_bytes(8, "little"))
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    else:
        put(b"r", f"{type(obj).__name__}:{obj!r}".encode())


def record_digest(payload: dict) -> str:
    """SHA-256 of an artifact payload's record: every field but the weights and the digest itself, plus
    the weights' own SHA-256 (version 3's, `pack_state`), so one value covers the whole file."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in ("state", "digest")})
    state = payload.get("state")
    _feed(h, state.get("sha256") if isinstance(state, dict) else None)
    return h.hexdigest()


def pack_state(state_dict: dict[str, torch.Tensor]) -> dict:
    """A state_dict as one flat buffer per dtype, split into byte planes, each entropy-coded where that
    pays, all stored in one uint8 tensor, with a compressed index and a SHA-256 (see the module
    docstring). Values are kept exactly. Inverse: `unpack_state`.
    ValueError for a quantized tensor (torch.qint8...), whose scale a flat buffer cannot hold.
    """
    index, parts = [], {}
    for name, tensor in state_dict.items():
        if tensor.is_quantized:  # its scale and zero point would be lost in the flat buffer
            raise ValueError(f"{name}: a quantized ({tensor.dtype}) tensor; store its int8 values and scales "
                             "as plain tensors")
        t = tensor.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        index.append([name, dtype, list(t.shape)])
        parts.setdefault(dtype, []).append(t.reshape(-1))
    text = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    planes = {d: [p.contiguous().numpy().tobytes() for p in _byte_planes(torch.cat(ts))] for d, ts in parts.items()}
    buffers, stored = {}, []
    for dtype, ps in planes.items():
        coded = [_compress(p) for p in ps]
        buffers[dtype] = [[codec, len(data)] for codec, data in coded]
        stored += [data for _, data in coded]
    return {"index": text, "byteorder": "little", "buffers": buffers, "data": _uint8(bytearray().join(stored)),
            "sha256": _digest(text, planes)}


def _read_index(packed: dict) -> list[tuple[str, str, list[int]]]:
    """The weight index: [(name, dtype, shape), ...] in state_dict order. ValueError when it is not
    zlib'd UTF-8 JSON of such triples."""
    index = packed.get("index")
    if not isinstance(index, bytes):
        raise ValueError(f"its index is a {type(index).__name__}, expected zlib'd bytes")
    try:
        entries = json.loads(_decompress("zlib", index, None, "the weight index").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"the weight index is not JSON: {e}") from None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(e[2], list) and all(type(n) is int and n >= 0 for n in e[2]) for e in entries):
        raise ValueError("the weight index is not a list of [name, dtype, shape]")
    return [tuple(e) for e in entries]


def _stored_planes(packed: dict, version: int, counts: dict[str, int]) -> dict[str, list[bytes]]:
    """dtype -> its decoded byte planes, each exactly `counts[dtype]` bytes (the index's element count):
    version 5 cuts them from the one "data" tensor by the lengths in "buffers"; versions 3 and 4 stored
    each plane as its own [codec, tensor]. ValueError for anything else."""
    buffers = packed.get("buffers")
    if not isinstance(buffers, dict) or not all(isinstance(p, list) for p in buffers.values()):
        raise ValueError(f"its buffers are a {type(buffers).__name__}, expected a dict of dtype -> list of byte planes")
    if version < 5:
        return {dtype: [_decode_plane_v4(p, counts.get(dtype, 0), f"{dtype} byte plane {i}")
                        for i, p in enumerate(planes)] for dtype, planes in buffers.items()}
    unknown = sorted(set(packed) - STATE_KEYS)
    if unknown:
        raise ValueError(f"its weights hold {', '.join(map(repr, unknown))}, which version {version} never writes")
    data = packed.get("data")
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        kind = f"a {data.dtype} tensor of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else \
            f"a {type(data).__name__}"
        raise ValueError(f"its planes' bytes are {kind}, expected a 1-D uint8 tensor")
    data, start, out = memoryview(data.numpy()), 0, {}
    for dtype, planes in buffers.items():
        out[dtype] = []
        for i, entry in enumerate(planes):
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[1]) is int and entry[1] >= 0):
                raise ValueError(f"{dtype} byte plane {i} is {entry!r}; expected [codec, length]")
            codec, n = entry
            if start + n > len(data):
                raise ValueError(f"{dtype} byte plane {i} runs past the {len(data):,} stored bytes")
            out[dtype].append(_decompress(codec, data[start: start + n], counts.get(dtype, 0),
                                          f"{dtype} byte plane {i}"))
            start += n
    if start != len(data):
        raise ValueError(f"{len(data) - start:,} stored bytes belong to no byte plane")
    return out


def _decode_plane_v4(entry: object, size: int, what: str) -> bytes:
    """Versions 3 and 4 stored each plane as its own [codec, uint8 tensor] (codec raw or zlib)."""
    codec, data = _stored(entry, what, codecs=("raw", "zlib"))
    return _decompress(codec, data, size, what)


def _flat_buffers(packed: dict, version: int, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """dtype -> 1-D tensor: version 2 stored them as tensors; versions 3 on as byte planes with a checksum,
    checked here (the format is decided by `version`, never by what the buffers look like, so a version
    3 file cannot skip its checksum)."""
    buffers = packed.get("buffers")
    if version == 2:
        if not isinstance(buffers, dict) or not all(isinstance(b, torch.Tensor) for b in buffers.values()):
            raise ValueError("a version 2 file whose buffers are not tensors")
        return buffers
    if packed.get("byteorder") != "little" or not isinstance(packed.get("sha256"), str):
        raise ValueError(f"a version {version} file needs little-endian byte planes and a sha256 "
                         f"(byteorder {packed.get('byteorder')!r}, sha256 {type(packed.get('sha256')).__name__})")
    raw_planes, flats = _stored_planes(packed, version, counts), {}
    for dtype, raw in raw_planes.items():
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"buffer {dtype!r}: not a known dtype")
        size = torch.empty(0, dtype=torch_dtype).element_size()
        if len(raw) != size or len({len(r) for r in raw}) != 1:
            raise ValueError(f"the {dtype} buffer has {len(raw)} byte planes of lengths {sorted({len(r) for r in raw})}; "
                             f"expected {size} of one length")
        native = raw[::-1] if sys.byteorder == "big" else raw
        interleaved = torch.stack([torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in native], 1) if raw[0] \
            else torch.empty(0, size, dtype=torch.uint8)
        flats[dtype] = interleaved.reshape(-1).view(torch_dtype)
    if packed["sha256"] != _digest(packed["index"], raw_planes):
        raise ValueError("the weights' SHA-256 does not match the one written with them: the file was damaged, or "
                         "edited without recomputing it, after it was saved")
    return flats


def unpack_state(packed: dict, version: int = VERSION) -> dict[str, torch.Tensor]:
    """`pack_state`'s inverse (`version` 2 to 5 of the file): name -> tensor, in the saved order, each its
    own copy (no tensor pins the whole buffer). ValueError when the index and the buffers disagree
    (dtype, extent) or, version 3 on, when the checksum does not match."""
    entries = _read_index(packed)
    counts: dict[str, int] = {}
    for _, dtype, shape in entries:
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    buffers, offsets, out = _flat_buffers(packed, version, counts), {}, {}
    for name, dtype, shape in entries:
        if dtype not in buffers:
            raise ValueError(f"{name}: indexed as {dtype}, a dtype no buffer holds")
        buf = buffers[dtype]
        if str(buf.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{name}: indexed as {dtype}, its buffer holds {buf.dtype}")
        start, n = offsets.get(dtype, 0), math.prod(shape)
        if start + n > buf.numel():
            raise ValueError(f"{name}: elements {start}..{start + n} lie outside its {dtype} buffer of {buf.numel()}")
        out[name] = buf[start: start + n].reshape(shape).clone()
        offsets[dtype] = start + n
    unused = {d: b.numel() - offsets.get(d, 0) for d, b in buffers.items() if b.numel() != offsets.get(d, 0)}
    if unused:
        raise ValueError(f"the index does not cover its buffers (elements left over: {unused})")
    return out


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

