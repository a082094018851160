"""Find labelled images: the seed's folder layout, plain class folders, or a CSV manifest.

Accepted layouts for a data path:
  ROOT/{train,val,test}/{benign,malignant}/*   (the seed's Kaggle layout; val/ and test/ optional)
  ROOT/{benign,malignant}/*                    (one unsplit set)
  a CSV manifest, or ROOT holding labels.csv   (columns: path or image_id, label, optional
                                                group / lesion_id, optional split)
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from melanoma_detector import CLASS_NAMES
from melanoma_detector.data.io import IMAGE_EXTENSIONS, is_image_file
from melanoma_detector.errors import DataError
from melanoma_detector.fileio import escape_undecodable

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
LABEL_ALIASES = {
    "benign": 0,
    "0": 0,
    "malignant": 1,
    "melanoma": 1,
    "1": 1,
}
MANIFEST_NAMES = ("labels.csv", "manifest.csv")
PATH_COLUMNS = ("path", "filepath", "file", "filename", "image_path")
ID_COLUMNS = ("image_id", "image", "id", "isic_id")
GROUP_COLUMNS = ("group", "lesion_id", "patient_id")
LAYOUT_HELP = (
    "accepted: ROOT/{train,val,test}/{benign,malignant}/*, ROOT/{benign,malignant}/*, "
    "or a CSV manifest (columns path or image_id, label, optional group, optional split)"
)
# Files that are never data and never worth an error.
_IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass
class Sample:
    path: str
    label: int
    group: str | None = None
    split: str | None = None
    source: str = ""
    key: str = ""  # "<source>/<path relative to the source root>": stable across machines
    meta: dict = field(default_factory=dict)

    @property
    def group_key(self) -> str:
        return f"{self.source}/{self.group}" if self.group else self.key


@dataclass
class DataSource:
    root: Path
    name: str
    layout: str
    samples: list[Sample]
    non_images: list[str] = field(default_factory=list)


def _class_of(name: str) -> int | None:
    return {"benign": 0, "malignant": 1}.get(name.lower())


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV manifest or split file. UTF-8 with or without the BOM Excel's "CSV UTF-8" starts
    with; a file name in it that is not UTF-8 is kept as the surrogates os.fsdecode gives the same name on disk.
    Raises OSError, or csv.Error for a file that is not CSV text (NUL bytes: binary, or UTF-16)."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        reader = csv.DictReader(_no_nul(fh))
        return list(reader.fieldnames or []), list(reader)


def _no_nul(fh: TextIO) -> Iterator[str]:
    for line in fh:
        if "\x00" in line:
            raise csv.Error("NUL byte: a binary or UTF-16 file, not UTF-8 CSV text")
        yield line


def files_under(top: Path, seen: set[str] | None = None, *, follow_links: bool = True) -> list[Path]:
    """Every file under `top` (file links and broken links too), sorted. Linked folders are followed, which
    Path.rglob does not do, but no real folder is entered twice, so a link loop ends and a folder linked twice
    gives its images once, under the first name in sorted order. `seen`: the real paths of folders not to enter
    below `top` (another class or split folder of the same data), shared by the calls scanning one data folder
    and added to as folders are entered."""
    seen = set() if seen is None else seen
    found: list[Path] = []
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(top, followlinks=follow_links)):
        real = os.path.realpath(dirpath)
        if i and real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath, name) for name in filenames)
    return sorted(found)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _scan_class_folders(root: Path, folder: Path, split: str | None, source: str, out: DataSource, seen: set[str]):
    dirs = _visible_dirs(folder)
    unknown = [d.name for d in dirs if _class_of(d.name) is None]
    if unknown:
        raise DataError(
            f"{folder}: unknown class folder(s) {escape_undecodable(', '.join(unknown))}; "
            f"accepted class folders: {', '.join(CLASS_NAMES)}"
        )
    if not dirs:
        raise DataError(f"{folder}: no class folders found; {LAYOUT_HELP}")
    for d in dirs:
        label = _class_of(d.name)
        for p in files_under(d, seen):
            if p.name.lower() in _IGNORED_FILES or p.name.startswith("."):
                continue
            if not is_image_file(p):
                out.non_images.append(str(p))
                continue
            rel = p.relative_to(root).as_posix()
            out.samples.append(Sample(str(p), label, None, split, source, f"{source}/{rel}"))


def _find_manifest(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    return None


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _load_manifest(manifest: Path, source: str) -> DataSource:
    root = manifest.parent
    out = DataSource(root, source, "manifest", [])
    try:
        columns, rows = read_csv(manifest)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{manifest}: cannot read CSV manifest ({exc})") from None
    path_col, id_col = _pick(columns, PATH_COLUMNS), _pick(columns, ID_COLUMNS)
    label_col = _pick(columns, ("label", "target", "class", "diagnosis_binary"))
    group_col, split_col = _pick(columns, GROUP_COLUMNS), _pick(columns, ("split", "fold_split"))
    if label_col is None or (path_col is None and id_col is None):
        raise DataError(
            f"{manifest}: manifest needs a 'label' column and a 'path' or 'image_id' column "
            f"(found: {escape_undecodable(', '.join(columns)) or 'none'})"
        )
    index: dict[str, list[Path]] = {}
    if path_col is None:
        # linked folders not followed here: a link to the originals beside resized copies would give
        # every id two files (class folders follow links: their folder says which image is meant)
        for p in files_under(root, follow_links=False):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                index.setdefault(p.stem, []).append(p)
    used = {c for c in (path_col, id_col, label_col, group_col, split_col) if c}
    for line, row in enumerate(rows, start=2):
        raw_label = (row.get(label_col) or "").strip().lower()
        if raw_label not in LABEL_ALIASES:
            raise DataError(
                f"{manifest}:{line}: label {raw_label!r} not understood; accepted: benign/malignant or 0/1"
            )
        if path_col is not None:
            p = Path(row[path_col].strip())
            p = p if p.is_absolute() else root / p
        else:
            ident = row[id_col].strip()
            if ident not in index:
                raise DataError(f"{manifest}:{line}: no image file named {escape_undecodable(ident)}.* under {root}")
            if len(index[ident]) > 1:  # which one was meant is not for the file system's order to decide
                found = escape_undecodable(", ".join(str(q.relative_to(root)) for q in index[ident][:3]))
                raise DataError(f"{manifest}:{line}: {escape_undecodable(ident)} names {len(index[ident])} files "
                                f"({found}); accepted: one image file per id, or a 'path' column")
            p = index[ident][0]
        split = None
        if split_col and row.get(split_col, "").strip():
            split = SPLIT_ALIASES.get(row[split_col].strip().lower())
            if split is None:
                raise DataError(
                    f"{manifest}:{line}: split {row[split_col]!r} not understood; accepted: train, val, test"
                )
        group = (row.get(group_col) or "").strip() or None if group_col else None
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        meta = {k: v for k, v in row.items() if k not in used and k is not None}
        out.samples.append(
            Sample(str(p), LABEL_ALIASES[raw_label], group, split, source, f"{source}/{rel}", meta)
        )
    missing = [s.path for s in out.samples if not Path(s.path).is_file()]
    if missing:
        raise DataError(
            f"{manifest}: {len(missing)} listed image(s) do not exist, first: {escape_undecodable(missing[0])}"
        )
    return out


def discover(path: str | Path) -> DataSource:
    """Read one data path into a DataSource, or raise DataError saying what is accepted."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}; {LAYOUT_HELP}")
    source = (p.parent.name if p.is_file() else p.name) or "data"
    manifest = _find_manifest(p)
    if p.is_file() and p.suffix.lower() != ".csv":
        raise DataError(f"{p}: is a file but not a CSV manifest; {LAYOUT_HELP}")
    if manifest is not None:
        out = _load_manifest(manifest, source)
    else:
        root = p
        dirs = _visible_dirs(root)
        split_dirs = [d for d in dirs if d.name.lower() in SPLIT_ALIASES]
        out = DataSource(root, source, "", [])
        # A link inside a class folder to the root, or to another class or split folder, is not followed: its
        # images are that folder's, under their own label and split.
        seen = {os.path.realpath(d) for d in [root, *split_dirs]}
        seen |= {os.path.realpath(c) for d in split_dirs or [root] for c in _visible_dirs(d)
                 if _class_of(c.name) is not None}
        if split_dirs:
            out.layout = "split-folders"
            others = [d.name for d in dirs if d.name.lower() not in SPLIT_ALIASES]
            if others:
                raise DataError(
                    f"{root}: unexpected folder(s) {', '.join(others)} beside the split folders; "
                    f"{LAYOUT_HELP}"
                )
            for d in split_dirs:
                _scan_class_folders(root, d, SPLIT_ALIASES[d.name.lower()], source, out, seen)
        elif dirs:
            out.layout = "class-folders"
            _scan_class_folders(root, root, None, source, out, seen)
        else:
            raise DataError(f"{root}: no class folders and no manifest found; {LAYOUT_HELP}")
    if not out.samples:
        raise DataError(f"{p}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return out


def discover_all(paths: list[str] | tuple[str, ...]) -> list[DataSource]:
    if not paths:
        raise DataError(f"no data path given; {LAYOUT_HELP}")
    sources = [discover(p) for p in paths]
    names = [s.name for s in sources]
    taken = set(names)
    for i, s in enumerate(sources):
        if names.count(s.name) > 1:  # keep keys unique when two roots share a folder name
            new = f"{s.name}{i}"
            while new in taken:  # roots named a, a, a1: the second a must not become a1
                new += "_"
            taken.add(new)
            s.name = new
            for smp in s.samples:
                smp.source = s.name
                smp.key = f"{s.name}/{smp.key.split('/', 1)[1]}"
    return sources


def require_both_classes(samples: list[Sample], what: str) -> None:
    labels = {s.label for s in samples}
    if len(samples) == 0:
        raise DataError(f"{what}: no images")
    if labels != {0, 1}:
        present = CLASS_NAMES[next(iter(labels))]
        hint = ""
        if what == "validation split":  # carved out of train when a source has no val folder
            hint = ("; a class with a single image or lesion group cannot be in both train and val (data.val_fraction "
                    "carves val out of train): add images of it, or give the data a val/ folder holding both classes")
        raise DataError(
            f"{what}: only one class present ({present}); both benign and malignant images are needed{hint}"
        )
