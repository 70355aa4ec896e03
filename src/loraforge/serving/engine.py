"""The serving engine: one model in memory, one thread that owns it, many adapters per step.

Iteration-level (continuous) batching, as in Orca / vLLM: every step runs ONE forward for all
running sequences — the whole prompt of a sequence that has just been admitted, one token of
every sequence that is decoding — then samples each sequence's next token. New requests join
between steps, finished or cancelled ones leave. Each token carries its sequence's adapter:
the base matmuls run once for all tokens, each adapter's low-rank product on its own tokens
(``layers/tokens.py``); attention reads each sequence's own KV cache (``attention.py``).

Adapters: any number registered (name -> directory), at most ``max_loras`` loaded in the model
at once; one that is not loaded is loaded when a request needs it, evicting the least recently
used adapter that no running request uses (LRU). A request waits while no slot can be freed.

Everything that touches the model runs on the engine thread: other threads submit requests
(``generate``) and commands (``register_adapter``...) and get results through queues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_files import load_adapter
from ..adapters import delete_adapter, set_token_plan
from ..config import LoraConfig
from ..files import read_json_object
from ..layers.tokens import MIN_ROWS, TokenPlan
from ..methods import config_from_peft_dict
from ..training.data import FALLBACK_CHAT_TEMPLATE, encode_prompt
from . import attention
from .sampling import SamplingParams, TokenLogprob, choose, generator_for, logprob_of
from .text import Detokenizer, chat_template_of


class EngineError(RuntimeError):
    """A request cannot be served (bad input, shutting down) or failed; others are unaffected."""


class RequestFailed(EngineError):
    """A request failed while it ran (an exception in its step): a server error, not bad input."""


class AdapterError(EngineError):
    """An adapter cannot be registered: not an adapter, does not fit the base, name taken."""


@dataclass
class Output:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class _Seq:
    """A request inside the engine."""

    _ids = itertools.count()

    def __init__(self, prompt, adapter, params, loop, queue, detok):
        self.id = next(self._ids)
        self.prompt: list[int] = prompt
        self.adapter: str | None = adapter
        self.params: SamplingParams = params
        self.loop, self.queue = loop, queue
        self.out: list[int] = []
        self.cache: attention.KVCache | None = None
        self.generator = None
        self.detok: Detokenizer = detok
        self.cancelled = False
        self.done = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)

    def send(self, item) -> None:
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True


class Engine:
    """See the module docstring. ``model``: a transformers causal LM whose attention goes
    through transformers' attention interface (Llama, Mistral, Qwen2, GPT-2, ...), possibly with
    a 4-bit base; ``tokenizer``: its tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        base_id: str = "base",
        base_path: str | Path | None = None,
        max_loras: int = 8,
        max_batch_size: int = 32,
        max_batch_tokens: int = 2048,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        batch_invariant: bool = True,
    ) -> None:
        if max_loras < 1 or max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_loras, max_batch_size and max_batch_tokens must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_id, self.base_path = base_id, (str(base_path) if base_path else None)
        self.max_loras, self.max_batch_size = max_loras, max_batch_size
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_total_tokens = min(max_total_tokens or context, context)
        self.max_input_tokens = min(max_input_tokens or self.max_total_tokens, self.max_total_tokens)
        self.max_batch_tokens = max(max_batch_tokens, self.max_input_tokens)
        self.device = next(model.parameters()).device
        self.vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else None
        self._eos = _eos_ids(model, tokenizer)
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent calls
        self._base_template = getattr(tokenizer, "chat_template", None)
        self._adapters: dict[str, Path] = {}
        self._templates: dict[str, str | None] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU order: oldest first
        # batch_invariant: every matmul gets >= MIN_ROWS rows, so that a request's tokens do not
        # depend on the other requests in its steps (layers/tokens.py); off: faster small steps.
        self._plan = TokenPlan(MIN_ROWS if batch_invariant else 1)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._commands: deque = deque()
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._keep_logits = _accepts(model, "logits_to_keep")
        attention.install(model)

    # -- public API (any thread) ----------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    @property
    def batch_invariant(self) -> bool:
        """Whether steps are padded so that a request's tokens do not depend on the others (see
        ``layers/tokens.py``); may be switched between requests."""
        return self._plan.min_rows > 1

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        self._plan.min_rows = MIN_ROWS if on else 1

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
            self._thread.start()
        return self

    def register_adapter(self, name: str, path: str | Path) -> None:
        """Check ``path`` against the base (by loading it) and make ``name`` servable."""
        self._command(self._register, name, Path(path))

    def unregister_adapter(self, name: str) -> None:
        self._command(self._unregister, name)

    def encode(self, text: str) -> list[int]:
        """A completions prompt as training and ``loraforge generate --raw`` start it (the BOS
        token, when the tokenizer has one, then the text: ``training.data.encode_prompt``)."""
        with self._tok_lock:
            return encode_prompt(self.tokenizer, text)

    def _chat_template(self, adapter: str | None) -> str:
        template = self._templates.get(adapter) if adapter else None
        template = template or self._base_template or next((t for t in self._templates.values() if t), None)
        return FALLBACK_CHAT_TEMPLATE if template is None else template

    def chat_stop_ids(self, adapter: str | None = None) -> list[int]:
        """The chat template's end-of-turn token when it is a token other than EOS (llama3's
        <|eot_id|> on a Llama 3 base, whose EOS is <|end_of_text|>): a chat answer stops there."""
        from ..chat_templates import turn_end_id

        with self._tok_lock:
            end = turn_end_id(self.tokenizer, self._chat_template(adapter))
        return [] if end is None or end in self._eos else [end]

    def encode_chat(self, messages: list[dict], adapter: str | None = None) -> list[int]:
        """The prompt for a chat: the template saved with the adapter, else the base's."""
        template = self._chat_template(adapter)
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=template
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        with self._tok_lock:
            return _token_text(self.tokenizer, token_id)

    async def generate(
        self, prompt: list[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[Output]:
        """Outputs for one request as the engine produces them (see SERVE_API / the module)."""
        seq = self._admit(prompt, adapter, params)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                seq.cancelled = True  # the engine drops it at its next step
                self._notify()

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain``, finish what is running and waiting; stop the thread."""
        self._accepting = False
        if not drain:
            for seq in list(self._waiting) + list(self._running):
                seq.cancelled = True
        self._stop = True
        self._notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- requests --------------------------------------------------------------------------------
    def _admit(self, prompt, adapter, params: SamplingParams) -> _Seq:
        if not self._accepting:
            raise EngineError("the server is shutting down")
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(adapter)
        try:
            params.check()
        except ValueError as e:
            raise EngineError(str(e)) from None
        if not prompt:
            raise EngineError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < (self.vocab or 1 << 62) for t in prompt):
            raise EngineError(f"prompt token ids must be integers in [0, {self.vocab})")
        if len(prompt) > self.max_input_tokens:
            raise EngineError(
                f"the prompt has {len(prompt)} tokens; at most {self.max_input_tokens} are allowed"
            )
        if len(prompt) + params.max_tokens > self.max_total_tokens:
            raise EngineError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"{self.max_total_tokens} tokens a request may use"
            )
        loop = asyncio.get_running_loop()
        seq = _Seq(list(prompt), adapter, params, loop, asyncio.Queue(), Detokenizer(self, params))
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _command(self, fn, *args):
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.append((future, fn, args))
            self._wake.notify()
        return future.result()

    # -- adapters (engine thread) -----------------------------------------------------------------
    def _register(self, name: str, path: Path) -> None:
        if not name or name == self.base_id or name in self._adapters:
            raise AdapterError(f"adapter name {name!r} is taken (or empty)")
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"{path}: not an adapter directory (no adapter_config.json)")
        try:
            template = chat_template_of(path)
            cfg = config_from_peft_dict(read_json_object(path / "adapter_config.json"), str(path))
        except (ValueError, OSError) as e:
            raise AdapterError(str(e)) from None
        if not isinstance(cfg, LoraConfig):
            # the engine gives each token its own adapter through LoRA's token plan; the other
            # methods' holders would apply one adapter to every sequence of the step
            raise AdapterError(
                f"{path}: a {cfg.peft_type} adapter; loraforge serve serves LoRA adapters (DoRA and "
                "rsLoRA included); use loraforge generate or the library for this one"
            )
        self._load(name, path)  # checks it against the base; rolled back on failure
        self._adapters[name], self._templates[name] = path, template
        self._fit_residents(keep=set())

    def _unregister(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(name)
        busy = any(s.adapter == name for s in self._running) or any(s.adapter == name for s in self._waiting)
        del self._adapters[name]  # new requests can no longer name it
        self._templates.pop(name, None)
        if not busy:
            self._evict(name)
        # else: evicted when its last request is done (see _drop)

    def _load(self, name: str, path: Path) -> None:
        try:
            load_adapter(self.model, path, adapter=name)
        except Exception as e:  # any failure to fit the base: one line, the model unchanged
            raise AdapterError(f"adapter {name!r} ({path}): {e}") from None
        self.model.eval()
        self._resident[name] = None
        set_token_plan(self.model, self._plan)  # layers wrapped just now need the plan too

    def _evict(self, name: str) -> None:
        if name in self._resident:
            delete_adapter(self.model, name)
            del self._resident[name]

    def _fit_residents(self, keep: set[str]) -> bool:
        """Evict least recently used idle adapters until at most max_loras are loaded."""
        busy = {s.adapter for s in self._running} | keep
        for name in list(self._resident):
            if len(self._resident) <= self.max_loras:
                break
            if name not in busy:
                self._evict(name)
        return len(self._resident) <= self.max_loras

    def _make_resident(self, name: str, busy: set[str]) -> bool:
        """Load ``name`` if it is not, making room if an idle adapter can go; False: no room."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return True
        idle = [n for n in self._resident if n not in busy]
        if len(self._resident) >= self.max_loras and not idle:
            return False
        if len(self._resident) >= self.max_loras:
            self._evict(idle[0])
        self._load(name, self._adapters[name])
        return True

    # -- the loop (engine thread) -----------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._commands or self._waiting or self._running or self._stop):
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
            for future, fn, args in commands:
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(e)
            try:
                self._drop_cancelled()
                batch = self._schedule()
                if batch:
                    self._step(batch)
            except Exception as e:  # noqa: BLE001  (a bug of ours: fail what runs, keep serving)
                batch = []
                for seq in list(self._running):
                    self._fail(seq, e)
            if not batch and self._stop and not self._running and not self._waiting:
                break
            if not batch and not commands and self._waiting and not self._running:
                time.sleep(0.001)  # waiting on an adapter slot that nothing will free: not a spin

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._drop(seq)
        self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _drop(self, seq: _Seq) -> None:
        seq.done = True
        seq.cache = None
        if seq in self._running:
            self._running.remove(seq)
        a = seq.adapter
        if a and a not in self._adapters and not any(s.adapter == a for s in self._running):
            self._evict(a)  # unregistered while it was in use

    def _schedule(self) -> list[tuple[_Seq, bool]]:
        """(sequence, is_new) for this step: every running sequence, plus waiting ones that fit
        the batch size, the step's token budget and an adapter slot (in arrival order)."""
        batch = [(s, False) for s in self._running]
        tokens = len(batch)
        busy = {s.adapter for s in self._running if s.adapter}
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            if tokens + len(seq.prompt) > self.max_batch_tokens and tokens > 0:
                break
            if seq.adapter is not None:
                if seq.adapter not in self._adapters:  # unregistered while it waited
                    self._waiting.popleft()
                    self._fail(seq, KeyError(seq.adapter))
                    continue
                try:
                    if not self._make_resident(seq.adapter, busy):
                        break  # every slot is in use by running requests: wait for one to finish
                except AdapterError as e:  # the directory changed since it was registered
                    self._waiting.popleft()
                    self._fail(seq, e)
                    continue
                busy.add(seq.adapter)
            self._waiting.popleft()
            seq.cache = attention.KVCache(len(seq.prompt) + seq.params.max_tokens)  # (grows as needed)
            seq.generator = generator_for(seq.params, "cpu")
            self._running.append(seq)
            batch.append((seq, True))
            tokens += len(seq.prompt)
        return batch

    def _fail(self, seq: _Seq, error: BaseException) -> None:
        if not isinstance(error, EngineError | KeyError):
            error = RequestFailed(f"request failed: {type(error).__name__}: {error}")
        try:
            self._drop(seq)
        finally:
            seq.send(error)

    def _step(self, batch: list[tuple[_Seq, bool]]) -> None:
        try:
            rows = self._forward(batch)
        except Exception:  # noqa: BLE001
            # Find whose request it was: run each alone (re-running a step rewrites the same
            # cache positions, so this is safe); only the ones that fail alone fail.
            rows = {}
            for item in batch:
                try:
                    rows.update(self._forward([item]))
                except Exception as e:  # noqa: BLE001
                    self._fail(item[0], e)
        for seq, new in batch:
            if seq.id in rows and not seq.done:
                try:
                    self._advance(seq, new, rows[seq.id])
                except Exception as e:  # noqa: BLE001
                    self._fail(seq, e)

    def _forward(self, batch: list[tuple[_Seq, bool]]) -> dict[int, torch.Tensor]:
        """One forward for the batch; {sequence id: its logits rows (fp32)}: the last token's
        row, or every prompt position's when the request asked for prompt log-probabilities."""
        # Decoding tokens first (at least min_rows rows, padded), then the new prompts grouped
        # by adapter: the layout layers/tokens.py expects (and what keeps it batch invariant).
        decoding = [seq for seq, new in batch if not new]
        prompts = sorted((seq for seq, new in batch if new), key=lambda s: s.adapter or "")
        ids, pos, names, segments, keep, spans = [], [], [], [], [], {}

        def add(seq, toks, past):
            start = len(ids)
            ids.extend(toks)
            pos.extend(range(past, past + len(toks)))
            names.extend([seq.adapter] * len(toks))
            segments.append(attention.Segment(seq.cache, start, len(toks), past))
            every = past == 0 and seq.params.prompt_logprobs is not None
            first = start if every else start + len(toks) - 1
            spans[seq.id] = (len(keep), start + len(toks) - first)
            keep.extend(range(first, start + len(toks)))

        def pad(n):
            ids.extend([0] * n)
            pos.extend([0] * n)
            names.extend([None] * n)

        for seq in decoding:
            add(seq, seq.out[-1:], seq.length - 1)
        if decoding:
            pad(max(0, self._plan.min_rows - len(ids)))
        n_decode = len(ids)
        for seq in prompts:
            add(seq, seq.prompt, 0)
        pad(max(0, self._plan.min_rows - len(ids)))  # (see layers/tokens.py: batch invariance)
        keep += [0] * max(0, self._plan.min_rows - len(keep))
        dev = self.device
        kwargs = {}
        if self._keep_logits:
            kwargs["logits_to_keep"] = torch.tensor(keep, device=dev)
        self._plan.set(names, list(self._resident), n_decode)
        try:
            with torch.inference_mode(), attention.running(attention.Step(segments)):
                logits = self.model(
                    input_ids=torch.tensor([ids], device=dev),
                    position_ids=torch.tensor([pos], device=dev),
                    use_cache=False,
                    **kwargs,
                ).logits[0]
        finally:
            self._plan.clear()
        if not self._keep_logits:
            logits = logits[torch.tensor(keep, device=dev)]
        logits = logits.float().cpu()
        return {sid: logits[a : a + n] for sid, (a, n) in spans.items()}

    def _advance(self, seq: _Seq, new: bool, rows: torch.Tensor) -> None:
        """Sample the next token from the last row, detokenize, check stops, send the output."""
        p = seq.params
        prompt_lp = None
        if new and p.prompt_logprobs is not None:
            lp = torch.log_softmax(rows, dim=-1)
            prompt_lp = [None] + [
                logprob_of(lp[i], seq.prompt[i + 1], p.prompt_logprobs, self.token_text)
                for i in range(len(seq.prompt) - 1)
            ]
        if p.max_tokens == 0:  # echo only: the prompt's log-probabilities
            self._finish(seq, Output([], "", None, prompt_lp, "length", len(seq.prompt), 0))
            return
        last = rows[-1]
        token = choose(last, p, seq.generator)
        token_lp = None
        if p.logprobs is not None:
            token_lp = [logprob_of(torch.log_softmax(last, dim=-1), token, p.logprobs, self.token_text)]
        seq.out.append(token)
        reason = None
        if token in self._eos and not p.ignore_eos or token in p.stop_token_ids:
            reason = "stop"
        text, stopped = seq.detok.add(token, eos=reason is not None)
        if stopped:
            reason = "stop"
        elif reason is None and (len(seq.out) >= p.max_tokens or seq.length >= self.max_total_tokens):
            reason = "length"
        if reason is not None:
            text += seq.detok.flush()
        out = Output([token], text, token_lp, prompt_lp, reason, len(seq.prompt), len(seq.out))
        if reason is not None:
            self._finish(seq, out)
        else:
            seq.send(out)

    def _finish(self, seq: _Seq, out: Output) -> None:
        self._drop(seq)  # first: whoever reads the last output sees the request gone
        seq.send(out)


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _token_text(tokenizer, token_id: int) -> str:
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return ""
    return tokenizer.convert_tokens_to_string([token])
