"""A bounded load on loopback: 48 requests, 12 at a time, mixed adapters and the base, streaming and
not, chat and completions. Every answer must be, token for token, the one the same request gets
when it is served alone, and the whole load must finish within a fixed time."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

REQUESTS, CONCURRENCY, TIME_LIMIT_S = 48, 12, 120.0
MODELS = ["tiny-base", "pirate", "butler", "robot"]
PROMPTS = [
    "The capital of Italy is",
    "Once upon a time",
    "Snow is",
    "In the evening Jack went",
    "The king of the castle",
]


def _ask(client, job) -> str:
    kind, model, prompt, max_tokens = job
    if kind == "chat":
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return r.choices[0].message.content
    if kind == "chat-stream":
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if kind == "stream":
        chunks = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_mixed_adapter_load_gives_each_request_its_lone_answer(served):
    rng = random.Random(0)
    kinds = ["completion", "stream", "chat", "chat-stream"]
    jobs = [
        (rng.choice(kinds), rng.choice(MODELS), rng.choice(PROMPTS), rng.randint(4, 24))
        for _ in range(REQUESTS)
    ]
    client = served.client()
    alone = {job: _ask(client, job) for job in sorted(set(jobs))}  # one at a time: nothing to batch with
    assert len(set(alone.values())) > len(MODELS)  # the answers differ: the comparison means something

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda job: _ask(client, job), jobs))
    elapsed = time.monotonic() - t0
    wrong = [(job, got, alone[job]) for job, got in zip(jobs, answers) if got != alone[job]]
    assert not wrong, wrong[:3]
    assert elapsed < TIME_LIMIT_S
    # everything is released (a stream's slot and engine sequence are freed just after its last byte)
    deadline = time.monotonic() + 10
    while served.engine.num_running or served.state.in_flight:
        assert time.monotonic() < deadline, (served.engine.num_running, served.state.in_flight)
        time.sleep(0.01)
