"""The systems the serving benchmark drives with one load (``serve_load.closed_loop``).

* :class:`Ours`: loraforge's engine (``loraforge.serving.engine.Engine``), every request through
  ``engine.generate`` with greedy sampling and ``ignore_eos``; a token's time is when the client
  received it.
* :class:`PeftServer`: the server a PEFT user writes around transformers' ``generate``: one
  ``PeftModel`` with every adapter loaded (``PeftModel.from_pretrained`` + ``load_adapter``), a
  worker thread that takes up to ``max_batch`` waiting requests of one adapter (the adapter of the
  oldest waiting request, in arrival order), ``set_adapter``, left-pads them into one batch, runs
  ``model.generate`` to the end and hands each request its tokens. A logits processor stamps the
  time of each step, which is the time of that step's token for every row (the processor runs
  just before the token is picked), so the clients see the latencies the batch really had, not
  the time the whole batch returned.
* :class:`TransformersCB`: transformers' own continuous batching (``init_continuous_batching``: a
  paged KV cache and a scheduler that adds and removes requests between steps; the machinery of
  ``generate_batch``), streaming; base model only (it has no adapters).

End of sequence is ignored by all three, so each request generates exactly the tokens asked for:
``ignore_eos`` in ours; ``eos_token_id=-1`` for transformers' batching; for ``generate``,
``eos_token_id=None`` (no stop). ``min_new_tokens`` would not do: it forbids the EOS token, so
greedy picks another one, where ignoring EOS emits it and goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from .serve_load import Request


class Ours:
    """loraforge's engine as a benchmark system."""

    def __init__(self, engine, name: str = "loraforge"):
        self.engine = engine
        self.name = name

    async def stream(self, request: Request, new_tokens: int) -> AsyncIterator[tuple[list[int], float]]:
        from loraforge.serving.engine import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        async for out in self.engine.generate(list(request.prompt_ids), request.adapter, params):
            if out.token_ids:
                yield list(out.token_ids), time.perf_counter()


