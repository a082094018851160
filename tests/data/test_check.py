"""`melanoma data check`: duplicates, near duplicates, corrupt files, label conflicts, leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_detector.data.check import check_dataset, format_summary, hamming, near_pairs, phash
from melanoma_detector.errors import UserError


def blocky(seed: int, size: int = 64) -> Image.Image:
    """A visually distinct image: random 8x8 colour blocks upscaled with NEAREST."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)


def make_seed_layout(root: Path, per_class: int = 3) -> dict[str, list[Path]]:
    """ROOT/{train,test}/{benign,malignant}/*.jpg with distinct images (seeds never reused)."""
    files: dict[str, list[Path]] = {}
    seed = 0
    for split in ("train", "test"):
        for cls in ("benign", "malignant"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            files[f"{split}/{cls}"] = []
            for k in range(per_class):
                seed += 1
                p = folder / f"img_{seed:03d}.jpg"
                blocky(seed).save(p, quality=95)
                files[f"{split}/{cls}"].append(p)
    return files


def run(root: Path, tmp_path: Path) -> dict:
    return check_dataset(root, out_dir=tmp_path / "out", progress=False, max_workers=2, sample_grid=8)


def all_paths(items: list[dict]) -> list[set[str]]:
    return [{m["path"] for m in item["files"]} for item in items]


# --------------------------------------------------------------------------- pHash


@pytest.mark.parametrize("hash_size", [8, 16])
def test_phash_identical_images_distance_zero(hash_size):
    a, b = phash(blocky(1), hash_size=hash_size), phash(blocky(1), hash_size=hash_size)
    assert hamming(a, b) == 0
    assert 0 <= a < 2 ** (hash_size**2)
    assert 0 < a.bit_count() <= hash_size**2 // 2  # median threshold: at most half the bits set


@pytest.mark.parametrize("hash_size,limit", [(8, 4), (16, 24)])
def test_phash_resized_copy_is_close(hash_size, limit):
    img = blocky(2, size=128)
    small = img.resize((100, 100), Image.Resampling.BILINEAR)
    assert hamming(phash(img, hash_size=hash_size), phash(small, hash_size=hash_size)) <= limit


@pytest.mark.parametrize("hash_size,floor", [(8, 10), (16, 60)])
def test_phash_different_images_are_far(hash_size, floor):
    hashes = [phash(blocky(s), hash_size=hash_size) for s in range(10, 20)]
    dists = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(dists) > floor


def test_near_pairs_bucketed_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2)
    hashes = [int(x) for x in base]
    # Plant pairs at distance 0..6 (0 = identical hashes still count as near).
    for k, d in enumerate(range(7)):
        flip = sum(1 << int(b) for b in rng.choice(64, size=d, replace=False))
        hashes[k] = hashes[100 + k] ^ flip
    for t in (0, 4, 6, 20):
        brute = {
            (i, j, hamming(a, b))
            for i, a in enumerate(hashes)
            for j, b in enumerate(hashes)
            if i < j and hamming(a, b) <= t
        }
        assert set(near_pairs(hashes, t)) == brute


# --------------------------------------------------------------------------- whole check


