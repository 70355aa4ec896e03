"""The demo's table, quality bars, switching printout and output files."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import dir_size, format_bytes
from .measure import format_table
from .runs import Settings, atomic_write_text

METHOD_LABEL = {
    "base": "base (fp32)",
    "base-nf4": "base (NF4 4-bit)",
    "lora": "LoRA",
    "qlora": "QLoRA (NF4 base)",
    "full": "full fine-tune",
}


def collect_rows(
    s: Settings, base_dir: Path, results: dict, scores: dict, nf4_bytes: int | None = None
) -> list[dict]:
    """One dict per table row: base and trained models, per character."""
    base_size = dir_size(base_dir, "*.safetensors")
    rows = []
    for c in s.characters:
        order = ["base", "lora"]
        if c == s.compare_on:  # the runs that did not happen have no scores and are skipped
            order = ["base", "base-nf4", "lora", "qlora", "full"]
        for kind in order:
            sc = scores.get(f"{c}/{kind}")
            if sc is None:
                continue
            row = {"character": c, "method": kind, "style": sc["style"], "content": sc["content"]}
            if kind in ("base", "base-nf4"):
                run = results[(c, "lora" if kind == "base" else "qlora")]
                row |= {
                    "trainable_params": 0,
                    "total_params": run["total_params"] if kind == "base" else None,
                    "size_bytes": base_size if kind == "base" else nf4_bytes,
                    "peak_mem_bytes": None,
                    "train_time_s": None,
                    # step-0 eval of the run: B = 0, so the adapter adds nothing yet
                    "eval_loss": run["initial_eval_loss"],
                }
            else:
                run = results[(c, kind)]
                row |= {
                    "trainable_params": run["trainable_params"],
                    "total_params": run["total_params"],
                    "size_bytes": run["size_bytes"],
                    "peak_mem_bytes": run["peak_mem_bytes"],
                    "train_time_s": run["train_time_s"],
                    "eval_loss": run["final_eval_loss"],
                }
            rows.append(row)
    return rows


def params_cell(row: dict) -> str:
    """The table's "trainable params" cell: "16,384 (1.64%)", or "0" for a base."""
    n, total = row["trainable_params"], row["total_params"]
    if not n:
        return "0"
    return f"{n:,} ({100 * n / total:.2f}%)" if total else f"{n:,}"


# The demo table's columns (README: "The demo: a persona chatbot on one base model").
HEADERS = [
    "character",
    "method",
    "trainable params",
    "size on disk",
    "peak memory",
    "train time",
    "eval loss",
    "style",
    "content",
]


def render_table(rows: list[dict]) -> str:
    headers = HEADERS
    body = []
    for r in rows:
        body.append(
            [
                r["character"],
                METHOD_LABEL[r["method"]],
                params_cell(r),
                format_bytes(r["size_bytes"]) if r["size_bytes"] is not None else "-",
                format_bytes(r["peak_mem_bytes"]) if r["peak_mem_bytes"] is not None else "-",
                f"{r['train_time_s']:.1f} s" if r["train_time_s"] is not None else "-",
                f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-",
                f"{r['style']:.2f}",
                f"{r['content']:.2f}",
            ]
        )
    note = (
        "size on disk: adapter_model.safetensors (LoRA/QLoRA) or model.safetensors (base, full); "
        "peak memory: process RSS above its level before the run;\n"
        "eval loss: mean cross-entropy per answer token on the held-out questions; style / content: "
        "share of greedy answers in character / still right."
    )
    return format_table(headers, body, "llrrrrrrr") + "\n" + note


def _find(rows, c, m):
    return next((r for r in rows if r["character"] == c and r["method"] == m), None)


def quality_bars(s: Settings, rows: list[dict]) -> list[dict]:
    """The issue's bars, each with a pass flag, the numbers behind it and its ``slack``: how far
    the measure is inside its limit (negative: outside), which ranks seeds from closest to safest."""
    bars = []
    for c in s.characters:
        base, lora = _find(rows, c, "base"), _find(rows, c, "lora")
        bars.append(style_bar(c, lora, base))
        diff = abs(lora["content"] - base["content"])
        bars.append(
            {
                "name": f"{c}: content kept",
                "ok": diff <= 0.05 + 1e-9,
                "slack": 0.05 - diff,
                "detail": f"LoRA {lora['content']:.2f} vs base {base['content']:.2f} "
                f"(|diff| {diff:.2f} <= 0.05)",
            }
        )
    c = s.compare_on
    lora, full, qlora = _find(rows, c, "lora"), _find(rows, c, "full"), _find(rows, c, "qlora")
    if full:
        bars.append(loss_bar("LoRA vs full fine-tune eval loss", lora, full, 0.05))
        bars.append(
            {
                "name": "adapter file vs full checkpoint",
                "ok": lora["size_bytes"] < 0.05 * full["size_bytes"],
                "slack": 0.05 - lora["size_bytes"] / full["size_bytes"],
                "detail": f"{format_bytes(lora['size_bytes'])} = "
                f"{100 * lora['size_bytes'] / full['size_bytes']:.2f}% "
                f"of {format_bytes(full['size_bytes'])} (< 5%)",
            }
        )
    if qlora:
        bars.append(loss_bar("QLoRA vs LoRA eval loss", qlora, lora, 0.02))
    bars.append(trainable_bar(lora))
    return bars


