"""Atomic file output: a result is written whole or not at all, and a failure names the file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import RewriteError


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (some span several), kept short."""
    text = " ".join(str(exc).split())
    return (text[:400] + " ...") if len(text) > 400 else (text or type(exc).__name__)


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output path that cannot become a file: a folder, or under a file."""
    path = Path(os.fspath(path))
    where = f"file {path}"
    if path.is_dir():
        raise RewriteError("is a folder; give a file name", where=where)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RewriteError(f"its folder {parent} is a file", where=where)
            break


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it to `path`.

    On any failure the temporary file is removed, `path` is left as it was, and the error is a
    RewriteError naming the file.
    """
    path = Path(os.fspath(path))
    directory = path.parent if str(path.parent) else Path(".")
    check_output_path(path)
    if not directory.is_dir():
        raise RewriteError("the output directory does not exist", where=f"file {path}")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, RewriteError) or not isinstance(exc, Exception):
            raise
        raise RewriteError(f"could not write: {type(exc).__name__}: {first_line(exc)}", where=f"file {path}") from None
    return path
