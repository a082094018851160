"""`melanoma data check ROOT`: validate a data folder before training on it.

For every image: sha256 of the bytes, decode (as training would), size, and two DCT perceptual
hashes (64-bit and 256-bit). Finds unreadable and non-image files, exact duplicates (same sha256),
near duplicates, label conflicts (duplicates carrying different labels) and
train/val/test leakage (duplicates or lesion groups spanning two splits). Writes report.json,
report.md, sample_grid.png and class_balance.png into an output folder.

Near duplicates are found in two stages. Candidates: 64-bit pHash within `near_threshold` bits,
found by pigeonhole bucketing (no O(n^2) loop). Confirmation: the 256-bit pHash (16x16 DCT block
of a 64x64 thumbnail) within `near_confirm` bits. The 64-bit hash alone is too coarse for
dermoscopy: a centred brown lesion on skin looks alike at 8x8 DCT resolution, so on ISIC 2017 about
half of the distance-4 pairs are different lesions. Even the 256-bit hash separates only re-encoded or
resized copies (under NEAR_SURE_BITS): colour-processed copies (26-60 of 256) and different lesions of the
same look (32-48) overlap, so pairs beyond NEAR_SURE_BITS are listed for review by eye and do not count as
leakage. Every image is hashed in its 8 orientations (flips, 90-degree rotations), so a mirrored or rotated
copy is found too; a cropped copy (over ~5 % per side) is not.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

from melanoma_detector import CLASS_NAMES
from melanoma_detector.data.discovery import DataSource, Sample, discover
from melanoma_detector.data.io import load_image
from melanoma_detector.errors import ImageDecodeError, UserError
from melanoma_detector.fileio import escape_undecodable

UNSPLIT = "unsplit"
SPLIT_ORDER = ("train", "val", "test", UNSPLIT)
MD_LIST_LIMIT = 50
_HASH_BITS = 64
NEAR_CONFIRM_BITS = 48  # of 256: default confirmation threshold for the fine hash
NEAR_SURE_BITS = 24  # of 256: closer pairs are copies (re-encoded, resized); farther ones are listed for review
# Buckets larger than this are compared in row blocks to bound memory (block x bucket matrix).
_BLOCK_ROWS = 1024


# --------------------------------------------------------------------------- perceptual hash


def phash(img: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """DCT perceptual hash (the classic pHash) of hash_size**2 bits, as an unsigned int.

    Greyscale, resize to 32x32, 2-D DCT-II, keep the top-left 8x8 low-frequency block and set
    each bit where the coefficient is above the block's median (64 bits; hash_size=16 gives the
    256-bit hash from a 64x64 thumbnail). The most significant bit is the (0, 0) coefficient.
    """
    return phash_variants(img, hash_size, highfreq_factor)[0]


def phash_variants(img: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> tuple[int, ...]:
    """The pHash of `img` and of its 7 flips and 90-degree rotations (dermoscopy has no up), from one DCT:
    mirroring a signal multiplies its k-th DCT-II coefficient by (-1)^k, and transposing the image transposes
    the block. The first is `phash(img)`."""
    size = hash_size * highfreq_factor
    grey = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[:hash_size, :hash_size]
    alternate = (-1.0) ** np.arange(hash_size)
    out = []
    for block in (low, low.T):
        for rows in (1.0, alternate[:, None]):
            for cols in (1.0, alternate[None, :]):
                b = block * rows * cols
                out.append(_to_int(b > np.median(b)))
    return tuple(out)


def _to_int(bits: np.ndarray) -> int:
    value = 0
    for b in bits.ravel():
        value = (value << 1) | int(b)
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two integer hashes."""
    return (int(a) ^ int(b)).bit_count()


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    as_bytes = x.astype(np.uint64).view(np.uint8).reshape(*x.shape, 8)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[as_bytes].sum(axis=-1)


