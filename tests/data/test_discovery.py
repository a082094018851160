
import numpy as np
import pytest

from conftest import make_class_folder
from melanoma_detector.data.discovery import discover, discover_all, require_both_classes
from melanoma_detector.data.splits import apply_split_file, assign_splits, check_no_group_leak, save_split
from melanoma_detector.errors import DataError


def test_seed_layout_is_read_exactly(seed_layout):
    src = discover(seed_layout)
    assert src.layout == "split-folders"
    splits = {(s.split, s.label) for s in src.samples}
    assert splits == {("train", 0), ("train", 1), ("test", 0), ("test", 1)}
    assert len(src.samples) == 2 * 16 + 2 * 6
    assert all(s.key.startswith("kaggle/train/") or s.key.startswith("kaggle/test/") for s in src.samples)


def test_optional_val_folder(seed_layout):
    make_class_folder(seed_layout / "val", 3, np.random.default_rng(5), "va")
    samples = assign_splits(discover_all([str(seed_layout)]), val_fraction=0.2, test_fraction=0.1, seed=0)
    assert sum(s.split == "val" for s in samples) == 6  # kept as given, nothing carved from train
    assert sum(s.split == "train" for s in samples) == 32


def test_manifest_with_groups(grouped_manifest):
    src = discover(grouped_manifest)
    assert src.layout == "manifest"
    assert all(s.group and s.group.startswith("HAM_") for s in src.samples)
    assert {s.meta["dx"] for s in src.samples} == {"mel", "nv"}
    assert sum(s.label for s in src.samples) > 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_never_leaks_a_group_and_is_stratified(grouped_manifest, seed):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=seed)
    sides = {}
    for s in samples:
        sides.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in sides.values())
    for split in ("train", "val", "test"):
        labels = {s.label for s in samples if s.split == split}
        assert labels == {0, 1}, f"{split} lacks a class"


def test_split_is_seeded(grouped_manifest):
    a = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=7)
    b = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=7)
    c = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=8)
    assert [s.split for s in a] == [s.split for s in b]
    assert [s.split for s in a] != [s.split for s in c]


def test_val_carved_from_train_only(seed_layout):
    samples = assign_splits(discover_all([str(seed_layout)]), val_fraction=0.25, test_fraction=0.1, seed=0)
    test_keys = {s.key for s in samples if s.split == "test"}
    assert all("/test/" in k for k in test_keys) and len(test_keys) == 12
    assert sum(s.split == "val" for s in samples) > 0


def test_saved_split_roundtrip(grouped_manifest, tmp_path):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=3)
    save_split(samples, tmp_path / "split.csv")
    fresh = [s for src in discover_all([str(grouped_manifest)]) for s in src.samples]
    apply_split_file(fresh, tmp_path / "split.csv")
    assert [s.split for s in fresh] == [s.split for s in samples]


def test_split_file_refuses_missing_and_repeated_images_of_the_sources_given(grouped_manifest, seed_layout, tmp_path):
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=3)
    other = assign_splits(discover_all([str(seed_layout)]), val_fraction=0.2, test_fraction=0.1, seed=3)
    save_split(samples + other, tmp_path / "split.csv")
    fresh = [s for src in discover_all([str(grouped_manifest)]) for s in src.samples]
    apply_split_file(fresh, tmp_path / "split.csv")  # the other source's rows are not asked for
    with pytest.raises(DataError, match="not in the data, first: " + fresh[-1].key):
        apply_split_file(fresh[:-1], tmp_path / "split.csv")  # one of its images went missing
    # evaluation only selects images by the split: a manifest of some of them is fine
    assert len(apply_split_file(fresh[:3], tmp_path / "split.csv", require_complete=False)) == 3
    rows = (tmp_path / "split.csv").read_text().splitlines()
    (tmp_path / "twice.csv").write_text("\n".join(rows + rows[1:2]) + "\n")
    with pytest.raises(DataError, match="listed twice"):
        apply_split_file(fresh, tmp_path / "twice.csv")


def test_leak_detected(grouped_manifest):
    samples = [s for src in discover_all([str(grouped_manifest)]) for s in src.samples]
    multi = [s for s in samples if s.group == "HAM_0002"]  # lesion 2 has 3 images
    for s, split in zip(multi, ("train", "test", "train")):
        s.split = split
    with pytest.raises(DataError, match="more than one split"):
        check_no_group_leak(samples)


