"""Batch prediction to a file (`melanoma predict --out`): parity with `Predictor.predict_paths`,
worker processes, resume after a kill, Parquet, manifests, incremental flushing, bad inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lesion_image
from melanoma_detector import DISCLAIMER
from melanoma_detector.cli import main
from melanoma_detector.errors import UserError
from melanoma_detector.inference import Predictor, default_bundle_dir
from melanoma_detector.inference.batch import decoded_batches, iter_inputs, predict_to_file
from melanoma_detector.inference.predictor import RESULT_COLUMNS, ImagePrep

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = default_bundle_dir()
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
pytestmark = pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file() or not EXAMPLES,
                                reason=f"no model bundle at {BUNDLE} or no examples/")
BAD = ("junk.jpg", "empty.jpg", "thin.png", "flat.png")


@pytest.fixture(scope="module")
def predictor():
    return Predictor(BUNDLE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """~34 files: real dermoscopy (examples/ and their mirror images), synthetic lesions (some refused
    by the OOD gate), and files the gate or the decoder refuses, in nested folders."""
    root = tmp_path_factory.mktemp("batch") / "imgs"
    (root / "real" / "mirrored").mkdir(parents=True)
    (root / "synthetic").mkdir()
    (root / "bad").mkdir()
    for p in EXAMPLES:
        shutil.copy(p, root / "real" / p.name)
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "real" / "mirrored" / p.name, quality=95)
    rng = np.random.default_rng(0)
    for i in range(6):
        lesion_image(rng, i % 2 == 0, size=(160, 120)).save(root / "synthetic" / f"s{i}.jpg")
    (root / "bad" / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (50, 300), (200, 150, 120)).save(root / "bad" / "thin.png")
    Image.new("RGB", (300, 300), (200, 150, 120)).save(root / "bad" / "flat.png")
    return root


@pytest.fixture(scope="module")
def all_paths(images) -> list[str]:
    return list(iter_inputs([str(images)]))


@pytest.fixture(scope="module")
def reference(predictor, all_paths) -> dict[str, dict]:
    return {r["path"]: r for r in predictor.predict_paths(all_paths)}


def read_rows(out: Path) -> list[dict]:
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    return list(csv.DictReader(out.open(newline="")))


def assert_matches(rows: list[dict], reference: dict[str, dict]) -> None:
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "an image appears twice"
    assert set(paths) == set(reference)
    for r in rows:
        ref = reference[r["path"]]
        assert r["status"] == ref["status"], r["path"]
        assert (r["reason"] or "") == ref["reason"]
        if ref["status"] == "ok":
            assert abs(float(r["probability_malignant"]) - ref["probability_malignant"]) <= 1e-6
            assert r["predicted_label"] == ref["predicted_label"] and r["risk_level"] == ref["risk_level"]
        else:
            assert r["probability_malignant"] in ("", None)


def test_reference_covers_both_outcomes(reference):
    statuses = [r["status"] for r in reference.values()]
    assert statuses.count("ok") >= 24 and statuses.count("cannot_assess") >= len(BAD)


@pytest.mark.parametrize("workers", [0, 2])
def test_csv_matches_predict_paths(predictor, images, reference, tmp_path, workers):
    out = tmp_path / "results.csv"
    s = predict_to_file(predictor, iter_inputs([str(images)]), out, workers=workers, batch_size=5, flush_every=7)
    assert s["processed"] == len(reference) and s["skipped"] == 0
    assert s["ok"] + s["cannot_assess"] == len(reference)
    rows = read_rows(out)
    assert_matches(rows, reference)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert "64" in by_name["thin.png"]["reason"] and "uniform" in by_name["flat.png"]["reason"]
    assert "junk.jpg" in by_name["junk.jpg"]["reason"] and "empty" in by_name["empty.jpg"]["reason"]


def test_workers_do_not_change_results(predictor, all_paths, tmp_path):
    a, b = tmp_path / "w0.csv", tmp_path / "w2.csv"
    predict_to_file(predictor, all_paths, a, workers=0, batch_size=16)
    predict_to_file(predictor, all_paths, b, workers=2, batch_size=3, max_in_flight=2)
    ra, rb = read_rows(a), read_rows(b)
    assert [r["path"] for r in ra] == [r["path"] for r in rb] == all_paths  # input order kept
    assert ra == rb


def test_rows_are_flushed_while_running_and_input_is_read_lazily(predictor, all_paths, tmp_path):
    """Bounded memory: the input is pulled only a few batches ahead of the rows already in the file."""
    out = tmp_path / "r.csv"
    seen: list[tuple[int, int]] = []

    def paths():
        for i, p in enumerate(all_paths):
            rows_on_disk = max(0, len(out.read_text().splitlines()) - 1) if out.exists() else 0
            seen.append((i, rows_on_disk))
            yield p

    batch, flush, in_flight = 2, 4, 2
    predict_to_file(predictor, paths(), out, workers=2, batch_size=batch, flush_every=flush, max_in_flight=in_flight)
    assert len(read_rows(out)) == len(all_paths)
    assert seen[-1][1] > 0, "no row reached the file before the input was exhausted"
    for i, on_disk in seen:
        assert i - on_disk <= (in_flight + 1) * batch + flush, (i, on_disk)


def test_resume_after_first_half(predictor, all_paths, reference, tmp_path):
    out = tmp_path / "r.csv"
    half = len(all_paths) // 2
    predict_to_file(predictor, all_paths[:half], out, workers=0)
    with pytest.raises(UserError, match="--resume"):
        predict_to_file(predictor, all_paths, out, workers=0)
    s = predict_to_file(predictor, all_paths + all_paths[:3], out, workers=2, resume=True)
    assert s["already_done"] == half and s["processed"] == len(all_paths) - half and s["skipped"] == half + 3
    assert_matches(read_rows(out), reference)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from melanoma_detector.inference import Predictor
    from melanoma_detector.inference.batch import iter_inputs, predict_to_file
    p = Predictor(sys.argv[1])
    score = p.predict_prepared
    def slow(*a, **k):  # slow enough that the test can kill the run midway
        time.sleep(0.2)
        return score(*a, **k)
    p.predict_prepared = slow
    predict_to_file(p, iter_inputs([sys.argv[2]]), sys.argv[3], workers=1, batch_size=2, flush_every=2)
""")


