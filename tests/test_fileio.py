"""atomic_path: the target appears whole or not at all."""

import numpy as np
import pytest

from melanoma_detector.fileio import atomic_path


def test_the_file_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "feats.npy"
    with atomic_path(target) as tmp:
        np.save(tmp, np.arange(3))  # np.save appends .npy to a name without it: the suffix is kept
        assert not target.exists()
    assert np.load(target).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["feats.npy"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_two_writers_of_one_target_never_share_a_temporary(tmp_path):
    target = tmp_path / "heatmap.png"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"a")
        second.write_bytes(b"b")
    assert target.read_bytes() == b"a"  # the outer block ends last
    assert [p.name for p in tmp_path.iterdir()] == ["heatmap.png"]


# ---- CSV formula injection (CWE-1236)
def test_text_that_would_start_a_formula_gets_a_leading_quote():
    from melanoma_detector.fileio import escape_formula

    for name in ("=1+1.jpg", "+cmd|' /C calc'!A0.jpg", "-x.jpg", "@a.jpg", "\tx.jpg", "\rx.jpg",
                 '=HYPERLINK("http://x","click").jpg'):
        assert escape_formula(name) == "'" + name
    for name in ("/abs/=x.jpg", "a.jpg", "x=1.jpg", "", "'", "'abc.jpg", " =x.jpg"):
        assert escape_formula(name) == name


def test_the_escape_is_undone_exactly_and_never_confuses_two_names():
    from melanoma_detector.fileio import escape_formula, unescape_formula

    names = ["=x.jpg", "'=x.jpg", "''=x.jpg", "'x.jpg", "''x.jpg", "x.jpg", "'", "''", "", "-1", "'-1", "@", "'@a"]
    written = [escape_formula(n) for n in names]
    assert len(set(written)) == len(names)  # one cell per name
    assert [unescape_formula(w) for w in written] == names
    assert escape_formula("'=x.jpg") == "''=x.jpg" and unescape_formula("'=x.jpg") == "=x.jpg"
    assert unescape_formula("=x.jpg") == "=x.jpg"  # a cell written before the escape existed reads the same


def test_numbers_are_never_escaped(tmp_path):
    import csv

    from melanoma_detector.fileio import escape_formula

    assert escape_formula(-0.25) == -0.25 and escape_formula(-3) == -3 and escape_formula(None) is None
    out = tmp_path / "r.csv"
    with out.open("w", newline="") as fh:
        csv.writer(fh).writerow([escape_formula("-x.jpg"), escape_formula(-0.25)])
    assert out.read_text().splitlines() == ["'-x.jpg,-0.25"]