def style_bar(c: str, lora: dict, base: dict, lo: float = 0.9, hi: float = 0.1) -> dict:
    """Character ``c``'s LoRA answers carry its style (share >= ``lo``) and the base's do not (<= ``hi``)."""
    return {
        "name": f"{c}: style",
        "ok": lora["style"] >= lo and base["style"] <= hi,
        "slack": min(lora["style"] - lo, hi - base["style"]),
        "detail": f"LoRA {lora['style']:.2f} >= {lo:.2f}, base {base['style']:.2f} <= {hi:.2f}",
    }


def loss_bar(name: str, row: dict, ref: dict, limit: float, one_sided: bool = False) -> dict:
    """``row``'s eval loss within ``limit`` (relative) of ``ref``'s; ``one_sided``: at most that
    much higher (ending lower is no loss)."""
    rel = row["eval_loss"] / ref["eval_loss"] - 1
    off = rel if one_sided else abs(rel)
    what = f"at most {100 * limit:g}% higher" if one_sided else f"within {100 * limit:g}%"
    return {
        "name": name,
        "ok": off <= limit,
        "slack": limit - off,
        "detail": f"{row['eval_loss']:.4f} vs {ref['eval_loss']:.4f} ({100 * rel:+.2f}%, {what})",
    }


def trainable_bar(lora: dict) -> dict:
    share = lora["trainable_params"] / lora["total_params"]
    return {
        "name": "LoRA trainable parameters",
        "ok": share < 0.02,
        "slack": 0.02 - share,
        "detail": f"{lora['trainable_params']:,} of {lora['total_params']:,} = {100 * share:.2f}% (< 2%)",
    }


def print_switching(sw: dict, s: Settings, questions: list[str], say) -> None:
    names = ["base", *s.characters]
    width = max(len(n) for n in names)
    say("merge / unmerge (W += s·B·A, then W -= s·B·A):")
    for qi, q in enumerate(questions):
        say(f"  Q: {q}")
        for n in names:
            say(f"    {n:>{width}}: {sw['answers'][n][qi]}")
    timing = ", ".join(f"{c} {sw['merge_ms'][c]:.2f} / {sw['unmerge_ms'][c]:.2f} ms" for c in s.characters)
    say(f"  switch time (merge / unmerge): {timing}")
    drift = sw["max_abs_weight_change"]
    same = " (bit for bit the original)" if drift == 0 else ""
    say(f"  base weights after all switches: max |W - W0| = {drift:.2e}{same}")
    say(
        f"mixed batch ({len(sw['mixed_names'])} rows, one adapter per row, one generate call, "
        f"{sw['mixed_ms']:.0f} ms):"
    )
    say(f"  Q: {questions[1]}")
    for n, a in zip(sw["mixed_names"], sw["mixed_answers"]):
        say(f"    {n:>{max(width, 8)}}: {a}")
    say(f"  same answers as one adapter at a time: {'yes' if sw['mixed_matches_merged'] else 'no'}")


def plot_runs(out: Path, results: dict) -> Path:
    """All runs' train loss (and eval points) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for (c, method), res in results.items():
        recs = [
            json.loads(x)
            for x in (Path(res["weights"]).parent / "metrics.jsonl").read_text().splitlines()
            if x
        ]
        steps = [r["step"] for r in recs if "loss" in r]
        losses = [r["loss"] for r in recs if "loss" in r]
        line = ax.plot(steps, losses, linewidth=1, alpha=0.8, label=f"{c} {METHOD_LABEL[method]} (train)")[0]
        ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o:", color=line.get_color(), markersize=5, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / answer token)")
    ax.set_title("loraforge demo: train loss (lines) and held-out eval loss (dots) per run")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(out: Path, summary: dict, results: dict) -> dict:
    """``results.json`` (everything), ``metrics.jsonl`` (one record per row / bar), ``loss.png``."""
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = [{"kind": "row", **r} for r in summary["rows"]]
    lines += [{"kind": "quality_bar", **b} for b in summary["quality_bars"]]
    sw = summary["switching"]
    lines.append(
        {
            "kind": "switching",
            "merge_ms": sw["merge_ms"],
            "unmerge_ms": sw["unmerge_ms"],
            "max_abs_weight_change": sw["max_abs_weight_change"],
            "mixed_ms": sw["mixed_ms"],
            "mixed_matches_merged": sw["mixed_matches_merged"],
        }
    )
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    return {
        "results": out / "results.json",
        "metrics": out / "metrics.jsonl",
        "plot": plot_runs(out, results),
    }
