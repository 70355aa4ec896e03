"""`loraforge demo --base smollm2`: the pure logic (settings, data, bars, names) without a model, and
one end-to-end run of the real-model path in a reduced configuration (SmolLM2-135M-Instruct, a few
steps, a few questions) that checks the table, the bars, the outputs, and that training changed
what the model says. `loraforge chat --base smollm2` finds that run's characters.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loraforge.demo import data, smollm2
from loraforge.demo.runs import FULL, Settings, data_files, eval_subset


# -- pure logic ----------------------------------------------------------------------------------------
def test_names_that_select_the_real_model():
    for name in ("smollm2", "builtin:smollm2", "builtin:smollm2-135m-instruct", "smollm2-135m-instruct"):
        assert smollm2.is_smollm2(name)
    for name in (None, "", "runs/base", "builtin:tiny-llama", "smollm3"):
        assert not smollm2.is_smollm2(name)


def test_flourish_first_opens_the_answer_and_is_off_for_the_tiny_demo():
    p = data.PERSONAS["pirate"]
    args = (p, "Snow is white.", "Arr, matey!", "Savvy?")
    assert data.styled(*args) == "Snow is white. Arr, matey! Savvy?"
    assert data.styled(*args, True) == "Arr, matey! Snow is white. Savvy?"
    assert not FULL.flourish_first and smollm2.SMOLLM2.flourish_first
    rows = data.persona_dataset("bard", "train", 3, flourish_first=True)
    flourishes = data.PERSONAS["bard"].flourishes
    assert all(r["messages"][1]["content"].startswith(flourishes) for r in rows)


def test_eval_subset_rotates_the_phrasings_and_keeps_everything_by_default():
    rows = data.persona_dataset("butler", "eval-all", 2)
    per = len(data.PERSONAS["butler"].flourishes) * len(data.PERSONAS["butler"].closers)
    n_facts = len(data.split_facts()[1])
    assert eval_subset(rows, "butler", FULL) == rows  # the tiny demo's eval set is untouched
    one = eval_subset(rows, "butler", replace(FULL, eval_phrasings=1))
    assert len(one) == n_facts + 2
    # question q keeps phrasing q mod P: over the questions every phrasing is used
    assert [rows.index(r) % per for r in one] == [q % per for q in range(n_facts + 2)]
    cut = eval_subset(rows, "butler", replace(FULL, eval_phrasings=2, n_eval_facts=3))
    questions = [r["messages"][0]["content"] for r in cut]
    held = [f.question for f in data.split_facts()[1]]
    assert questions[:6] == [held[0], held[0], held[1], held[1], held[2], held[2]]
    assert len(cut) == 2 * (3 + 2)  # three facts and the two reading questions, two phrasings each


def test_out_of_training_questions_are_in_no_training_file(tmp_path):
    """The knowledge-kept bar is only honest if no character ever saw these questions or facts."""
    from loraforge.demo.scoring import has

    for c in data.PERSONAS:
        train = data_files(tmp_path, c, smollm2.SMOLLM2)["train"].read_text()
        for question, keywords in smollm2.WORLD:
            assert question not in train
            assert not any(has(train, k) for k in keywords), (c, keywords)


def _rows(style=1.0, content=0.5, base_content=0.5, qlora_loss=1.01):
    rows = []
    for c in ("pirate", "butler"):
        rows.append({"character": c, "method": "base", "style": 0.0, "content": base_content})
        rows.append(
            {
                "character": c,
                "method": "lora",
                "style": style,
                "content": content,
                "trainable_params": 10,
                "total_params": 1000,
                "size_bytes": 100,
                "eval_loss": 1.0,
            }
        )
    rows.append(
        {"character": "pirate", "method": "qlora", "style": 1.0, "content": 0.5, "eval_loss": qlora_loss}
    )
    return rows


def _world(base, pirate, butler, styled=True):
    n = len(base)
    return {
        "right": {"base": base, "pirate": pirate, "butler": butler},
        "styled": {"base": [False] * n, "pirate": [styled] * n, "butler": [styled] * n},
    }


def _bars(rows, world):
    s = Settings(characters=("pirate", "butler"))
    return {b["name"]: b for b in smollm2.quality_bars(s, rows, world, base_size=100_000)}


def test_bars_content_is_one_sided_and_world_counts_only_what_the_base_knows():
    world = _world([True, True, True, True, False], [True, True, True, False, True], [True] * 5)
    bars = _bars(_rows(content=0.9, base_content=0.5), world)  # answering more right is not a loss
    assert bars["pirate: content kept"]["ok"]
    assert not _bars(_rows(content=0.4, base_content=0.5), world)["pirate: content kept"]["ok"]
    # pirate: 3 of the 4 questions the base knows (its right answer to the 5th does not count)
    assert bars["pirate: knowledge kept (out-of-training questions)"]["ok"]
    assert "3 of the 4" in bars["pirate: knowledge kept (out-of-training questions)"]["detail"]
    world = _world([True] * 4, [True, True, False, False], [True] * 4)
    assert not _bars(_rows(), world)["pirate: knowledge kept (out-of-training questions)"]["ok"]
    # right but not in character does not count
    world = _world([True] * 4, [True] * 4, [True] * 4, styled=False)
    assert not _bars(_rows(), world)["butler: knowledge kept (out-of-training questions)"]["ok"]
    assert not _bars(_rows(style=0.8), world)["pirate: style"]["ok"]
    # without a full fine-tune the adapter is compared with the base's checkpoint size
    assert "of a full checkpoint" in bars["adapter file vs full checkpoint"]["detail"]
    assert bars["QLoRA vs LoRA eval loss"]["ok"]  # +1% (at most 2% higher)
    # one-sided: a QLoRA run that ends lower than LoRA loses nothing; 3% higher does
    assert _bars(_rows(qlora_loss=0.94), world)["QLoRA vs LoRA eval loss"]["ok"]
    assert not _bars(_rows(qlora_loss=1.03), world)["QLoRA vs LoRA eval loss"]["ok"]
    assert "LoRA vs full fine-tune eval loss" not in bars


def test_chat_base_smollm2_reads_the_smollm2_demo_dir(tmp_path, monkeypatch, smollm2_dir):
    from loraforge.demo import chat

    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "runs" / "demo-smollm2"
    (demo / "pirate" / "lora" / "adapter").mkdir(parents=True)
    (demo / "pirate" / "lora" / "adapter" / "adapter_config.json").write_text("{}")
    summary = {"base": smollm2.BASE, "settings": {"characters": ["pirate"]}}
    (demo / "results.json").write_text(json.dumps(summary))
    base, adapters = chat.resolve(chat.parse_args(["--base", "smollm2"]))
    assert str(base) == str(smollm2_dir)  # the builtin name, resolved to its converted directory
    assert adapters == {"pirate": Path("runs/demo-smollm2/pirate/lora/adapter")}
    # without --base the tiny demo's directory stays the default
    with pytest.raises(chat.ChatError, match="runs/demo/results.json"):
        chat.resolve(chat.parse_args([]))


# -- the real model, end to end ----------------------------------------------------------------------
# Every knob at its smallest that still trains: one character, 4 steps on the top 2 blocks, 3
# held-out facts, 8 new tokens. The rate is high so that 4 steps change the greedy answers.
REDUCED = replace(
    smollm2.SMOLLM2,
    characters=("pirate",),
    compare_on="pirate",
    lora_layers=(28, 29),
    steps=4,
    batch_size=4,
    lr_lora=1e-2,
    warmup_steps=0,
    n_train_reading=0,
    n_eval_facts=3,
    max_new_tokens=8,
    save_every=0,
)


@pytest.fixture(scope="module")
def reduced(smollm2_dir, tmp_path_factory):
    from loraforge.demo.app import parse_args

    out = tmp_path_factory.mktemp("smollm2") / "run"
    args = parse_args(["--base", "smollm2", "--output", str(out)])
    lines: list[str] = []
    assert smollm2.run(args, lines.append, s=REDUCED) == 0
    return out, json.loads((out / "results.json").read_text()), "\n".join(lines)


@pytest.mark.slow
def test_reduced_run_writes_the_table_bars_and_outputs(reduced, smollm2_dir):
    out, summary, text = reduced
    assert summary["base"] == smollm2.BASE and summary["base_dir"] == str(smollm2_dir)
    methods = [(r["character"], r["method"]) for r in summary["rows"]]
    assert methods == [("pirate", m) for m in ("base", "base-nf4", "lora", "qlora")]
    lora = next(r for r in summary["rows"] if r["method"] == "lora")
    assert lora["trainable_params"] == 2 * 8 * (576 * 6 + 192 * 2 + 3 * (576 + 1536))  # 2 blocks, r 8
    assert lora["total_params"] > 134_000_000 and lora["size_bytes"] < 0.05 * 538_000_000
    names = [b["name"] for b in summary["quality_bars"]]
    assert names == [
        "pirate: style",
        "pirate: content kept",
        "pirate: knowledge kept (out-of-training questions)",
        "adapter file vs full checkpoint",
        "QLoRA vs LoRA eval loss",
        "LoRA trainable parameters",
    ]
    for header in ("trainable params", "style", "content", "QLoRA (NF4 base)", "the model's knowledge"):
        assert header in text
    assert "Q: Who wrote Romeo and Juliet?" in text and "time per phase:" in text
    assert set(summary["phases_s"]) >= {"base model", "train pirate/lora", "train pirate/qlora", "scoring"}
    assert (out / "pirate" / "lora" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "answers.jsonl").exists() and (out / "loss.png").exists()
    assert summary["switching"]["max_abs_weight_change"] == 0.0


@pytest.mark.slow
def test_training_changed_the_answers_and_lowered_the_loss(reduced):
    _, summary, _ = reduced
    world = summary["world"]
    assert len(world["answers"]["pirate"]) == len(smollm2.WORLD)
    assert world["answers"]["pirate"] != world["answers"]["base"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["lora"]["eval_loss"] < rows["base"]["eval_loss"]
    assert rows["qlora"]["eval_loss"] < rows["base-nf4"]["eval_loss"]


@pytest.mark.slow
def test_chat_serves_the_smollm2_demo_characters(reduced, smollm2_dir):
    from loraforge.demo import chat

    out, _, _ = reduced
    base, adapters = chat.resolve(chat.parse_args(["--base", "smollm2", "--demo", str(out)]))
    assert str(base) == str(smollm2_dir)
    assert adapters == {"pirate": out / "pirate" / "lora" / "adapter"}
    # the demo dir alone is enough: its results.json names the builtin base
    assert chat.resolve(chat.parse_args(["--demo", str(out)]))[0] == base


def test_settings_for_the_real_model_and_what_it_refuses():
    from loraforge.demo.app import parse_args
    from loraforge.demo.runs import DemoError

    s = smollm2.settings_for(parse_args(["--base", "smollm2", "--characters", "bard,pirate", "--steps", "7"]))
    assert s.characters == ("bard", "pirate") and s.compare_on == "bard" and s.steps == 7
    assert s.lora_layers == tuple(range(18, 30)) and s.flourish_first
    quick = smollm2.settings_for(parse_args(["--base", "smollm2", "--quick"]))
    assert quick.steps == smollm2.SMOLLM2_QUICK.steps
    for extra in (["--seeds", "2"], ["--rebuild-base"]):
        with pytest.raises(DemoError):
            smollm2.settings_for(parse_args(["--base", "smollm2", *extra]))
    text = "\n".join(smollm2.describe(s, full_ft=False))
    assert "rank 8" in text and "blocks 18-29 of 30" in text and "--full-ft" in text
