import json

import pytest

from brats.layout import DataError
from brats.splits import Fold, load_or_create_splits, make_splits

CASES = [(f"Brats17_TCIA_{i:03d}_1", "hgg") for i in range(20)] + [(f"Brats17_2013_{i}_1", "lgg") for i in range(10)]
GRADE = dict(CASES)


def test_single_split_deterministic_and_stratified():
    a = make_splits(CASES, val_fraction=0.2, seed=5)
    b = make_splits(list(reversed(CASES)), val_fraction=0.2, seed=5)  # input order does not matter
    assert a == b and len(a) == 1
    fold = a[0]
    assert len(fold.val) == 6 and len(fold.train) == 24
    assert sorted(fold.train + fold.val) == sorted(GRADE)
    assert [GRADE[c] for c in fold.val].count("hgg") == 4  # 20 * 0.2
    assert [GRADE[c] for c in fold.val].count("lgg") == 2  # 10 * 0.2
    assert make_splits(CASES, val_fraction=0.2, seed=6)[0].val != fold.val


def test_tiny_sets_keep_one_val_and_one_train():
    assert make_splits([("a", "hgg"), ("b", "lgg")], val_fraction=0.2) in (
        [Fold(["a"], ["b"])], [Fold(["b"], ["a"])])
    three = make_splits([("a", "hgg"), ("b", "hgg"), ("c", None)], val_fraction=0.9)[0]
    assert len(three.val) == 2 and len(three.train) == 1
    assert make_splits([("a", "hgg")], val_fraction=0.5) == [Fold(["a"], [])]


def test_k_folds_partition_and_stratify():
    folds = make_splits(CASES, folds=5, seed=0)
    assert len(folds) == 5
    vals = [c for f in folds for c in f.val]
    assert sorted(vals) == sorted(GRADE)  # every case validated exactly once
    for f in folds:
        assert len(f.val) == 6 and set(f.train).isdisjoint(f.val) and len(f.train) == 24
        assert [GRADE[c] for c in f.val].count("lgg") == 2
    with pytest.raises(DataError, match="at least 5 cases"):
        make_splits(CASES[:3], folds=5)


def test_file_is_created_then_read_not_regenerated(tmp_path):
    path = tmp_path / "splits.json"
    folds = load_or_create_splits(path, CASES, val_fraction=0.2, folds=1, seed=0)
    data = json.loads(path.read_text())
    assert data["seed"] == 0 and data["val_fraction"] == 0.2
    assert data["folds"] == [{"train": folds[0].train, "val": folds[0].val}]
    # a user moves one case from val to train by hand
    moved = data["folds"][0]["val"].pop()
    data["folds"][0]["train"].append(moved)
    path.write_text(json.dumps(data))
    notes = []
    again = load_or_create_splits(path, CASES, val_fraction=0.5, folds=1, seed=99, note=notes.append)
    assert len(again[0].val) == 5 and moved in again[0].train
    assert notes == [f"split file {path}: used as it is, drawn with seed 0 (asked 99), val_fraction 0.2 (asked 0.5); "
                     "delete it to draw a new split"]
    load_or_create_splits(path, CASES, val_fraction=0.2, folds=1, seed=0, note=notes.append)
    assert len(notes) == 1  # what it was drawn with: nothing to say
    data["seed"] = "by hand"  # a hand-made file may record anything: a note, not a crash
    path.write_text(json.dumps(data))
    load_or_create_splits(path, CASES, val_fraction=0.2, folds=1, seed=0, note=notes.append)
    assert notes[-1].startswith(f"split file {path}: used as it is, drawn with seed 'by hand' (asked 0);")


def test_a_split_file_with_other_folds_is_refused_not_used(tmp_path):
    """data.folds=3 on a cache whose splits.json holds one split trained on that split and said nothing."""
    path = tmp_path / "splits.json"
    load_or_create_splits(path, CASES, folds=1)
    with pytest.raises(DataError, match=r"has 1 fold\(s\), but data.folds=3: delete it to draw 3 fold\(s\)"):
        load_or_create_splits(path, CASES, folds=3)
    other = tmp_path / "kfold.json"
    assert len(load_or_create_splits(other, CASES, folds=3)) == 3
    notes = []
    assert len(load_or_create_splits(other, CASES, folds=3, val_fraction=0.5, note=notes.append)) == 3
    assert notes == []  # k-fold draws use no val_fraction: nothing to say


def test_bad_split_files_name_the_file(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"folds": [{"train": ["Brats17_TCIA_000_1", "ghost_case"], "val": []}]}))
    with pytest.raises(DataError, match=f"{path}.*ghost_case"):
        load_or_create_splits(path, CASES)
    path.write_text(json.dumps({"folds": [{"train": ["Brats17_TCIA_000_1"], "val": ["Brats17_TCIA_000_1"]}]}))
    with pytest.raises(DataError, match="both train and val"):
        load_or_create_splits(path, CASES)
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: unreadable"):
        load_or_create_splits(path, CASES)
