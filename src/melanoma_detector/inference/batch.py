"""Batch prediction at scale: stream images from folders or manifests to a CSV or Parquet file.

Memory stays bounded whatever the number of images: paths are read lazily (folder walk, manifest
rows), at most a few batches of decoded images are in flight, and results go to the output file
every `flush_every` rows instead of into a list. Decoding and preprocessing run in worker
processes (`workers`); the ONNX model runs in this process, one batch at a time.

Resume: the output is the record of what is done. With `resume=True` the paths already in it are
skipped and new rows are appended, so an interrupted run (Ctrl-C, kill, power loss) continues
where its output ends. Paths are compared as written, so resume with the same arguments (and
working directory, for relative paths). A CSV's text cells that would open as a spreadsheet formula
(`=...`, `-...`) are written with a leading `'` (`fileio.escape_formula`), which resume takes off again.

Output formats, by the file name:
  .csv      rows appended and flushed every `flush_every` rows; a last `disclaimer` column repeats the
            disclaimer in every row. A last line cut off by a kill is truncated away on resume.
  .parquet  a Parquet file is unreadable until its footer is written, so rows go first to complete
            part files, `OUT.parts/part-NNNNN.parquet`, each written under a temporary name and
            renamed (atomic); at the end the parts (and an earlier OUT, when resuming) are
            combined into OUT (written to OUT.tmp, renamed) and the parts removed. An interrupted
            run leaves OUT.parts/; resume reads the complete parts and finishes. The disclaimer is
            in the schema's metadata.

Never imports torch: workers run only Pillow + numpy (`ImagePrep`).
"""

from __future__ import annotations

import csv
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from melanoma_detector import DISCLAIMER
from melanoma_detector.errors import UserError
from melanoma_detector.fileio import escape_formula, escape_undecodable, unescape_formula
from melanoma_detector.inference.predictor import RESULT_COLUMNS, ImagePrep

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MANIFEST_PATH_COLUMNS = ("path", "filepath", "image", "image_path", "file", "filename")
STATUSES = ("ok", "cannot_assess")


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


# ---- inputs ------------------------------------------------------------------------------------
def _walk_images(root: Path) -> Iterator[str]:
    from melanoma_detector.data.io import is_image_file

    # os.walk is lazy; sorting each directory's entries keeps the order stable between runs.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_file(Path(name)):
                yield os.path.join(dirpath, name)


def _manifest_column(columns: list[str], manifest: Path) -> str:
    lower = {c.lower().strip(): c for c in columns}
    col = next((lower[c] for c in MANIFEST_PATH_COLUMNS if c in lower), None)
    if col is None:
        raise UserError(
            f"{manifest}: no path column (found: {', '.join(columns) or 'none'}); accepted: "
            f"{', '.join(MANIFEST_PATH_COLUMNS)}, or a text file with one path per line"
        )
    return col


