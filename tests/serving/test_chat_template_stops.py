"""loraforge serve: a chat answer stops at the end-of-turn token of the adapter's chat template (the
template training saved with it) when that token is not the base's EOS, as generate and chat do."""

from __future__ import annotations

import shutil

import requests

from loraforge.serving.engine import Engine

from .conftest import load_base, start_server

# the turn ends with <|system|> (a token of the shipped base other than its EOS <|end|>): the shape of
# llama3's <|eot_id|> on a Llama 3 base whose EOS is <|end_of_text|>
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|system|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_template(adapter_dirs, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(adapter_dirs["pirate"], own)
    (own / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return own


def test_engine_stop_ids_follow_the_adapters_template(adapter_dirs, tmp_path):
    model, tok = load_base()
    eng = Engine(model, tok)
    eng.register_adapter("own", with_template(adapter_dirs, tmp_path))
    eng.register_adapter("plain", adapter_dirs["robot"])
    assert eng.chat_stop_ids("own") == [tok.convert_tokens_to_ids("<|system|>")]
    assert eng.chat_stop_ids("plain") == eng.chat_stop_ids(None) == []  # the base's turn ends with EOS


def test_chat_request_stops_at_the_templates_end_of_turn(adapter_dirs, tmp_path):
    seen = []

    class Recording(Engine):
        def generate(self, prompt, adapter, params):
            seen.append((adapter, list(params.stop_token_ids)))
            return super().generate(prompt, adapter, params)

    def make_engine(cfg):
        model, tok = load_base()
        return Recording(model, tok, base_id=cfg.base_id, base_path=cfg.base_path, max_loras=cfg.max_loras)

    s = start_server({"own": with_template(adapter_dirs, tmp_path)}, make_engine=make_engine)
    try:
        for model in ("own", "tiny-base"):
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            r = requests.post(f"{s.url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        s.stop()
    system_id = s.engine.tokenizer.convert_tokens_to_ids("<|system|>")
    assert seen == [("own", [system_id]), (None, [])]
