"""data.chat_template: the named templates, a .jinja file, the tokenizer's own; the completion-only
mask per template (checked against transformers' own assistant mask and against the character
offsets of the assistant contents); the setting's errors; the template saved with the adapter and
used by generate / chat / serve."""

from __future__ import annotations

import json

import pytest

from loraforge import chat_templates as ct
from loraforge.training import ConfigError, DataError, TrainConfig, train
from loraforge.training.config import DataSection
from loraforge.training.data import IGNORE, encode_row, load_examples

from .util import tiny_config, write_jsonl

CONVERSATIONS = [
    [  # multi-turn, with a system prompt
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What sound does a cat make?"},
        {"role": "assistant", "content": "A cat meows."},
        {"role": "user", "content": "And a dog?"},
        {"role": "assistant", "content": " It barks, loudly. "},  # spaces: the BPE word boundary
    ],
    [  # no system prompt, one turn
        {"role": "user", "content": "Colour of snow?"},
        {"role": "assistant", "content": "White."},
    ],
]

# Twins of the named templates with transformers' {% generation %} markers around what must be
# trained: apply_chat_template(return_assistant_tokens_mask=True) then gives transformers' own mask.
GEN = "{% generation %}{{ X }}{% endgeneration %}"
TWINS = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}" + GEN.replace("X", "m['content'] + '<|im_end|>\\n'") + "{% else %}"
    "{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    + GEN.replace("X", "m['content'] | trim + '<|eot_id|>'")
    + "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}",
    "mistral": "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}" + GEN.replace("X", "m['content'] + eos_token") + "{% endif %}"
    "{% endfor %}",
    "zephyr": "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}" + GEN.replace("X", "m['content'] + eos_token + '\\n'") + "{% else %}"
    "{{ m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}",
}
# What follows an assistant's content up to the next turn, per template (the end-of-turn marker and
# the separator the template puts after it): trained with the content.
TURN_END = {
    "chatml": lambda tok: "<|im_end|>\n",
    "llama3": lambda tok: "<|eot_id|>",
    "mistral": lambda tok: tok.eos_token,
    "zephyr": lambda tok: tok.eos_token + "\n",
}
# a user's own .jinja template: markdown-style headers, EOS and a blank line after each answer
CUSTOM = (
    "{{ bos_token }}{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
MARKER_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def builtin_tokenizer(with_markers: bool):
    from loraforge.training.builtin import build_tokenizer

    tok = build_tokenizer()
    if with_markers:  # the markers as single special tokens, as the model families' tokenizers have them
        tok.add_special_tokens({"additional_special_tokens": MARKER_TOKENS})
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=["builtin-text", "builtin-tokens", "smollm2"])
def any_tokenizer(request):
    if request.param == "smollm2":
        tok = request.getfixturevalue("smollm2_tokenizer")
        saved = tok.chat_template
        yield tok
        tok.chat_template = saved
    else:
        yield builtin_tokenizer(request.param == "builtin-tokens")


def trained_positions(example) -> list[int]:
    """Positions t whose token is a target (labels are shifted: labels[t - 1] = input_ids[t])."""
    return [t + 1 for t, label in enumerate(example.labels) if label != IGNORE]


def offset_reference(tok, text: str, messages: list[dict], turn_end: str, trim: bool = False):
    """(trained positions, trained text): the tokens of ``tok(text)`` overlapping an assistant turn,
    found from where each message's content lies in the rendered text (messages in order)."""
    spans, pos = [], 0
    for m in messages:
        content = m["content"].strip() if trim else m["content"]
        start = text.index(content, pos)
        pos = start + len(content)
        if m["role"] == "assistant":
            assert text.startswith(turn_end, pos), (text[pos:], turn_end)
            pos += len(turn_end)
            spans.append((start, pos))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    positions = [i for i, (s, e) in enumerate(offsets) if any(s < b and e > a for a, b in spans)]
    return positions, "".join(text[a:b] for a, b in spans)


