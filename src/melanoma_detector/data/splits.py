"""Seeded, stratified, group-aware splits: one lesion never lands on two sides."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from melanoma_detector.data.discovery import DataSource, Sample, discover_all, read_csv
from melanoma_detector.errors import DataError
from melanoma_detector.fileio import atomic_path, escape_undecodable

SPLITS = ("train", "val", "test")
# Split files are UTF-8; a file name that is not (held as surrogates, as os.fsdecode gives it) is written as its own
# bytes and read back (discovery.read_csv) as the same name.
_WRITE_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def _split_groups(
    samples: list[Sample], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign whole groups to splits, stratified by the group's label (malignant if any image is).

    Groups of each stratum are shuffled with `seed` and dealt out until each split holds its
    share of that stratum's images, so class balance is kept even when group sizes vary. A small
    stratum can end up with no group in a carved split (3 malignant images, 15% each to val and
    test): then `_ensure_each_split` moves single groups so that train, val and test (in that order
    of need) each hold at least one of its groups while there are enough groups to go round.
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
        _ensure_each_split(keys, groups, assignment, order)
    return assignment


def _ensure_each_split(keys: list[str], groups: dict[str, list[Sample]], assignment: dict[str, str],
                       carved: list[str]) -> None:
    """Within one stratum (`keys`, in their shuffled order), give each of train, val and test (those carved) at
    least one group, as far as its groups go round: train first, then val (training needs both classes there),
    then test. A split left empty takes the smallest group (the first in shuffled order on a tie) of the split
    with the most groups beyond the one it needs itself. Whole groups move, so a group stays on one side, and a
    stratum whose splits all hold a group already (any data of normal size) is left exactly as dealt."""
    needed = [name for name in ("train", "val", "test") if name == "train" or name in carved][:len(keys)]
    held: dict[str, list[str]] = {name: [] for name in ("train", "val", "test")}
    for g in keys:
        held[assignment[g]].append(g)
    for want in needed:
        if held[want]:
            continue
        spare = {name: len(gs) - (name in needed) for name, gs in held.items()}
        donor = max(("train", "test", "val"), key=lambda name: spare[name])  # max keeps the first of a tie
        if spare[donor] <= 0:
            return
        g = min(held[donor], key=lambda k: len(groups[k]))  # min keeps the first of a tie
        held[donor].remove(g)
        held[want].append(g)
        assignment[g] = want


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
    val carved out of train. A source with no splits gets train/val/test. A fraction is checked only
    where a source needs it: data.val_fraction 0 is fine when every source has its own val folder.
    """
    plans = []
    for src in sources:
        present = {s.split for s in src.samples}
        if None in present and len(present) > 1:
            raise DataError(f"{src.root}: some images have a split and some do not; give all or none")
        if None in present:
            _check_fractions(src, val_fraction, test_fraction, test_use="has no split folders")
            fractions = {"val": val_fraction, "test": test_fraction}
            pool = src.samples
        elif "val" not in present and "train" in present:
            # The seed's layout: test given, so val is its share of what is left, train + val.
            _check_fractions(src, val_fraction, test_fraction,
                             test_use="has a test folder but no val folder" if "test" in present else None)
            fractions = {"val": val_fraction / (1 - test_fraction) if "test" in present else val_fraction}
            pool = [s for s in src.samples if s.split == "train"]
        else:
            pool = []
            fractions = {}
        plans.append((src, pool, fractions))
    out: list[Sample] = []
    for src, pool, fractions in plans:
        if pool:
            assignment = _split_groups(pool, fractions, seed)
            for s in pool:
                s.split = assignment[s.group_key]
        out.extend(src.samples)
    check_no_group_leak(out)
    return out


def _check_fractions(src: DataSource, val_fraction: float, test_fraction: float, *, test_use: str | None) -> None:
    """The fractions a source that needs val carved out uses: val always; test when `test_use` says why (test
    carved out of a source with no split folders, or val sized against the source's own test folder)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}; accepted: above 0 and below 1 when a data source has no "
                        f"val folder ({src.root} has none), or give that source a val/ folder")
    if test_use and not (0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"data.test_fraction={test_fraction} with data.val_fraction={val_fraction}; accepted: "
                        f"test_fraction 0 or more and val_fraction + test_fraction under 1, when a data source "
                        f"{test_use} ({src.root})")


def check_no_group_leak(samples: list[Sample]) -> None:
    sides: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.group:
            sides[s.group_key].add(s.split or "")
    leaked = [g for g, sp in sides.items() if len(sp) > 1]
    if leaked:
        raise DataError(
            f"{len(leaked)} lesion group(s) appear in more than one split (first: {escape_undecodable(leaked[0])}); "
            "a split must keep every image of a lesion on one side"
        )


def save_split(samples: list[Sample], path: str | Path) -> None:
    write_split_rows([{"key": s.key, "path": s.path, "label": s.label, "group": s.group or "", "split": s.split}
                      for s in samples], path)


def _read_split_csv(p: Path) -> tuple[list[dict[str, str]], set[str]]:
    if not p.is_file():
        raise DataError(f"split file not found: {p}; accepted: a run's split.csv or a --split-file CSV")
    try:
        fieldnames, rows = read_csv(p)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: not a readable CSV ({e}); accepted: a split CSV with columns key and split") from None
    columns = set(fieldnames)
    if not {"key", "split"} <= columns:
        found = escape_undecodable(", ".join(sorted(columns))) or "none"
        raise DataError(f"{p}: columns {found}; accepted: a split CSV with "
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
                        f"{', '.join(data_paths)}, first: {escape_undecodable(missing[0])}; accepted: the data folders "
                        "the split was made on")
    return [{"key": r["key"], "path": str(by_key[r["key"]].path), "label": str(by_key[r["key"]].label),
             "group": r.get("group") or by_key[r["key"]].group or "", "split": r["split"]} for r in rows]


def write_split_rows(rows: list[dict[str, str]], path: str | Path) -> None:
    """Rows of `read_split_rows` as a run's split.csv, written whole or not at all."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", **_WRITE_ENCODING) as fh:
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
        raise DataError(f"{p}: {escape_undecodable(twice)} is listed twice; accepted: one row per image")
    missing = [s.key for s in samples if s.key not in mapping]
    if missing:
        raise DataError(
            f"{p}: {len(missing)} image(s) are not in the split file, first: {escape_undecodable(missing[0])}"
        )
    present = {s.key for s in samples} if present is None else set(present)
    sources = {k.split("/", 1)[0] for k in present}
    absent = [k for k in mapping if require_complete and k.split("/", 1)[0] in sources and k not in present]
    if absent:
        raise DataError(f"{p}: {len(absent)} image(s) it lists are not in the data, first: "
                        f"{escape_undecodable(absent[0])}; accepted: the data folders the split was made on, complete")
    for s in samples:
        if mapping[s.key] not in SPLITS:
            raise DataError(f"{p}: split {mapping[s.key]!r} for {escape_undecodable(s.key)}; "
                            "accepted: train, val, test")
        s.split = mapping[s.key]
    check_no_group_leak(samples)
    return samples


def train_fingerprint(train_keys: Iterable[str]) -> str:
    """sha256 of a training set's image keys (order-free). A model bundle records it so that a run
    distilling from the bundle can check the teacher trained on exactly its own training images,
    hence never on its val/test images, without the bundle carrying its whole split."""
    return hashlib.sha256("\n".join(sorted(set(train_keys))).encode("utf-8", "surrogateescape")).hexdigest()


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
