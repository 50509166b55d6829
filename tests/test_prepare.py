import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats.cache import open_cache, uncrop
from brats.layout import DataError, discover_cases
from brats.nifti import load_case, save_label_map, write_nifti
from brats.phantom import write_phantom_dataset
from brats.prepare import PrepareError, brain_bbox, main, prepare, run_prepare

SHAPE = (32, 32, 24)
ROOT = Path(__file__).resolve().parents[1]
# `python -m brats.prepare` whose array writes each take 0.3 s longer: its temp files stay in flight
SLOW_PREPARE = """import os, sys, time
import numpy as np
save = np.save
go = os.environ["PREPARE_GO"]
def slow_save(*args, **kwargs):  # after its first array, wait (at most 120 s) until the test says go
    save(*args, **kwargs)
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
np.save = slow_save
from brats.prepare import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    write_phantom_dataset(root, cases=7, val_cases=1, shape=SHAPE, seed=3)
    return root


@pytest.fixture
def data(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


def _refs(root):
    return [r for r in discover_cases(root) if r.has_label]


def _rewrite(path, fn):
    img = nib.load(str(path))
    data, affine = fn(np.asanyarray(img.dataobj), img.affine.copy())
    write_nifti(path, data, affine)


def _break_cases(root):
    """Break six labelled cases, each in its own way; returns case -> (file, message pattern)."""
    refs = _refs(root)
    broken = {}
    # truncated gzip
    f = refs[0].files["t2"]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    broken[refs[0].case] = (f, "unreadable or truncated")
    # missing modality
    f = refs[1].files["t1ce"]
    f.unlink()
    broken[refs[1].case] = (f, "missing t1ce")
    # shape mismatch
    f = refs[2].files["t1"]
    _rewrite(f, lambda d, a: (d[:, :, :-1], a))
    broken[refs[2].case] = (f, r"shape \(32, 32, 23\) differs")
    # affine mismatch
    f = refs[3].files["flair"]

    def shift(d, a):
        a[0, 3] += 2.0
        return d, a
    _rewrite(f, shift)
    broken[refs[3].case] = (refs[3].files["t1"], "affine differs")
    # label 3 (does not exist in BraTS 2017)
    f = refs[4].files["seg"]
    _rewrite(f, lambda d, a: (np.where(d == 1, 3, d).astype(d.dtype), a))
    broken[refs[4].case] = (f, r"label values \[3\]")
    # non-integer labels
    f = refs[5].files["seg"]
    _rewrite(f, lambda d, a: (d.astype(np.float32) * 0.5, a))
    broken[refs[5].case] = (f, "not integers")
    return broken


def test_each_bad_case_names_case_file_and_problem(data):
    broken = _break_cases(data)
    refs = {r.case: r for r in _refs(data)}
    for case, (path, pattern) in broken.items():
        with pytest.raises(DataError) as err:
            load_case(refs[case])
        msg = str(err.value)
        assert case in msg and path.name in msg, msg
        assert re.search(pattern, msg), msg


def test_prepare_lists_all_bad_cases_and_skip_bad(data, tmp_path, capsys):
    broken = _break_cases(data)
    cache_dir = tmp_path / "cache"
    with pytest.raises(PrepareError) as err:
        prepare(data, cache_dir, progress=False)
    assert set(err.value.bad) == set(broken)
    for case in broken:
        assert case in str(err.value)

    assert main([str(data), "--out", str(cache_dir), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "6 bad case(s)" in out.err and all(case in out.err for case in broken)
    assert "error: bad cases (above); pass --skip-bad" in out.err

    assert main([str(data), "--out", str(cache_dir), "--quiet", "--skip-bad"]) == 0
    out = capsys.readouterr()
    assert all(case in out.err for case in broken)
    cache = open_cache(cache_dir)
    good = {r.case for r in discover_cases(data)} - set(broken)
    assert {m.case for m in cache.cases} == good and len(good) == 2  # 1 training + 1 validation case
    assert set(cache.bad) == set(broken)
    assert len(cache.labelled()) == 1
    with pytest.raises(SystemExit):
        main(["--help"])


def test_cache_round_trip(pristine, tmp_path):
    cache = prepare(pristine, tmp_path / "cache", progress=False)
    refs = {r.case: r for r in discover_cases(pristine)}
    assert {m.case for m in cache.cases} == set(refs) and len(cache.labelled()) == 7
    for meta in cache.cases:
        src = load_case(refs[meta.case])
        image = cache.image(meta.case)
        assert isinstance(image, np.memmap) and image.dtype == np.float16 and image.shape == (4, *meta.shape)
        assert meta.full_shape == SHAPE and meta.bbox == brain_bbox(src.image, src.label)
        assert meta.grade == refs[meta.case].grade and meta.spacing == (1.0, 1.0, 1.0)
        np.testing.assert_allclose(meta.affine, src.affine)
        (x0, x1), (y0, y1), (z0, z1) = meta.bbox
        assert 0 < x0 and x1 < SHAPE[0]  # the crop removed background
        img = np.asarray(image, dtype=np.float32)
        for c in range(4):
            brain = img[c] != 0
            assert abs(img[c][brain].mean()) < 1e-2 and abs(img[c][brain].std() - 1) < 1e-2
        # background stays 0 and nothing outside the bbox is lost
        np.testing.assert_array_equal(uncrop(img, meta) != 0, src.image != 0)
        if meta.has_label:
            label = cache.label(meta.case)
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, src.label[x0:x1, y0:y1, z0:z1])
            np.testing.assert_array_equal(uncrop(np.asarray(label), meta), src.label)
        else:
            assert cache.label(meta.case) is None


def test_stale_entry_rebuilt_others_reused(data, tmp_path):
    cache_dir = tmp_path / "cache"
    first = run_prepare(data, cache_dir, progress=False)
    assert len(first.built) == 8 and first.reused == [] and first.bad == {}
    ref = _refs(data)[2]
    old_file = open_cache(cache_dir).meta(ref.case).image_file
    st = ref.files["t2"].stat()
    os.utime(ref.files["t2"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = run_prepare(data, cache_dir, progress=False)
    assert second.built == [ref.case] and len(second.reused) == 7
    new_file = open_cache(cache_dir).meta(ref.case).image_file
    assert new_file != old_file and not (cache_dir / old_file).exists()
    assert len(list((cache_dir / "cases").glob("*.image.npy"))) == 8


def test_a_read_only_cache_is_used_as_it_is_or_names_the_setting(data, tmp_path, monkeypatch):
    import brats.prepare as prep

    cache_dir = tmp_path / "cache"
    run_prepare(data, cache_dir, progress=False)
    (cache_dir / ".lock").unlink()
    before = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")}
    monkeypatch.setattr(prep, "_writable", lambda folder: False)  # a read-only mount (root ignores chmod)
    again = run_prepare(data, cache_dir, progress=False)
    assert len(again.reused) == 8 and again.built == []
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*")} == before  # nothing written, no lock taken
    ref = _refs(data)[2]
    st = ref.files["t2"].stat()
    os.utime(ref.files["t2"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a case changed since
    with pytest.raises(DataError, match=r"cannot be written here \(read-only\) and 1 of 8 case\(s\).*"
                                        r"--set data\.cache=DIR"):
        run_prepare(data, cache_dir, progress=False)


def test_interrupted_prepare_is_not_trusted(data, tmp_path):
    cache_dir = tmp_path / "cache"
    run_prepare(data, cache_dir, progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    # a run killed before its manifest: arrays on disk, no entry -> rebuilt, leftovers cleared
    victim = sorted(manifest["cases"])[0]
    del manifest["cases"][victim]
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    (cache_dir / "cases" / ".x.npy.123.tmp").write_bytes(b"partial")
    report = run_prepare(data, cache_dir, progress=False)
    assert report.built == [victim] and len(report.reused) == 7
    assert not (cache_dir / "cases" / ".x.npy.123.tmp").exists()
    # a manifest entry whose array vanished is rebuilt too
    meta = open_cache(cache_dir).meta(victim)
    (cache_dir / meta.image_file).unlink()
    assert run_prepare(data, cache_dir, progress=False).built == [victim]
    with pytest.raises(DataError, match="no usable manifest.json"):
        open_cache(tmp_path / "nowhere")


def test_two_prepares_on_one_cache_both_succeed(data, tmp_path):
    """The second waits for the first instead of deleting its in-flight temp files. The first holds after
    its first array until the second says it waits (however slowly a loaded machine starts either)."""
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREPARE_GO": str(go),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [str(data), "--out", str(cache_dir), "--quiet"]

    def start(*cmd):
        return subprocess.Popen([sys.executable, *cmd, *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    slow = start("-c", SLOW_PREPARE)
    deadline = time.monotonic() + 120
    while not any((cache_dir / "cases").glob("*")) and slow.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the slow one is writing its first array
    fast = start("-m", "brats.prepare")
    seen = []
    for line in fast.stderr:  # until the second one reports the wait (or ends without it)
        seen.append(line)
        if "waiting for another prepare" in line:
            break
    go.touch()
    (slow_out, slow_err), (fast_out, fast_err) = slow.communicate(timeout=300), fast.communicate(timeout=300)
    fast_err = "".join(seen) + fast_err
    assert slow.returncode == 0, slow_err[-2000:]
    assert fast.returncode == 0, fast_err[-2000:]
    assert slow_out.startswith("8 case(s)") and "8 built, 0 reused" in slow_out
    assert f"waiting for another prepare of {cache_dir}" in fast_err and "0 built, 8 reused" in fast_out
    cache = open_cache(cache_dir)
    assert len(cache) == 8 and len(cache.labelled()) == 7
    files = {m.image_file for m in cache.cases} | {m.label_file for m in cache.cases if m.label_file}
    assert {f"cases/{p.name}" for p in (cache_dir / "cases").iterdir()} == files  # no temp file left
    for meta in cache.cases:
        assert cache.image(meta.case).shape == (4, *meta.shape)


def test_save_label_map_keeps_affine_and_header(pristine, tmp_path):
    ref = _refs(pristine)[0]
    src = load_case(ref)
    out = save_label_map(tmp_path / "pred" / f"{ref.case}.nii.gz", src.label, src.affine, src.header)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), src.label)
    np.testing.assert_allclose(img.affine, src.affine)
    assert img.header.get_zooms() == src.header.get_zooms()
    assert list(tmp_path.joinpath("pred").iterdir()) == [out]  # no temp file left behind


@pytest.mark.parametrize("value", [0.0, 123.0])
def test_constant_modality_is_a_bad_case_unless_allowed(write_tiny_case, tmp_path, capsys, value):
    good = write_tiny_case(tmp_path / "data" / "HGG" / "Brats17_TCIA_105_1")
    flat = write_tiny_case.images(seed=1)["t1ce"]
    flat[flat != 0] = value  # all zero, or one value over the whole brain
    bad = write_tiny_case(tmp_path / "data" / "HGG" / "Brats17_TCIA_222_1", images={"t1ce": flat}, seed=1)
    cache_dir = tmp_path / "cache"
    report = run_prepare(tmp_path / "data", cache_dir, progress=False)
    assert report.built == ["Brats17_TCIA_105_1"] and list(report.bad) == ["Brats17_TCIA_222_1"]
    msg = report.bad["Brats17_TCIA_222_1"]
    assert msg.startswith(f"case Brats17_TCIA_222_1: {bad['t1ce']}: t1ce is constant ({value:g}) over the 480 brain")
    assert "--allow-constant-modality" in msg
    assert main([str(tmp_path / "data"), "--out", str(cache_dir), "--quiet"]) == 2
    capsys.readouterr()

    assert main([str(tmp_path / "data"), "--out", str(cache_dir), "--quiet", "--allow-constant-modality"]) == 0
    err = capsys.readouterr().err
    assert f"warning: case Brats17_TCIA_222_1: {bad['t1ce']}: t1ce is constant" in err and str(good["t1"]) not in err
    cache = open_cache(cache_dir)
    assert cache.meta("Brats17_TCIA_222_1").constant == ("t1ce",) and cache.meta("Brats17_TCIA_105_1").constant == ()
    assert not np.asarray(cache.image("Brats17_TCIA_222_1")[2]).any()  # z-scored constant: zeros
    # cached while allowed, then prepared without: not reused, reported again
    report = run_prepare(tmp_path / "data", cache_dir, progress=False)
    assert report.reused == ["Brats17_TCIA_105_1"] and list(report.bad) == ["Brats17_TCIA_222_1"]


def test_all_zero_case_names_its_files(write_tiny_case, tmp_path):
    zeros = {k: np.zeros_like(v) for k, v in write_tiny_case.images().items()}
    paths = write_tiny_case(tmp_path / "flat" / "Brats17_TCIA_105_1", images=zeros,
                            label=np.zeros((12, 10, 8), np.uint8))
    (ref,) = discover_cases(tmp_path / "flat")
    with pytest.raises(DataError, match="all modalities are zero") as err:
        load_case(ref, allow_constant_modality=True)
    assert all(str(paths[k]) in str(err.value) for k in ("flair", "t1", "t1ce", "t2"))
