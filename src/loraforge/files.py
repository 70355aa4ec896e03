"""Files the package writes (whole or not at all, with the mode ``open()`` gives), the JSON it
reads (untrusted: every failure is one line naming the file), and sizes on disk as people read them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "dir_size", "format_bytes", "read_json_object", "sha256_file"]


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


def dir_size(path: str | os.PathLike, pattern: str = "*") -> int:
    """Bytes of the files under ``path`` (recursively) whose names match ``pattern``."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def format_bytes(n: float, si: bool = False, digits: int = 1) -> str:
    """``n`` bytes as "67.0 KB": binary units (1 KB = 1024 B), or SI ones (1 KB = 1000 B) with
    ``si``; whole bytes below one KB, ``digits`` decimals above."""
    step = 1000 if si else 1024
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < step or unit == "GB":
            break
        n /= step
    return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of the file's contents, computed once per process per (path, size, mtime): a real
    base's 538 MB would otherwise be hashed again for every run that names it, and a rewritten file
    has a new size or mtime, so the remembered digest never answers for it."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
