"""Data: formats, masking, chat templates, packing without leakage, bad rows, batch plans."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.training import DataError
from loraforge.training.config import DataSection
from loraforge.training.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE,
    BatchPlan,
    collate,
    encode_row,
    load_examples,
    pack,
)

from .util import write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def targets(tokenizer, example) -> str:
    """The text the labels ask the model to produce, in order."""
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_prompt_completion_masks_the_prompt(tokenizer):
    row = {"prompt": "What is 2 plus 2?\n", "completion": "2 plus 2 is 4."}
    ex, cut = encode_row(tokenizer, row, "prompt_completion", DataSection(train="x"))
    assert not cut
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert targets(tokenizer, ex) == "2 plus 2 is 4.</s>"
    # labels are the next token of the same example: label[t] == input[t + 1] where trained
    for t, label in enumerate(ex.labels):
        if label != IGNORE:
            assert label == ex.input_ids[t + 1]
    assert ex.labels[-1] == IGNORE
    full, _ = encode_row(tokenizer, row, "prompt_completion", DataSection(train="x", completion_only=False))
    assert targets(tokenizer, full) == "What is 2 plus 2?\n2 plus 2 is 4.</s>"


def test_text_trains_every_token(tokenizer):
    row = {"text": "The day after Monday is Tuesday."}
    ex, _ = encode_row(tokenizer, row, "text", DataSection(train="x"))
    assert targets(tokenizer, ex) == "The day after Monday is Tuesday.</s>"
    assert ex.n_targets == len(ex.input_ids) - 1


def test_truncation(tokenizer):
    row = {"text": "one two three four five six seven eight nine ten " * 5}
    ex, cut = encode_row(tokenizer, row, "text", DataSection(train="x", max_length=10))
    assert cut and len(ex.input_ids) == 10 and ex.labels[-1] == IGNORE


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What sound does a cat make?"},
    {"role": "assistant", "content": "A cat meows."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "A dog barks."},
]


@pytest.fixture
def fresh_tokenizer():
    from loraforge.training.builtin import build_tokenizer

    return build_tokenizer()


def test_chat_template_masking(fresh_tokenizer):
    tok = fresh_tokenizer
    tok.chat_template = CHATML
    ex, _ = encode_row(tok, {"messages": MESSAGES}, "chat", DataSection(train="x"))
    text = tok.decode(ex.input_ids)
    assert text == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert targets(tok, ex) == "A cat meows.<|im_end|>\nA dog barks.<|im_end|>\n"
    cfg = DataSection(train="x", completion_only=False)
    everything, _ = encode_row(tok, {"messages": MESSAGES}, "chat", cfg)
    assert targets(tok, everything) == tok.decode(everything.input_ids[1:])


def test_chat_fallback_template(fresh_tokenizer, tmp_path):
    tok = fresh_tokenizer
    assert not tok.chat_template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES}])
    notes = []
    [ex] = load_examples(str(path), DataSection(train=str(path)), tok, log=notes.append)
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE  # kept, so it is saved with the adapter
    assert any("no chat template" in n for n in notes)
    text = tok.decode(ex.input_ids)
    assert text.startswith("<s><|system|>\nBe brief.\n<|user|>\nWhat sound")
    assert targets(tok, ex) == "A cat meows.</s>\nA dog barks.</s>\n"


def test_packing_resets_positions_and_never_predicts_across(tokenizer):
    cfg = DataSection(train="x")
    row = {"prompt": "What is 1 plus 1?\n", "completion": "2."}
    a, _ = encode_row(tokenizer, row, "prompt_completion", cfg)
    b, _ = encode_row(tokenizer, {"text": "A cow moos."}, "text", cfg)
    rows = pack([a, b, a], max_length=len(a.input_ids) + len(b.input_ids))
    assert len(rows) == 2
    row = rows[0]
    n = len(a.input_ids)
    assert row.position_ids == list(range(n)) + list(range(len(b.input_ids)))
    assert row.labels[n - 1] == IGNORE  # the last token of `a` does not predict the first of `b`
    assert row.labels == a.labels + b.labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_across_examples(tokenizer, attn):
    """The logits of an example inside a packed row equal those of the example alone."""
    from loraforge.training.builtin import build_model

    model = build_model("builtin:tiny-llama").eval()
    model.config._attn_implementation = attn
    cfg = DataSection(train="x")
    a, _ = encode_row(tokenizer, {"text": "The month after May is June."}, "text", cfg)
    b, _ = encode_row(tokenizer, {"text": "Mixing red and blue gives purple."}, "text", cfg)
    [row] = pack([a, b], max_length=64)
    batch = collate([row], pad_id=tokenizer.pad_token_id)
    alone = collate([b], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        single = model(**{k: alone[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
    n = len(a.input_ids)
    torch.testing.assert_close(packed[0, n:], single[0], atol=1e-5, rtol=1e-5)


def test_packing_check_refuses_a_model_that_would_leak():
    from loraforge.training.builtin import build_model
    from loraforge.training.modeling import check_packed_attention

    model = build_model("builtin:tiny-llama")
    check_packed_attention(model)  # Llama separates packed examples
    body = model.base_model
    forward = body.forward
    # a model that ignores position ids for masking: always plain causal attention
    body.forward = lambda input_ids, position_ids, use_cache: forward(input_ids=input_ids, use_cache=False)
    with pytest.raises(ValueError, match="set data.packing: false"):
        check_packed_attention(model)


def test_collate_pads_right(tokenizer):
    cfg = DataSection(train="x")
    a, _ = encode_row(tokenizer, {"text": "A duck quacks."}, "text", cfg)
    b, _ = encode_row(tokenizer, {"text": "A lion roars loudly at night."}, "text", cfg)
    batch = collate([a, b], pad_id=2)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    pad = len(b.input_ids) - len(a.input_ids)
    assert batch["input_ids"][0, -pad:].tolist() == [2] * pad
    assert batch["labels"][0, -pad:].tolist() == [IGNORE] * pad
    assert batch["position_ids"][0].tolist() == list(range(len(b.input_ids)))


# -- reading files and bad rows ------------------------------------------------------------------


def test_reads_jsonl_json_csv_parquet(tokenizer, tmp_path):
    import pandas as pd

    rows = [{"prompt": f"What is {i} plus 1?\n", "completion": f"{i + 1}."} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl", rows)
    got = {}
    for ext in ("jsonl", "json", "csv", "parquet"):
        path = str(tmp_path / f"d.{ext}")
        examples = load_examples(path, DataSection(train=path), tokenizer, log=lambda s: None)
        got[ext] = [e.input_ids for e in examples]
    assert got["jsonl"] == got["json"] == got["csv"] == got["parquet"] and len(got["jsonl"]) == 5


GOOD = {"prompt": "Q?\n", "completion": "A."}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Q?\n"}, "missing field 'completion'"),
        ({"prompt": "Q?\n", "completion": 5}, "field 'completion' must be a string, got int"),
        ({"prompt": "Q?\n", "completion": "   "}, "field 'completion' is empty"),
        ('{"prompt": "Q?", "completion": ', "invalid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tokenizer, tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    (tmp_path / "d.jsonl").write_text("\n" + path.read_text())  # a blank first line: line numbers still right
    with pytest.raises(DataError) as e:
        load_examples(str(path), DataSection(train=str(path)), tokenizer, log=lambda s: None)
    assert str(e.value).startswith(f"{path}:4: ") and message in str(e.value)
    notes = []
    cfg = DataSection(train=str(path), skip_bad_rows=True)
    examples = load_examples(str(path), cfg, tokenizer, log=notes.append)
    assert len(examples) == 3 and "skipped 1 bad rows" in notes[0]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], "messages[0] is missing 'content'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "empty assistant message"),
        ("hello", "non-empty list"),
    ],
)
def test_bad_chat_rows(fresh_tokenizer, tmp_path, messages, message):
    good = {"messages": MESSAGES}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError) as e:
        load_examples(str(path), DataSection(train=str(path)), fresh_tokenizer, log=lambda s: None)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_csv_line_numbers_count_quoted_newlines(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",A.\nQ?,\n')
    with pytest.raises(DataError, match=rf"^{path}:4: field .completion. is empty"):
        load_examples(str(path), DataSection(train=str(path)), tokenizer, log=lambda s: None)


def test_unknown_format_and_missing_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "?"}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_examples(str(path), DataSection(train=str(path)), tokenizer)
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"), DataSection(train="x"), tokenizer)
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_examples(str(tmp_path / "d.txt"), DataSection(train="x"), tokenizer)


# -- batch plan ----------------------------------------------------------------------------------


def test_batch_plan_partitions_global_batches():
    one = BatchPlan(n_rows=50, batch_size=4, grad_accum=1, world_size=1, seed=3)
    two = BatchPlan(n_rows=50, batch_size=2, grad_accum=1, world_size=2, seed=3)
    accum = BatchPlan(n_rows=50, batch_size=1, grad_accum=2, world_size=2, seed=3)
    assert one.steps_per_epoch == 12
    for step in range(30):  # crosses epochs: a new permutation each epoch
        rows = one.micro_batches(step, 0)[0]
        assert sorted(rows) == sorted(sum((two.micro_batches(step, r)[0] for r in range(2)), []))
        assert sorted(rows) == sorted(sum((sum(accum.micro_batches(step, r), []) for r in range(2)), []))
    epoch0 = sum((one.step_rows(s) for s in range(12)), [])
    assert len(set(epoch0)) == 48
    assert one.step_rows(12) != one.step_rows(0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(n_rows=3, batch_size=4, grad_accum=1, world_size=1, seed=0)
