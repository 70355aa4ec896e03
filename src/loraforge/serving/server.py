"""The HTTP side of ``loraforge serve``: an OpenAI-compatible FastAPI app over one :class:`Engine`.

Routes (names as vLLM's): ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (with an adapter root only),
``GET /health``, ``GET /metrics``, ``GET /`` (the chat page) and ``/static/...``.

The HTTP layer never touches the model: it checks a request, turns it into prompt ids and
:class:`SamplingParams`, and reads the engine's outputs. Each engine request of an HTTP request runs
as an asyncio task that puts its outputs on one queue (several prompts in one completions request
run at once, one choice each); cancelling those tasks (the client went away) aborts the engine
requests, whose slots the engine frees at its next step. The engine is created and started in the
app's lifespan and drained there on shutdown (uvicorn stops accepting first and lets running
responses finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from . import responses
from .metrics import RequestTimer, ServerMetrics
from .protocol import APIError, error_body, parse_adapter, parse_chat, parse_completion, parse_json

log = logging.getLogger("loraforge.serve")
PUBLIC_PATHS = ("/health",)  # besides the chat page and its static files (they hold no data)


@dataclass
class ServeConfig:
    """What the server needs besides the engine (the CLI's flags). The token limits and the
    vocabulary size are the engine's (it caps them at the model's context) once it is made."""

    base_id: str
    base_path: str
    adapters: dict[str, Path] = field(default_factory=dict)  # registered at start-up
    adapter_root: Path | None = None  # runtime loading allowed under this directory only
    api_key: str | None = None
    max_loras: int = 8
    max_concurrent_requests: int = 256
    max_input_tokens: int = 0  # set from the engine at start-up
    max_total_tokens: int = 0  # prompt + generated tokens of one request
    vocab_size: int = 0


class State:
    """One server's mutable state: the engine, in-flight count and metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.engine = None
        self.startup_error: BaseException | None = None
        self.in_flight = 0
        self.metrics = ServerMetrics(lambda: self.engine, config.max_loras)

    def acquire(self) -> None:
        """Take one of --max-concurrent-requests; 429 at once when none is free (never queued).
        Released by :meth:`release` when the response (or its stream) ends."""
        limit = self.config.max_concurrent_requests
        if self.in_flight >= limit:
            raise APIError(
                429,
                f"too many requests in flight (--max-concurrent-requests {limit}); retry later",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base); 404 naming the known ones."""
        if model == self.config.base_id:
            return None
        if model in self.engine.adapters:
            return model
        known = ", ".join([self.config.base_id, *self.engine.adapters])
        raise APIError(
            404,
            f"the model {model!r} does not exist; served models: {known}",
            param="model",
            code="model_not_found",
        )


def create_app(
    make_engine: Callable[[ServeConfig], object],
    config: ServeConfig,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; ``make_engine(config)`` builds the (unstarted) engine in the lifespan's start."""
    state = State(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = make_engine(config)
        config.max_input_tokens, config.max_total_tokens = engine.max_input_tokens, engine.max_total_tokens
        config.vocab_size = engine.vocab or len(engine.tokenizer)
        engine.start()
        state.engine = engine
        try:
            for name, path in config.adapters.items():
                await asyncio.to_thread(engine.register_adapter, name, Path(path))
        except BaseException as e:
            state.startup_error = e  # the CLI reports it in one line
            await engine.shutdown(drain=False)
            raise
        if on_ready is not None:
            on_ready()
        yield
        await engine.shutdown(drain=True)

    app = FastAPI(title="loraforge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    _add_error_handlers(app)
    if config.api_key:
        app.add_middleware(BearerAuth, key=config.api_key)
    _add_routes(app, state)
    static = Path(str(resources.files(__package__).joinpath("static")))
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")
    return app


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but /health and the chat page
    (a browser cannot attach the header to a page load; the page sends it with its API calls)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path == "/" or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):  # constant time for keys of equal length
            body = error_body(
                "invalid or missing API key: send Authorization: Bearer KEY", code="invalid_api_key"
            )
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):  # FastAPI's 422 -> OpenAI's 400
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(
            error_body(f"{param}: {first.get('msg', 'invalid')}", param=param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # one request fails; the server goes on
        log.exception("request %s failed", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)


def _add_routes(app: FastAPI, state: State) -> None:
    config = state.config

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/")
    async def page():
        index = Path(str(resources.files(__package__).joinpath("static", "index.html")))
        if not index.is_file():
            raise APIError(404, "no chat page in this installation (serving/static/index.html)")
        return FileResponse(index, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        base = {
            "id": config.base_id,
            "object": "model",
            "created": created,
            "owned_by": "loraforge",
            "root": str(config.base_path),
            "parent": None,
            "max_model_len": config.max_total_tokens,
        }
        adapters = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "loraforge",
                "root": str(path),
                "parent": config.base_id,
                "max_model_len": config.max_total_tokens,
            }
            for name, path in state.engine.adapters.items()
        ]
        return {"object": "list", "data": [base, *adapters]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(parse_json(await request.body()))
        adapter = state.resolve_model(req.sampling.model)
        engine = state.engine
        prompts = [
            await asyncio.to_thread(engine.encode, p) if isinstance(p, str) else p for p in req.prompts
        ]
        for ids in prompts:
            _check_length(config, ids, req.sampling.max_tokens, "prompt")
        params = responses.completion_params(req)
        jobs = [(ids, params) for ids in prompts]
        builder = responses.CompletionBuilder(engine, req, prompts, _new_id("cmpl"))
        return await _respond(request, state, adapter, req.sampling, jobs, builder)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_chat(parse_json(await request.body()))
        adapter = state.resolve_model(req.sampling.model)
        try:
            ids = await asyncio.to_thread(state.engine.encode_chat, req.messages, adapter)
        except Exception as e:  # the template refused the conversation (e.g. roles must alternate)
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
        max_tokens = req.sampling.max_tokens
        if max_tokens is None:  # OpenAI's chat default: as much as the context has room for
            max_tokens = max(config.max_total_tokens - len(ids), 1)
        _check_length(config, ids, max_tokens, "messages")
        params = responses.chat_params(req, max_tokens)
        if turn_end := await asyncio.to_thread(state.engine.chat_stop_ids, adapter):  # the template's
            params = replace(params, stop_token_ids=[*params.stop_token_ids, *turn_end])
        builder = responses.ChatBuilder(req, _new_id("chatcmpl"))
        return await _respond(request, state, adapter, req.sampling, [(ids, params)], builder)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        root = _adapter_root(config)
        req = parse_adapter(parse_json(await request.body()), need_path=True)
        if req.name == config.base_id:
            raise APIError(400, f"lora_name: {req.name!r} is the base model's id", param="lora_name")
        path = _inside(root, req.path)
        from .engine import AdapterError

        try:
            await asyncio.to_thread(state.engine.register_adapter, req.name, path)
        except AdapterError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path") from None
        log.info("adapter %r loaded from %s", req.name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        _adapter_root(config)
        req = parse_adapter(parse_json(await request.body()), need_path=False)
        try:
            await asyncio.to_thread(state.engine.unregister_adapter, req.name)
        except KeyError:
            raise APIError(
                404,
                f"lora_name: no adapter {req.name!r} is loaded",
                param="lora_name",
                code="model_not_found",
            ) from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.name}' removed successfully.")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _check_length(config: ServeConfig, ids: list[int], max_tokens: int, param: str) -> None:
    if not ids:
        raise APIError(400, f"{param}: the prompt has no tokens", param=param)
    if max(ids) >= config.vocab_size:
        raise APIError(
            400,
            f"{param}: token id {max(ids)} is outside the vocabulary (size {config.vocab_size})",
            param=param,
        )
    if len(ids) > config.max_input_tokens:
        raise APIError(
            400,
            f"{param}: the prompt has {len(ids)} tokens, over --max-input-tokens {config.max_input_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    if len(ids) + max_tokens > config.max_total_tokens:
        raise APIError(
            400,
            f"max_tokens: the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed "
            f"--max-total-tokens {config.max_total_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _adapter_root(config: ServeConfig) -> Path:
    if config.adapter_root is None:
        raise APIError(404, "loading adapters at runtime is off: start the server with --adapter-root DIR")
    return config.adapter_root


def _inside(root: Path, given: str) -> Path:
    """``given`` (relative to the root, or absolute) resolved, symlinks followed: it must lie in the root."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, given))
    if os.path.commonpath([real_root, real]) != real_root:
        raise APIError(400, f"lora_path: {given!r} is outside the adapter root {root}", param="lora_path")
    return Path(real)


class _Run:
    """The engine requests of one HTTP request: one task each, outputs on one queue as
    ``(index, output, error)``; ``output`` and ``error`` both None mark the end of a request."""

    def __init__(self, state: State, model: str, adapter: str | None, jobs: list):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.state, self.model, self.adapter = state, model, adapter
        self.tasks = [asyncio.create_task(self._pump(i, ids, params)) for i, (ids, params) in enumerate(jobs)]
        self.open = len(jobs)

    async def _pump(self, i: int, ids: list[int], params) -> None:
        timer = RequestTimer(self.state.metrics, self.model, time.perf_counter)
        reason, prompt_n, done_n, error = "abort", len(ids), 0, None
        try:
            gen = self.state.engine.generate(ids, self.adapter, params)
            try:
                async for out in gen:
                    timer.tokens(len(out.token_ids))
                    prompt_n, done_n = out.prompt_tokens, out.completion_tokens
                    reason = out.finish_reason or reason
                    await self.queue.put((i, out, None))
            finally:
                await gen.aclose()
        except asyncio.CancelledError:
            reason = "abort"
            raise
        except Exception as e:  # this request fails; the others go on
            reason, error = "error", e
            log.warning("request on %s failed: %s: %s", self.model, type(e).__name__, e)
        finally:
            timer.finish(reason, prompt_n, done_n)
        await self.queue.put((i, None, error))

    async def events(self) -> AsyncIterator[tuple[int, object, Exception | None]]:
        while self.open:
            event = await self.queue.get()
            if event[1] is None:
                self.open -= 1
            yield event

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _respond(request: Request, state: State, adapter, sampling, jobs, builder):
    state.acquire()
    run = _Run(state, sampling.model, adapter, jobs)
    streaming = False
    try:
        if not sampling.stream:

            async def collect():
                async for i, out, error in run.events():
                    _raise_early(error, builder.started(i))
                    if out is not None:
                        builder.add(i, out)
                return builder.response()

            body = await _unless_disconnected(request, collect())
            return JSONResponse(body) if body is not None else Response(status_code=499)
        # Streaming: wait for every request's first output before the 200, so that a request
        # refused by the engine still gets an HTTP error status.
        events, pending, early = run.events().__aiter__(), set(range(len(jobs))), []

        async def prime():
            async for i, out, error in events:
                _raise_early(error, builder.started(i))
                early.append((i, out, error))
                pending.discard(i)
                if not pending:
                    return True
            return True

        if await _unless_disconnected(request, prime()) is None:
            return Response(status_code=499)
        streaming = True  # the stream cancels the run and releases the slot when it ends
        return _EventStream(_stream(run, builder, early, events, sampling.include_usage), run, state)
    finally:
        if not streaming:
            await run.cancel()
            state.release()


def _raise_early(error: Exception | None, started: bool) -> None:
    """An engine error before a request's first output becomes this HTTP request's error."""
    if error is None:
        return
    raise responses.api_error(error, started)


class _EventStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (done, the client went away, the
    server cancelled it) the engine requests still running are aborted and the slot released."""

    def __init__(self, content, run: _Run, state: State):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run, self.state = run, state

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.run.cancel()
            self.state.release()


async def _stream(run: _Run, builder, early, events, include_usage: bool):
    try:
        for i, out, error in early:
            for chunk in builder.chunks(i, out, error):
                yield responses.sse(chunk)
        async for i, out, error in events:
            for chunk in builder.chunks(i, out, error):
                yield responses.sse(chunk)
        if include_usage:
            yield responses.sse(builder.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # the client went away (this is cancelled) or the end: abort what still runs
        await run.cancel()


async def _unless_disconnected(request: Request, coro):
    """``await coro``, unless the client disconnects first: then cancel it and return None."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()