def tagged_processes(tag: str) -> list[str]:
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MELANOMA_TEST_TAG={tag}".encode() in env.read_bytes().split(b"\0"):
                found.append(env.parent.name)
        except OSError:
            pass
    return found


def test_resume_after_sigkill_and_truncated_line(predictor, images, reference, tmp_path):
    out = tmp_path / "r.csv"
    tag = f"batch-test-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(BUNDLE), str(images), str(out)],
                            env={**os.environ, "MELANOMA_TEST_TAG": tag})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_bytes().splitlines()) >= 7:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    if Path("/proc/self/environ").exists():  # the killed run's decode workers and forkserver exit too
        deadline = time.monotonic() + 20
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tagged_processes(tag)
    written = [r for r in read_rows(out) if r["status"] in ("ok", "cannot_assess")]
    assert 6 <= len(written) < len(reference)
    with out.open("ab") as fh:  # a row cut off mid-write by the kill
        fh.write(f"{written[0]['path']}x,0.12".encode())
    s = predict_to_file(predictor, iter_inputs([str(images)]), out, workers=0, resume=True)
    assert s["already_done"] == len(written)
    assert s["processed"] == len(reference) - len(written)
    rows = read_rows(out)
    assert_matches(rows, reference)
    assert out.read_bytes().endswith(b"\n")


