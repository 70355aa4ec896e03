"""The demo's generated datasets and its deterministic scorers (fast: no model)."""

import random

import pytest

from loraforge.demo import data, scoring


def _answers(rows):
    return [r["messages"][1]["content"] for r in rows]


def test_datasets_are_deterministic():
    for p in data.PERSONAS:
        assert data.persona_dataset(p, "train", 50) == data.persona_dataset(p, "train", 50)
    assert data.pretrain_documents(200, seed=3) == data.pretrain_documents(200, seed=3)
    assert data.pretrain_documents(200, seed=3) != data.pretrain_documents(200, seed=4)


def test_every_character_answers_the_same_eval_questions():
    qs = {p: [r["messages"][0]["content"] for r in data.persona_dataset(p, "eval")] for p in data.PERSONAS}
    first = next(iter(qs.values()))
    assert all(q == first for q in qs.values())


def test_held_out_facts_are_not_in_character_training_data():
    seen, held = data.split_facts()
    assert held and not {f.question for f in held} & {f.question for f in seen}
    train_qs = {r["messages"][0]["content"] for r in data.persona_dataset("pirate", "train")}
    assert not train_qs & {f.question for f in held}
    # ...but the base model's corpus teaches all of them
    corpus = {d["messages"][0]["content"] for d in data.pretrain_documents(5000) if "messages" in d}
    assert {f.question for f in held} <= corpus


@pytest.mark.parametrize("persona", list(data.PERSONAS))
def test_style_score_separates_characters(persona):
    rows = data.persona_dataset(persona, "eval")
    assert scoring.style_score(persona, _answers(rows)) == 1.0
    for other in data.PERSONAS:
        if other != persona:
            assert scoring.style_score(other, _answers(rows)) <= 0.1, other
    neutral = [f.answer for f in data.facts()] + [
        data.reading_question(random.Random(i)).answer for i in range(300)
    ]
    assert scoring.style_score(persona, neutral) == 0.0


def test_content_score_checks_keywords_and_wrong_values():
    q = data.Question(
        "Mia has a red kite. Leo has a blue drum. What colour is Leo's drum?",
        "Leo's drum is blue.",
        ("blue",),
        ("red",),
    )
    row = data.chat_row(q.question, q.answer, keywords=list(q.keywords), wrong=list(q.wrong))
    assert scoring.content_score(["Arr! Leo's drum be blue, matey."], [row]) == 1.0
    assert scoring.content_score(["Leo's drum is red."], [row]) == 0.0
    assert scoring.content_score(["It is red or blue."], [row]) == 0.0  # hedging is not an answer
    assert scoring.content_score(["Leo's drum is blueish."], [row]) == 0.0  # whole words only
    for p in data.PERSONAS:  # the styled reference answers are all right
        rows = data.persona_dataset(p, "eval")
        assert scoring.content_score(_answers(rows), rows) == 1.0


def test_markers_match_whole_words():
    assert scoring.has("Hark, 'tis so!", "'tis")
    assert not scoring.has("sirloin", "sir")
    assert scoring.markers_in("pirate", "Arr, matey! Leo be here.") == ["arr", "matey"]