# --------------------------------------------------------------------------------------------
# PEFT + generate, batches of one adapter
# --------------------------------------------------------------------------------------------
class _StepStamps:
    """A transformers ``LogitsProcessor`` that records the time of each generation step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def load_peft(model: torch.nn.Module, adapter_dirs: dict[str, Path]):
    """``model`` (a transformers causal LM) wrapped by PEFT with every adapter loaded, eval mode."""
    import peft

    names = list(adapter_dirs)
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        wrapped.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return wrapped.eval()


def peft_generate(
    model, prompts: list[list[int]], adapter: str | None, new_tokens: int, pad_id: int
) -> tuple[list[list[int]], list[float]]:
    """One left-padded ``generate`` call of ``prompts`` on ``adapter`` (``None``: adapters
    disabled), greedy, exactly ``new_tokens`` tokens each; returns the new tokens per prompt and
    the time of each step."""
    import contextlib

    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    stamps = _StepStamps()
    if adapter is None:
        scope = model.disable_adapter()
    else:
        model.set_adapter(adapter)
        scope = contextlib.nullcontext()
    with scope, torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([stamps]),
        )
    return out[:, width:].tolist(), stamps.times


def generate_decode_rate(model, prompt: list[int], new_tokens: int, pad_id: int) -> float:
    """Batch-1 decode tokens / s of plain ``model.generate`` (KV cache, greedy): the tokens after
    the first over the time between the first and the last step."""
    from transformers import LogitsProcessorList

    stamps = _StepStamps()
    device = next(model.parameters()).device
    with torch.no_grad():
        model.generate(
            input_ids=torch.tensor([prompt], device=device),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([stamps]),
        )
    return (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])


@dataclasses.dataclass
class _Waiting:
    request: Request
    new_tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class PeftServer:
    """A PEFT user's server (module docstring). ``start()`` starts the worker thread, ``stop()``
    ends it once the queue is empty."""

    def __init__(self, peft_model, pad_id: int, max_batch: int, name: str = "PEFT server"):
        self.model = peft_model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.name = name
        self.batches: list[tuple[str | None, int]] = []  # (adapter, rows) of each generate call
        self._waiting: list[_Waiting] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peft-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def stream(self, request: Request, new_tokens: int) -> AsyncIterator[tuple[list[int], float]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            self._waiting.append(_Waiting(request, new_tokens, loop, future))
            self._cv.notify()
        tokens, times = await future
        for tok, t in zip(tokens, times):
            yield [tok], t

    def _next_batch(self) -> list[_Waiting] | None:
        """Up to ``max_batch`` waiting requests of the oldest waiting request's adapter (and its
        length of generation), in arrival order; None once stopping with nothing left."""
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if not self._waiting:
                return None
            head = self._waiting[0]
            key = (head.request.adapter, head.new_tokens)
            batch = [w for w in self._waiting if (w.request.adapter, w.new_tokens) == key][: self.max_batch]
            taken = {id(w) for w in batch}
            self._waiting = [w for w in self._waiting if id(w) not in taken]
            return batch

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while (batch := self._next_batch()) is not None:
            adapter, n = batch[0].request.adapter, batch[0].new_tokens
            try:
                outs, times = peft_generate(
                    self.model, [w.request.prompt_ids for w in batch], adapter, n, self.pad_id
                )
                self.batches.append((adapter, len(batch)))
                for w, toks in zip(batch, outs):
                    w.loop.call_soon_threadsafe(_resolve, w.future, (toks, times))
            except Exception as e:  # every request of the failed batch fails, the server goes on
                for w in batch:
                    w.loop.call_soon_threadsafe(_fail, w.future, e)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


# --------------------------------------------------------------------------------------------
# transformers' continuous batching (base model)
# --------------------------------------------------------------------------------------------
class TransformersCB:
    """transformers' continuous batching manager on ``model`` (the base, no adapters), streaming.

    Sized like our engine: at most ``max_batch`` requests per step and ``max_batch_tokens`` tokens
    per forward; a paged KV cache of pages of ``page_size`` tokens with room for ``max_batch``
    sequences of ``max_len`` tokens. Attention: the model's (SDPA; transformers switches to a
    flash-attention kernel by itself where one is installed)."""

    def __init__(
        self,
        model,
        max_batch: int,
        max_batch_tokens: int,
        max_len: int,
        page_size: int = 64,
        name: str = "transformers CB",
    ):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = model
        self.name = name
        pages = max_batch * -(-max_len // page_size) + max_batch
        self.cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=pages,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_batch,
        )
        self.gen_config = GenerationConfig(
            do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16
        )
        self.manager = None
        self._ids = 0

    def start(self) -> None:
        self.manager = self.model.init_continuous_batching(
            generation_config=self.gen_config, continuous_batching_config=self.cb_config
        )
        if next(self.model.parameters()).is_cuda:
            self.manager.warmup()  # (captures CUDA graphs where it uses them; nothing to do on CPU)
        self.manager.start()

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True)
            self.manager.destroy()
            self.manager = None

    async def stream(self, request: Request, new_tokens: int) -> AsyncIterator[tuple[list[int], float]]:
        if request.adapter is not None:
            raise ValueError(f"{self.name} serves the base only, not adapter {request.adapter!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self._ids += 1
        rid = f"bench-{self._ids}"
        self.manager.register_result_handler(rid, queue.put_nowait)
        self.manager.add_request(
            list(request.prompt_ids),
            request_id=rid,
            max_new_tokens=new_tokens,
            streaming=True,
            eos_token_id=-1,
        )
        seen = 0
        while True:
            out = await queue.get()
            if out.error is not None:
                raise RuntimeError(f"{self.name}: request {request.idx} failed: {out.error}")
            now = time.perf_counter()
            if len(out.generated_tokens) > seen:  # (each streamed output holds every token so far)
                yield list(out.generated_tokens[seen:]), now
                seen = len(out.generated_tokens)
            if out.is_finished():
                return
