import pytest

from melanoma_detector.data.discovery import discover_all
from melanoma_detector.data.splits import assign_splits, save_split
from melanoma_detector.errors import DataError
from melanoma_detector.evaluation.evaluate import evaluation_samples


def test_split_file_selects_the_test_split(grouped_manifest, tmp_path):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=1)
    save_split(samples, tmp_path / "split.csv")
    chosen = evaluation_samples(grouped_manifest, split_file=tmp_path / "split.csv")
    expected = sorted(s.key for s in samples if s.split == "test")
    assert sorted(s.key for s in chosen) == expected
    assert len(evaluation_samples(grouped_manifest)) == len(samples)  # no split file: every image


def test_split_val_selects_the_val_split(grouped_manifest, tmp_path):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=1)
    save_split(samples, tmp_path / "split.csv")
    chosen = evaluation_samples(grouped_manifest, split_file=tmp_path / "split.csv", split="val")
    assert sorted(s.key for s in chosen) == sorted(s.key for s in samples if s.split == "val")


def test_split_all_scores_every_image_whatever_its_split(grouped_manifest, tmp_path):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=1)
    save_split(samples, tmp_path / "split.csv")
    chosen = evaluation_samples(grouped_manifest, split_file=tmp_path / "split.csv", split="all")
    assert sorted(s.key for s in chosen) == sorted(s.key for s in samples)
    assert {s.split for s in chosen} == {"train", "val", "test"}


def test_a_split_that_is_not_there_is_a_one_line_error(grouped_manifest, tmp_path):
    with pytest.raises(DataError, match=r"no val split to evaluate on \(splits present: none"):
        evaluation_samples(grouped_manifest, split="val")  # plain class folders: no splits at all
    with pytest.raises(DataError, match=r"split 'train'; accepted: test, val, all"):
        evaluation_samples(grouped_manifest, split="train")



def test_a_non_image_file_is_left_out_with_a_warning_not_refused(seed_layout, caplog):
    """A notes.txt in train/, which evaluation does not even score, used to refuse the whole evaluation."""
    (seed_layout / "train" / "malignant" / "notes.txt").write_text("hello")
    caplog.set_level("WARNING")
    chosen = evaluation_samples(seed_layout)
    assert chosen and all(s.split == "test" for s in chosen)
    assert any("left out 1 non-image file(s)" in r.getMessage() for r in caplog.records)
