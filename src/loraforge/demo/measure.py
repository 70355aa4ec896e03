"""Measurements for the demo's table: peak memory of a block of code, sizes on disk, table text.

Peak memory on CPU: PyTorch keeps no allocator statistics for CPU tensors, so we watch the
process's resident set size (``/proc/self/statm``) from a background thread every few
milliseconds and report ``peak RSS during the block − RSS just before it``. Freed heap is handed
back to the OS first (``malloc_trim``) so that memory left over from an earlier run is not reused
silently and hidden from the next one. On CUDA the allocator's own peak counter is used.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, the measure is just rougher
        pass


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak`` = bytes above the starting level."""

    def __init__(self, interval_s: float = 0.005, device: str = "cpu"):
        self.interval_s = interval_s
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._max = rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, rss_bytes())
        self.peak = self._max - self._start


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one 'l' or 'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return " | ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)
        )

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])
