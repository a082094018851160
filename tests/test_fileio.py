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