def test_resume_rejects_a_foreign_csv(predictor, all_paths, tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a results file"):
        predict_to_file(predictor, all_paths, out, resume=True)


def test_parquet_round_trip_and_resume_from_parts(predictor, all_paths, reference, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "r.parquet"
    stop_after = 20

    def interrupted():
        for i, p in enumerate(all_paths):
            if i == stop_after:
                raise KeyboardInterrupt
            yield p

    with pytest.raises(KeyboardInterrupt):
        predict_to_file(predictor, interrupted(), out, workers=0, batch_size=4, flush_every=4)
    parts = out.with_name("r.parquet.parts")
    assert not out.exists() and len(list(parts.glob("part-*.parquet"))) >= 4
    (parts / "part-00099.tmp").write_bytes(b"PAR1 cut off")  # a part killed mid-write
    with pytest.raises(UserError, match="--resume"):
        predict_to_file(predictor, all_paths, out)
    s = predict_to_file(predictor, all_paths, out, workers=2, batch_size=4, resume=True)
    assert s["already_done"] == stop_after and s["processed"] == len(all_paths) - stop_after
    assert out.exists() and not parts.exists()
    rows = read_rows(out)
    assert_matches(rows, reference)
    import pyarrow.parquet as pq

    from melanoma_detector import DISCLAIMER

    assert pq.read_schema(out).metadata[b"disclaimer"].decode() == DISCLAIMER
    # A later resume with new images appends to the finished file.
    extra = tmp_path / "extra.jpg"
    shutil.copy(EXAMPLES[0], extra)
    s = predict_to_file(predictor, all_paths + [str(extra)], out, workers=0, resume=True)
    assert s["processed"] == 1 and s["skipped"] == len(all_paths)
    rows = read_rows(out)
    assert len(rows) == len(all_paths) + 1 and rows[-1]["path"] == str(extra) and rows[-1]["status"] == "ok"


def test_parquet_without_pyarrow_names_the_extra(predictor, all_paths, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match=r"melanoma-detector\[batch\]"):
        predict_to_file(predictor, all_paths, tmp_path / "r.parquet")


def test_decode_error_never_stops_the_run(predictor, all_paths, reference, tmp_path, monkeypatch):
    """An unexpected exception inside a decoder becomes a cannot_assess row."""
    target = next(p for p in all_paths if reference[p]["status"] == "ok")
    load = ImagePrep.load

    def flaky(self, path):
        if path == target:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return load(self, path)

    monkeypatch.setattr(ImagePrep, "load", flaky)
    out = tmp_path / "r.csv"
    s = predict_to_file(predictor, all_paths, out, workers=0)
    assert s["processed"] == len(all_paths)
    row = next(r for r in read_rows(out) if r["path"] == target)
    assert row["status"] == "cannot_assess" and "cannot decode" in row["reason"] and target in row["reason"]


class CrashingPrep(ImagePrep):
    """Kills its worker process on files named crash*: a segfaulting decoder, as the pool sees it."""

    def load(self, path):
        if Path(path).name.startswith("crash"):
            os._exit(1)
        return super().load(path)


def test_a_worker_crash_costs_one_file(predictor, all_paths, reference, tmp_path):
    crash = tmp_path / "crash.jpg"
    shutil.copy(EXAMPLES[0], crash)
    paths = all_paths[:10] + [str(crash)] + all_paths[10:14]
    prep = CrashingPrep(predictor.pp, predictor.min_side, predictor.min_std)
    batches = [paths[i : i + 3] for i in range(0, len(paths), 3)]
    got = [item for batch in decoded_batches(prep, batches, workers=2) for item in batch]
    assert [p for p, _, _ in got] == paths
    by_path = {p: (a, r) for p, a, r in got}
    assert by_path[str(crash)][0] is None and "crashed" in by_path[str(crash)][1]
    plain = ImagePrep(predictor.pp, predictor.min_side, predictor.min_std)
    for p in paths:
        if p != str(crash):
            arr, reason = plain.load(p)
            assert by_path[p][1] == reason and (arr is None) == (by_path[p][0] is None), p
            if arr is not None:
                assert np.array_equal(arr, by_path[p][0])


def test_cli_manifests_with_relative_paths(images, reference, tmp_path, capsys):
    lists = images.parent / "lists"
    lists.mkdir(exist_ok=True)
    real = sorted((images / "real").glob("*.jpg"))
    with (lists / "m.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image", "note"])
        for p in real[:5]:
            w.writerow([os.path.relpath(p, lists), "x"])
        w.writerow([str(images / "bad" / "junk.jpg"), "absolute"])
        w.writerow(["../imgs/missing.jpg", "not there"])
    (lists / "m.txt").write_text("# one path per line\n\n" + "\n".join(os.path.relpath(p, lists) for p in real[5:8]) + "\n")
    out = tmp_path / "out" / "m.csv"
    rc = main(["predict", "--manifest", str(lists / "m.csv"), "--manifest", str(lists / "m.txt"),
               "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "8 ok, 2 cannot assess" in capsys.readouterr().out
    rows = {Path(r["path"]).resolve(): r for r in read_rows(out)}
    assert len(rows) == 10
    for p in real[:8]:
        assert rows[p.resolve()]["status"] == reference[str(p)]["status"] == "ok"
    assert "not found" in rows[(images / "missing.jpg").resolve()]["reason"]
    # Without --out the small-job table takes a manifest too.
    assert main(["predict", "--manifest", str(lists / "m.txt"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("\n") >= 4


def test_cli_user_errors_are_one_line(images, tmp_path, capsys):
    def err(args):
        assert main(args) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error:") and "\n" not in msg
        return msg

    out = tmp_path / "r.csv"
    out.write_text("path\n")
    assert "--resume" in err(["predict", str(images / "real"), "--out", str(out)])
    assert ".csv or .parquet" in err(["predict", str(images / "real"), "--out", str(tmp_path / "r.xlsx")])
    assert "--out" in err(["predict", str(images / "real"), "--resume"])
    (tmp_path / "nocol.csv").write_text("label,group\nbenign,a\n")
    assert "path column" in err(["predict", "--manifest", str(tmp_path / "nocol.csv"), "--out", str(tmp_path / "x.csv")])
    assert "nothing to score" in err(["predict"])


def test_batch_path_never_imports_torch(images, tmp_path):
    """Neither the main process nor a decode worker imports torch: a stand-in `torch` that records
    every import attempt comes first on the path of both."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    marker = tmp_path / "torch-imported"
    (fake / "__init__.py").write_text(
        "import os\nopen(os.environ['TORCH_MARKER'], 'a').write(str(os.getpid()) + '\\n')\n"
        "raise ImportError('torch imported on the batch prediction path')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]),
           "TORCH_MARKER": str(marker)}
    code = (
        "import sys\n"
        "from melanoma_detector.cli import main\n"
        f"rc = main(['predict', {str(images / 'real')!r}, '--out', {str(tmp_path / 'r.csv')!r}, '--workers', '2',"
        " '--no-progress'])\n"
        "assert rc == 0 and 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), f"torch imported by process(es) {marker.read_text().split()}"
    assert len(read_rows(tmp_path / "r.csv")) == 2 * len(EXAMPLES)


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in file names")
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_non_utf8_file_names_resume_exactly_once(predictor, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], folder / "plain.jpg")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as fh:  # Latin-1 name, not UTF-8
        fh.write(EXAMPLES[1].read_bytes())
    out = tmp_path / f"r{suffix}"
    predict_to_file(predictor, iter_inputs([str(folder)]), out, workers=0)
    s = predict_to_file(predictor, iter_inputs([str(folder)]), out, workers=0, resume=True)
    assert s["processed"] == 0 and s["skipped"] == 2
    if suffix == ".csv":
        rows = list(csv.DictReader(out.open(newline="", encoding="utf-8", errors="surrogateescape")))
    else:
        rows = read_rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)


def test_resume_cuts_a_record_truncated_inside_a_quoted_newline(predictor, tmp_path):
    """A reason holding a newline (from a file name with one) is quoted over two lines; a kill right after that
    newline left a record the lenient CSV reader took for whole, and every later row went into its open quote."""
    folder = tmp_path / "nl"
    folder.mkdir()
    shutil.copy(EXAMPLES[0], folder / "a.jpg")
    (folder / "bad\nname.jpg").write_bytes(b"not an image")
    shutil.copy(EXAMPLES[1], folder / "z.jpg")
    out = tmp_path / "r.csv"
    predict_to_file(predictor, iter_inputs([str(folder)]), out, workers=0)
    data = out.read_bytes()
    cut = data.rindex(b"bad\nname.jpg") + len(b"bad\n")  # inside the quoted reason, the last field, after its newline
    out.write_bytes(data[:cut])
    predict_to_file(predictor, iter_inputs([str(folder)]), out, workers=0, resume=True)
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(["a.jpg", "bad\nname.jpg", "z.jpg"])
    assert [r["status"] for r in rows if Path(r["path"]).name == "z.jpg"] == ["ok"]


def test_a_manifest_with_a_latin1_row_far_down_is_read_to_the_end(tmp_path):
    manifest = tmp_path / "m.txt"
    names = [f"img{i}.jpg".encode() for i in range(3000)] + [b"caf\xe9.jpg"]
    manifest.write_bytes(b"\n".join(names) + b"\n")
    got = list(iter_inputs(manifests=[str(manifest)]))
    assert len(got) == 3001 and os.fsencode(got[-1]).endswith(b"caf\xe9.jpg")
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_bytes(b"path\n" + b"\n".join(names) + b"\n")
    got = list(iter_inputs(manifests=[str(csv_manifest)]))
    assert len(got) == 3001 and os.fsencode(got[-1]).endswith(b"caf\xe9.jpg")


def test_cli_table_and_csv_take_any_file_name(tmp_path):
    """A Latin-1 or newline file name used to crash `predict --csv` and the table after every image was scored."""
    folder = tmp_path / "odd"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(EXAMPLES[0].read_bytes())
    shutil.copy(EXAMPLES[1], folder / "new\nline.jpg")
    out_csv = tmp_path / "r.csv"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, as a UTF-8 terminal is
    proc = subprocess.run([sys.executable, "-m", "melanoma_detector", "predict", str(folder), "--csv", str(out_csv),
                           "--no-progress", "--model", str(BUNDLE)], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    table = proc.stdout.decode("utf-8")
    assert "caf\\xe9.jpg" in table and "new\\nline.jpg" in table
    rows = list(csv.DictReader(out_csv.open(newline="", encoding="utf-8", errors="surrogateescape")))
    assert sorted(os.fsencode(r["path"]).rsplit(b"/", 1)[1] for r in rows) == [b"caf\xe9.jpg", b"new\nline.jpg"]


# ---- CSV formula injection (CWE-1236): a cell starting with = + - @ opens as a formula in a spreadsheet
def _copy_examples(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        shutil.copy(EXAMPLES[i % len(EXAMPLES)], folder / name)


def test_csv_formula_cells_are_escaped_and_resume_scores_each_file_once(predictor, tmp_path, monkeypatch):
    """Relative names starting with a formula character get a leading `'` in the CSV; an interrupted run resumed
    skips them (the escape is undone when the file is read back), and a real name `'=1+1.jpg` stays apart from
    `=1+1.jpg` (written `''=1+1.jpg`)."""
    first = ["=1+1.jpg", "-x.jpg", "'@a.jpg", "a.jpg"]
    rest = ["'=1+1.jpg", "@a.jpg", "+cmd|' C calc'!A0.jpg"]
    _copy_examples(tmp_path / "imgs", first + rest)
    (tmp_path / "imgs" / "-junk.jpg").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path / "imgs")
    names = first + rest + ["-junk.jpg"]
    out = tmp_path / "r.csv"

    score, calls = predictor.predict_prepared, []

    def killed_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return score(*a, **k)

    monkeypatch.setattr(predictor, "predict_prepared", killed_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(predictor, names, out, workers=0, batch_size=2, flush_every=1)
    monkeypatch.setattr(predictor, "predict_prepared", score)
    s = predict_to_file(predictor, names, out, workers=0, batch_size=2, resume=True)
    assert s["already_done"] == len(first) and s["skipped"] == len(first) and s["processed"] == len(names) - len(first)

    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    cells = [r["path"] for r in rows]
    assert sorted(cells) == sorted(["'=1+1.jpg", "'-x.jpg", "''@a.jpg", "a.jpg", "''=1+1.jpg", "'@a.jpg",
                                    "'+cmd|' C calc'!A0.jpg", "'-junk.jpg"])  # each input exactly once
    junk = next(r for r in rows if r["path"] == "'-junk.jpg")
    assert junk["status"] == "cannot_assess" and junk["reason"].startswith("'-junk.jpg: ")
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(0 <= float(r["probability_malignant"]) <= 1 for r in ok)


def test_csv_numbers_are_written_as_numbers_even_when_negative(tmp_path):
    class Stub:  # decodes nothing: any object with predict_paths scores in-process
        def predict_paths(self, paths, batch_size=16):
            return [{"path": p, "probability_malignant": -0.25, "predicted_label": "benign", "risk_level": "Low",
                     "recommendation": "Routine", "status": "ok", "reason": ""} for p in paths]

    out = tmp_path / "r.csv"
    predict_to_file(Stub(), ["-x.jpg", "/abs/-y.jpg"], out, workers=0)
    assert out.read_text().splitlines()[1:] == [f"'-x.jpg,-0.25,benign,Low,Routine,ok,,\"{DISCLAIMER}\"",
                                                f"/abs/-y.jpg,-0.25,benign,Low,Routine,ok,,\"{DISCLAIMER}\""]


class _Stub:
    def predict_paths(self, paths, batch_size=16):
        return [{"path": p, "probability_malignant": 0.5, "predicted_label": "malignant", "risk_level": "High",
                 "recommendation": "See a dermatologist", "status": "ok", "reason": ""} for p in paths]


def test_every_csv_row_carries_the_disclaimer(tmp_path, monkeypatch, capsys):
    """A CSV has no file-level metadata: each row of `--out x.csv` and `predict --csv` ends with the disclaimer."""
    out = tmp_path / "r.csv"
    predict_to_file(_Stub(), ["a.jpg", "b.jpg"], out, workers=0)
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert [r["disclaimer"] for r in rows] == [DISCLAIMER] * 2

    _copy_examples(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    out_csv = tmp_path / "cli.csv"
    assert main(["predict", "--csv", str(out_csv), "--model", str(BUNDLE), "--no-progress",
                 str(tmp_path / "imgs")]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(out_csv.open(newline="", encoding="utf-8")))
    assert len(rows) == 2 and all(r["disclaimer"] == DISCLAIMER for r in rows)
    assert list(rows[0])[-1] == "disclaimer" and list(rows[0])[:-1] == RESULT_COLUMNS


def test_resume_of_a_file_from_before_the_disclaimer_column_keeps_its_columns(tmp_path):
    """A results file an earlier version began (7 columns) is resumed in its own columns, not with ragged rows."""
    out = tmp_path / "old.csv"
    out.write_text(",".join(RESULT_COLUMNS) + "\na.jpg,0.5,malignant,High,See a dermatologist,ok,\n")
    s = predict_to_file(_Stub(), ["a.jpg", "b.jpg"], out, workers=0, resume=True)
    assert s["already_done"] == 1 and s["processed"] == 1
    rows = list(csv.reader(out.open(newline="")))
    assert rows[0] == RESULT_COLUMNS and [r[0] for r in rows[1:]] == ["a.jpg", "b.jpg"]
    assert all(len(r) == len(RESULT_COLUMNS) for r in rows)


def test_cli_csv_escapes_formula_names_and_json_keeps_them(tmp_path, monkeypatch, capsys):
    names = ["=1+1.jpg", "-x.jpg", "@a.jpg"]
    _copy_examples(tmp_path / "imgs", names)
    monkeypatch.chdir(tmp_path / "imgs")
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    assert main(["predict", "--csv", str(out_csv), "--json", str(out_json), "--model", str(BUNDLE),
                 "--no-progress", "--", *names]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(out_csv.open(newline="", encoding="utf-8")))
    assert [r["path"] for r in rows] == ["'=1+1.jpg", "'-x.jpg", "'@a.jpg"]
    assert all(float(r["probability_malignant"]) >= 0 for r in rows if r["status"] == "ok")
    assert [r["path"] for r in json.loads(out_json.read_text())["results"]] == names
