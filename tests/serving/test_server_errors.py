"""Bad requests and faults: each gets OpenAI's error shape and the right status, and nothing of it
takes the server down or changes another request's answer."""

from __future__ import annotations

import socket
import time

import openai
import pytest
import requests

PROMPT = "The capital of Italy is"


def _post(url: str, path: str, body=None, raw: bytes | None = None, headers=None):
    return requests.post(f"{url}{path}", json=body, data=raw, headers=headers, timeout=60)


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_model_is_404_naming_the_served_ones(served):
    err = _error(_post(served.url, "/v1/completions", {"model": "parrot", "prompt": "hi"}), 404)
    assert "parrot" in err["message"] and all(m in err["message"] for m in ("tiny-base", "pirate", "butler"))
    assert err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="parrot", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "pirate", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"model": "pirate", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "pirate", "prompt": "hi", "temperature": 3.0}, "temperature"),
        ({"model": "pirate", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "pirate", "prompt": "hi", "stream": 1}, "stream"),
        ({"model": "pirate", "prompt": "hi", "stop": [1, 2]}, "stop"),
        ({"model": "pirate", "prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"model": "pirate", "prompt": "hi", "n": 2}, "n"),
        ({"model": "pirate", "prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"model": "pirate", "prompt": {"text": "hi"}}, "prompt"),
        ({"model": "pirate", "prompt": ["a", 1]}, "prompt"),
        ({"model": "pirate", "prompt": [[1, 2], []]}, "prompt"),
        ({"model": "pirate"}, "prompt"),
        ({"prompt": "hi"}, "model"),
        ({"model": 7, "prompt": "hi"}, "model"),
        ({"model": "pirate", "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"model": "pirate", "prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
    ],
)
def test_wrong_field_is_400_naming_it(served, body, param):
    err = _error(_post(served.url, "/v1/completions", body), 400)
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "pirate", "messages": "hi"}, "messages"),
        ({"model": "pirate", "messages": []}, "messages"),
        ({"model": "pirate", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "pirate", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            {"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
            "max_completion_tokens",
        ),
    ],
)
def test_wrong_chat_field_is_400_naming_it(served, body, param):
    err = _error(_post(served.url, "/v1/chat/completions", body), 400)
    assert err["param"] == param


def test_malformed_json_is_400(served):
    err = _error(
        _post(
            served.url,
            "/v1/completions",
            raw=b'{"model": "pirate", "prompt": ',
            headers={"Content-Type": "application/json"},
        ),
        400,
    )
    assert "JSON" in err["message"]
    err = _error(_post(served.url, "/v1/chat/completions", raw=b"[1, 2]"), 400)
    assert "object" in err["message"]


def test_token_ids_outside_the_vocabulary_are_400(served):
    err = _error(_post(served.url, "/v1/completions", {"model": "pirate", "prompt": [5, 10**6]}), 400)
    assert "vocabulary" in err["message"]


def test_too_long_prompts_are_400(server_factory):
    s = server_factory(max_input_tokens=10, max_total_tokens=20)
    long_prompt = list(range(5, 16))  # 11 tokens
    err = _error(_post(s.url, "/v1/completions", {"model": "pirate", "prompt": long_prompt}), 400)
    assert "--max-input-tokens 10" in err["message"] and err["code"] == "context_length_exceeded"
    err = _error(
        _post(s.url, "/v1/completions", {"model": "pirate", "prompt": [5] * 8, "max_tokens": 13}), 400
    )
    assert err["param"] == "max_tokens" and "--max-total-tokens 20" in err["message"]
    # the chat default max_tokens fills the room left, and is accepted
    r = s.client().chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "Hi"}], temperature=0
    )
    assert r.usage.total_tokens <= 20
    assert (
        s.client().completions.create(model="pirate", prompt=[5] * 8, max_tokens=12).usage.prompt_tokens == 8
    )


def test_unknown_route_and_method_use_the_error_shape(served):
    _error(requests.get(f"{served.url}/v1/nothing", timeout=10), 404)
    _error(requests.get(f"{served.url}/v1/completions", timeout=10), 405)


