"""``loraforge compare``: every method trained on the demo task, measured, in one table."""

from __future__ import annotations

import json

import pytest

from loraforge.demo import compare


def test_compare_table_and_reuse(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--methods", "lora,lora-merged", "--seeds", "2", "--steps", "3", "--output", str(out)]
    argv += ["--latency-reps", "1", "--latency-tokens", "2"]
    assert compare.main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    lora, merged = summary["rows"]["lora"], summary["rows"]["lora-merged"]
    assert len(lora) == 2 and lora[0]["eval_loss"] != lora[1]["eval_loss"]  # two seeds, two runs
    # the merged row is the same trained adapter, measured merged
    assert [r["eval_loss"] for r in merged] == [r["eval_loss"] for r in lora]
    assert lora[0]["trainable_params"] == 16384 and lora[0]["context_tokens"] == 0
    assert all(r["ms_per_token_b1"] > 0 and r["vs_base_b32"] > 0 for r in lora + merged)
    table = (out / "compare.md").read_text()
    assert "lora-merged" in table and " ± " in table
    capsys.readouterr()
    assert compare.main(argv) == 0  # finished runs are reused, not trained again
    assert "training" not in capsys.readouterr().out


def test_compare_refuses_unknown_methods(capsys):
    assert compare.main(["--methods", "lora,adalora"]) == 2
    assert "unknown method(s) ['adalora']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--seeds"])