def _pairs_within(idx: np.ndarray, hashes: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs (i < j, as global indices) among idx whose hashes differ by <= threshold bits.

    Returns an (k, 3) int64 array of (i, j, distance).
    """
    idx = np.sort(idx)
    sub = hashes[idx]
    m = len(idx)
    found = []
    for start in range(0, m - 1, _BLOCK_ROWS):
        rows = sub[start : start + _BLOCK_ROWS]
        dist = _popcount(rows[:, None] ^ sub[None, :]).astype(np.int64)
        r, c = np.nonzero(dist <= threshold)
        r_glob = r + start
        keep = c > r_glob  # upper triangle only: each pair once, no self-pairs
        if keep.any():
            found.append(np.stack([idx[r_glob[keep]], idx[c[keep]], dist[r[keep], c[keep]]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 3), dtype=np.int64)


def near_pairs(hashes: np.ndarray | list[int], threshold: int) -> list[tuple[int, int, int]]:
    """Index pairs (i, j, distance), i < j, of 64-bit hashes within `threshold` bits.

    Pigeonhole bucketing: split the 64 bits into threshold + 1 chunks; two hashes within
    `threshold` bits agree exactly on at least one chunk, so only hashes sharing a chunk value
    are compared. Scales to tens of thousands of hashes without an O(n^2) comparison.
    """
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    n = len(h)
    if n < 2 or threshold < 0:
        return []
    chunks = threshold + 1
    if chunks > 16:
        # Chunks of <= 4 bits make buckets of a sixteenth of the data; just compare everything.
        found = _pairs_within(np.arange(n), h, threshold)
    else:
        bounds = np.linspace(0, _HASH_BITS, chunks + 1).round().astype(int)
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mask = np.uint64((1 << int(hi - lo)) - 1)
            vals = (h >> np.uint64(lo)) & mask
            order = np.argsort(vals, kind="stable")
            svals = vals[order]
            edges = np.flatnonzero(np.diff(svals)) + 1
            starts = np.concatenate([[0], edges])
            ends = np.concatenate([edges, [n]])
            for s, e in zip(starts, ends):
                if e - s > 1:
                    parts.append(_pairs_within(order[s:e], h, threshold))
        parts = [p for p in parts if len(p)]
        if not parts:
            return []
        found = np.unique(np.concatenate(parts), axis=0)
    return [(int(i), int(j), int(d)) for i, j, d in found]


# --------------------------------------------------------------------------- per-image scan


@dataclass
class _ImageInfo:
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    phash: int | None = None
    phash256: int | None = None
    # the hashes of the image's 8 orientations (first: as stored), so a mirrored or rotated copy is found
    variants: tuple[int, ...] = ()
    variants256: tuple[int, ...] = ()
    error: str | None = None


def _scan_one(path: str) -> _ImageInfo:
    info = _ImageInfo()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        info.error = f"cannot read file ({exc.strerror or type(exc).__name__})"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        img = load_image(data)
    except ImageDecodeError as exc:
        msg = str(exc)
        info.error = msg.split(": ", 1)[1] if msg.startswith("<bytes>: ") else msg
        return info
    info.width, info.height = img.size
    info.variants, info.variants256 = phash_variants(img), phash_variants(img, hash_size=16)
    info.phash, info.phash256 = info.variants[0], info.variants256[0]
    return info


def _scan(samples: list[Sample], max_workers: int, progress: bool) -> list[_ImageInfo]:
    from tqdm import tqdm

    paths = [s.path for s in samples]
    with ThreadPoolExecutor(max_workers=max(1, int(max_workers))) as pool, tqdm(
        total=len(paths), desc="checking images", unit="img", disable=not progress
    ) as bar:
        out = []
        for info in pool.map(_scan_one, paths):
            out.append(info)
            bar.update(1)
    return out


# --------------------------------------------------------------------------- findings


def _split(s: Sample) -> str:
    return s.split or UNSPLIT


def _display(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _spans_splits(samples: list[Sample]) -> bool:
    """True when members sit in two or more real splits (train/val/test; unsplit does not count)."""
    return len({s.split for s in samples if s.split is not None}) > 1


def _ordered_splits(names) -> list[str]:
    names = set(names)
    known = [s for s in SPLIT_ORDER if s in names]
    return known + sorted(names - set(known))


def _counts(samples: list[Sample]) -> dict:
    table: dict[str, dict[str, int]] = {}
    for split in _ordered_splits(_split(s) for s in samples):
        members = [s for s in samples if _split(s) == split]
        row = {name: sum(1 for s in members if s.label == i) for i, name in enumerate(CLASS_NAMES)}
        row["total"] = len(members)
        table[split] = row
    table["all"] = {
        **{name: sum(1 for s in samples if s.label == i) for i, name in enumerate(CLASS_NAMES)},
        "total": len(samples),
    }
    return table


def _size_stats(infos: list[_ImageInfo]) -> dict:
    sizes = [(i.width, i.height) for i in infos if i.width is not None]
    if not sizes:
        return {"n": 0}
    ws = [w for w, _ in sizes]
    hs = [h for _, h in sizes]
    return {
        "n": len(sizes),
        "width": {"min": min(ws), "max": max(ws), "median": float(statistics.median(ws))},
        "height": {"min": min(hs), "max": max(hs), "median": float(statistics.median(hs))},
        "most_common": [
            {"width": w, "height": h, "count": c} for (w, h), c in Counter(sizes).most_common(5)
        ],
    }


def _member(s: Sample, root: Path) -> dict:
    return {
        "path": _display(s.path, root),
        "split": _split(s),
        "label": CLASS_NAMES[s.label],
        "group": s.group,
    }


def check_dataset(
    path: str | Path,
    *,
    out_dir: str | Path,
    near_threshold: int = 4,
    near_confirm: int | None = NEAR_CONFIRM_BITS,
    max_workers: int = 4,
    sample_grid: int = 16,
    progress: bool = True,
) -> dict:
    """Check a data path (any layout `discover` accepts); write the report files; return the report.

    near_threshold: 64-bit pHash distance for near-duplicate candidates; near_confirm: 256-bit pHash
    distance a candidate must also meet (None: report every candidate).
    """
    if not 0 <= int(near_threshold) < _HASH_BITS:
        raise UserError(f"near-duplicate threshold must be between 0 and 63 bits (got {near_threshold})")
    if near_confirm is not None and not 0 <= int(near_confirm) < 256:
        raise UserError(f"near-duplicate confirmation must be between 0 and 255 bits (got {near_confirm})")
    out = Path(out_dir).expanduser()
    source: DataSource = discover(path)  # before the output folder exists: it must not become part of the data
    root = source.root
    data_root = Path(root).resolve()
    if out.resolve() == data_root or data_root in out.resolve().parents:
        raise UserError(f"output folder {out} lies inside the data folder {root}, where discovery (and training) "
                        "would take it for data; accepted: --out outside the data folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out} ({exc.strerror or exc})") from None
    samples = source.samples
    infos = _scan(samples, max_workers, progress)

    unreadable = [
        {"path": _display(s.path, root), "split": _split(s), "label": CLASS_NAMES[s.label], "reason": i.error}
        for s, i in zip(samples, infos)
        if i.error is not None
    ]
    non_images = [_display(p, root) for p in source.non_images]

    # Exact duplicates: identical bytes (unreadable files included: a corrupt copy is still a copy).
    by_sha: dict[str, list[int]] = defaultdict(list)
    for k, info in enumerate(infos):
        if info.sha256 is not None:
            by_sha[info.sha256].append(k)
    exact = []
    for sha, members in sorted(by_sha.items(), key=lambda kv: samples[kv[1][0]].path):
        if len(members) < 2:
            continue
        group = [samples[k] for k in members]
        # identical unreadable files (empty, an HTML error page) are listed, but nothing trains on them
        readable = all(infos[k].error is None for k in members)
        exact.append(
            {
                "sha256": sha,
                "cross_split": readable and _spans_splits(group),
                "splits": _ordered_splits(_split(s) for s in group),
                "label_conflict": readable and len({s.label for s in group}) > 1,
                "unreadable": not readable,
                "files": [_member(s, root) for s in group],
            }
        )

    # Near duplicates: 64-bit pHash candidates confirmed by the 256-bit pHash; byte copies excluded.
    # Every orientation of every image is indexed, so a mirrored or rotated copy is a candidate too.
    hashed = [k for k, info in enumerate(infos) if info.phash is not None]
    n_var = len(infos[hashed[0]].variants) if hashed else 1
    pairs = {tuple(sorted((hashed[a // n_var], hashed[b // n_var])))
             for a, b, _ in near_pairs([v for k in hashed for v in infos[k].variants], int(near_threshold))}
    near = []
    candidates = 0
    for i, j in sorted(p for p in pairs if p[0] != p[1]):
        if infos[i].sha256 == infos[j].sha256:
            continue
        candidates += 1
        # j as stored against i in each orientation: the closest orientation is the copy's
        t = min(range(n_var), key=lambda v: (hamming(infos[i].variants256[v], infos[j].phash256), v))
        dist, fine = hamming(infos[i].variants[t], infos[j].phash), hamming(infos[i].variants256[t], infos[j].phash256)
        if near_confirm is not None and fine > int(near_confirm):
            continue
        pair = [samples[i], samples[j]]
        # Beyond NEAR_SURE_BITS the fine hash cannot tell a re-coloured copy from another lesion of the same
        # look (both seen at 26-60 of 256 in HAM10000 and ISIC 2017): listed for review, not called leakage.
        sure = fine <= NEAR_SURE_BITS
        near.append(
            {
                "distance": dist,
                "distance_256": fine,
                "orientation": "same" if t == 0 else "mirrored or rotated",
                "review": not sure,
                "cross_split": sure and _spans_splits(pair),
                "cross_split_to_review": not sure and _spans_splits(pair),
                "splits": _ordered_splits(_split(s) for s in pair),
                "label_conflict": pair[0].label != pair[1].label,
                "files": [_member(s, root) for s in pair],
            }
        )
    near.sort(key=lambda p: (p["distance"], p["distance_256"], *(m["path"] for m in p["files"])))

    label_conflicts = [
        {"kind": "exact", "cross_split": g["cross_split"], "files": g["files"]}
        for g in exact
        if g["label_conflict"]
    ] + [
        {
            "kind": "near",
            "distance": p["distance"],
            "distance_256": p["distance_256"],
            "cross_split": p["cross_split"],
            "files": p["files"],
        }
        for p in near
        if p["label_conflict"] and not p["review"]
    ]

    # Lesion groups present in more than one split.
    group_splits: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.group:
            group_splits[s.group].append(s)
    group_leaks = [
        {
            "group": g,
            "splits": _ordered_splits(s.split for s in members if s.split),
            "n_images": len(members),
        }
        for g, members in sorted(group_splits.items())
        if _spans_splits(members)
    ]

    exact_cross = sum(g["cross_split"] for g in exact)
    exact_unreadable = sum(g["unreadable"] for g in exact)
    near_cross = sum(p["cross_split"] for p in near)
    leakage = bool(exact_cross or near_cross or group_leaks)
    summary = {
        "images": len(samples),
        "readable": len(samples) - len(unreadable),
        "unreadable": len(unreadable),
        "non_images": len(non_images),
        "exact_duplicate_groups": len(exact),
        # groups of identical unreadable files are counted apart: nothing trains on them, so they are
        # neither leakage nor a within-split duplicate, wherever their copies lie
        "exact_duplicate_groups_within_split": len(exact) - exact_cross - exact_unreadable,
        "exact_duplicate_groups_unreadable": exact_unreadable,
        "exact_duplicate_groups_cross_split": exact_cross,
        "exact_duplicate_extra_files": sum(len(g["files"]) - 1 for g in exact),
        "near_duplicate_pairs": len(near),
        "near_duplicate_pairs_within_split": sum(not (p["cross_split"] or p["cross_split_to_review"]) for p in near),
        "near_duplicate_pairs_cross_split": near_cross,
        "near_duplicate_pairs_to_review": sum(p["review"] for p in near),
        "near_duplicate_pairs_to_review_cross_split": sum(p["cross_split_to_review"] for p in near),
        "near_duplicate_candidates_rejected": candidates - len(near),
        "label_conflicts": len(label_conflicts),
        "groups_in_several_splits": len(group_leaks),
    }
    report = {
        "root": str(root),
        "source": source.name,
        "layout": source.layout,
        "near_threshold": int(near_threshold),
        "near_confirm": None if near_confirm is None else int(near_confirm),
        "leakage": leakage,
        "summary": summary,
        "counts": _counts(samples),
        "image_sizes": _size_stats(infos),
        "unreadable": unreadable,
        "non_images": non_images,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "label_conflicts": label_conflicts,
        "group_leakage": group_leaks,
        "out_dir": str(out),
        "files": {
            name: str(out / name)
            for name in ("report.json", "report.md", "sample_grid.png", "class_balance.png")
        },
    }

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # a file name that is not UTF-8 is shown with its bad bytes escaped (report.json escapes them itself)
    (out / "report.md").write_text(escape_undecodable(_markdown(report)), encoding="utf-8")
    _plot_sample_grid(samples, infos, out / "sample_grid.png", int(sample_grid))
    _plot_class_balance(report["counts"], out / "class_balance.png")
    return report


# --------------------------------------------------------------------------- outputs


def _md_list(items: list[str]) -> list[str]:
    lines = [f"- {x}" for x in items[:MD_LIST_LIMIT]]
    if len(items) > MD_LIST_LIMIT:
        lines.append(f"- ... and {len(items) - MD_LIST_LIMIT} more (see report.json)")
    return lines


def _fmt_member(m: dict) -> str:
    group = f", group {m['group']}" if m.get("group") else ""
    return f"`{m['path']}` ({m['split']}, {m['label']}{group})"


def _scope(item: dict) -> str:
    if item.get("unreadable"):
        where = "in splits " + ", ".join(item["splits"]) if len(item["splits"]) > 1 else "within split"
        return f"unreadable copies {where} (not counted as leakage)"
    return "**cross-split**" if item["cross_split"] or item.get("cross_split_to_review") else "within split"


def _near_rule(r: dict) -> str:
    rule = f"pHash distance <= {r['near_threshold']} of 64"
    if r.get("near_confirm") is not None:
        rule += f" and <= {r['near_confirm']} of 256"
    return rule


def _markdown(r: dict) -> str:
    s = r["summary"]
    lines = [
        f"# Data check: {r['source']}",
        "",
        f"- root: `{r['root']}` (layout: {r['layout']})",
        f"- images: {s['images']} ({s['readable']} readable, {s['unreadable']} unreadable); "
        f"non-image files: {s['non_images']}",
        f"- **leakage between splits: {'YES' if r['leakage'] else 'no'}**",
        "",
        "## Counts",
        "",
        "| split | " + " | ".join(CLASS_NAMES) + " | total |",
        "|---|" + "---:|" * (len(CLASS_NAMES) + 1),
    ]
    for split, row in r["counts"].items():
        cells = [str(row[c]) for c in CLASS_NAMES] + [str(row["total"])]
        name = f"**{split}**" if split == "all" else split
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    sz = r["image_sizes"]
    lines += ["", "## Image sizes", ""]
    if sz.get("n"):
        lines += [
            "| | min | median | max |",
            "|---|---:|---:|---:|",
            f"| width | {sz['width']['min']} | {sz['width']['median']:g} | {sz['width']['max']} |",
            f"| height | {sz['height']['min']} | {sz['height']['median']:g} | {sz['height']['max']} |",
            "",
            "Most common sizes (width x height): "
            + ", ".join(f"{m['width']}x{m['height']} ({m['count']})" for m in sz["most_common"]),
        ]
    else:
        lines.append("No readable images.")

    lines += ["", "## Summary of findings", ""]
    lines += ["| finding | within split | cross-split | total |", "|---|---:|---:|---:|"]
    lines.append(
        f"| exact-duplicate groups | {s['exact_duplicate_groups_within_split']} | "
        f"{s['exact_duplicate_groups_cross_split']} | {s['exact_duplicate_groups']} |"
    )
    if s["exact_duplicate_groups_unreadable"]:
        lines.append(
            f"| exact-duplicate groups of unreadable files (not counted as leakage) | | | "
            f"{s['exact_duplicate_groups_unreadable']} |"
        )
    lines.append(
        f"| near-duplicate pairs ({_near_rule(r)}, any orientation) | "
        f"{s['near_duplicate_pairs_within_split']} | {s['near_duplicate_pairs_cross_split']} copies, "
        f"{s['near_duplicate_pairs_to_review_cross_split']} to review (over {NEAR_SURE_BITS} of 256) | "
        f"{s['near_duplicate_pairs']} |"
    )
    lines += [
        f"| label conflicts | | | {s['label_conflicts']} |",
        f"| lesion groups in several splits | | {s['groups_in_several_splits']} | "
        f"{s['groups_in_several_splits']} |",
        f"| unreadable files | | | {s['unreadable']} |",
        f"| non-image files | | | {s['non_images']} |",
    ]

    def section(title: str, items: list[str]) -> None:
        lines.extend(["", f"## {title} ({len(items)})", ""])
        lines.extend(_md_list(items) if items else ["None."])

    section(
        "Unreadable files",
        [f"`{u['path']}` ({u['split']}, {u['label']}): {u['reason']}" for u in r["unreadable"]],
    )
    section("Non-image files", [f"`{p}`" for p in r["non_images"]])
    section(
        "Exact duplicates (identical bytes)",
        [
            f"{_scope(g)}{', **label conflict**' if g['label_conflict'] else ''}: "
            + "; ".join(_fmt_member(m) for m in g["files"])
            for g in r["exact_duplicates"]
        ],
    )
    section(
        f"Near duplicates ({_near_rule(r)}; not byte-identical)",
        [
            f"distance {p['distance']}/64, {p['distance_256']}/256"
            f"{', mirrored or rotated' if p.get('orientation', 'same') != 'same' else ''}"
            f"{', **review by eye** (not counted as leakage)' if p.get('review') else ''}, {_scope(p)}"
            f"{', **label conflict**' if p['label_conflict'] else ''}: "
            + "; ".join(_fmt_member(m) for m in p["files"])
            for p in r["near_duplicates"]
        ],
    )
    section(
        "Label conflicts (duplicates with different labels)",
        [
            f"{c['kind']}{' distance ' + str(c['distance']) + '/64' if c['kind'] == 'near' else ''}: "
            + "; ".join(_fmt_member(m) for m in c["files"])
            for c in r["label_conflicts"]
        ],
    )
    section(
        "Lesion groups in several splits",
        [f"`{g['group']}`: {', '.join(g['splits'])} ({g['n_images']} images)" for g in r["group_leakage"]],
    )
    lines += [
        "",
        "Leakage = an exact or near duplicate, or a lesion group, shared by two of train/val/test. "
        "Leaked images inflate validation and test scores; remove or re-split them before training.",
        "",
    ]
    return "\n".join(lines)


def _pick_grid_samples(samples: list[Sample], infos: list[_ImageInfo], n: int) -> list[Sample]:
    rng = random.Random(0)
    readable = [s for s, i in zip(samples, infos) if i.error is None]
    by_class = [[s for s in readable if s.label == c] for c in range(len(CLASS_NAMES))]
    for pool in by_class:
        rng.shuffle(pool)
    per_class = n // len(by_class)
    chosen = [pool[:per_class] for pool in by_class]
    # Fill any shortfall (a small class, an odd n) from whatever is left.
    leftovers = [s for c, pool in enumerate(by_class) for s in pool[len(chosen[c]) :]]
    spare = n - sum(len(c) for c in chosen)
    return [s for c in chosen for s in c] + leftovers[: max(0, spare)]


def _plot_sample_grid(samples: list[Sample], infos: list[_ImageInfo], dest: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _pick_grid_samples(samples, infos, max(0, n))
    cols = max(1, int(np.ceil(np.sqrt(len(picks))))) if picks else 1
    rows = max(1, int(np.ceil(len(picks) / cols))) if picks else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not picks:
        axes[0, 0].text(0.5, 0.5, "no readable images", ha="center", va="center")
    for ax, s in zip(axes.ravel(), picks):
        try:
            img = load_image(s.path)
            img.thumbnail((256, 256))
            ax.imshow(img)
        except ImageDecodeError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(f"{CLASS_NAMES[s.label]} / {_split(s)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dest, dpi=80)
    plt.close(fig)


def _plot_class_balance(counts: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [k for k in counts if k != "all"]
    x = np.arange(len(splits))
    width = 0.8 / len(CLASS_NAMES)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(splits) + 2), 3.5))
    for c, name in enumerate(CLASS_NAMES):
        vals = [counts[s][name] for s in splits]
        bars = ax.bar(x + (c - (len(CLASS_NAMES) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title("Images per split and class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=80)
    plt.close(fig)


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    s = report["summary"]
    counts = report["counts"]
    parts = []
    for split, row in counts.items():
        if split == "all":
            continue
        parts.append(f"{split} " + "/".join(str(row[c]) for c in CLASS_NAMES))
    lines = [
        f"{s['images']} images in {report['root']} ({', '.join(parts)}; {'/'.join(CLASS_NAMES)})",
        f"unreadable: {s['unreadable']}, non-image files: {s['non_images']}",
        f"exact-duplicate groups: {s['exact_duplicate_groups']} "
        f"({s['exact_duplicate_groups_within_split']} within split, "
        f"{s['exact_duplicate_groups_cross_split']} cross-split"
        + (f", {s['exact_duplicate_groups_unreadable']} of unreadable files" if s["exact_duplicate_groups_unreadable"] else "")
        + ")",
        f"near-duplicate pairs ({_near_rule(report)}, any orientation): {s['near_duplicate_pairs']} "
        f"({s['near_duplicate_pairs_within_split']} within split, "
        f"{s['near_duplicate_pairs_cross_split']} cross-split copies, "
        f"{s['near_duplicate_pairs_to_review_cross_split']} cross-split to review by eye: over {NEAR_SURE_BITS} of 256, "
        "not counted as leakage)",
        f"label conflicts: {s['label_conflicts']}, lesion groups in several splits: "
        f"{s['groups_in_several_splits']}",
        f"LEAKAGE between splits: {'YES' if report['leakage'] else 'no'}",
        *[f"WARNING: no {c} images: `melanoma train` needs both {' and '.join(CLASS_NAMES)} ones"
          for c in CLASS_NAMES if not counts.get("all", {}).get(c)],
        f"report written to {report['out_dir']} (report.md, report.json, sample_grid.png, class_balance.png)",
    ]
    return "\n".join(lines)
