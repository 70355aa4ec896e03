"""Smoke test of the benchmark harness (``python -m benchmarks.run``) on a tiny model.

It checks that every benchmark group runs end to end — loraforge and its peers build, compute
the same losses / logits (the groups assert that themselves) and get timed — and that the table
and the JSON come out; the figures of a tiny model mean nothing and are not checked. The
peak-memory group (a fresh process per contender) is left to the real runs: its process start
alone takes longer than this test may.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder next to `src`, not installed

pytest.importorskip("peft")


def _groups() -> list[str]:
    groups = ["lora_step", "inference", "mixed", "switch", "bound"]
    import loraforge.quant

    if hasattr(loraforge.quant, "quantize") and importlib.util.find_spec("bitsandbytes"):
        groups += ["qlora_step", "linear4bit"]
    if (ROOT / "benchmarks" / "bench_quant.py").exists():
        groups.append("nf4")
    return groups


def test_harness_runs_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import run

    out = tmp_path / "bench.json"
    groups = _groups()
    code = run.main(["--size", "tiny", "--only", ",".join(groups), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| benchmark" in printed and "met?" in printed and "total runtime" in printed
    result = json.loads(out.read_text())
    assert not result["errors"]
    seen = {row["group"] for row in result["rows"]}
    assert seen == set(groups)
    for row in result["rows"]:
        assert row["ours"] > 0 and row["peer"] > 0 and math.isfinite(row["ratio"]), row


def test_unknown_group_is_an_error():
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])
