"""What a training run prints, where it is, and how it stops: the console (lines on stdout, the
progress bar on stderr, both best effort), the phase named in a Ctrl-C or failed-write message,
and SIGINT/SIGTERM turned into "save a checkpoint after this step"."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import sys
import threading
from pathlib import Path

from tqdm.auto import tqdm

from . import checkpoint as ckpt


@dataclasses.dataclass
class Phase:
    """Where the run is, for the message of a Ctrl-C or a failed write."""

    name: str = "start-up"  # then "training", then "writing the results"
    step: int = 0
    trackers: object = None  # the experiment trackers, ended by ``train`` whatever happens

    def interrupted(self, out: Path) -> str:
        if self.name == "start-up":
            return "Ctrl-C during start-up, before the first step: nothing was saved"
        newest = ckpt.latest_checkpoint(out)
        return f"Ctrl-C at step {self.step} ({self.name}); newest complete checkpoint: {newest or 'none'}"


class Console:
    """What the run prints: lines on stdout, the progress bar on stderr.

    Printing is best effort. When a stream's reader has gone (``loraforge train ... | tee log``:
    Ctrl-C reaches tee too, and it exits first), a write fails with EPIPE; that stream is then
    pointed at /dev/null and the run goes on, so saving never depends on it (nor does the
    interpreter's flush of stdout at exit). Lines are flushed at once so such an error surfaces
    here, not at some later write.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def say(self, text: str) -> None:
        if self.enabled:
            self._guard(lambda: (tqdm.write(text), sys.stdout.flush()))

    def open_bar(self, total: int, initial: int, show: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", disable=not (self.enabled and show)
        )

    def advance(self, **postfix) -> None:
        self._guard(lambda: (self.bar.set_postfix(**postfix, refresh=False), self.bar.update(1)))

    def close_bar(self) -> None:
        if self.bar is not None:
            self._guard(self.bar.close)

    @staticmethod
    def _guard(write) -> None:
        try:
            write()
        except (OSError, ValueError):  # ValueError: "I/O operation on closed file"
            for stream in (sys.stdout, sys.stderr):
                _silence_if_broken(stream)


def _silence_if_broken(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null if it is a pipe whose reader has gone."""
    try:
        fd = stream.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0)):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
    except (OSError, ValueError, AttributeError):  # no fileno (a notebook), no poll (Windows)
        pass


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (checkpoint first).

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers can only be installed from the
    main thread; elsewhere (e.g. a notebook worker thread) Ctrl-C keeps its default meaning.
    The handler only sets a flag and prints through the console, which never raises: an
    exception here would surface in whatever line the loop was running, before the save.
    """

    def __init__(self, console: Console):
        self.requested = False
        self.console = console
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: quit at once, without saving the current step")
        self.requested = True
        self.console.say(
            f"{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to quit now)"
        )

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
