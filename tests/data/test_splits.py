"""Split files (the fingerprint a bundle records for `--distill-from BUNDLE`, names, encodings) and split assignment."""

import csv

import pytest

from melanoma_detector.data.splits import split_csv_fingerprint, train_fingerprint


def test_fingerprint_ignores_order_and_repeats_but_not_membership():
    assert train_fingerprint(["a", "b", "c"]) == train_fingerprint(["c", "a", "b", "a"])
    assert train_fingerprint(["a", "b"]) != train_fingerprint(["a", "b", "c"])
    assert train_fingerprint(["a", "b"]) != train_fingerprint(["ab"])


def test_split_csv_fingerprint_reads_only_the_training_rows(tmp_path):
    path = tmp_path / "split.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "group", "label", "split"])
        w.writerows([["s/a.jpg", "L1", 0, "train"], ["s/b.jpg", "L2", 1, "val"], ["s/c.jpg", "L3", 1, "train"]])
    assert split_csv_fingerprint(path) == train_fingerprint(["s/c.jpg", "s/a.jpg"])
    assert split_csv_fingerprint(tmp_path / "missing.csv") is None


def _keys_only(rows: list[dict], path):
    """The portable form of a split (configs/splits/default.csv): keys, groups, labels, no paths."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "group", "label", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_keys_only_split_finds_each_image_in_the_data_folders(seed_layout, tmp_path):
    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import read_split_rows, save_split

    samples = discover_all([str(seed_layout)])[0].samples
    for i, s in enumerate(samples):
        s.split = ("train", "val", "test")[i % 3]
    save_split(samples, tmp_path / "run-split.csv")
    full = read_split_rows(tmp_path / "run-split.csv")
    assert [r["path"] for r in full] == [s.path for s in samples]
    keys = _keys_only(full, tmp_path / "keys.csv")
    assert read_split_rows(keys, data_paths=[str(seed_layout)]) == full


def test_a_keys_only_split_without_its_data_is_refused_with_what_is_accepted(seed_layout, tmp_path):
    import pytest

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import read_split_rows
    from melanoma_detector.errors import DataError

    rows = [{"key": s.key, "group": "", "label": s.label, "split": "val"} for s in discover_all([str(seed_layout)])[0].samples]
    keys = _keys_only(rows, tmp_path / "keys.csv")
    with pytest.raises(DataError, match="lists image keys, not paths; accepted"):
        read_split_rows(keys)
    # The same images under another folder name have other keys: the split was not made on them.
    with pytest.raises(DataError, match=rf"{len(rows)} of {len(rows)} image key\(s\) not found under .*accepted"):
        read_split_rows(keys, data_paths=[str(seed_layout / "test")])
    (tmp_path / "notes.csv").write_text("image,label\na.jpg,0\n")
    with pytest.raises(DataError, match="accepted: a split CSV with columns key and split"):
        read_split_rows(tmp_path / "notes.csv")


# ---- split files: non-UTF-8 names, Excel's BOM; fractions; small classes ------------------------------------------

def _files(folder, names: list[bytes]) -> None:
    """Image files named by raw bytes (a Latin-1 name is not UTF-8); discovery goes by extension only."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
            fh.write(b"\xff\xd8 not decoded here")


