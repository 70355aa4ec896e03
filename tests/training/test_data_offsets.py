"""Masking at the prompt/answer boundary: a token that carries answer characters is trained.

A prompt ending in a space followed by the answer "white" is tokenized as one token "Ġwhite"
(byte-level BPE) or "▁white" (SentencePiece) that starts in the prompt; it must still be trained.
Checked on the demo's byte-level BPE tokenizer and on a SentencePiece-style (Unigram + Metaspace)
tokenizer built here, for prompt/completion and chat rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.training.builtin import ASSETS, build_tokenizer
from loraforge.training.config import DataSection
from loraforge.training.data import FALLBACK_CHAT_TEMPLATE, IGNORE, chat_segments, encode_row

DEMO_TOKENIZER = Path(__file__).parents[2] / "src" / "loraforge" / "demo" / "assets" / "base"

# The assistant's text follows "Assistant: ", so its first word's token starts at that space.
SPACE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "What color is snow?"},
    {"role": "assistant", "content": "Snow is white."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green."},
]


def byte_bpe():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tok.chat_template = SPACE_TEMPLATE
    return tok


def sentencepiece_style():
    """A tiny Unigram model with Metaspace pre-tokenization ("▁" marks a word start), as
    SentencePiece / Llama-2 tokenizers work; whole words score higher than their letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "▁What",
        "▁color",
        "▁is",
        "▁snow",
        "▁white",
        "▁Snow",
        "▁Grass",
        "▁green",
        "▁User:",
        "▁Assistant:",
    ]
    chars = sorted(set("".join(words) + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?.:!,\n▁"))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = SPACE_TEMPLATE
    return tok


TOKENIZERS = {"byte-level BPE": byte_bpe, "SentencePiece": sentencepiece_style}


def trained_tokens(tok, example) -> list[str]:
    """The tokens the labels train, in order."""
    return tok.convert_ids_to_tokens([t for t in example.labels if t != IGNORE])


def by_offsets(tok, text: str, trained_from: list[tuple[int, int]]) -> list[str]:
    """The reference rule: the tokens of ``text`` whose character span overlaps a trained span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    keep = [
        tid
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
        if any(s < b and e > a for a, b in trained_from)
    ]
    return tok.convert_ids_to_tokens(keep)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_prompt_completion_boundary_token_is_trained(name):
    tok = TOKENIZERS[name]()
    prompt, completion = "What color is snow? ", "white."
    ex, _ = encode_row(
        tok, {"prompt": prompt, "completion": completion}, "prompt_completion", DataSection("x")
    )
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    straddling = {"byte-level BPE": "Ġwhite", "SentencePiece": "▁white"}[name]
    assert straddling in tokens  # one token holds the prompt's last space and the answer's first word
    got = trained_tokens(tok, ex)
    assert got[0] == straddling
    assert got == by_offsets(tok, prompt + completion, [(len(prompt), len(prompt + completion))]) + [
        tok.eos_token
    ]
    # labels stay the next token of the same example
    for t, label in enumerate(ex.labels):
        assert label == IGNORE or label == ex.input_ids[t + 1]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chat_boundary_tokens_are_trained(name):
    tok = TOKENIZERS[name]()
    ex, _ = encode_row(tok, {"messages": MESSAGES}, "chat", DataSection("x"))
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert "Assistant: Snow is white.\n" in text
    spans, pos = [], 0
    for piece, trained in chat_segments(tok, MESSAGES):
        if trained:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    assert [text[a:b] for a, b in spans] == ["Snow is white.\n", "Grass is green.\n"]
    assert trained_tokens(tok, ex) == by_offsets(tok, text, spans)
    # each answer's first token starts at the space of "Assistant: " and is trained
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for a, _ in spans:
        [first] = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a < e]
        assert tok.convert_ids_to_tokens(enc["input_ids"][first])[0] in "Ġ▁"
        assert ex.labels[first - 1] == enc["input_ids"][first]  # the position before predicts it


def test_text_inside_the_answer_is_unchanged_for_the_bundled_data(tokenizer):
    """On the bundled data (prompts end in a newline, templates put no space before the
    answer) no token straddles the boundary: the trained tokens are the answer's own."""
    cfg = DataSection("x", max_length=4096)
    for line in (ASSETS / "quickstart" / "qa_train.jsonl").read_text().splitlines()[:40]:
        row = json.loads(line)
        ex, _ = encode_row(tokenizer, row, "prompt_completion", cfg)
        assert tokenizer.decode([t for t in ex.labels if t != IGNORE]) == row["completion"] + "</s>"
    tokenizer_copy = build_tokenizer()  # the session's tokenizer keeps no chat template
    tokenizer_copy.chat_template = FALLBACK_CHAT_TEMPLATE
    for line in (ASSETS / "quickstart" / "chat_train.jsonl").read_text().splitlines()[:40]:
        row = json.loads(line)
        ex, _ = encode_row(tokenizer_copy, row, "chat", cfg)
        answer = row["messages"][-1]["content"]
        assert tokenizer_copy.decode([t for t in ex.labels if t != IGNORE]) == answer + "</s>\n"
