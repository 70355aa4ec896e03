"""The demo over several seeds: one table whose cells are mean ± spread, and every bar per seed.

A seed changes the LoRA initialisation (A), the order of the training batches and which flourish
and closer each training answer draws (``data.persona_dataset``); the base model and the
held-out questions stay the same. Each cell of the table is ``mean ± s`` over the seeds, ``s``
the sample standard deviation (n − 1 in the denominator); trainable parameters and sizes on
disk do not depend on the seed and are printed once. A quality bar passes only when it holds
for *every* seed; its line names the seed that came closest to the limit.
"""

from __future__ import annotations

import statistics

from ..files import format_bytes
from .measure import format_table
from .report import HEADERS, METHOD_LABEL, params_cell

MEASURED = ("trainable_params", "total_params", "size_bytes", "peak_mem_bytes", "train_time_s", "eval_loss")
MEASURED += ("style", "content")


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def aggregate_rows(per_seed: list[list[dict]]) -> list[dict]:
    """One row per (character, method) of the first seed; each measure as mean/std/values."""
    out = []
    for first in per_seed[0]:
        key = (first["character"], first["method"])
        same = [next(r for r in rows if (r["character"], r["method"]) == key) for rows in per_seed]
        row = {"character": key[0], "method": key[1]}
        for field in MEASURED:
            values = [r[field] for r in same]
            row[field] = None if any(v is None for v in values) else _spread(values)
        out.append(row)
    return out


def _bytes(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["std"] == 0:
        return format_bytes(cell["mean"])
    number, unit = format_bytes(cell["mean"]).split()
    scale = float(number) / cell["mean"] if cell["mean"] else 1.0  # the unit format_bytes chose
    digits = len(number.partition(".")[2])
    return f"{number} ± {cell['std'] * scale:.{digits}f} {unit}"


def _number(cell: dict | None, digits: int, unit: str = "") -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}{unit}"


def render_seeds_table(rows: list[dict], seeds: list[int]) -> str:
    """The demo's table with ``mean ± s`` cells over ``seeds``."""
    headers = HEADERS
    body = []
    for r in rows:
        if r["trainable_params"]["std"] == 0 and (r["total_params"] is None or r["total_params"]["std"] == 0):
            params = params_cell(
                {
                    "trainable_params": r["trainable_params"]["mean"],
                    "total_params": r["total_params"] and r["total_params"]["mean"],
                }
            ).replace(".0 (", " (")
        else:
            params = _number(r["trainable_params"], 0)
        body.append(
            [
                r["character"],
                METHOD_LABEL[r["method"]],
                params,
                _bytes(r["size_bytes"]),
                _bytes(r["peak_mem_bytes"]),
                _number(r["train_time_s"], 1, " s"),
                _number(r["eval_loss"], 4),
                _number(r["style"], 2),
                _number(r["content"], 2),
            ]
        )
    note = (
        f"mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
        "columns as in the single-seed table."
    )
    return format_table(headers, body, "llrrrrrrr") + "\n" + note


def aggregate_bars(per_seed_bars: list[list[dict]], seeds: list[int]) -> list[dict]:
    """Each bar once: ``ok`` when it holds for every seed; ``detail`` names the closest seed."""
    out = []
    for first in per_seed_bars[0]:
        name = first["name"]
        items = [
            (seed, next(b for b in bars if b["name"] == name)) for seed, bars in zip(seeds, per_seed_bars)
        ]
        failed = [seed for seed, b in items if not b["ok"]]
        closest_seed, closest = min(items, key=lambda item: item[1]["slack"])
        passed = f"{len(items) - len(failed)}/{len(items)} seeds"
        detail = f"{passed}; closest, seed {closest_seed}: {closest['detail']}"
        if failed:
            detail += f"; failed for seed {', '.join(map(str, failed))}"
        out.append(
            {
                "name": name,
                "ok": not failed,
                "failed_seeds": failed,
                "closest_seed": closest_seed,
                "detail": detail,
            }
        )
    return out