def test_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "empty")
    (tmp_path / "odd" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="unknown class folder.*cats.*benign, malignant"):
        discover(tmp_path / "odd")
    (tmp_path / "one" / "benign").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        discover(tmp_path / "one")


def test_single_class_is_an_error(tmp_path):
    root = tmp_path / "single"
    make_class_folder(root, 2, np.random.default_rng(0))
    for p in (root / "malignant").iterdir():
        p.unlink()
    (root / "malignant").rmdir()
    with pytest.raises(DataError, match="only one class"):
        require_both_classes(discover(root).samples, "training split")


def test_roots_sharing_a_folder_name_get_distinct_keys(tmp_path):
    rng = np.random.default_rng(0)
    roots = [tmp_path / "x" / "a", tmp_path / "y" / "a", tmp_path / "z" / "a1"]
    for r in roots:
        make_class_folder(r, 1, rng)
    keys = [s.key for src in discover_all([str(r) for r in roots]) for s in src.samples]
    assert len(keys) == len(set(keys)) == 6


def test_an_image_id_naming_two_files_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        make_class_folder(tmp_path / "d" / split, 1, rng)
    one = next((tmp_path / "d" / "train" / "benign").iterdir())
    (tmp_path / "d" / "val" / "benign" / one.name).write_bytes(one.read_bytes()[::-1])  # same name, other file
    (tmp_path / "d" / "labels.csv").write_text(f"image_id,label\n{one.stem},benign\n")
    with pytest.raises(DataError, match=f"{one.stem} names 2 files"):
        discover(str(tmp_path / "d" / "labels.csv"))


def test_a_manifest_saved_by_excel_as_csv_utf8_is_read(grouped_manifest):
    plain = discover(grouped_manifest)
    text = (grouped_manifest / "labels.csv").read_text(encoding="utf-8")
    (grouped_manifest / "labels.csv").write_text(text, encoding="utf-8-sig")  # BOM EF BB BF before "image_id"
    assert (grouped_manifest / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbfimage_id,")
    excel = discover(grouped_manifest)
    assert [(s.key, s.label, s.group) for s in excel.samples] == [(s.key, s.label, s.group) for s in plain.samples]
    assert "\ufeffimage_id" not in excel.samples[0].meta


def test_a_manifest_in_utf16_is_refused_as_not_csv_text(grouped_manifest):
    text = (grouped_manifest / "labels.csv").read_text(encoding="utf-8")
    (grouped_manifest / "labels.csv").write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match="cannot read CSV manifest.*UTF-16"):
        discover(grouped_manifest)


def test_images_in_a_linked_subfolder_of_a_class_folder_are_found(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    make_class_folder(root, 2, rng)
    elsewhere = tmp_path / "elsewhere" / "more"
    make_class_folder(elsewhere, 3, rng, "more")
    (root / "benign" / "linked").symlink_to(elsewhere / "benign", target_is_directory=True)
    keys = [s.key for s in discover(root).samples]
    assert sum(k.startswith("data/benign/linked/") for k in keys) == 3  # rglob left these out
    assert len(keys) == 2 + 2 + 3 and keys == sorted(keys)
    # A manifest naming images by id does not look through linked folders (as before): a link to the originals
    # beside resized copies must not give every id two files.
    (root / "labels.csv").write_text("image_id,label\nimg_benign_000,benign\nimg_malignant_000,malignant\n")
    (root / "originals").symlink_to(root / "benign", target_is_directory=True)
    assert [s.key for s in discover(root).samples] == ["data/benign/img_benign_000.jpg",
                                                       "data/malignant/img_malignant_000.jpg"]


def test_a_link_loop_in_a_class_folder_ends(tmp_path):
    root = tmp_path / "data"
    make_class_folder(root, 2, np.random.default_rng(0))
    (root / "benign" / "again").symlink_to(root / "benign", target_is_directory=True)  # benign/again/again/...
    (root / "malignant" / "sub").mkdir()
    (root / "malignant" / "sub" / "up").symlink_to(root, target_is_directory=True)  # to the data root
    (root / "benign" / "theirs").symlink_to(root / "malignant", target_is_directory=True)
    samples = discover(root).samples
    keys = [s.key for s in samples]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == 4
    # each folder's images once, by its own name and so with its own label
    assert not any("/again/" in k or "/up/" in k or "/theirs/" in k for k in keys)
    assert [s.label for s in samples] == [0, 0, 1, 1]
