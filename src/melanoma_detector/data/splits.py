"""Seeded, stratified, group-aware splits: one lesion never lands on two sides."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from melanoma_detector.data.discovery import DataSource, Sample, discover_all
from melanoma_detector.errors import DataError

SPLITS = ("train", "val", "test")


def _split_groups(
    samples: list[Sample], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign whole groups to splits, stratified by the group's label (malignant if any image is).

    Groups of each stratum are shuffled with `seed` and dealt out until each split holds its
    share of that stratum's images, so class balance is kept even when group sizes vary.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_key].append(s)
    strata: dict[int, list[str]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        strata[max(m.label for m in members)].append(g)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    order = [name for name in ("test", "val") if fractions.get(name, 0) > 0]
    for label in sorted(strata):
        keys = strata[label]
        rng.shuffle(keys)
        total = sum(len(groups[g]) for g in keys)
        targets = {name: fractions[name] * total for name in order}
        filled = Counter()
        for g in keys:
            size = len(groups[g])
            # Give the group to the first split still below its target, else to train.
            dest = next((n for n in order if filled[n] + size / 2 <= targets[n]), "train")
            filled[dest] += size
            assignment[g] = dest
    return assignment


def holdout_split(samples: list[Sample], fraction: float, *, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): whole lesion groups held out, stratified by label, about `fraction` of the images."""
    if not 0 <= fraction < 1:
        raise DataError(f"holdout fraction {fraction}; accepted: 0 <= fraction < 1")
    if fraction == 0:
        return list(samples), []
    assignment = _split_groups(samples, {"test": fraction}, seed)
    return ([s for s in samples if assignment[s.group_key] != "test"],
            [s for s in samples if assignment[s.group_key] == "test"])