def iter_manifest(manifest: str | Path) -> Iterator[str]:
    """Paths listed in a CSV (a path column) or a text file (one per line, # comments), read lazily.
    Relative paths are resolved against the manifest's folder. The header is checked before this returns."""
    manifest = Path(manifest)
    if manifest.is_dir():
        raise UserError(f"--manifest {manifest}: is a folder; accepted: a CSV with a path column or a text file "
                        "(a folder of images goes as an argument)")
    if not manifest.is_file():
        raise UserError(f"--manifest {manifest}: no such file; expected a CSV with a path column or a text file")
    root = manifest.parent
    from melanoma_detector.data.io import IMAGE_EXTENSIONS

    try:
        with manifest.open("rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        raise UserError(f"--manifest {manifest}: cannot read ({exc.strerror})") from None
    if manifest.suffix.lower() in IMAGE_EXTENSIONS or b"\0" in head:
        # read as lines, an image would be scored as dozens of garbage "paths" and echoed to the terminal
        raise UserError(f"--manifest {manifest}: a binary file (an image?), not a list of paths; accepted: a CSV "
                        "with a path column or a text file with one path per line (images go as arguments)")

    def resolve(raw: str) -> str:
        p = Path(raw)
        return str(p if p.is_absolute() else root / p)

    if manifest.suffix.lower() == ".csv":
        try:
            with manifest.open(newline="", encoding="utf-8-sig") as fh:
                columns = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{manifest}: cannot read CSV manifest ({exc})") from None
        col = _manifest_column(columns, manifest)

        def rows() -> Iterator[str]:
            # surrogateescape: a path that is not UTF-8 (a Latin-1 file name) still names its file, and
            # a bad byte thousands of rows down cannot stop a long job half-way
            with manifest.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
                for line, row in enumerate(csv.DictReader(fh), start=2):
                    raw = (row.get(col) or "").strip()
                    if raw:
                        yield resolve(raw)
                    else:
                        log.warning("%s:%d: empty %s, row skipped", manifest, line, col)

        return rows()

    def lines() -> Iterator[str]:
        with manifest.open(encoding="utf-8-sig", errors="surrogateescape") as fh:
            for line in fh:
                raw = line.strip()
                if raw and not raw.startswith("#"):
                    yield resolve(raw)

    return lines()


def iter_inputs(paths: Iterable[str] = (), manifests: Iterable[str] = ()) -> Iterator[str]:
    """Image paths from files, folders (recursive, lazily walked) and manifests. Missing paths and
    unreadable manifests fail here, before any work; a folder without images fails when reached."""
    paths, manifests = [Path(p) for p in paths], list(manifests)
    for p in paths:
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
    listed = [iter_manifest(m) for m in manifests]

    def gen() -> Iterator[str]:
        for p in paths:
            if p.is_dir():
                n = 0
                for f in _walk_images(p):
                    n += 1
                    yield f
                if n == 0:
                    raise UserError(f"{p}: folder holds no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)")
            else:
                yield str(p)  # any file: a non-image gets status cannot_assess, not a crash
        for it in listed:
            yield from it

    return gen()


# ---- decoding in worker processes ---------------------------------------------------------------
_PREP: ImagePrep | None = None


def _init_worker(prep: ImagePrep) -> None:
    global _PREP
    _PREP = prep
    # Ctrl-C reaches the whole process group; the main process shuts the pool down, so a worker
    # dying mid-task on SIGINT would only add a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker's task queue holds both pipe ends, so it never sees EOF when the main process is
    # killed (SIGKILL, OOM): without this watch, idle workers (and the forkserver) would live on.
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])
    os._exit(1)


def _load_one(prep: ImagePrep, path: str) -> tuple[str, Any, str | None]:
    try:
        arr, reason = prep.load(path)
    except Exception as exc:  # noqa: BLE001 -- a decoder bug on one odd file must not cost the other 99,999 images
        arr, reason = None, f"{path}: cannot decode image ({type(exc).__name__}: {exc})"
    return path, arr, reason


def _load_many(paths: list[str]) -> list[tuple[str, Any, str | None]]:
    return [_load_one(_PREP, p) for p in paths]


def _start_method() -> str:
    # Not fork: by the time workers start, ONNX Runtime has its intra-op thread pool running in this
    # process (and tqdm a monitor thread). fork copies only the calling thread, so a lock another
    # thread holds at that instant (allocator, ORT, OpenMP) stays locked forever in the child: a rare
    # hang that Python 3.12+ warns about. forkserver forks workers from a clean helper process
    # (started by fork+exec, no threads), cheaply; spawn where forkserver is unavailable.
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class _DecodePool:
    """A process pool whose worker crashes (a segfault in a decoder, an OOM kill) cost one file, not the run."""

    def __init__(self, prep: ImagePrep, workers: int):
        self.prep, self.workers = prep, workers
        self.ctx = mp.get_context(_start_method())
        if self.ctx.get_start_method() == "forkserver":
            # Workers fork from a server that has already imported these (no per-worker import cost);
            # the list names only torch-free modules.
            self.ctx.set_forkserver_preload(["numpy", "PIL.Image", "melanoma_detector.inference.batch"])
        self.executor: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> None:
        self.executor = ProcessPoolExecutor(self.workers, mp_context=self.ctx, initializer=_init_worker,
                                            initargs=(self.prep,))

    def restart(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def submit(self, paths: list[str]) -> Future:
        try:
            return self.executor.submit(_load_many, paths)
        except BrokenProcessPool as exc:
            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    def collect(self, pending: deque) -> list[tuple[str, Any, str | None]]:
        """The oldest batch's results (results come back in input order)."""
        paths, fut = pending.popleft()
        try:
            return fut.result()
        except BrokenProcessPool:
            log.warning("a decode worker died; retrying its batch one file at a time to find the file")
            self.restart()
            out = [self._one_isolated(p) for p in paths]
            for k, (ps, f) in enumerate(pending):  # unfinished ones died with the old pool
                if f.cancelled() or not f.done() or f.exception() is not None:
                    pending[k] = (ps, self.submit(ps))
            return out

    def _one_isolated(self, path: str) -> tuple[str, Any, str | None]:
        try:
            return self.submit([path]).result()[0]
        except BrokenProcessPool:
            self.restart()
            return path, None, f"{path}: the image decoder crashed on this file (its worker process died)"

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _batches(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(paths)
    while batch := list(itertools.islice(it, size)):
        yield batch


def decoded_batches(prep: ImagePrep, batches: Iterable[list[str]], *, workers: int,
                    max_in_flight: int | None = None) -> Iterator[list[tuple[str, Any, str | None]]]:
    """(path, preprocessed array or None, reason) per image, batch by batch, in input order.

    workers=0 decodes in this process. Otherwise at most `max_in_flight` batches (default
    2 x workers + 2) are submitted and not yet consumed: that, not the number of images, bounds memory
    (each 224 px image is 0.6 MB as float32) when the model is slower than the decoders.
    """
    if workers == 0:
        for batch in batches:
            yield [_load_one(prep, p) for p in batch]
        return
    limit = max_in_flight or 2 * workers + 2
    pool = _DecodePool(prep, workers)
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(batch)))
            if len(pending) >= limit:
                yield pool.collect(pending)
        while pending:
            yield pool.collect(pending)
    finally:
        pool.close()


