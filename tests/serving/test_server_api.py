"""``loraforge serve``'s API through the real ``openai`` client: each adapter's greedy answer is the
one transformers ``generate`` gives with that adapter; streaming says the same as non-streaming;
echo + logprobs are the prompt's log-probabilities (what lm-evaluation-harness reads)."""

from __future__ import annotations

import json

import pytest
import requests
import torch

import loraforge as lf

MODELS = ["tiny-base", "pirate", "butler", "robot"]
PROMPT = "The capital of Italy is"


def test_models_lists_the_base_and_every_adapter(served, adapter_dirs):
    page = served.client().models.list()
    by_id = {m.id: m for m in page.data}
    assert list(by_id) == MODELS
    base = by_id["tiny-base"]
    assert base.object == "model" and base.owned_by == "loraforge" and base.parent is None
    assert base.root == served.state.config.base_path
    for name, path in adapter_dirs.items():
        assert by_id[name].parent == "tiny-base" and by_id[name].root == str(path)


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_generate(served, reference, model):
    r = served.client().completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].text == reference(model, PROMPT, 12)
    assert r.usage.prompt_tokens == len(served.engine.tokenizer(PROMPT)["input_ids"])
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_adapters_change_the_answer(served, reference):
    assert len({reference(m, PROMPT, 12) for m in MODELS}) == 4


@pytest.mark.parametrize("model", ["pirate", "butler"])
def test_greedy_chat_equals_generate(served, reference, model):
    question = "What colour is snow?"
    r = served.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(model, question, 10, chat=True)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_concatenation_equals_the_whole_answer(served):
    client = served.client()
    whole = client.completions.create(model="robot", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(model="robot", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_stream_role_first_then_content_then_usage(served):
    client = served.client()
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model="butler", messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="butler",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


def test_raw_sse_ends_with_done(served):
    body = {"model": "pirate", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with requests.post(f"{served.url}/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_several_prompts_one_choice_each(served, reference):
    prompts = [PROMPT, "Once upon a time", "Snow is"]
    r = served.client().completions.create(model="pirate", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [reference("pirate", p, 6) for p in prompts]
    stream = served.client().completions.create(
        model="pirate",
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage = ["", "", ""], None
    for chunk in stream:
        if chunk.choices:
            texts[chunk.choices[0].index] += chunk.choices[0].text
        else:
            usage = chunk.usage
    assert texts == [c.text for c in r.choices]
    assert usage == r.usage  # one usage chunk for the whole request, last


def test_token_id_prompts_equal_text_prompts(served):
    client = served.client()
    ids = served.engine.tokenizer(PROMPT)["input_ids"]
    by_text = client.completions.create(model="butler", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="butler", prompt=ids, max_tokens=6, temperature=0)
    batch = client.completions.create(model="butler", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == batch.choices[0].text
    assert len(batch.choices) == 2


def test_stop_string_ends_the_answer_without_it(served):
    client = served.client()
    full = (
        client.completions.create(model="pirate", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    )
    stop = full.strip().split()[1]  # a word in the middle of the answer
    r = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_repeats(served):
    client = served.client()
    kw = dict(model="robot", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def _prompt_logprobs(model_name: str, adapter_dirs, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from loraforge.demo.app import SHIPPED_BASE

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_BASE).eval()
    lf.load_adapter(model, adapter_dirs[model_name], adapter=model_name)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return lp


def test_echo_logprobs_are_the_prompts_log_probabilities(served, adapter_dirs):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood: token ids,
    echo, logprobs=1, max_tokens=1; it reads token_logprobs[ctxlen:-1] and top_logprobs."""
    ids = served.engine.tokenizer("Once upon a time there was a king")["input_ids"]
    r = served.client().completions.create(
        model="butler", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = _prompt_logprobs("butler", adapter_dirs, ids)
    for j in range(1, n):
        assert lp.token_logprobs[j] == pytest.approx(expected[j - 1, ids[j]].item(), abs=1e-4)
        best = expected[j - 1].max().item()
        assert max(lp.top_logprobs[j].values()) == pytest.approx(max(best, lp.token_logprobs[j]), abs=1e-4)
        assert lp.tokens[j] in lp.top_logprobs[j]  # the token itself is listed with its alternatives
    assert r.choices[0].text.startswith(served.engine.decode(ids))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # the generated token's logprob is the greedy one: the best of its row
    assert lp.token_logprobs[n] == pytest.approx(expected[n - 1].max().item(), abs=1e-4)


def test_echo_with_max_tokens_zero_scores_the_prompt_only(served):
    r = served.client().completions.create(model="pirate", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == PROMPT
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.tokens) == r.usage.prompt_tokens


def test_chat_logprobs(served):
    r = served.client().chat.completions.create(
        model="robot",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy
        assert bytes(entry.bytes).decode() == entry.token


def test_health_and_page(served):
    assert requests.get(f"{served.url}/health", timeout=10).status_code == 200
    r = requests.get(f"{served.url}/", timeout=10)
    assert r.status_code in (200, 404)  # the page ships with the package when serving/static/ exists
    if r.status_code == 200:
        assert "text/html" in r.headers["content-type"]