def assign_splits(
    sources: list[DataSource],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[Sample]:
    """Fill in missing splits per source and return all samples.

    A source with train and val keeps them. A source with train (and maybe test) but no val gets
    val carved out of train. A source with no splits gets train/val/test.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"bad split fractions val={val_fraction}, test={test_fraction}; "
            "each in [0, 1) and together under 1"
        )
    out: list[Sample] = []
    for src in sources:
        present = {s.split for s in src.samples}
        if None in present and len(present) > 1:
            raise DataError(f"{src.root}: some images have a split and some do not; give all or none")
        if None in present:
            fractions = {"val": val_fraction, "test": test_fraction}
            pool = src.samples
        elif "val" not in present and "train" in present:
            fractions = {"val": val_fraction / (1 - test_fraction) if "test" in present else val_fraction}
            pool = [s for s in src.samples if s.split == "train"]
        else:
            pool = []
            fractions = {}
        if pool:
            assignment = _split_groups(pool, fractions, seed)
            for s in pool:
                s.split = assignment[s.group_key]
        out.extend(src.samples)
    check_no_group_leak(out)
    return out


def check_no_group_leak(samples: list[Sample]) -> None:
    sides: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.group:
            sides[s.group_key].add(s.split or "")
    leaked = [g for g, sp in sides.items() if len(sp) > 1]
    if leaked:
        raise DataError(
            f"{len(leaked)} lesion group(s) appear in more than one split (first: {leaked[0]}); "
            "a split must keep every image of a lesion on one side"
        )


def save_split(samples: list[Sample], path: str | Path) -> None:
    write_split_rows([{"key": s.key, "path": s.path, "label": s.label, "group": s.group or "", "split": s.split}
                      for s in samples], path)


def _read_split_csv(p: Path) -> tuple[list[dict[str, str]], set[str]]:
    if not p.is_file():
        raise DataError(f"split file not found: {p}; accepted: a run's split.csv or a --split-file CSV")
    try:
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: not a readable CSV ({e}); accepted: a split CSV with columns key and split") from None
    if not {"key", "split"} <= columns:
        raise DataError(f"{p}: columns {', '.join(sorted(columns)) or 'none'}; accepted: a split CSV with "
                        "columns key and split (and path, label, group as in a run's split.csv)")
    return rows, columns


def read_split_rows(path: str | Path, *, data_paths: Iterable[str] = ()) -> list[dict[str, str]]:
    """A split CSV's rows, each with the columns `save_split` writes. A run's split.csv has every image's
    path; a --split-file such as configs/splits/default.csv lists keys only, so that it travels between
    machines, and its images are found by key in `data_paths`, the folders it was made on."""
    p = Path(path)
    rows, columns = _read_split_csv(p)
    if {"path", "label"} <= columns:
        return [{**r, "group": r.get("group") or ""} for r in rows]
    data_paths = [str(d) for d in data_paths]
    if not data_paths:
        raise DataError(f"{p} lists image keys, not paths; accepted: a run's split.csv, or this file with "
                        "the data folders it was made on")
    by_key = {s.key: s for source in discover_all(data_paths) for s in source.samples}
    missing = [r["key"] for r in rows if r["key"] not in by_key]
    if missing:
        raise DataError(f"{p}: {len(missing)} of {len(rows)} image key(s) not found under "
                        f"{', '.join(data_paths)}, first: {missing[0]}; accepted: the data folders the split "
                        "was made on")
    return [{"key": r["key"], "path": str(by_key[r["key"]].path), "label": str(by_key[r["key"]].label),
             "group": r.get("group") or by_key[r["key"]].group or "", "split": r["split"]} for r in rows]


def write_split_rows(rows: list[dict[str, str]], path: str | Path) -> None:
    """Rows of `read_split_rows` as a run's split.csv."""
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "path", "label", "group", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def apply_split_file(samples: list[Sample], path: str | Path, *, present: Iterable[str] | None = None,
                     require_complete: bool = True) -> list[Sample]:
    """Use a saved split (matched by `key`, so it works on any machine that has the data).

    Every sample must be listed, and every listed image of the sources at hand must be there: a split whose
    images went missing would quietly train, select or test on fewer images than it says. `present`: the keys
    found on disk when some were dropped before (unreadable images skipped by --skip-bad-images); rows of
    sources not given (the committed split with --data ham10000 alone) are not asked for. Evaluation only selects
    images by the split, so it passes `require_complete=False` (a manifest of some test images is fine)."""
    p = Path(path)
    rows = _read_split_csv(p)[0]
    mapping = {row["key"]: row["split"] for row in rows}
    if len(mapping) < len(rows):
        seen: set[str] = set()
        twice = next(r["key"] for r in rows if r["key"] in seen or seen.add(r["key"]))
        raise DataError(f"{p}: {twice} is listed twice; accepted: one row per image")
    missing = [s.key for s in samples if s.key not in mapping]
    if missing:
        raise DataError(
            f"{p}: {len(missing)} image(s) are not in the split file, first: {missing[0]}"
        )
    present = {s.key for s in samples} if present is None else set(present)
    sources = {k.split("/", 1)[0] for k in present}
    absent = [k for k in mapping if require_complete and k.split("/", 1)[0] in sources and k not in present]
    if absent:
        raise DataError(f"{p}: {len(absent)} image(s) it lists are not in the data, first: {absent[0]}; accepted: "
                        "the data folders the split was made on, complete")
    for s in samples:
        if mapping[s.key] not in SPLITS:
            raise DataError(f"{p}: split {mapping[s.key]!r} for {s.key}; accepted: train, val, test")
        s.split = mapping[s.key]
    check_no_group_leak(samples)
    return samples


def train_fingerprint(train_keys: Iterable[str]) -> str:
    """sha256 of a training set's image keys (order-free). A model bundle records it so that a run
    distilling from the bundle can check the teacher trained on exactly its own training images,
    hence never on its val/test images, without the bundle carrying its whole split."""
    return hashlib.sha256("\n".join(sorted(set(train_keys))).encode()).hexdigest()


def split_csv_fingerprint(path: str | Path) -> str | None:
    """`train_fingerprint` of the train rows of a split CSV (a run's split.csv or a --split-file);
    None when the file is missing."""
    p = Path(path)
    if not p.is_file():
        return None
    return train_fingerprint(row["key"] for row in _read_split_csv(p)[0] if row["split"] == "train")


def split_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        c = counts.setdefault(s.split or "unsplit", {"benign": 0, "malignant": 0})
        c["malignant" if s.label else "benign"] += 1
    return counts