def test_a_non_utf8_file_name_round_trips_through_a_split_file(tmp_path):
    import os

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import apply_split_file, assign_splits, read_split_rows, save_split

    root = tmp_path / "data"
    _files(root / "benign", [b"caf\xe9_\xff.jpg"] + [b"b%d.jpg" % i for i in range(9)])
    _files(root / "malignant", [b"m%d.jpg" % i for i in range(6)])
    samples = assign_splits(discover_all([str(root)]), val_fraction=0.2, test_fraction=0.2, seed=0)
    odd = next(s for s in samples if os.fsencode(s.path).endswith(b"caf\xe9_\xff.jpg"))
    assert odd.split in ("train", "val", "test") and odd.label == 0
    save_split(samples, tmp_path / "split.csv")  # raised UnicodeEncodeError, leaving half a file
    assert b"data/benign/caf\xe9_\xff.jpg" in (tmp_path / "split.csv").read_bytes()  # the name's own bytes
    rows = read_split_rows(tmp_path / "split.csv")
    assert [(r["key"], r["path"], r["split"]) for r in rows] == [(s.key, s.path, s.split) for s in samples]
    assert os.path.isfile(next(r["path"] for r in rows if r["key"] == odd.key))
    fresh = [s for src in discover_all([str(root)]) for s in src.samples]
    assert [s.split for s in apply_split_file(fresh, tmp_path / "split.csv")] == [s.split for s in samples]
    assert split_csv_fingerprint(tmp_path / "split.csv") == train_fingerprint(
        s.key for s in samples if s.split == "train")
    from melanoma_detector.training.features import cache_key

    assert len(cache_key([odd], size=64)) == 20  # the feature cache hashes the name too (the next crash in train)


def test_the_committed_split_keeps_the_fingerprint_the_default_model_records():
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    meta = json.loads((repo / "models" / "default" / "metadata.json").read_text())
    assert split_csv_fingerprint(repo / "configs" / "splits" / "default.csv") == meta["training"]["train_keys_sha256"]


def test_a_split_file_saved_by_excel_with_a_bom_is_read(tmp_path):
    from melanoma_detector.data.splits import apply_split_file, read_split_rows

    rows = "key,path,label,group,split\r\nd/benign/a.jpg,/x/a.jpg,0,,train\r\nd/malignant/b.jpg,/x/b.jpg,1,,val\r\n"
    (tmp_path / "plain.csv").write_text(rows, encoding="utf-8")
    (tmp_path / "excel.csv").write_text(rows, encoding="utf-8-sig")  # Excel's "CSV UTF-8": EF BB BF first
    assert (tmp_path / "excel.csv").read_bytes().startswith(b"\xef\xbb\xbfkey,")
    assert read_split_rows(tmp_path / "excel.csv") == read_split_rows(tmp_path / "plain.csv")
    assert split_csv_fingerprint(tmp_path / "excel.csv") == train_fingerprint(["d/benign/a.jpg"])
    from melanoma_detector.data.discovery import Sample

    samples = [Sample("/x/a.jpg", 0, source="d", key="d/benign/a.jpg"),
               Sample("/x/b.jpg", 1, source="d", key="d/malignant/b.jpg")]
    assert [s.split for s in apply_split_file(samples, tmp_path / "excel.csv")] == ["train", "val"]


def test_val_fraction_zero_is_fine_when_the_data_has_its_own_val_folder(tmp_path):
    import pytest

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import assign_splits
    from melanoma_detector.errors import DataError

    root = tmp_path / "kaggle"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("benign", "malignant"):
            _files(root / split / cls, [b"%s%d.jpg" % (cls.encode(), i) for i in range(n)])
    samples = assign_splits(discover_all([str(root)]), val_fraction=0.0, test_fraction=0.15, seed=0)
    assert [s.split for s in samples] == [s.key.split("/")[1] for s in samples]  # as given, nothing carved
    # Without the val folder, val must be carved: the message names the config key and what is accepted.
    for p in (root / "val").rglob("*.jpg"):
        p.unlink()
    for cls in ("benign", "malignant", ""):
        (root / "val" / cls).rmdir()
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.0; accepted: above 0 .* no val folder"):
        assign_splits(discover_all([str(root)]), val_fraction=0.0, test_fraction=0.15, seed=0)
    with pytest.raises(DataError, match=r"data\.test_fraction=0\.9 .*val_fraction \+ test_fraction under 1"):
        assign_splits(discover_all([str(root)]), val_fraction=0.2, test_fraction=0.9, seed=0)


def test_a_fraction_is_checked_where_a_source_carves_that_split(tmp_path):
    import pytest

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import assign_splits
    from melanoma_detector.errors import DataError

    root = tmp_path / "plain"
    for cls in ("benign", "malignant"):
        _files(root / cls, [b"%s%d.jpg" % (cls.encode(), i) for i in range(5)])
    for vf, tf, key in ((0.0, 0.15, "val_fraction"), (1.0, 0.0, "val_fraction"), (0.2, -0.1, "test_fraction"),
                        (0.5, 0.5, "test_fraction")):
        with pytest.raises(DataError, match=rf"data\.{key}=.*accepted: .*no split folders|data\.{key}=.*no val"):
            assign_splits(discover_all([str(root)]), val_fraction=vf, test_fraction=tf, seed=0)


