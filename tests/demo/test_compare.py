"""``loraforge compare``: every method trained on the demo task, measured, in one table."""

from __future__ import annotations

import json

import pytest

from loraforge.demo import compare

FAST = ["--steps", "2", "--latency-reps", "1", "--latency-tokens", "2"]


def test_every_method_in_one_table(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--seeds", "1", "--output", str(out), *FAST]) == 0
    rows = {name: runs[0] for name, runs in json.loads((out / "compare.json").read_text())["rows"].items()}
    assert list(rows) == list(compare.METHODS)
    # comparable budgets (IA3 has no size knob), as METHODS documents them
    assert rows["lora"]["trainable_params"] == 16384 and rows["prefix"]["trainable_params"] == 16384
    assert rows["prompt"]["trainable_params"] == 16384 and rows["ia3"]["trainable_params"] == 2560
    assert {n: r["context_tokens"] for n, r in rows.items() if r["context_tokens"]} == {
        "prefix": 16, "prompt": 128, "p_tuning": 16
    }  # fmt: skip
    # merged latency where the method merges, and only there
    merged = sorted(n for n, r in rows.items() if "vs_base_b32_merged" in r)
    assert merged == ["dora", "ia3", "lora"]
    assert all(r["ms_per_token_b1"] > 0 and r["vs_base_b32"] > 0 for r in rows.values())
    table = (out / "compare.md").read_text()
    assert "128 of 256" in table and "b32 merged" in table


def test_seeds_and_reuse(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--methods", "lora", "--seeds", "2", "--output", str(out), *FAST]
    assert compare.main(argv) == 0
    lora = json.loads((out / "compare.json").read_text())["rows"]["lora"]
    assert len(lora) == 2 and lora[0]["eval_loss"] != lora[1]["eval_loss"]  # two seeds, two runs
    assert " ± " in (out / "compare.md").read_text()
    capsys.readouterr()
    assert compare.main(argv) == 0  # finished runs are reused, not trained again
    assert "training" not in capsys.readouterr().out


def test_compare_refuses_unknown_methods(capsys):
    assert compare.main(["--methods", "lora,adalora"]) == 2
    assert "unknown method(s) ['adalora']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--seeds"])
