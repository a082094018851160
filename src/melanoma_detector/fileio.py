"""Writing files so that a crash or a kill never leaves half of one behind, and file names any text output can hold."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def escape_undecodable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (held as surrogates, as os.fsdecode gives them) written as
    backslash escapes (`caf\\xe9.jpg`): valid UTF-8 for a terminal, a Markdown report or an Arrow string."""
    return text if text.isascii() else text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