def encode(tok, messages):
    example, _ = encode_row(tok, {"messages": messages}, "chat", DataSection(train="x"))
    assert tok.decode(example.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    return example


@pytest.mark.parametrize("name", list(ct.NAMED))
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["multi-turn", "single"])
def test_named_template_masks_exactly_the_assistant_turns(any_tokenizer, name, messages):
    tok = any_tokenizer
    ct.apply_setting(tok, name, log=lambda _: None)
    assert tok.chat_template == ct.NAMED[name]
    example = encode(tok, messages)

    # 1. transformers' own assistant mask, from the {% generation %} twin (same text, same tokens)
    twin = tok.apply_chat_template(
        messages, chat_template=TWINS[name], return_dict=True, return_assistant_tokens_mask=True
    )
    assert tok.apply_chat_template(messages, tokenize=False, chat_template=TWINS[name]) == (
        tok.apply_chat_template(messages, tokenize=False)
    ), "the twin must render as the named template"
    assert list(twin["input_ids"]) == example.input_ids
    assert trained_positions(example) == [i for i, m in enumerate(twin["assistant_masks"]) if m]

    # 2. character offsets of the assistant contents in the rendered text
    text = tok.apply_chat_template(messages, tokenize=False)
    end = TURN_END[name](tok)
    positions, trained_text = offset_reference(tok, text, messages, end, trim=name == "llama3")
    assert trained_positions(example) == positions
    decoded = tok.decode([example.input_ids[t] for t in positions])
    # equal, or (markers rendered as text) a token straddles two markers: SmolLM2's "><" in
    # "<|eot_id|><|start_header_id|>" carries the end of the turn, so it is trained
    assert decoded == trained_text or decoded.replace("><", ">") == trained_text
    assert "user" not in decoded and "assistant" not in decoded  # no role header is trained


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["multi-turn", "single"])
def test_smollm2_own_template_masks_exactly_the_assistant_turns(smollm2_tokenizer, messages):
    tok = smollm2_tokenizer
    own = tok.chat_template
    ct.apply_setting(tok, "tokenizer", log=pytest.fail)  # keeps it, says nothing
    assert tok.chat_template == own and "<|im_start|>" in own
    example = encode(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\n")  # its default system prompt when there is none
    positions, trained_text = offset_reference(tok, text, messages, "<|im_end|>\n")
    assert trained_positions(example) == positions
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained_text == "".join(a + "<|im_end|>\n" for a in answers)


@pytest.mark.parametrize("which", ["builtin", "smollm2"])
def test_jinja_file_template(tmp_path, smollm2_dir, which, request):
    path = tmp_path / "markdown.jinja"
    path.write_text(CUSTOM, encoding="utf-8")
    tok = request.getfixturevalue("smollm2_tokenizer") if which == "smollm2" else builtin_tokenizer(False)
    saved = tok.chat_template
    try:
        ct.apply_setting(tok, str(path), log=pytest.fail)  # no <|...|> marker: nothing to say
        assert tok.chat_template == CUSTOM
        for messages in CONVERSATIONS:
            example = encode(tok, messages)
            text = tok.apply_chat_template(messages, tokenize=False)
            assert "### Assistant:\nA cat meows." in text or "### Assistant:\nWhite." in text
            positions, _ = offset_reference(tok, text, messages, tok.eos_token + "\n\n")
            assert trained_positions(example) == positions
    finally:
        tok.chat_template = saved


def test_jinja_file_with_generation_markers(tmp_path):
    """A TRL-style training template ({% generation %} tags, which transformers' own Jinja
    environment knows) is accepted, and its own assistant mask agrees with ours."""
    path = tmp_path / "chatml-generation.jinja"
    path.write_text(TWINS["chatml"], encoding="utf-8")
    tok = builtin_tokenizer(True)
    ct.apply_setting(tok, str(path), log=lambda _: None)
    example = encode(tok, CONVERSATIONS[0])
    twin = tok.apply_chat_template(CONVERSATIONS[0], return_dict=True, return_assistant_tokens_mask=True)
    assert trained_positions(example) == [i for i, m in enumerate(twin["assistant_masks"]) if m]


def test_markers_the_tokenizer_lacks_are_text_with_one_note(smollm2_tokenizer):
    notes = []
    tok = builtin_tokenizer(False)
    ct.apply_setting(tok, "llama3", log=notes.append)
    [note] = notes
    assert "<|start_header_id|>, <|end_header_id|>, <|eot_id|>" in note and "plain text" in note
    assert len(tok(tok.apply_chat_template(CONVERSATIONS[1], tokenize=False))["input_ids"]) > 30
    assert len(builtin_tokenizer(True).vocab) == len(tok.vocab) + len(MARKER_TOKENS)  # nothing added
    saved = smollm2_tokenizer.chat_template
    try:
        quiet = []
        ct.apply_setting(smollm2_tokenizer, "chatml", log=quiet.append)  # SmolLM2 has ChatML's tokens
        assert quiet == []
        ct.apply_setting(smollm2_tokenizer, "llama3", log=quiet.append)
        assert len(quiet) == 1 and "<|eot_id|>" in quiet[0]
    finally:
        smollm2_tokenizer.chat_template = saved


def test_turn_end_token(smollm2_tokenizer):
    tok = builtin_tokenizer(True)
    assert ct.turn_end_id(tok, ct.LLAMA3) == tok.convert_tokens_to_ids("<|eot_id|>")
    assert ct.turn_end_id(tok, ct.CHATML) == tok.convert_tokens_to_ids("<|im_end|>")
    assert ct.turn_end_id(tok, ct.ZEPHYR) == tok.eos_token_id
    assert ct.turn_end_id(builtin_tokenizer(False), ct.LLAMA3) is None  # text, not a token
    assert ct.turn_end_id(smollm2_tokenizer) == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_generate_stops_at_the_templates_end_of_turn_token(monkeypatch):
    from loraforge.training.builtin import build_model
    from loraforge.training.inference import generate

    tok = builtin_tokenizer(True)
    tok.chat_template = ct.LLAMA3
    model = build_model("builtin:tiny-llama")
    seen = {}

    def fake_generate(input_ids, **kwargs):
        seen.update(kwargs, prompt=tok.decode(input_ids[0]))
        return input_ids

    monkeypatch.setattr(model, "generate", fake_generate)
    generate(model, tok, "Hi")
    assert seen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    assert seen["prompt"].endswith("Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    generate(model, tok, "Hi", chat=False)
    assert seen["eos_token_id"] == tok.eos_token_id


def test_mistral_refuses_roles_that_do_not_alternate(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": CONVERSATIONS[1]},
            {"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hey"}]},
        ],
    )
    tok = builtin_tokenizer(False)
    ct.apply_setting(tok, "mistral")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the chat template refuses .*alternate"):
        load_examples(str(path), DataSection(train=str(path)), tok, log=lambda _: None)