# ---- output files -------------------------------------------------------------------------------
def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {c: r.get(c) for c in RESULT_COLUMNS}


# The result columns that hold text from the user (a path, a reason or recommendation naming the file): escaped
# in a CSV, so that a file named `=HYPERLINK(...).jpg` is not a live formula in a spreadsheet. The numbers (and
# the labels the model's bundle names) are written as they are.
CSV_TEXT_COLUMNS = ("path", "recommendation", "reason")

# A CSV has no place for file-level metadata (JSON has a `disclaimer` key, Parquet its schema metadata), and a
# comment line before the header breaks plain readers, so every row carries the disclaimer in a last column:
# a row copied out of the file, or one line of it opened in a spreadsheet, still says what it is.
CSV_COLUMNS = [*RESULT_COLUMNS, "disclaimer"]


def csv_row(r: dict[str, Any]) -> dict[str, Any]:
    """A result row for a CSV file: CSV_COLUMNS, the text ones formula-escaped (`fileio.escape_formula`)."""
    row = _row(r)
    for c in CSV_TEXT_COLUMNS:
        row[c] = escape_formula(row[c])
    row["disclaimer"] = DISCLAIMER
    return row


class _CsvSink:
    @staticmethod
    def key(path: str) -> str:
        """A path as `open` returns it (CSV keeps every byte of a file name; `_scan_csv` undoes the formula escape)."""
        return path

    def __init__(self, out: Path):
        self.out = out
        self.fh = None
        self.buffer: list[dict[str, Any]] = []

    def exists(self) -> bool:
        return self.out.exists()

    def open(self) -> set[str]:
        """Paths already in the file; a record cut off by an interruption is truncated away."""
        done: set[str] = set()
        header_ok, columns = False, CSV_COLUMNS
        if self.out.exists() and self.out.stat().st_size > 0:
            done, end, header_ok, columns = _scan_csv(self.out)
            if end < self.out.stat().st_size:
                log.warning("%s: dropping an incomplete last row (%d bytes) left by an interrupted run",
                            self.out, self.out.stat().st_size - end)
                with self.out.open("r+b") as fh:
                    fh.truncate(end)
        # surrogateescape: file names that are not valid UTF-8 round-trip byte for byte, so resume still matches them
        self.fh = self.out.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        # a file begun by a version without the disclaimer column goes on in its own columns, not a ragged mix
        self.writer = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore")
        if not header_ok:
            self.writer.writeheader()
            self.fh.flush()
        return done

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.buffer.extend(csv_row(r) for r in rows)

    def flush(self) -> None:
        if self.buffer:
            self.writer.writerows(self.buffer)
            self.buffer.clear()
        self.fh.flush()

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def _scan_csv(path: Path) -> tuple[set[str], int, bool, list[str]]:
    """(paths in complete rows, as given to the run (formula escape undone), byte offset after the last
    complete row, header present, the file's columns)."""
    with path.open("rb") as fh:
        consumed, ended = 0, True

        def lines() -> Iterator[str]:
            nonlocal consumed, ended
            for raw in fh:
                consumed += len(raw)
                ended = raw.endswith(b"\n")
                yield raw.decode("utf-8", errors="surrogateescape")

        # csv.reader pulls exactly the lines of one record before returning it, so `consumed` is the
        # byte offset of the record's end: a record is complete when it ends in a newline and has every field.
        reader = csv.reader(lines(), strict=True)  # strict: a record cut inside a quoted field is an error, not a row
        try:
            header = next(reader, None)
        except csv.Error:
            header = None
        if header is None or not ended:
            fh.seek(0)
            head = fh.read(4096).decode("utf-8", errors="replace")
            if ",".join(CSV_COLUMNS).startswith(head.rstrip("\r\n")):
                return set(), 0, False, CSV_COLUMNS  # killed while writing the header: start the file again
            raise UserError(f"{path}: not a results file of `melanoma predict` (no header line); choose another --out")
        if header not in (CSV_COLUMNS, RESULT_COLUMNS):  # RESULT_COLUMNS alone: written before the disclaimer column
            raise UserError(
                f"{path}: not a results file of `melanoma predict` (columns: {', '.join(header)[:200]}); "
                "choose another --out"
            )
        ncols = len(header)
        done: set[str] = set()
        good, bad_at = consumed, None
        while True:
            start = consumed
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                row = None
            complete = ended and row is not None and len(row) == ncols and row[5] in STATUSES
            if not complete:
                if bad_at is None:
                    bad_at = start
                continue
            if bad_at is not None:
                raise UserError(f"{path}: malformed row at byte {bad_at} before the end; not a file this tool wrote "
                                "(or it was edited); choose another --out")
            done.add(unescape_formula(row[0]))  # `'=x.jpg` was written for =x.jpg (and `''=x.jpg` for '=x.jpg)
            good = consumed
        return done, good, True, header


