"""`loraforge demo --quick`: the shortened run meets the issue's quality bars, reuses finished
runs, never overwrites a finished adapter silently, and gives the same output for a fixed seed.

One quick demo (three LoRA characters, a full fine-tune and a QLoRA run) is shared by the module.
"""

from __future__ import annotations

import json

import pytest

from loraforge.demo import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["--quick", "--output", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _row(summary, character, method):
    return next(r for r in summary["rows"] if r["character"] == character and r["method"] == method)


def test_every_quality_bar_is_met(quick):
    _, summary = quick
    failed = [f"{b['name']}: {b['detail']}" for b in summary["quality_bars"] if not b["ok"]]
    assert not failed, failed
    names = {b["name"] for b in summary["quality_bars"]}
    assert {
        "LoRA vs full fine-tune eval loss",
        "QLoRA vs LoRA eval loss",
        "adapter file vs full checkpoint",
    } <= names


def test_characters_sound_different_and_stay_right(quick):
    _, summary = quick
    chars = summary["settings"]["characters"]
    assert len(chars) >= 3
    for c in chars:
        base, lora = _row(summary, c, "base"), _row(summary, c, "lora")
        assert lora["style"] >= 0.9 and base["style"] <= 0.1
        assert abs(lora["content"] - base["content"]) <= 0.05
        assert base["content"] >= 0.8  # the base knows the answers to begin with
        assert lora["eval_loss"] < base["eval_loss"]
    c = summary["settings"]["compare_on"]
    lora, full, qlora = _row(summary, c, "lora"), _row(summary, c, "full"), _row(summary, c, "qlora")
    assert abs(lora["eval_loss"] / full["eval_loss"] - 1) <= 0.05
    assert abs(qlora["eval_loss"] / lora["eval_loss"] - 1) <= 0.02
    assert lora["trainable_params"] < 0.02 * lora["total_params"]
    assert lora["size_bytes"] < 0.05 * full["size_bytes"]
    assert all(r["peak_mem_bytes"] > 0 for r in (lora, full, qlora))


def test_outputs_and_switching(quick):
    out, summary = quick
    for c in summary["settings"]["characters"]:
        adapter = out / c / "lora" / "adapter"
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
        assert (out / c / "lora" / "metrics.jsonl").exists() and (out / c / "lora" / "loss.png").exists()
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "metrics.jsonl").exists()
    sw = summary["switching"]
    assert sw["max_abs_weight_change"] == 0.0  # merge/unmerge leaves the base bit for bit as it was
    assert sw["mixed_matches_merged"]
    assert set(sw["merge_ms"]) == set(summary["settings"]["characters"])


def test_rerun_reuses_finished_runs(quick, capsys):
    out, summary = quick
    adapter = out / "pirate" / "lora" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--quick", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("reusing") == len(summary["settings"]["characters"]) + 2
    assert "training " not in text
    assert adapter.stat().st_mtime_ns == before
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == summary["rows"]  # same scores: greedy decoding is deterministic


def test_finished_adapter_is_never_overwritten_silently(quick, capsys):
    out, _ = quick
    adapter = out / "pirate" / "lora" / "adapter" / "adapter_model.safetensors"
    data = adapter.read_bytes()
    assert (
        main(["--quick", "--output", str(out), "--steps", "7", "--characters", "pirate", "--no-compare"]) == 2
    )
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--overwrite" in err and "steps" in err
    assert adapter.read_bytes() == data


def test_same_seed_same_adapter(quick, tmp_path):
    """A second, independent run with the same settings writes byte-identical adapter weights."""
    out, summary = quick
    other = tmp_path / "again"
    assert main(["--quick", "--output", str(other), "--characters", "pirate", "--no-compare"]) == 0
    a = (out / "pirate" / "lora" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (other / "pirate" / "lora" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    again = json.loads((other / "results.json").read_text())
    assert _row(again, "pirate", "lora")["style"] == _row(summary, "pirate", "lora")["style"]


def test_character_adapters_load_in_peft(quick):
    """The demo's adapters are ordinary PEFT adapters: peft loads one and gives our logits."""
    import torch
    from peft import PeftModel

    import loraforge as lf
    from loraforge.demo.app import SHIPPED_BASE
    from loraforge.demo.evaluate import load_base

    out, _ = quick
    adapter = out / "bard" / "lora" / "adapter"
    ours, tok = load_base(SHIPPED_BASE)
    lf.load_adapter(ours, adapter, adapter="bard")
    theirs = PeftModel.from_pretrained(load_base(SHIPPED_BASE)[0], adapter).eval()
    ids = tok("<|user|>What colour is snow?<|end|><|assistant|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
