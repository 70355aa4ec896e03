"""OpenAI's response shapes for ``loraforge serve``: whole responses, SSE chunks, logprobs.

A builder collects the engine's :class:`Output` deltas per choice (``index``) and writes either
the whole response (``response()``) or, as they arrive, stream chunks (``chunks()``).

Completions logprobs (what lm-evaluation-harness's ``local-completions`` reads)::

    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{token: logprob} | None],
     "text_offset": [int]}

With ``echo`` the prompt's tokens come first; the first prompt token has ``None`` (nothing predicts
it). ``top_logprobs[j]`` holds the k best alternatives and the chosen token itself (as vLLM, so
``max(top.values()) == token_logprob`` exactly when the token is the greedy one). ``text_offset[j]``
is where token j starts in the choice's ``text`` (the sum of the earlier tokens' lengths).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .protocol import APIError, error_body


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def api_error(e: Exception, started: bool) -> APIError:
    """The HTTP error of an engine request that failed before its first output."""
    from .engine import EngineError, RequestFailed

    if isinstance(e, KeyError):  # the adapter was unloaded between the check and the start
        return APIError(
            404,
            f"model: {e.args[0] if e.args else e} is no longer served",
            param="model",
            code="model_not_found",
        )
    if isinstance(e, EngineError) and "shutting down" in str(e):
        return APIError(503, f"the server is shutting down: {e}")
    if isinstance(e, EngineError) and not started and not isinstance(e, RequestFailed):
        return APIError(400, str(e))  # the engine refused this request's input
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def _params(**kwargs):
    from .engine import SamplingParams

    return SamplingParams(**kwargs)


def _common(s) -> dict:
    return dict(
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )


def completion_params(req):
    """max_tokens 0 (with echo): the prompt's log-probabilities only."""
    prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
    return _params(
        max_tokens=req.sampling.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=prompt_lp,
        **_common(req.sampling),
    )


def chat_params(req, max_tokens: int):
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _params(max_tokens=max_tokens, logprobs=logprobs, **_common(req.sampling))


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob, or (token, None) for the first prompt token
    offset: int = 0  # text_offset of the next token
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: bool = False


class _Builder:
    object_name = ""

    def __init__(self, n: int, request_id: str, model: str):
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.choices = [_Choice() for _ in range(n)]

    def started(self, i: int) -> bool:
        return self.choices[i].started

    def usage(self) -> dict:
        p = sum(c.prompt_tokens for c in self.choices)
        g = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    def envelope(self, choices: list, obj: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": obj or self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage_chunk(self) -> dict:
        return self.envelope([]) | {"usage": self.usage()}

    def error_chunk(self, e: Exception) -> dict:
        err = api_error(e, started=True)
        return error_body(err.message, err.type, err.param, err.code)


class CompletionBuilder(_Builder):
    object_name = "text_completion"

    def __init__(self, engine, req, prompts: list[list[int]], request_id: str):
        super().__init__(len(prompts), request_id, req.sampling.model)
        self.engine, self.req, self.prompts = engine, req, prompts
        self.raw = req.prompts

    def _take(self, i: int, out) -> tuple[str, list]:
        """(text, logprob entries) this output adds to choice i; updates the choice's totals."""
        c, text, entries = self.choices[i], "", []
        if not c.started and self.req.echo:
            raw = self.raw[i]
            text = raw if isinstance(raw, str) else self.engine.decode(raw)
            if out.prompt_logprobs is not None:
                first = self.engine.token_text(self.prompts[i][0])
                entries = [e if e is not None else (first, None) for e in out.prompt_logprobs]
        c.started = True
        c.prompt_tokens, c.completion_tokens = out.prompt_tokens, out.completion_tokens
        text += out.text
        entries += list(out.logprobs or [])
        c.finish_reason = out.finish_reason or c.finish_reason
        return text, entries

    def _logprobs(self, c: _Choice, entries: list) -> dict | None:
        if self.req.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for e in entries:
            if isinstance(e, tuple):  # the first prompt token: nothing predicts it
                token, value, top = e[0], None, None
            else:
                token, value = e.token, e.logprob
                top = {t: lp for _, t, lp in e.top}
                top[token] = value
            tokens.append(token)
            values.append(value)
            tops.append(top)
            offsets.append(c.offset)
            c.offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def add(self, i: int, out) -> None:
        c = self.choices[i]
        text, entries = self._take(i, out)
        c.text.append(text)
        c.logprobs += entries

    def response(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            c.offset = 0
            choices.append(
                {
                    "index": i,
                    "text": "".join(c.text),
                    "logprobs": self._logprobs(c, c.logprobs),
                    "finish_reason": c.finish_reason,
                }
            )
        return self.envelope(choices) | {"usage": self.usage()}

    def chunks(self, i: int, out, error) -> list[dict]:
        if error is not None:
            return [self.error_chunk(error)]
        if out is None:
            return []
        c = self.choices[i]
        text, entries = self._take(i, out)
        chunks = []
        if text or entries:
            chunks.append(
                self.envelope(
                    [
                        {
                            "index": i,
                            "text": text,
                            "logprobs": self._logprobs(c, entries),
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if out.finish_reason:
            chunks.append(
                self.envelope([{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}])
            )
        return chunks


def _chat_logprob(e, k: int) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return entry(e.token, e.logprob) | {"top_logprobs": [entry(t, lp) for _, t, lp in e.top[:k]]}


class ChatBuilder(_Builder):
    object_name = "chat.completion"

    def __init__(self, req, request_id: str):
        super().__init__(1, request_id, req.sampling.model)
        self.req = req
        self.k = req.top_logprobs or 0

    def _take(self, i: int, out) -> list:
        c = self.choices[i]
        c.started = True
        c.prompt_tokens, c.completion_tokens = out.prompt_tokens, out.completion_tokens
        c.finish_reason = out.finish_reason or c.finish_reason
        return [_chat_logprob(e, self.k) for e in (out.logprobs or [])] if self.req.logprobs else []

    def add(self, i: int, out) -> None:
        c = self.choices[i]
        c.logprobs += self._take(i, out)
        c.text.append(out.text)

    def response(self) -> dict:
        c = self.choices[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": {"content": c.logprobs} if self.req.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        return self.envelope([choice]) | {"usage": self.usage()}

    def chunks(self, i: int, out, error) -> list[dict]:
        if error is not None:
            return [self.error_chunk(error)]
        if out is None:
            return []
        first = not self.choices[i].started
        entries = self._take(i, out)
        obj, chunks = "chat.completion.chunk", []
        if first:
            chunks.append(
                self.envelope(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    obj,
                )
            )
        if out.text or entries:
            chunks.append(
                self.envelope(
                    [
                        {
                            "index": i,
                            "delta": {"content": out.text},
                            "logprobs": {"content": entries} if self.req.logprobs else None,
                            "finish_reason": None,
                        }
                    ],
                    obj,
                )
            )
        if out.finish_reason:
            chunks.append(
                self.envelope(
                    [{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}], obj
                )
            )
        return chunks

    def usage_chunk(self) -> dict:
        return self.envelope([], "chat.completion.chunk") | {"usage": self.usage()}
