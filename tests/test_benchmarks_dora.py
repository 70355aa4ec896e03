"""Smoke test of the DoRA benchmark group (``python -m benchmarks.run --only dora_step``) on a tiny
model: the four steps build, loraforge's and PEFT's DoRA agree (the group checks loss and
gradients itself) and get timed. The figures of a tiny model mean nothing and are not checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder next to `src`, not installed

pytest.importorskip("peft")


def test_dora_group_runs_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import run

    out = tmp_path / "bench.json"
    code = run.main(["--size", "tiny", "--only", "dora_step", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert not result["errors"]
    rows = result["rows"]
    assert {row["group"] for row in rows} == {"dora_step"} and len(rows) == 3
    assert rows[0]["target"] == ["<=", 1.15] and "adapter grads differ" in rows[0]["note"]
    for row in rows:
        assert row["ours"] > 0 and row["peer"] > 0 and math.isfinite(row["ratio"]), row
