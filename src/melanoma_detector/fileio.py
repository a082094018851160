"""Writing files so that a crash or a kill never leaves half of one behind, and file names any text output can hold
(a terminal, a report, and a CSV that a spreadsheet opens)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


def escape_undecodable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (held as surrogates, as os.fsdecode gives them) written as
    backslash escapes (`caf\\xe9.jpg`): valid UTF-8 for a terminal, a Markdown report or an Arrow string."""
    return text if text.isascii() else text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# A CSV cell starting with one of these opens as a formula in Excel/LibreOffice (CWE-1236, OWASP "CSV injection"):
# a file named `=HYPERLINK("http://x","y").jpg` would be a live link in a `predict --csv` or evaluation report.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(value: _T) -> _T | str:
    """A user-supplied text cell (a path, a file name, a reason that names a file) made safe for a spreadsheet:
    prefixed with `'` when it would start a formula, so the spreadsheet shows it as text. Only for text columns:
    a number (a negative one too) is returned as is and must stay a number.

    Reversible by `unescape_formula`: the quote is added to any text whose leading quotes are followed by a
    trigger character (`=x`, but also `'=x`, `''=x`), and only there, so a real name `'=x.jpg` is written
    `''=x.jpg` and never read back as `=x.jpg`."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


def unescape_formula(cell: str) -> str:
    """The text `escape_formula` was given, from the cell it wrote (a cell it did not change is returned as is)."""
    if cell.startswith("'") and cell[1:].lstrip("'").startswith(FORMULA_TRIGGERS):
        return cell[1:]
    return cell


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; renamed onto `path` when the block ends
    normally, removed when it raises. The temporary name keeps the suffix, because `np.save`
    and `np.savez` append theirs to a name that lacks it, and is unique per call, so threads of one
    process (the web app's queue) writing the same target never share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
