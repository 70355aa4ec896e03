"""Metrics: one JSON object per line in ``OUTPUT/metrics.jsonl``, the loss-curve PNG, and the
process's peak host memory that the metrics report."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def peak_host_bytes() -> int:
    """This process's peak resident memory so far, in bytes: on Linux the high-water mark of its own
    address space (``VmHWM``, which ``reset_peak_host`` restarts), elsewhere ``ru_maxrss`` (KiB;
    bytes on macOS). (Linux's ``ru_maxrss`` also keeps the peak of the process image before
    ``exec``, a fork of the parent: under pytest, the parent's size.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_host() -> bool:
    """Start ``peak_host_bytes`` afresh from the current resident size (Linux: ``/proc/self/clear_refs``
    resets ``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (main process only) and keeps them in memory.

    ``trackers`` (set by the loop, main process only): every record written is also handed to its
    ``write(record)``, so the experiment trackers get each metric at the same step as the file."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled, self.records = Path(path), enabled, []
        self.trackers = None
        if resume_step is not None and self.path.exists():
            # Records after the checkpoint will be recomputed by the resumed run: drop them.
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= resume_step and record.get("event") != "end":
                    self.records.append(record)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, **record) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.write(record)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if key in r]
        return [s for s, _ in points], [v for _, v in points]


def plot_losses(log: MetricsLog, path: Path, title: str = "") -> None:
    """Train loss per step and eval loss at each evaluation, to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = log.series("loss")
    if steps:
        ax.plot(steps, losses, label="train loss", linewidth=1)
    steps, losses = log.series("eval_loss")
    if steps:
        ax.plot(steps, losses, "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
