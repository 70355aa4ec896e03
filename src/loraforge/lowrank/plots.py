"""PNG plots for ``loraforge analyze`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

MAX_HEATMAPS = 8
MAX_LEGEND = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # (files only: never open a window, work without a display)
    import matplotlib.pyplot as plt

    return plt


def file_name(layer: str) -> str:
    """``phi_<layer>.png`` with the path's dots kept and anything unsafe in a file name as ``_``."""
    return "phi_" + re.sub(r"[^A-Za-z0-9._-]", "_", layer) + ".png"


def plot_analysis(result: dict, out: Path, all_maps: bool = True) -> list[Path]:
    """Write ``singular_values.png`` and, when ``result`` has φ grids, one heat map per layer
    (``all_maps=False``: :data:`MAX_HEATMAPS` layers evenly spaced through the list). Returns the paths."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = [_singular_values(plt, result["layers"], out / "singular_values.png")]
    sim = result.get("similarity", {})
    names = list(sim)
    if not all_maps and len(names) > MAX_HEATMAPS:
        step = (len(names) - 1) / (MAX_HEATMAPS - 1)
        names = [names[round(i * step)] for i in range(MAX_HEATMAPS)]
    for name in names:
        written.append(_heatmap(plt, name, sim[name], result.get("other", "other"), out / file_name(name)))
    return written


def _singular_values(plt, layers: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in layers.items():
        sv = [s for s in v["singular_values"] if s > 0]
        if sv:
            ax.plot(range(1, len(sv) + 1), sv, marker="o", markersize=3, linewidth=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value of s·B·A")
    ax.set_title(f"singular values, {len(layers)} LoRA layers")
    if 0 < len(layers) <= MAX_LEGEND:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heatmap(plt, name: str, sim: dict, other: str, path: Path) -> Path:
    """φ(i, j) with i (this adapter's top-i directions) down and j (the other's) across."""
    phi = sim["phi"]
    r1, r2 = len(phi), len(phi[0])
    fig, ax = plt.subplots(figsize=(min(10, 2.5 + 0.35 * r2), min(8, 2 + 0.35 * r1)))
    im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(r2), [str(j + 1) for j in range(r2)], fontsize=6)
    ax.set_yticks(range(r1), [str(i + 1) for i in range(r1)], fontsize=6)
    ax.set_xlabel(f"j (top-j directions of {Path(other).name or other})")
    ax.set_ylabel("i (top-i directions)")
    ax.set_title(
        f"φ(i, j) {name}\nφ(1,1) = {sim['phi_1_1']:.3f}, random {sim['random']['phi_1_1']:.3f}", fontsize=8
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