# -- the setting's errors ------------------------------------------------------------------------


def config_error(tmp_path, value) -> str:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(tiny_config(tmp_path, data={"chat_template": value}))
    message = str(e.value)
    assert "data.chat_template" in message and "\n" not in message
    return message


def test_bad_settings_are_one_line_config_errors(tmp_path):
    assert "unknown chat template 'llama2'" in config_error(tmp_path, "llama2")
    assert "chatml | llama3 | mistral | zephyr" in config_error(tmp_path, "ChatML")
    assert "no such chat template file" in config_error(tmp_path, str(tmp_path / "missing.jinja"))
    (tmp_path / "dir.jinja").mkdir()
    assert "not a file" in config_error(tmp_path, str(tmp_path / "dir.jinja"))
    big = tmp_path / "big.jinja"
    big.write_bytes(b"{{ x }}" * (ct.MAX_TEMPLATE_BYTES // 7 + 1))
    assert "a chat template may have at most" in config_error(tmp_path, str(big))
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{{ 'ok' }}\n{{ 'caf\xe9' }}")
    assert "latin.jinja:2: not UTF-8 text (byte 0xe9)" in config_error(tmp_path, str(latin))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n", encoding="utf-8")
    assert "broken.jinja:2: not a valid Jinja template" in config_error(tmp_path, str(broken))
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n", encoding="utf-8")
    assert "empty" in config_error(tmp_path, str(empty))


def test_good_settings_load(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(CUSTOM, encoding="utf-8")
    for value in ["tokenizer", *ct.NAMED, str(path)]:
        cfg = TrainConfig.from_dict(tiny_config(tmp_path, data={"chat_template": value}))
        assert cfg.data.chat_template == value


# -- saved with the adapter, used by generate, chat and serve ------------------------------------


@pytest.mark.parametrize("setting", ["llama3", "file"])
def test_trained_adapter_carries_the_template(tmp_path, setting):
    from loraforge.demo.chat import chat_templates
    from loraforge.serving.text import chat_template_of
    from loraforge.training.builtin import build_tokenizer
    from loraforge.training.inference import load_with_adapters, prompt_ids

    template = ct.LLAMA3 if setting == "llama3" else CUSTOM
    value = "llama3" if setting == "llama3" else str(tmp_path / "custom.jinja")
    (tmp_path / "custom.jinja").write_text(CUSTOM, encoding="utf-8")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] * 2)
    cfg = tiny_config(
        tmp_path / "run",
        data={"train": str(data), "chat_template": value, "max_length": 96},
        train={"max_steps": 1, "batch_size": 2},
    )
    train(cfg)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # loraforge generate: the tokenizer comes from the adapter directory, with its template
    _, tok = load_with_adapters("builtin:tiny-llama", {"default": str(adapter)}, device="cpu")
    assert tok.chat_template == template
    hi = [{"role": "user", "content": "Hi"}]
    expected = tok.apply_chat_template(hi, tokenize=False, add_generation_prompt=True, chat_template=template)
    assert tok.decode(prompt_ids(tok, "Hi")) == expected
    # loraforge chat: the persona's template is the adapter's, not the base tokenizer's
    base_tok = build_tokenizer()
    base_tok.chat_template = ct.CHATML
    templates, _ = chat_templates(base_tok, tmp_path, {"mine": adapter})
    assert templates["mine"] == template and templates["base"] is None
    # loraforge serve: the engine registers each adapter with chat_template_of(directory)
    assert chat_template_of(adapter) == template


def test_chat_stream_stops_at_the_templates_end_of_turn_token():
    """loraforge chat (stream_answer) stops where the template ends a turn, not only at EOS."""
    from conftest import tiny_llama

    from loraforge.demo.generation import stream_answer

    tok = builtin_tokenizer(True)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model = tiny_llama(vocab=len(tok))
    step = {"n": 0}

    def third_token_is_eot(module, args, output):  # the model "answers" two tokens, then <|eot_id|>
        step["n"] += 1
        output.logits[..., eot] = 1e4 if step["n"] == 3 else -1e4
        return output

    model.register_forward_hook(third_token_is_eot)
    pieces = []
    stream_answer(model, tok, "Hi", pieces.append, max_new_tokens=10, chat_template=ct.LLAMA3)
    assert step["n"] == 3  # stopped at <|eot_id|> (before: ran to max_new_tokens)