def test_api_key(server_factory):
    s = server_factory(api_key="s3cret")
    assert requests.get(f"{s.url}/health", timeout=10).status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics"):
        err = _error(requests.get(f"{s.url}{path}", timeout=10), 401)
        assert err["code"] == "invalid_api_key"
        _error(requests.get(f"{s.url}{path}", headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
        assert requests.get(f"{s.url}{path}", headers={"Authorization": "Bearer s3cret"}, timeout=10).ok
    _error(_post(s.url, "/v1/completions", {"model": "pirate", "prompt": "hi"}), 401)
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    assert s.client("s3cret").completions.create(model="pirate", prompt="hi", max_tokens=2).choices


def _slow_stream(s, model="pirate", max_tokens=80):
    """A streaming request that runs long, started; (response, iterator of lines)."""
    body = {
        "model": model,
        "prompt": "Once",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    r = requests.post(f"{s.url}/v1/completions", json=body, stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: {")  # it is running
    return r, lines


def test_over_max_concurrent_requests_is_429_at_once(server_factory):
    s = server_factory(max_concurrent_requests=1, max_total_tokens=256)
    r, lines = _slow_stream(s)
    t0 = time.monotonic()
    err = _error(_post(s.url, "/v1/completions", {"model": "butler", "prompt": "hi", "max_tokens": 2}), 429)
    assert time.monotonic() - t0 < 5 and "--max-concurrent-requests 1" in err["message"]
    with pytest.raises(openai.RateLimitError):
        s.client().chat.completions.create(model="butler", messages=[{"role": "user", "content": "hi"}])
    assert [line for line in lines if line][-1] == "data: [DONE]"  # the running one finishes
    r.close()
    assert s.client().completions.create(model="butler", prompt="hi", max_tokens=2).choices  # a slot again


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _raw_post(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_a_client_that_goes_away_frees_its_slot(server_factory):
    s = server_factory(max_total_tokens=256, max_concurrent_requests=4)
    sock = _raw_post(
        s.port,
        b'{"model": "pirate", "prompt": "Once", "max_tokens": 240, "ignore_eos": true, "stream": true}',
    )
    received = b""
    while b"data: {" not in received:  # the stream is running
        received += sock.recv(4096)
    assert s.engine.num_running == 1
    sock.close()  # hang up mid-stream
    _wait(lambda: s.engine.num_running == 0 and s.state.in_flight == 0)
    text = requests.get(f"{s.url}/metrics", timeout=10).text
    assert 'loraforge:request_success_total{finished_reason="abort",model_name="pirate"} 1.0' in text
    # a non-streaming request whose client goes away is aborted too
    sock = _raw_post(s.port, b'{"model": "butler", "prompt": "Once", "max_tokens": 240, "ignore_eos": true}')
    _wait(lambda: s.engine.num_running == 1)
    sock.close()
    _wait(lambda: s.engine.num_running == 0 and s.state.in_flight == 0)
    text = requests.get(f"{s.url}/metrics", timeout=10).text
    assert 'loraforge:request_success_total{finished_reason="abort",model_name="butler"} 1.0' in text


def test_an_exception_in_one_request_fails_that_request_only(server_factory, reference):
    """The engine raising for one request (here: every request on 'robot', after its first output)
    gives that request a 500 or a stream error event; the server and other requests go on."""
    holder = {}
    s = server_factory()
    engine = s.engine
    real = engine.generate

    async def faulty(prompt, adapter, params):
        from loraforge.serving.engine import EngineError

        n = 0
        async for out in real(prompt, adapter, params):
            yield out
            n += 1
            if adapter == "robot" and n == 2:
                raise EngineError("request failed: RuntimeError: boom")
        holder["ok"] = True

    engine.generate = faulty
    client = s.client()
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(
            model="robot", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
    with pytest.raises(openai.APIError, match="boom"):
        list(
            client.completions.create(
                model="robot",
                prompt=PROMPT,
                max_tokens=8,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
    r = client.completions.create(model="pirate", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == reference("pirate", PROMPT, 12)
    assert holder["ok"]
    _wait(lambda: s.state.in_flight == 0)
    text = requests.get(f"{s.url}/metrics", timeout=10).text
    assert 'loraforge:request_success_total{finished_reason="error",model_name="robot"} 2.0' in text


@pytest.mark.parametrize(
    "message, status", [("the server is shutting down", 503), ("the prompt has 9 tokens; at most 8", 400)]
)
@pytest.mark.parametrize("stream", [False, True])
def test_the_engine_refusing_before_the_first_output_is_an_http_error(
    server_factory, message, status, stream
):
    s = server_factory()

    async def refuse(prompt, adapter, params):
        from loraforge.serving.engine import EngineError

        raise EngineError(message)
        yield  # an async generator, as the engine's

    s.engine.generate = refuse
    body = {"model": "pirate", "prompt": "hi", "stream": stream}
    err = _error(_post(s.url, "/v1/completions", body), status)
    assert message in err["message"]
    assert s.state.in_flight == 0
