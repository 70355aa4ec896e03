"""Files the package writes (whole or not at all, with the mode ``open()`` gives) and the JSON it
reads (untrusted: every failure is one line naming the file)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "read_json_object"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    Readers (and a run killed mid-write) never see half a file: the rename is atomic on POSIX and
    Windows within one directory. The file gets ``0o666 & ~umask`` as ``open()`` would, not the
    0600 that ``mkstemp`` creates. On any failure, Ctrl-C included, the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0o022)  # os has no umask getter: read it and put it back at once
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of UTF-8 ``text``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; a file that is not UTF-8, not JSON or not an object is one
    ``ValueError`` line naming the file (and where it goes wrong)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # json's own messages may end in "at" ("Invalid control character at"): say it once
        where = f"at line {e.lineno}, column {e.colno}"
        raise ValueError(f"{path}: invalid JSON ({e.msg.removesuffix(' at')} {where})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
