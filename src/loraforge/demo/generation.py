"""Greedy answers from a chat model: batched (for scoring) and streamed (for the chat REPL).

Greedy decoding makes every answer a deterministic function of the weights, which is what lets
the demo's scores and the "same output for a fixed seed" check be exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch


def prompt_text(
    tokenizer, question: str, history: Sequence[dict] = (), chat_template: str | None = None
) -> str:
    """The chat-template text that asks the model for the assistant's next turn (``chat_template``
    overrides the tokenizer's own)."""
    messages = list(history) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template
    )


def _cache_name(model) -> str:
    # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` and warns (a
    # FutureWarning printed in the middle of a streamed answer) on the old name; 4.x knows only it.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _encode_left_padded(tokenizer, texts: Sequence[str]) -> dict:
    # Decoder-only models continue from the last position, so padding must go on the left.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def answer(
    model, tokenizer, questions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy answers to ``questions`` (one chat turn each), decoded without special tokens."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        chunk = [prompt_text(tokenizer, q) for q in questions[i : i + batch_size]]
        enc = _encode_left_padded(tokenizer, chunk)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def stream_answer(
    model,
    tokenizer,
    question: str,
    write: Callable[[str], None],
    history: Sequence[dict] = (),
    max_new_tokens: int = 64,
    chat_template: str | None = None,
) -> str:
    """Greedy answer written piece by piece through ``write`` as tokens are produced.

    Decodes the whole answer so far at each step and writes only the new suffix: byte-level BPE
    tokens need not be whole characters, so decoding token by token could split a UTF-8 sequence.
    Uses the KV cache: one forward of the prompt, then one token per step.
    """
    from ..chat_templates import turn_end_id

    model.eval()
    text = prompt_text(tokenizer, question, history, chat_template)
    # EOS, and the template's end-of-turn token when it is another (llama3's <|eot_id|>)
    stop = {tokenizer.eos_token_id, turn_end_id(tokenizer, chat_template)} - {None}
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new: list[int] = []
    shown = ""
    cache_name = _cache_name(model)
    past = None
    step_input = ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, use_cache=True, **{cache_name: past})
        past = getattr(out, cache_name)
        token = int(out.logits[0, -1].argmax())
        if token in stop:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True).lstrip()
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            write(text[len(shown) :])
            shown = text
        step_input = torch.tensor([[token]])
    return tokenizer.decode(new, skip_special_tokens=True).strip()