class _ParquetSink:
    key = staticmethod(escape_undecodable)  # a path as this file stores it, so a resume finds it

    def __init__(self, out: Path):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"--out {out}: writing Parquet needs pyarrow: pip install 'melanoma-detector[batch]' "
                            "(or write a .csv)") from None
        self.pa, self.pq = pa, pq
        self.out = out
        self.parts = out.with_name(out.name + ".parts")
        self.schema = pa.schema([
            ("path", pa.string()), ("probability_malignant", pa.float64()), ("predicted_label", pa.string()),
            ("risk_level", pa.string()), ("recommendation", pa.string()), ("status", pa.string()),
            ("reason", pa.string()),
        ], metadata={"disclaimer": DISCLAIMER})  # the file carries it, as the JSON output does
        self.buffer: list[dict[str, Any]] = []
        self.next_part = 0
        self.wrote = False

    def exists(self) -> bool:
        return self.out.exists() or self.parts.exists()

    def _paths(self, file: Path) -> list[str]:
        try:
            pf = self.pq.ParquetFile(file)
        except Exception as exc:  # noqa: BLE001 -- pyarrow has its own error types for a damaged file
            raise UserError(f"{file}: unreadable Parquet ({exc}); choose another --out") from None
        if pf.schema_arrow.names != self.schema.names:
            raise UserError(f"{file}: not a results file of `melanoma predict` (columns: "
                            f"{', '.join(pf.schema_arrow.names)}); choose another --out")
        return [p for b in pf.iter_batches(columns=["path"]) for p in b.column(0).to_pylist()]

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def open(self) -> set[str]:
        done: set[str] = set(self._paths(self.out)) if self.out.exists() else set()
        if self.parts.is_dir():
            for tmp in self.parts.glob("*.tmp"):
                tmp.unlink()  # a part cut off mid-write; its rows were never counted as done
            final = set(done)
            for part in self._part_files():
                paths = self._paths(part)
                if final and set(paths) <= final:
                    part.unlink()  # left over from a combine that finished but was stopped before cleanup
                    continue
                done.update(paths)
                self.next_part = max(self.next_part, int(part.stem.split("-")[1]) + 1)
        self.parts.mkdir(parents=True, exist_ok=True)
        return done

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.buffer.extend(_row(r) for r in rows)

    def flush(self) -> None:
        if not self.buffer:
            return
        for r in self.buffer:
            for k in ("path", "reason", "recommendation"):
                if isinstance(r[k], str):
                    r[k] = escape_undecodable(r[k])  # Arrow strings must be valid UTF-8
        table = self.pa.Table.from_pylist(self.buffer, schema=self.schema)
        part = self.parts / f"part-{self.next_part:05d}.parquet"
        tmp = part.with_suffix(".tmp")
        self.pq.write_table(table, tmp)
        os.replace(tmp, part)
        self.next_part += 1
        self.buffer.clear()
        self.wrote = True

    def finish(self) -> None:
        self.flush()
        parts = self._part_files()
        if not parts and self.out.exists():
            shutil.rmtree(self.parts, ignore_errors=True)
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        rows_per_group = 65536
        with self.pq.ParquetWriter(tmp, self.schema) as writer:
            pending, n = [], 0

            def emit(table, force=False):
                nonlocal pending, n
                if table is not None:
                    pending.append(table)
                    n += table.num_rows
                if pending and (force or n >= rows_per_group):
                    writer.write_table(self.pa.concat_tables(pending))
                    pending, n = [], 0

            if self.out.exists():
                pf = self.pq.ParquetFile(self.out)
                for i in range(pf.num_row_groups):
                    emit(pf.read_row_group(i))
            for part in parts:
                emit(self.pq.read_table(part, schema=self.schema))
            emit(None, force=True)
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        self.flush()
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()  # stopped before the first part: leave nothing that would need --resume


