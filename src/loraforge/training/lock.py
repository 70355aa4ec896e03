"""One run per output directory, and an output checked writable before anything loads.

``OutputLock(out)`` holds an exclusive ``flock`` on ``OUT/.loraforge.lock`` for a run's life
and writes the holder's pid, host and start time into that file. A second run pointed at the
same directory (another shell, another job, or another ``lf.train`` call in this process) is
refused with one line naming the directory and the holder, before it touches anything: so
``overwrite: true`` cannot delete a running job's checkpoints, ``--resume`` cannot read a folder
the running job is pruning, and two runs cannot both "succeed" into one folder.

Stale locks. The kernel drops a flock when the last descriptor of its open file is closed, which
happens when a process dies however it dies (kill -9, OOM, crash): a killed run therefore never
blocks the next one. Its lock file stays behind with a dead pid in it, and the next run simply
takes the lock (``previous`` holds the old holder, for a log line). The flock can outlive its run
only if a forked child inherited the descriptor and is still alive (``os.open`` descriptors are
not inherited across ``exec``, but ``fork`` copies them); then the file names a pid that has
ended on this host, and the lock is taken over by replacing the file: new runs lock the new
file, the orphan keeps a lock nobody asks for. On a filesystem without flock (some network
mounts) the file's pid/host is the only lock: a live pid on this host, or any pid on another
host, refuses (the message names the file to delete once that run is over).

Writability. Creating the lock file and writing and syncing its line is the probe: a read-only
output, a missing permission or a full disk is reported here, in one line, before the model is
loaded (a disk with a few blocks left passes; a checkpoint that then fails to save stops the run
with its own line, earlier checkpoints kept).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: the pid/host file alone is the lock
    fcntl = None

LOCK_NAME = ".loraforge.lock"


class RunError(ValueError):
    """A run cannot start or had to stop: its output is in use by another run or not writable,
    its loss or gradient norm stopped being finite, or a file could not be written. The message
    names the directory or the step. (A ValueError, like ConfigError and DataError, so callers
    and the command line report all three the same way.)"""


class OutputLock:
    """Exclusive use of an output directory until ``release()`` (or the process ends).

    Creates the directory if needed; ``release()`` removes the lock file, and the directory
    too when this lock created it and the run left nothing in it.
    """

    def __init__(self, output: str | os.PathLike):
        self.dir = Path(output)
        self.path = self.dir / LOCK_NAME
        self.previous: dict | None = None  # the holder of a stale lock taken over
        self._fd: int | None = None
        self._made_dir = not self.dir.exists()
        try:
            self._acquire()
        except OSError as e:
            raise RunError(f"output {self.dir}: cannot write there ({e.strerror or e})") from None

    def _acquire(self) -> None:
        for _ in range(10):  # retried only when another process replaced the file meanwhile
            self.dir.mkdir(parents=True, exist_ok=True)  # again: a releasing run may remove it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = _try_flock(fd)  # True, False (held elsewhere) or None (no flock here)
                holder = _read_holder(fd)
                if locked is False and holder is not None and not _alive(holder):
                    # Held by an orphaned child of a run that has ended: stop using this file.
                    self.previous = holder
                    if _same_file(fd, self.path):
                        os.unlink(self.path)
                    continue
                if locked is False or (locked is None and holder is not None and _alive(holder)):
                    raise RunError(_busy_message(self.dir, self.path, holder, flock=locked is not None))
                if not _same_file(fd, self.path):
                    continue  # removed or replaced after we opened it: lock the current file
                self.previous = holder or self.previous
                mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
                os.ftruncate(fd, 0)
                os.pwrite(fd, (mine + "\n").encode(), 0)
                os.fsync(fd)  # a full disk can fail only here on some filesystems
                self._fd, fd = fd, None
                return
            finally:
                if fd is not None:
                    os.close(fd)
        raise RunError(f"output {self.dir}: could not take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Unlink while still holding the flock; a process that opened the old file meanwhile
            # notices the replacement (_same_file) and retries on a fresh one.
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None
        if self._made_dir:
            try:
                self.dir.rmdir()  # only succeeds when the run wrote nothing there
            except OSError:
                pass

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a run that is starting"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


# -- helpers ------------------------------------------------------------------------------------------


def _try_flock(fd: int) -> bool | None:
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read_holder(fd: int) -> dict | None:
    """The pid/host/start line in the lock file, or None when empty or unreadable."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: only a pid on this host can be checked."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _busy_message(directory: Path, path: Path, holder: dict | None, flock: bool) -> str:
    hint = "wait for it to finish, or choose another output"
    if not flock:
        hint += f" (this filesystem has no flock: delete {path} if that run has ended)"
    return f"output {directory} is in use by another run ({describe_holder(holder)}); {hint}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
