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
