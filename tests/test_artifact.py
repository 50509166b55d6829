import gzip
import json
import lzma
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

from common.artifact import (BUILDERS, RECORD_FIELDS, Artifact, ArtifactError, _read_index, _stored_planes,
                             build_model, decode_record, encode_record, load_model, record_digest)
from common.atomic import atomic_write
from model.refineformer3d import ModelSpec, RefineFormer3D

TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 2, 2, 2], depths=[1, 1, 1, 1], decoder_dim=16, fuse_dim=16, refine_dim=4)


def _artifact(stage="teacher", **kw):
    torch.manual_seed(0)
    model = RefineFormer3D(ModelSpec(**TINY)).eval()
    return model, Artifact(stage=stage, spec=model.spec.to_dict(), state_dict=model.state_dict(), **kw)


def _edited(src, dst, change, digest: bool = False):
    """Save `src`'s payload as `dst` after `change(payload)` ran on it with the record's fields decoded in
    place, as version 4 stored them; the digest is recomputed only when asked (a careful hand edit)."""
    raw = torch.load(src, weights_only=True)
    raw.update(decode_record(raw.pop("record")))
    change(raw)
    record, kept = encode_record({k: raw.pop(k) for k in RECORD_FIELDS if k in raw})
    raw.update(record=record, **kept)
    if digest:
        raw["digest"] = record_digest(raw)
    torch.save(raw, dst)
    return dst


def _as_version_4(raw: dict) -> dict:
    """A version 5 payload as version 4 wrote it: record fields stored as they are, each byte plane its own
    [codec, uint8 tensor] (raw here), the digest recomputed."""
    out = {k: v for k, v in raw.items() if k not in ("record", "digest")}
    out.update(decode_record(raw["record"]), version=4)
    counts = {}
    for _, dtype, shape in _read_index(raw["state"]):
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    planes = _stored_planes(raw["state"], 5, counts)
    out["state"] = {**{k: v for k, v in raw["state"].items() if k != "data"},
                    "buffers": {d: [["raw", torch.frombuffer(bytearray(p), dtype=torch.uint8)] for p in ps]
                                for d, ps in planes.items()}}
    out["digest"] = record_digest(out)
    return out


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model, art = _artifact(metrics={"dice_mean": 0.5}, extra={"table": [{"layer": "a", "rank": 3}]})
    art.save(tmp_path / "a.pt")
    # the format's promise: plain torch.load with weights_only=True reads it
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw["stage"] == "teacher" and decode_record(raw["record"])["metrics"] == {"dice_mean": 0.5}
    loaded, back = load_model(tmp_path / "a.pt")
    x = torch.randn(1, 4, 32, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    assert back.extra["table"][0]["rank"] == 3


def test_lineage_links_children_to_ancestors(tmp_path):
    _, teacher = _artifact()
    teacher.metrics = {"dice_mean": 0.8}
    teacher.save(tmp_path / "teacher.pt")
    _, student = _artifact("student", lineage=teacher.child_lineage())
    student.save(tmp_path / "student.pt")
    lowrank = Artifact("lowrank", student.spec, student.state_dict, lineage=Artifact.load(tmp_path / "student.pt").child_lineage())
    assert [e["stage"] for e in lowrank.lineage] == ["teacher", "student"]
    assert lowrank.ancestor("teacher") == str(tmp_path / "teacher.pt")
    assert lowrank.lineage[0]["metrics"]["dice_mean"] == 0.8
    assert lowrank.ancestor("grown") is None


def test_broken_files_give_clear_errors(tmp_path):
    _, art = _artifact()
    path = art.save(tmp_path / "a.pt")
    with pytest.raises(ArtifactError, match="no such artifact"):
        Artifact.load(tmp_path / "missing.pt")
    with pytest.raises(ArtifactError, match=r"no such artifact file \(a folder\)"):
        Artifact.load(tmp_path)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ArtifactError, match=r"t\.pt: not a readable artifact \(a torch file, corrupted or truncated\)"):
        Artifact.load(truncated)
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)
    with pytest.raises(ArtifactError, match="not a refineformer3d-artifact file .a bare state_dict; use model.segformer_import"):
        Artifact.load(bare)
    raw = torch.load(path, weights_only=True)
    raw["format"] = "refineformer3d-artifacs"  # one flipped byte in the tag: damage, not a state_dict
    torch.save(raw, tmp_path / "tag.pt")
    with pytest.raises(ArtifactError, match="tag.pt: not a .* file .its format tag reads 'refineformer3d-artifacs'"):
        Artifact.load(tmp_path / "tag.pt")
    for name, obj, what in (("list.pt", [1, 2], "a list"), ("empty.pt", {}, "an empty dict"),
                            ("dict.pt", {"epoch": 3, "w": torch.zeros(1)}, "a dict with keys 'epoch', 'w'"),
                            ("wrapped.pt", {"epoch": 3, "state_dict": {"w": torch.zeros(1)}},
                             "a training checkpoint with a 'state_dict' .keys 'epoch', 'state_dict'.; "
                             "use model.segformer_import")):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ArtifactError, match=f"{name}: not a .* file .{what}"):
            Artifact.load(tmp_path / name)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    _, art = _artifact()
    art.spec = {**art.spec, "embed_dims": [16, 16, 16, 16]}
    art.save(tmp_path / "a.pt")
    with pytest.raises(ArtifactError, match="do not fit the stored spec"):
        build_model(Artifact.load(tmp_path / "a.pt"))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"good")

    def failing(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no temp file left behind


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "y.bin", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "y.bin").stat().st_mode & 0o777 == 0o644