def _split_of(samples) -> dict[tuple[int, str], int]:
    from collections import Counter

    return dict(Counter((s.label, s.split) for s in samples))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_a_small_minority_class_gets_a_group_in_every_carved_split(tmp_path, seed):
    from melanoma_detector.data.discovery import discover_all, require_both_classes
    from melanoma_detector.data.splits import assign_splits

    root = tmp_path / "plain"
    _files(root / "benign", [b"b%02d.jpg" % i for i in range(20)])
    _files(root / "malignant", [b"m%d.jpg" % i for i in range(3)])
    samples = assign_splits(discover_all([str(root)]), val_fraction=0.15, test_fraction=0.15, seed=seed)
    counts = _split_of(samples)
    assert counts[(1, "train")] == counts[(1, "val")] == counts[(1, "test")] == 1, counts
    for split in ("train", "val", "test"):
        require_both_classes([s for s in samples if s.split == split], split)
    again = assign_splits(discover_all([str(root)]), val_fraction=0.15, test_fraction=0.15, seed=seed)
    assert [s.split for s in again] == [s.split for s in samples]  # deterministic
    # Two malignant images: one stays in train, the other goes to val, which training needs (test can do without).
    (root / "malignant" / "m2.jpg").unlink()
    counts = _split_of(assign_splits(discover_all([str(root)]), val_fraction=0.15, test_fraction=0.15, seed=seed))
    assert counts[(1, "train")] == counts[(1, "val")] == 1 and (1, "test") not in counts, counts
    # Val carved alone (the seed's layout has its own test folder): 2 groups are enough.
    counts = _split_of(assign_splits(discover_all([str(root)]), val_fraction=0.1, test_fraction=0.0, seed=seed))
    assert counts[(1, "train")] == counts[(1, "val")] == 1, counts


def test_the_minimum_moves_whole_lesion_groups(tmp_path):
    import csv

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import assign_splits, check_no_group_leak

    root = tmp_path / "ham"
    rows = [{"path": f"benign/b{i:02d}.jpg", "label": "benign", "lesion_id": f"B{i // 2}"} for i in range(40)]
    rows += [{"path": f"malignant/m{i}.jpg", "label": "malignant", "lesion_id": f"M{i // 2}"} for i in range(6)]
    _files(root / "benign", [r["path"].split("/")[1].encode() for r in rows if r["label"] == "benign"])
    _files(root / "malignant", [r["path"].split("/")[1].encode() for r in rows if r["label"] == "malignant"])
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "lesion_id"])
        w.writeheader()
        w.writerows(rows)
    for seed in range(6):
        samples = assign_splits(discover_all([str(root)]), val_fraction=0.15, test_fraction=0.15, seed=seed)
        check_no_group_leak(samples)
        assert _split_of(samples)[(1, "train")] == _split_of(samples)[(1, "val")] == 2  # one lesion, 2 images


def test_a_class_with_a_single_image_names_the_fixes_in_its_error(tmp_path):
    import pytest

    from melanoma_detector.data.discovery import discover_all, require_both_classes
    from melanoma_detector.data.splits import assign_splits
    from melanoma_detector.errors import DataError

    root = tmp_path / "plain"
    _files(root / "benign", [b"b%02d.jpg" % i for i in range(20)])
    _files(root / "malignant", [b"m0.jpg"])
    samples = assign_splits(discover_all([str(root)]), val_fraction=0.15, test_fraction=0.15, seed=0)
    assert _split_of(samples)[(1, "train")] == 1
    with pytest.raises(DataError, match=r"only one class present \(benign\).*data\.val_fraction.*val/ folder"):
        require_both_classes([s for s in samples if s.split == "val"], "validation split")
