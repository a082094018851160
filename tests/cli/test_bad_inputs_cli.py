"""`melanoma predict` on the bad-input corpus: one row per file, bad files "cannot assess" with a
one-line reason, never a traceback, in-process and as a real `python -m melanoma_detector` process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from badinputs import BY_NAME, CORPUS, cases, refused_only_for_colour, unreadable_skip_reason
from melanoma_detector.cli import main
from melanoma_detector.inference import default_bundle_dir

BUNDLE = default_bundle_dir()
pytestmark = pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file(), reason=f"no model bundle at {BUNDLE}")


def _expected(corpus: Path, name: str) -> str:
    readable = name == "no-permission.jpg" and unreadable_skip_reason(corpus / name)
    return "ok" if BY_NAME[name].kind == "accepted" or readable else "cannot_assess"


def test_predict_folder_json(bad_corpus, capsys):
    corpus = bad_corpus / "benign"
    assert main(["predict", str(corpus), "--json", "--no-progress"]) == 0  # some images are ok
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    rows = {Path(r["path"]).name: r for r in json.loads(captured.out)["results"]}
    assert set(rows) == {c.name for c in CORPUS} - {"folder.jpg"}  # a folder is searched, not scored
    for name, row in rows.items():
        if refused_only_for_colour(BY_NAME[name], row["status"], row["reason"]):
            continue
        assert row["status"] == _expected(corpus, name), (name, row["reason"])
        if row["status"] == "cannot_assess":
            assert BY_NAME[name].words in row["reason"] and "\n" not in row["reason"], row["reason"]


def test_predict_only_bad_files_exit_1(bad_corpus, capsys):
    corpus = bad_corpus / "benign"
    names = [c.name for c in cases("undecodable") + cases("gate") if c.name not in ("folder.jpg", "no-permission.jpg")]
    assert main(["predict", *(str(corpus / n) for n in names), "--no-progress"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "cannot assess: " in line]
    assert len(lines) == len(names) and all(any(n in line for line in lines) for n in names)


def test_predict_folder_named_like_an_image(bad_corpus, capsys):
    """An empty folder called folder.jpg is a folder: a one-line error, exit code 2."""
    assert main(["predict", str(bad_corpus / "benign" / "folder.jpg"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "folder.jpg: folder holds no images" in err and "\n" not in err


def test_predict_subprocess_never_prints_a_traceback(bad_corpus):
    corpus = bad_corpus / "benign"
    files = sorted(str(p) for p in corpus.iterdir() if p.is_file())
    r = subprocess.run([sys.executable, "-m", "melanoma_detector", "predict", *files, "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "DecompressionBombWarning" not in r.stderr  # the row's reason says it once, in one line
    rows = [line for line in r.stdout.splitlines() if line.startswith(str(corpus))]
    assert len(rows) == len(files)
    for line in rows:
        name = Path(line.split()[0]).name
        if refused_only_for_colour(BY_NAME[name], "cannot_assess" if "cannot assess: " in line else "ok", line):
            continue
        assert ("cannot assess: " in line) == (_expected(corpus, name) == "cannot_assess"), line