def output_format(out: str | Path) -> str:
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out}: unknown output format; accepted: a file name ending in .csv or .parquet")
    return fmt


def open_output(out: str | Path, *, resume: bool):
    """The output sink for `out`, checked: an existing output needs resume=True."""
    out = Path(out)
    sink = _CsvSink(out) if output_format(out) == "csv" else _ParquetSink(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; expected a .csv or .parquet file name")
    if sink.exists() and not resume:
        what = out if out.exists() else f"{out} (parts of an interrupted run in {out.name}.parts/)"
        raise UserError(f"{what} already exists; pass --resume to continue it (scored images are skipped) "
                        "or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return sink


# ---- the job ------------------------------------------------------------------------------------
def predict_to_file(predictor, paths: Iterable[str], out: str | Path, *, workers: int | None = None,
                    batch_size: int = 16, tta: bool = False, resume: bool = False, flush_every: int = 256,
                    progress: bool = False, max_in_flight: int | None = None) -> dict[str, Any]:
    """Score every image in `paths` (any iterable, consumed lazily) and write one row per image to
    `out` (.csv or .parquet), flushed every `flush_every` rows. Returns counts and timing.

    `predictor`: a `Predictor` (decode in `workers` processes, default `default_workers()`; 0 = in
    this process) or anything with `predict_paths` (e.g. a torch checkpoint; decoded in-process).
    Paths already in `out` (resume=True) or seen earlier in this run are skipped.
    """
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    if workers < 0 or batch_size < 1 or flush_every < 1:
        raise UserError("workers must be >= 0, batch size and flush interval >= 1")
    out = Path(out)
    sink = open_output(out, resume=resume)
    done = sink.open()
    n_before = len(done)
    counts = {"ok": 0, "cannot_assess": 0}
    skipped = 0

    def todo() -> Iterator[str]:
        nonlocal skipped
        for p in paths:
            p = str(p)
            stored = sink.key(p)
            if stored in done:
                skipped += 1
                continue
            done.add(stored)  # also drops a path listed twice
            yield p

    batches = _batches(todo(), batch_size)
    prepared = hasattr(predictor, "predict_prepared") and hasattr(predictor, "image_prep")
    if not prepared and workers:
        log.info("this model type decodes in the main process; --workers ignored")
    t0 = time.perf_counter()
    unflushed = 0
    with tqdm(total=None, unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        try:
            if prepared:
                results = (
                    predictor.predict_prepared([p for p, _, _ in b], [a for _, a, _ in b], [r for _, _, r in b], tta=tta)
                    for b in decoded_batches(predictor.image_prep(), batches, workers=workers,
                                             max_in_flight=max_in_flight)
                )
            else:
                results = (predictor.predict_paths(b, batch_size=batch_size) for b in batches)
            for rows in results:
                sink.write(rows)
                for r in rows:
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
                unflushed += len(rows)
                if unflushed >= flush_every:
                    sink.flush()
                    unflushed = 0
                bar.update(len(rows))
            sink.finish()
        finally:
            sink.close()  # an interrupted run keeps every row scored so far
    seconds = time.perf_counter() - t0
    processed = counts["ok"] + counts["cannot_assess"]
    return {
        "out": str(out), "format": output_format(out), "processed": processed, "ok": counts["ok"],
        "cannot_assess": counts["cannot_assess"], "skipped": skipped, "already_done": n_before,
        "seconds": seconds, "images_per_s": processed / seconds if seconds > 0 else 0.0, "workers": workers,
    }
