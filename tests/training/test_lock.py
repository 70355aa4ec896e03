"""The output lock: one run per directory, held by real second processes; stale locks taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.training import lock as lock_mod
from loraforge.training.lock import LOCK_NAME, OutputLock, RunError

from .util import subprocess_env

# Takes the lock on argv[1], says so, then sleeps until killed. With "fork": a child inherits the
# descriptor (and so the flock), prints its pid, and the parent exits: an orphan keeps the lock.
HOLDER = """
import os, sys, time
from loraforge.training.lock import OutputLock
held = OutputLock(sys.argv[1])
if sys.argv[2:] == ["fork"]:
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""


def hold(directory: Path, *extra: str) -> subprocess.Popen:
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lock_mod.__file__).parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), *extra], env=env, stdout=subprocess.PIPE, text=True
    )
    return proc


def test_second_process_is_refused_then_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = hold(out)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunError) as err:
            OutputLock(out)
        message = str(err.value)
        assert message.startswith(f"output {out} is in use by another run (pid {proc.pid} on ")
        assert socket.gethostname() in message and "\n" not in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The kernel dropped the flock with the process; its file (with its pid) is still there.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    with OutputLock(out) as mine:
        assert mine.previous["pid"] == proc.pid
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunError, match=f"pid {os.getpid()}"):
            OutputLock(out)  # a second lock in this very process is refused too
    assert not (out / LOCK_NAME).exists()  # released: the file is gone, the directory stays
    assert out.is_dir()


def test_orphaned_child_holding_the_flock_is_a_stale_lock(tmp_path):
    out = tmp_path / "run"
    proc = hold(out, "fork")
    child = int(proc.stdout.readline())
    proc.wait(timeout=30)  # the holder named in the file has ended (and is reaped)
    try:
        os.kill(child, 0)  # the orphan still runs and still holds the flock on the old file
        with OutputLock(out) as mine:
            assert mine.previous["pid"] == proc.pid
            with pytest.raises(RunError, match="in use by another run"):
                OutputLock(out)
    finally:
        os.kill(child, signal.SIGKILL)


def test_without_flock_the_pid_file_is_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "_try_flock", lambda fd: None)  # e.g. an NFS mount without locks
    out = tmp_path / "run"
    out.mkdir()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    (out / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(RunError, match=f"delete {out / LOCK_NAME} if that run has ended"):
        OutputLock(out)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (out / LOCK_NAME).write_text(json.dumps({**live, "pid": proc.pid}))  # a pid that has ended
    with OutputLock(out) as mine:
        assert mine.previous["pid"] == proc.pid


def test_a_new_directory_is_removed_again_when_nothing_was_written(tmp_path):
    out = tmp_path / "a" / "b"
    OutputLock(out).release()
    assert not out.exists()


def test_unwritable_output_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"^output .*file/run: cannot write there \(Not a directory\)$"):
        OutputLock(tmp_path / "file" / "run")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_mod.os, "fsync", full)
    with pytest.raises(RunError, match=r"cannot write there \(No space left on device\)"):
        OutputLock(tmp_path / "full")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunError, match="cannot write there"):
            OutputLock(ro)
    finally:
        ro.chmod(0o755)


def test_a_file_removed_while_locking_is_not_trusted(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder released (and removed) it gets a
    flock on a file no one else will open: it must retry on the current file."""
    out = tmp_path / "run"
    holder = OutputLock(out)
    real, calls = lock_mod._try_flock, []

    def release_first(fd):
        if not calls:
            holder.release()  # between our open() and our flock()
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(lock_mod, "_try_flock", release_first)
    with OutputLock(out) as mine:
        assert len(calls) == 2  # the first flock was on the removed file
        assert lock_mod._same_file(mine._fd, out / LOCK_NAME)
