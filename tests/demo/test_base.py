"""The shipped base model: what it is, what it knows, and that its recipe is deterministic."""

import json

from safetensors.torch import load_file

from loraforge.demo import base, data, scoring
from loraforge.demo.app import SHIPPED_BASE
from loraforge.demo.evaluate import load_base
from loraforge.demo.generation import answer


def test_shipped_base_is_a_small_llama_with_its_recipe():
    cfg = json.loads((SHIPPED_BASE / "config.json").read_text())
    meta = json.loads((SHIPPED_BASE / "pretrain.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (SHIPPED_BASE / "model.safetensors").stat().st_size < 8 * 2**20  # small enough to ship
    assert 5e5 < meta["parameters"] < 5e6
    assert meta["hidden_size"] == cfg["hidden_size"] and meta["num_layers"] == cfg["num_hidden_layers"]


def test_base_knows_general_text_and_answers_plainly():
    """Pretrained, not random: it answers held-out facts and reading questions, in no character."""
    model, tok = load_base(SHIPPED_BASE)
    rows = data.persona_dataset("pirate", "eval", 0)  # the held-out facts
    answers = answer(model, tok, [r["messages"][0]["content"] for r in rows])
    assert scoring.content_score(answers, rows) >= 0.95
    for p in data.PERSONAS:
        assert scoring.style_score(p, answers) <= 0.1
    story = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert story == "<|user|>hi<|end|><|assistant|>"


def test_pretraining_recipe_is_deterministic(tmp_path):
    cfg = base.PretrainConfig(
        n_docs=300,
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        seq_len=32,
        batch_size=4,
        steps=3,
        warmup=1,
    )
    a = base.build_base(tmp_path / "a", cfg, progress=False)
    b = base.build_base(tmp_path / "b", cfg, progress=False)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
