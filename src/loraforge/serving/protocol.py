"""The OpenAI-compatible request bodies of ``loraforge serve``, checked field by field.

Parsing is explicit (no FastAPI body models): a malformed body or a field of the wrong type is a
400 in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` naming the field,
where FastAPI would answer 422 in its own shape. Types are strict, as OpenAI's are: ``"5"`` is not
an int and ``1`` is not a bool. Unknown fields are ignored (as vLLM does), so that clients sending
``user`` or other extras work; features loraforge lacks (``n`` > 1, penalties, ``logit_bias``,
``suffix``) are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's limit for completions' logprobs and chat's top_logprobs
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An HTTP error in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,  # noqa: A002
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 when it is not one)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(value) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


class _Fields:
    """Typed getters over one JSON object; each raises a 400 naming the field."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body, self.prefix = body, prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str, kinds: tuple, what: str, default=None):
        value = self.body.get(key)
        if value is None:
            return default
        # bool is an int in Python; JSON true is not a number
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad(self.name(key), f"expected {what}, got {_kind(value)}")
        return value

    def int(self, key: str, default=None, lo: int | None = None, hi: int | None = None):
        value = self.get(key, (int,), "an integer", default)
        if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            raise bad(self.name(key), f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = float(self.get(key, (int, float), "a number", default))
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise bad(self.name(key), f"must be in {interval}, got {value}")
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        return self.get(key, (bool,), "a boolean", default)

    def str(self, key: str, default=None, required: bool = False):
        value = self.get(key, (str,), "a string", default)
        if required and not value:
            raise bad(self.name(key), "is required" if key not in self.body else "must not be empty")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.get(key, (list,), "an array of integers", [])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad(self.name(key), "expected an array of non-negative integers")
        return value

    def stop(self) -> list[str]:
        value = self.get("stop", (str, list), "a string or an array of strings", [])
        value = [value] if isinstance(value, str) else value
        if not all(isinstance(s, str) for s in value):
            raise bad(self.name("stop"), "expected a string or an array of strings")
        if len(value) > 16:
            raise bad(self.name("stop"), f"at most 16 stop strings, got {len(value)}")
        return [s for s in value if s]

    def refuse_unsupported(self) -> None:
        """Fields loraforge does not implement: refused unless they ask for the default."""
        n = self.int("n", 1)
        if n != 1:
            raise bad("n", f"only n=1 is supported, got {n}")
        for key in ("presence_penalty", "frequency_penalty"):
            if self.get(key, (int, float), "a number", 0) != 0:
                raise bad(key, "is not supported (only 0)")
        if self.get("logit_bias", (dict,), "an object", {}):
            raise bad("logit_bias", "is not supported")
        best_of = self.int("best_of", 1)
        if best_of != 1:
            raise bad("best_of", f"only best_of=1 is supported, got {best_of}")


@dataclass
class Sampling:
    """What both endpoints share; ``max_tokens`` None = the room left under --max-total-tokens."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    stream: bool
    include_usage: bool


def _sampling(f: _Fields, max_tokens: int | None) -> Sampling:
    stream = f.bool("stream")
    options = f.get("stream_options", (dict,), "an object", {})
    include_usage = _Fields(options, "stream_options.").bool("include_usage")
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    return Sampling(
        model=f.str("model", required=True),
        max_tokens=max_tokens,
        temperature=f.number("temperature", 1.0, 0.0, 2.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=f.int("seed"),
        stop=f.stop(),
        stop_token_ids=f.int_list("stop_token_ids"),
        ignore_eos=f.bool("ignore_eos"),
        stream=stream,
        include_usage=include_usage,
    )


@dataclass
class CompletionRequest:
    sampling: Sampling
    prompts: list[str | list[int]]  # one choice per prompt
    echo: bool = False
    logprobs: int | None = None


def parse_completion(body: dict) -> CompletionRequest:
    f = _Fields(body)
    f.refuse_unsupported()
    if f.str("suffix"):
        raise bad("suffix", "is not supported")
    echo = f.bool("echo")
    # max_tokens 0 with echo: score the prompt only (what log-likelihood evaluations send)
    max_tokens = f.int("max_tokens", 16, lo=0 if echo else 1)
    return CompletionRequest(
        sampling=_sampling(f, max_tokens),
        prompts=_prompts(body.get("prompt")),
        echo=echo,
        logprobs=f.int("logprobs", None, lo=0, hi=MAX_LOGPROBS),
    )


def _prompts(value: Any) -> list[str | list[int]]:
    """prompt: a string, an array of strings, an array of token ids or an array of such arrays."""
    what = "a string, an array of strings, an array of token ids or an array of arrays of token ids"

    def ids(v) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if value is None:
        raise bad("prompt", "is required")
    if isinstance(value, str):
        prompts = [value]
    elif ids(value) and value:
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(ids(v) for v in value):
        prompts = list(value)
    else:
        raise bad("prompt", f"expected {what}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise bad("prompt", f"prompt {i} is empty")
        if isinstance(p, list) and min(p) < 0:
            raise bad("prompt", f"prompt {i} holds a negative token id")
    return prompts


@dataclass
class ChatRequest:
    sampling: Sampling
    messages: list[dict] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None


def parse_chat(body: dict) -> ChatRequest:
    f = _Fields(body)
    f.refuse_unsupported()
    # max_completion_tokens is OpenAI's newer name; max_tokens the older one vLLM still accepts
    max_tokens = f.int("max_completion_tokens", None, lo=1)
    max_tokens = max_tokens if max_tokens is not None else f.int("max_tokens", None, lo=1)
    logprobs = f.bool("logprobs")
    top = f.int("top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    return ChatRequest(
        sampling=_sampling(f, max_tokens),
        messages=_messages(body.get("messages")),
        logprobs=logprobs,
        top_logprobs=top,
    )


def _messages(value: Any) -> list[dict]:
    """[{role, content}] with content a string or an array of text parts (joined)."""
    if value is None:
        raise bad("messages", "is required")
    if not isinstance(value, list) or not value:
        raise bad("messages", f"expected a non-empty array of messages, got {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"expected an object, got {_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise bad(f"{where}.content[{j}]", 'only text parts ({"type": "text", "text": ...})')
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(
                f"{where}.content", f"expected a string or an array of text parts, got {_kind(content)}"
            )
        out.append({"role": role, "content": content})
    return out


@dataclass
class AdapterRequest:
    name: str
    path: str | None


def parse_adapter(body: dict, need_path: bool) -> AdapterRequest:
    f = _Fields(body)
    name = f.str("lora_name", required=True)
    if len(name) > 128 or any(c.isspace() or not c.isprintable() for c in name):
        raise bad("lora_name", "at most 128 printable characters, no spaces")
    path = f.str("lora_path", required=need_path)
    return AdapterRequest(name, path)