def test_clean_folder_has_no_findings(tmp_path):
    root = tmp_path / "data"
    make_seed_layout(root)
    r = run(root, tmp_path)
    s = r["summary"]
    assert r["leakage"] is False
    assert s["images"] == 12 and s["readable"] == 12
    for key in (
        "unreadable",
        "non_images",
        "exact_duplicate_groups",
        "near_duplicate_pairs",
        "label_conflicts",
        "groups_in_several_splits",
    ):
        assert s[key] == 0, key
    assert r["counts"]["train"] == {"benign": 3, "malignant": 3, "total": 6}
    assert r["counts"]["test"] == {"benign": 3, "malignant": 3, "total": 6}
    assert r["image_sizes"]["most_common"][0] == {"width": 64, "height": 64, "count": 12}
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "sample_grid.png", "class_balance.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == r
    for name in ("sample_grid.png", "class_balance.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 50
    text = format_summary(r)
    assert "LEAKAGE between splits: no" in text and str(out) in text


def test_cross_split_exact_duplicate_is_leakage(tmp_path):
    root = tmp_path / "data"
    files = make_seed_layout(root)
    src = files["train/benign"][0]
    shutil.copyfile(src, root / "test" / "benign" / "copy_of_train.jpg")
    r = run(root, tmp_path)
    assert r["leakage"] is True
    assert r["summary"]["exact_duplicate_groups_cross_split"] == 1
    (group,) = r["exact_duplicates"]
    assert group["cross_split"] is True and group["splits"] == ["train", "test"]
    assert {m["path"] for m in group["files"]} == {
        "train/benign/img_001.jpg",
        "test/benign/copy_of_train.jpg",
    }
    assert not group["label_conflict"]
    assert r["summary"]["near_duplicate_pairs"] == 0  # byte copies are not reported twice
    assert "LEAKAGE between splits: YES" in format_summary(r)
    assert "cross-split" in (tmp_path / "out" / "report.md").read_text()


def test_near_duplicate_within_train(tmp_path):
    root = tmp_path / "data"
    files = make_seed_layout(root)
    src = files["train/malignant"][1]
    with Image.open(src) as im:
        im.convert("RGB").resize((60, 60), Image.Resampling.BILINEAR).save(
            root / "train" / "malignant" / "resaved.jpg", quality=70
        )
    r = run(root, tmp_path)
    assert r["leakage"] is False
    assert r["summary"]["exact_duplicate_groups"] == 0
    assert r["summary"]["near_duplicate_pairs"] == 1
    assert r["summary"]["near_duplicate_pairs_within_split"] == 1
    (pair,) = r["near_duplicates"]
    assert {m["path"] for m in pair["files"]} == {
        f"train/malignant/{src.name}",
        "train/malignant/resaved.jpg",
    }
    assert pair["cross_split"] is False and pair["distance"] <= 4
    assert pair["distance_256"] <= r["near_confirm"]
    sizes = {(m["width"], m["height"]) for m in r["image_sizes"]["most_common"]}
    assert sizes == {(64, 64), (60, 60)}


def test_corrupt_and_non_image_files(tmp_path):
    root = tmp_path / "data"
    files = make_seed_layout(root)
    good = files["train/benign"][0].read_bytes()
    (root / "train" / "benign" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "test" / "malignant" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "test" / "malignant" / "notes.txt").write_text("not an image")
    r = run(root, tmp_path)
    bad = {u["path"]: u["reason"] for u in r["unreadable"]}
    assert set(bad) == {"train/benign/truncated.jpg", "test/malignant/noise.jpg"}
    assert all(reason and "\n" not in reason for reason in bad.values())
    assert "not a recognised image" in bad["test/malignant/noise.jpg"]
    assert r["non_images"] == ["test/malignant/notes.txt"]
    assert r["summary"]["unreadable"] == 2 and r["summary"]["readable"] == 12
    assert r["summary"]["non_images"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "truncated.jpg" in md and "notes.txt" in md
    assert "unreadable: 2" in format_summary(r)


def test_label_conflict_same_bytes_in_both_classes(tmp_path):
    root = tmp_path / "data"
    files = make_seed_layout(root)
    shutil.copyfile(files["train/benign"][2], root / "train" / "malignant" / "also_malignant.jpg")
    r = run(root, tmp_path)
    assert r["leakage"] is False  # same split: a conflict, not leakage
    assert r["summary"]["label_conflicts"] == 1
    (conflict,) = r["label_conflicts"]
    assert conflict["kind"] == "exact"
    assert {m["label"] for m in conflict["files"]} == {"benign", "malignant"}
    assert r["exact_duplicates"][0]["label_conflict"] is True
    assert r["exact_duplicates"][0]["cross_split"] is False


def test_lesion_group_in_two_splits_is_leakage(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = ["path,label,group,split"]
    for k, (split, group) in enumerate([("train", "L1"), ("train", "L2"), ("val", "L1"), ("val", "L3")]):
        blocky(100 + k).save(root / f"im{k}.png")
        rows.append(f"im{k}.png,{'benign' if k % 2 else 'malignant'},{group},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    r = run(root, tmp_path)
    assert r["leakage"] is True
    assert r["group_leakage"] == [{"group": "L1", "splits": ["train", "val"], "n_images": 2}]
    assert r["summary"]["exact_duplicate_groups"] == 0


def test_unsplit_duplicates_are_not_leakage(tmp_path):
    root = tmp_path / "data"
    for cls, seeds in (("benign", (1, 2)), ("malignant", (3, 4))):
        (root / cls).mkdir(parents=True)
        for s in seeds:
            blocky(s).save(root / cls / f"{s}.png")
    shutil.copyfile(root / "benign" / "1.png", root / "benign" / "1_copy.png")
    r = run(root, tmp_path)
    assert r["leakage"] is False
    assert list(r["counts"]) == ["unsplit", "all"]
    assert r["summary"]["exact_duplicate_groups_within_split"] == 1


def test_long_lists_are_truncated_in_markdown(tmp_path, monkeypatch):
    from melanoma_detector.data import check

    monkeypatch.setattr(check, "MD_LIST_LIMIT", 2)
    root = tmp_path / "data"
    make_seed_layout(root, per_class=2)
    for k in range(4):
        (root / "train" / "benign" / f"bad{k}.jpg").write_bytes(b"junk" * (k + 1))
    run(root, tmp_path)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "... and 2 more" in md


def test_confirmation_stage_rejects_coarse_candidates(tmp_path):
    root = tmp_path / "data"
    make_seed_layout(root, per_class=2)  # 8 distinct images, 28 pairs
    every = check_dataset(
        root, out_dir=tmp_path / "a", near_threshold=63, near_confirm=None, progress=False
    )
    assert every["summary"]["near_duplicate_pairs"] == 28
    # unconfirmed candidates span train and test, but far apart they are listed for review, not called leakage
    assert every["leakage"] is False and every["summary"]["near_duplicate_pairs_to_review_cross_split"] > 0
    confirmed = check_dataset(root, out_dir=tmp_path / "b", near_threshold=63, progress=False)
    assert confirmed["summary"]["near_duplicate_pairs"] == 0
    assert confirmed["summary"]["near_duplicate_candidates_rejected"] == 28
    assert confirmed["leakage"] is False


def test_bad_threshold_is_a_user_error(tmp_path):
    from melanoma_detector.errors import UserError

    root = tmp_path / "data"
    make_seed_layout(root, per_class=1)
    with pytest.raises(UserError):
        check_dataset(root, out_dir=tmp_path / "out", near_threshold=-1, progress=False)


def test_mirrored_and_rotated_copies_are_found_and_far_pairs_go_to_review(tmp_path):
    """pHash is not orientation-invariant: a mirrored or rotated copy in the test split went unnoticed."""
    from PIL import Image

    root = tmp_path / "data"
    make_seed_layout(root, per_class=2)
    src = next((root / "train" / "benign").iterdir())
    img = Image.open(src).convert("RGB")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "test" / "benign" / "mirrored.png")
    img.transpose(Image.Transpose.ROTATE_90).save(root / "test" / "benign" / "rotated.png")
    r = check_dataset(root, out_dir=tmp_path / "out", progress=False)
    found = {m["path"].rsplit("/", 1)[1] for p in r["near_duplicates"] if p["cross_split"] for m in p["files"]}
    assert {"mirrored.png", "rotated.png"} <= found and r["leakage"] is True
    assert all(p["orientation"] == "mirrored or rotated" for p in r["near_duplicates"]
               if {m["path"].rsplit("/", 1)[1] for m in p["files"]} & {"mirrored.png", "rotated.png"}
               and src.name in {m["path"].rsplit("/", 1)[1] for m in p["files"]})


def test_the_report_never_goes_inside_the_data_and_empty_files_do_not_leak(tmp_path):
    root = tmp_path / "data"
    make_seed_layout(root, per_class=2)
    with pytest.raises(UserError, match="inside the data folder"):
        check_dataset(root, out_dir=root / "report", progress=False)
    assert not (root / "report").exists()
    (root / "train" / "benign" / "x.jpg").write_bytes(b"")
    (root / "test" / "malignant" / "y.jpg").write_bytes(b"")  # two identical empty files, train and test
    r = check_dataset(root, out_dir=tmp_path / "out", progress=False)
    assert r["summary"]["exact_duplicate_groups"] == 1 and r["exact_duplicates"][0]["unreadable"]
    assert r["leakage"] is False and r["summary"]["label_conflicts"] == 0
    # counted apart, not as a within-split duplicate: its copies lie in train and test
    assert r["summary"]["exact_duplicate_groups_unreadable"] == 1
    assert r["summary"]["exact_duplicate_groups_within_split"] == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "unreadable copies in splits train, test (not counted as leakage)" in md
    assert "within split" not in md.split("## Exact duplicates")[1].split("##")[0]
    assert "1 of unreadable files" in format_summary(r)


def test_a_file_name_that_is_not_utf8_is_reported_not_a_crash(tmp_path):
    import os

    root = tmp_path / "data"
    make_seed_layout(root, per_class=2)
    with open(os.path.join(os.fsencode(root / "train" / "benign"), b"bad\xe9.jpg"), "wb") as fh:
        fh.write(b"not an image")
    r = check_dataset(root, out_dir=tmp_path / "out", progress=False)
    assert r["summary"]["unreadable"] == 1
    assert "bad\\xe9.jpg" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_a_one_class_folder_is_warned_about(tmp_path):
    root = tmp_path / "data"
    files = make_seed_layout(root)
    for folder in ("train/malignant", "test/malignant"):
        for f in files[folder]:
            f.unlink()
    summary = format_summary(run(root, tmp_path))
    assert "WARNING: no malignant images: `melanoma train` needs both benign and malignant ones" in summary
    make_seed_layout(tmp_path / "both")
    assert "WARNING" not in format_summary(run(tmp_path / "both", tmp_path / "o2"))
