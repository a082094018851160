"""The training-set fingerprint a bundle records for `--distill-from BUNDLE`'s leak check."""

import csv

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