def test_builders_are_registered_by_the_model_modules_and_unknown_kinds_named(tmp_path, monkeypatch):
    # the artifact module alone names no model code; the model package registers "fp32" on import
    code = ("import common.artifact as a; before = sorted(a.BUILDERS); import model.refineformer3d; "
            "import compress.quant; print(before, sorted(a.BUILDERS))")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] [") == ["[", "'fp32', 'int8-qat', 'int8-torch', 'onnx']\n"]

    _, art = _artifact()
    monkeypatch.delitem(BUILDERS, "fp32")
    with pytest.raises(ArtifactError, match="no builder registered for model kind 'fp32'.*import model first"):
        build_model(art)
    art.spec = {**art.spec, "kind": "mystery"}
    with pytest.raises(ArtifactError, match="'mystery'"):
        build_model(art)


def test_packed_state_round_trips_every_dtype_and_layout_exactly(tmp_path):
    """One buffer per dtype in the file; back out: the same names, order, dtypes, shapes and values."""
    state = {
        "w": torch.randn(3, 4).t(),  # not contiguous
        "q": torch.randint(-128, 127, (5, 2, 2), dtype=torch.int8),
        "n": torch.tensor(7),  # 0-d int64 (num_batches_tracked)
        "e": torch.empty(0, 3),
        "h": torch.randn(6, dtype=torch.bfloat16),
        "m": torch.tensor([True, False]),
        "b": torch.randn(2),
    }
    Artifact("x", {"kind": "fp32"}, state).save(tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert "state_dict" not in raw and sorted(raw["state"]["buffers"]) == ["bfloat16", "bool", "float32", "int64", "int8"]
    back = Artifact.load(tmp_path / "a.pt").state_dict
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    back["b"].add_(1)  # each tensor is its own copy, not a view of the shared buffer
    assert torch.equal(back["w"], state["w"])


def test_packing_saves_the_per_tensor_overhead(tmp_path):
    """Many small tensors: the packed file is within 8 KiB of its bytes; torch.save of the plain dict is not."""
    state = {f"layer{i}.bias": torch.randn(16) for i in range(300)}
    payload = 300 * 16 * 4
    Artifact("x", {"kind": "fp32"}, state).save(tmp_path / "packed.pt")
    torch.save(state, tmp_path / "plain.pt")
    packed, plain = (tmp_path / "packed.pt").stat().st_size, (tmp_path / "plain.pt").stat().st_size
    assert packed < payload + 8192
    assert plain - payload > 2 * (packed - payload)


def test_version_1_artifacts_still_load(tmp_path):
    """Written before packing: the state_dict stored as a dict of tensors."""
    model, art = _artifact()
    torch.save({"format": "refineformer3d-artifact", "version": 1, "stage": "teacher", "spec": art.spec,
                "state_dict": model.state_dict()}, tmp_path / "v1.pt")
    loaded, _ = load_model(tmp_path / "v1.pt")
    x = torch.randn(1, 4, 32, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))


def _v2_payload(art: Artifact) -> dict:
    """The payload version 2 wrote: flat buffers as tensors, no byte planes, no checksum."""
    index, parts = [], {}
    for name, t in art.state_dict.items():
        dtype = str(t.dtype).removeprefix("torch.")
        index.append([name, dtype, list(t.shape)])
        parts.setdefault(dtype, []).append(t.reshape(-1))
    return {"format": "refineformer3d-artifact", "version": 2, "stage": art.stage, "spec": art.spec,
            "state": {"index": zlib.compress(json.dumps(index).encode()),
                      "buffers": {d: torch.cat(ts) for d, ts in parts.items()}}}


def test_version_2_artifacts_still_load_and_malformed_buffers_are_named(tmp_path):
    model, art = _artifact()
    raw = _v2_payload(art)
    torch.save(raw, tmp_path / "v2.pt")
    loaded, _ = load_model(tmp_path / "v2.pt")
    x = torch.randn(1, 4, 32, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    buffers = raw["state"]["buffers"]
    buffers["float32"] = buffers["float32"][:-1]  # one element short
    torch.save(raw, tmp_path / "short.pt")
    with pytest.raises(ArtifactError, match=r"short\.pt: its packed weights are malformed.*outside its float32 buffer"):
        Artifact.load(tmp_path / "short.pt")
    buffers["float32"] = torch.zeros(buffers["float32"].numel() + 2)  # two too many
    torch.save(raw, tmp_path / "long.pt")
    with pytest.raises(ArtifactError, match=r"long\.pt: .*elements left over: \{'float32': 1\}"):
        Artifact.load(tmp_path / "long.pt")
    raw["version"] = 6
    torch.save(raw, tmp_path / "new.pt")
    with pytest.raises(ArtifactError, match=r"new\.pt: artifact version 6.*newer release"):
        Artifact.load(tmp_path / "new.pt")


def test_byte_planes_compress_what_compresses_and_keep_noise_raw(tmp_path):
    """int8 weights near zero (as QAT leaves them) are zlib'd; float32 noise keeps its mantissa planes raw
    but its sign/exponent plane zlib'd; the file is smaller than the values' bytes; values come back exactly."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(200_000, generator=g) * 6).round().clamp(-127, 127).to(torch.int8)
    w = torch.randn(100_000, generator=g) * 0.02
    Artifact("x", {"kind": "fp32"}, {"q": q, "w": w}).save(tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    codecs = {d: [c for c, _ in planes] for d, planes in raw["state"]["buffers"].items()}
    assert codecs["int8"][0] in ("zlib", "lzma")
    assert codecs["float32"][:3] == ["raw", "raw", "raw"] and codecs["float32"][3] in ("zlib", "lzma")  # little-endian
    assert (tmp_path / "a.pt").stat().st_size < 0.85 * (200_000 + 4 * 100_000)
    back = Artifact.load(tmp_path / "a.pt").state_dict
    assert torch.equal(back["q"], q) and torch.equal(back["w"], w)


def test_a_version_3_file_cannot_skip_its_checksum_with_flat_buffers(tmp_path):
    """Buffers stored as plain tensors (as version 2 did) in a file that says version 3: refused, not loaded
    unchecked."""
    _, art = _artifact()
    raw = _v2_payload(art)
    raw["version"] = 3
    raw["state"]["buffers"]["float32"][0] = 1e6
    torch.save(raw, tmp_path / "sneaky.pt")
    with pytest.raises(ArtifactError, match=r"sneaky\.pt: its packed weights are malformed.*sha256"):
        Artifact.load(tmp_path / "sneaky.pt")


def test_byte_planes_are_stored_least_significant_first_on_either_byte_order(tmp_path, monkeypatch):
    """On a big-endian machine the native planes are reversed on save and back on load. Faking the byte
    order here must round-trip and store the (little-endian) native planes reversed; on a real big-endian
    machine, whose native planes are the other way round, that gives the same stored order as here."""
    import common.artifact as artifact_module
    state = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}
    Artifact("x", {"kind": "fp32"}, state).save(tmp_path / "little.pt")
    monkeypatch.setattr(artifact_module.sys, "byteorder", "big")
    Artifact("x", {"kind": "fp32"}, state).save(tmp_path / "big.pt")
    assert torch.equal(Artifact.load(tmp_path / "big.pt").state_dict["w"], state["w"])
    little, big = (torch.load(tmp_path / n, weights_only=True)["state"]["buffers"]["float32"] for n in ("little.pt", "big.pt"))
    assert [c for c, _ in little] == [c for c, _ in big[::-1]]  # the native planes, reversed


def test_a_flipped_byte_in_the_record_is_refused_like_one_in_the_weights(tmp_path):
    """The ET rule, a metric, the spec: any field changed after saving fails the record's SHA-256, in the
    compressed record or stored beside it (a tensor in extra); version 4 and 3 files still load."""
    _, art = _artifact()
    art.extra = {"et_rule": {"et_min_voxels": 0}, "train_state": {"step": torch.tensor([1.0, 2.0])}}
    art.metrics = {"dice_mean": 0.8}
    art.save(tmp_path / "a.pt")
    assert Artifact.load(tmp_path / "a.pt").extra["et_rule"]["et_min_voxels"] == 0
    changes = {"rule.pt": lambda r: r["extra"]["et_rule"].update(et_min_voxels=128),
               "metric.pt": lambda r: r["metrics"].update(dice_mean=2.2e-21),
               "spec.pt": lambda r: r["spec"].update(num_classes=4),
               "tensor.pt": lambda r: r["extra"]["train_state"]["step"].add_(1)}
    for name, change in changes.items():
        with pytest.raises(ArtifactError, match=rf"{name}: its record .* does not match the SHA-256"):
            Artifact.load(_edited(tmp_path / "a.pt", tmp_path / name, change))
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    v4 = _as_version_4(raw)
    torch.save(v4, tmp_path / "v4.pt")
    back = Artifact.load(tmp_path / "v4.pt")
    assert back.metrics["dice_mean"] == 0.8 and all(torch.equal(back.state_dict[k], v) for k, v in art.state_dict.items())
    v4["metrics"]["dice_mean"] = 0.9
    torch.save(v4, tmp_path / "v4-edited.pt")
    with pytest.raises(ArtifactError, match=r"v4-edited\.pt: its record .* does not match"):
        Artifact.load(tmp_path / "v4-edited.pt")
    del v4["digest"]
    v4["version"] = 3
    torch.save(v4, tmp_path / "v3.pt")
    assert Artifact.load(tmp_path / "v3.pt").metrics["dice_mean"] == 0.9


def test_the_record_is_compressed_json_and_what_json_would_change_is_kept_as_it_is(tmp_path):
    """Plain fields go into the compressed JSON record; a tensor, a tuple or an int key keeps its field
    beside the record, so every field loads back exactly as it was given (NaN included)."""
    _, art = _artifact(metrics={"dice_mean": 0.8, "hd95_et": float("nan")}, config={"train": {"lr": 1e-3}},
                       extra={"window": (96, 96, 64), "train_state": {"step": torch.tensor([3])}},
                       lineage=[{"stage": "teacher", "path": None, "metrics": {1: 0.5}}])
    art.save(tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert sorted(decode_record(raw["record"])) == ["config", "created", "metrics", "spec"]
    assert raw["record"][0] in ("zlib", "lzma") and {"extra", "lineage"} <= set(raw)
    back = Artifact.load(tmp_path / "a.pt")
    assert back.extra["window"] == (96, 96, 64) and torch.equal(back.extra["train_state"]["step"], torch.tensor([3]))
    assert back.lineage[0]["metrics"] == {1: 0.5} and back.config == art.config and back.spec == art.spec
    assert back.metrics["dice_mean"] == 0.8 and back.metrics["hd95_et"] != back.metrics["hd95_et"]  # NaN
    twice = torch.load(tmp_path / "a.pt", weights_only=True)
    twice["config"] = {}
    twice["digest"] = record_digest(twice)
    torch.save(twice, tmp_path / "twice.pt")
    with pytest.raises(ArtifactError, match=r"twice\.pt: config stored both in its record and beside it"):
        Artifact.load(tmp_path / "twice.pt")
    broken = torch.load(tmp_path / "a.pt", weights_only=True)
    broken["record"] = ["zlib", torch.tensor([1, 2, 3], dtype=torch.uint8)]
    broken["digest"] = record_digest(broken)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ArtifactError, match=r"broken\.pt: its record is malformed: the record \(zlib\) does not decompress"):
        Artifact.load(tmp_path / "broken.pt")


def test_a_students_int8_artifact_is_smaller_for_the_compressed_record(tmp_path):
    """Version 5's record and single plane tensor: an artifact with a realistic record (a few kB of
    config, lineage and per-layer data) costs well under the bytes version 4 stored for the same."""
    _, art = _artifact(config={"train": {f"k{i}": i * 0.5 for i in range(200)}},
                       extra={"layers": [{"name": f"encoder.stages.{i}.mlp.fc1", "int8": i % 2 == 0,
                                          "ms_fp32": 1.2345 + i, "ms_int8": 0.98765 + i} for i in range(150)]})
    art.save(tmp_path / "v5.pt")
    torch.save(_as_version_4(torch.load(tmp_path / "v5.pt", weights_only=True)), tmp_path / "v4.pt")
    v5, v4 = (tmp_path / "v5.pt").stat().st_size, (tmp_path / "v4.pt").stat().st_size
    assert v4 - v5 > 10_000, (v4, v5)


def test_altered_weights_or_index_fail_the_checksum(tmp_path):
    """A flipped byte in a raw plane, two index entries swapped (same dtype and shape), a damaged zlib
    plane, a plane cut short: each is refused at load with the file named, never loaded silently."""
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(64, generator=g), "b": torch.randn(64, generator=g),
             "q": torch.randint(-3, 3, (4096,), dtype=torch.int8, generator=g)}
    Artifact("x", {"kind": "fp32"}, state).save(tmp_path / "a.pt")
    good = torch.load(tmp_path / "a.pt", weights_only=True)

    def altered(name: str, change) -> str:
        raw = torch.load(tmp_path / "a.pt", weights_only=True)
        change(raw["state"])
        torch.save(raw, tmp_path / name)
        return name

    def flip(st):  # a byte of the first float32 plane (raw: noise), the first plane stored
        assert st["buffers"]["float32"][0][0] == "raw"
        st["data"][5] ^= 1

    def swap(st):
        index = json.loads(zlib.decompress(st["index"]))
        index[0][0], index[1][0] = index[1][0], index[0][0]
        st["index"] = zlib.compress(json.dumps(index).encode())

    def damage(st):  # a byte inside the int8 plane, stored compressed after the float32 planes
        st["data"][sum(n for _, n in st["buffers"]["float32"]) + 20] ^= 0xFF

    def cut(st):
        st["data"] = st["data"][:-1]

    def uneven(st):  # lengths moved between two raw planes: every byte accounted for, planes of two lengths
        st["buffers"]["float32"][0][1] -= 1
        st["buffers"]["float32"][1][1] += 1

    def extra_bytes(st):
        st["data"] = torch.cat([st["data"], torch.zeros(3, dtype=torch.uint8)])

    assert good["state"]["buffers"]["int8"][0][0] in ("zlib", "lzma")
    for name, change, why in (("flip.pt", flip, "SHA-256 does not match"), ("swap.pt", swap, "SHA-256 does not match"),
                              ("damage.pt", damage, "does not decompress"), ("cut.pt", cut, "runs past the"),
                              ("uneven.pt", uneven, "float32 byte plane 0 decodes to 127 bytes; its index says 128"),
                              ("extra.pt", extra_bytes, "3 stored bytes belong to no byte plane")):
        with pytest.raises(ArtifactError, match=rf"{name}: its packed weights are malformed.*{why}"):
            Artifact.load(tmp_path / altered(name, change))


def _crafted(tmp_path, name: str, change) -> str:
    """A version 5 file of a few tensors, changed by `change(payload)` and its digest recomputed (a
    careful hand edit or a crafted file), saved as `name`."""
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(300, generator=g), "q": torch.randint(-3, 3, (4096,), dtype=torch.int8, generator=g)}
    Artifact("x", {"kind": "fp32"}, state, metrics={"dice_mean": 0.5}).save(tmp_path / "good.pt")
    raw = torch.load(tmp_path / "good.pt", weights_only=True)
    change(raw)
    raw["digest"] = record_digest(raw)
    torch.save(raw, tmp_path / name)
    return name


def _record_of(text: bytes, codec: str = "raw") -> list:
    data = zlib.compress(text) if codec == "zlib" else text
    return [codec, torch.frombuffer(bytearray(data), dtype=torch.uint8)]


def _junk_after_int8_plane(raw):
    """4 bytes appended to the (compressed) int8 plane, its length raised to match: every stored byte
    belongs to a plane, the decoded weights are the same; refused as bytes after the stream."""
    st = raw["state"]
    end = sum(n for _, n in st["buffers"]["float32"]) + st["buffers"]["int8"][0][1]
    st["data"] = torch.cat([st["data"][:end], torch.tensor([1, 2, 3, 4], dtype=torch.uint8), st["data"][end:]])
    st["buffers"]["int8"][0][1] += 4


@pytest.mark.parametrize("change, why", [
    (lambda r: r["state"].update(buffers=[1]), "its buffers are a list, expected a dict"),
    (lambda r: r["state"]["buffers"]["float32"][0].__setitem__(1, True), r"float32 byte plane 0 is \['raw', True\]"),
    (lambda r: r["state"]["buffers"]["float32"][0].__setitem__(1, -1), r"float32 byte plane 0 is \['raw', -1\]"),
    (lambda r: r["state"].update(data=r["state"]["data"].float()), "its planes' bytes are a torch.float32 tensor"),
    (lambda r: r["state"].pop("data"), "its planes' bytes are a NoneType"),
    (lambda r: r["state"].update(smuggled=torch.zeros(3)), "its weights hold 'smuggled', which version 5 never writes"),
    (_junk_after_int8_plane, r"int8 byte plane 0 \((zlib|lzma)\) is followed by bytes that belong to no stream"),
    (lambda r: r["state"].update(index="[]"), "its index is a str, expected zlib'd bytes"),
    (lambda r: r.pop("record"), "its record is malformed: a version 5 file without its record"),
    (lambda r: r.update(record=[1, r["record"][1]]), "the record coded 1; expected one of raw, zlib, lzma"),
    (lambda r: r.update(record=["raw", r["record"][1].reshape(1, -1)]), r"the record holds a torch.uint8 tensor of shape \(1, "),
    (lambda r: r.update(record=_record_of(b"[1, 2]")), "the record is a JSON list, expected an object"),
    (lambda r: r.update(record=_record_of(b"[" * 4000)), "the record's JSON is nested too deeply"),
    (lambda r: r.update(record=_record_of('{"spec": {}}'.encode("utf-16"))), "the record is not UTF-8 JSON"),
    (lambda r: r.update(record=_record_of(b'{"spec": {}, "bogus": 1}')), "the record holds 'bogus', which it never holds"),
    (lambda r: r.update(record=_record_of(b'{"spec": {}, "created": 5}')), "its 'created' is a int, expected a str"),
    (lambda r: r.update(record=_record_of(b"{}" + b" " * 5000, "zlib")), "the record decodes to more than 4,096 bytes"),
])
def test_crafted_version_5_files_are_refused_with_the_file_and_the_fault_named(tmp_path, monkeypatch, change, why):
    """Whatever a crafted or hand-edited file holds (its digest recomputed), loading it either gives back
    what was saved or raises ArtifactError naming the file: never another exception, never more memory
    than the limit (MAX_RECORD, lowered here to 4 KiB)."""
    import common.artifact as artifact_module
    monkeypatch.setattr(artifact_module, "MAX_RECORD", 4096)
    name = _crafted(tmp_path, "crafted.pt", change)
    with pytest.raises(ArtifactError, match=rf"crafted\.pt: .*{why}"):
        Artifact.load(tmp_path / name)


def test_lzma_planes_decode_with_the_formats_fixed_dictionary_whatever_the_encoder_preset(tmp_path):
    """Raw LZMA2 does not record its dictionary size: a plane another encoder wrote (preset 0, the
    fastest, whose own dictionary is 256 KiB) loads, because decoding uses the format's fixed LZMA_DECODE;
    the weights' SHA-256 covers the decoded planes, so the codec may differ."""
    q = (torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 3).round().to(torch.int8)
    Artifact("x", {"kind": "fp32"}, {"q": q}).save(tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    plane = lzma.compress(q.numpy().tobytes(), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
    raw["state"]["buffers"]["int8"] = [["lzma", len(plane)]]
    raw["state"]["data"] = torch.frombuffer(bytearray(plane), dtype=torch.uint8)
    torch.save(raw, tmp_path / "fast.pt")
    assert torch.equal(Artifact.load(tmp_path / "fast.pt").state_dict["q"], q)


def test_quantized_tensors_are_refused_by_name(tmp_path):
    q = torch.quantize_per_tensor(torch.tensor([0.5, 1.0]), 0.5, 0, torch.qint8)
    with pytest.raises(ValueError, match="w: a quantized"):
        Artifact("x", {"kind": "fp32"}, {"w": q}).save(tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists()


@pytest.mark.parametrize("field, value", [("extra", None), ("spec", [1, 2]), ("lineage", None), ("config", "x")])
def test_hand_edited_fields_of_the_wrong_type_are_named(tmp_path, field, value):
    _, art = _artifact()
    art.save(tmp_path / "a.pt")
    _edited(tmp_path / "a.pt", tmp_path / "edited.pt", lambda raw: raw.update({field: value}), digest=True)
    with pytest.raises(ArtifactError, match=rf"edited\.pt: its '{field}' is (a )?\w+, expected a"):
        Artifact.load(tmp_path / "edited.pt")


def test_empty_and_text_files_say_what_they_are(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("these are notes\n")
    with pytest.raises(ArtifactError, match=r"empty\.pt: an empty file \(0 bytes\), not an artifact"):
        Artifact.load(tmp_path / "empty.pt")
    with pytest.raises(ArtifactError, match=r"notes\.pt: not a readable artifact \(a text file, not a torch file; "
                                            r"it begins 'these are notes'\)$"):
        Artifact.load(tmp_path / "notes.pt")
    (tmp_path / "image.pt").write_bytes(gzip.compress(b"\x5c\x01" * 100))
    with pytest.raises(ArtifactError, match=r"image\.pt: not a readable artifact \(not a torch file: a gzip file"):
        Artifact.load(tmp_path / "image.pt")


def test_an_onnx_graph_given_as_an_artifact_points_to_the_artifact_beside_it(tmp_path):
    """quantize.py --backend onnxruntime writes int8.onnx beside int8.pt; passing the .onnx said only
    "corrupted, truncated or not a torch file"."""
    import onnx

    from compress.quant.onnx_export import export_onnx

    graph = export_onnx(torch.nn.Conv3d(4, 3, 1), (1, 4, 8, 8, 8))
    assert onnx.load_from_string(graph).graph.node  # a real ONNX graph, as the exporter writes it
    for name in ("int8.onnx", "renamed.bin"):  # known by its name, or by its first bytes
        (tmp_path / name).write_bytes(graph)
        with pytest.raises(ArtifactError, match=rf"{name}: not a readable artifact \(an ONNX graph, not an artifact: "
                                                r"pass the \.pt artifact written beside it"):
            Artifact.load(tmp_path / name)
