"""The serving benchmark's load, its client, its statistics and the memory-bandwidth bound.

Load. ``N`` requests built once (seeded) and replayed, identical, against every system: request
``i`` has a prompt of ``prompt_min..prompt_max`` token ids cut from a stream of real text (the demo
corpus builder's stories, tokenized by the model's tokenizer) and an adapter drawn at random from
the registered ones (or ``None``: the base). Every request asks for exactly ``new_tokens`` greedy
tokens with end-of-sequence ignored, so every system generates ``N * new_tokens`` tokens and the
throughputs compare the same work.

Client. A *closed loop* of ``C`` asyncio clients (what vLLM's ``benchmark_serving --max-concurrency``
and most serving papers call a fixed concurrency): each takes the next request of the list, waits
until its last token arrived, then takes the next, so ``C`` requests are in flight until the list
runs out. A system is anything with ``async stream(request, new_tokens)`` yielding
``(token_ids, timestamp)`` pairs (``time.perf_counter`` seconds) as tokens come out.

Statistics (per system, one run of the whole list): generated tokens / s over the wall time from
the first submission to the last token; time to first token (TTFT: first token's timestamp minus
the request's submission, queueing included) p50 / p99 over requests; inter-token latency (ITL:
the gaps between a request's successive tokens, all requests' gaps pooled, as vLLM reports it)
p50 / p99. Percentiles interpolate linearly (numpy's default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import torch

from . import common as C


@dataclasses.dataclass(frozen=True)
class Request:
    idx: int
    prompt_ids: list[int]
    adapter: str | None


class System(Protocol):
    name: str

    def stream(self, request: Request, new_tokens: int) -> AsyncIterator[tuple[list[int], float]]: ...


def text_ids(tokenizer, n_tokens: int, seed: int = 17) -> list[int]:
    """``n_tokens`` token ids of real English text: the demo corpus builder's short stories
    (``loraforge.demo.data.story``, seed ``seed``), as the quantization benchmark reads them."""
    from .quant_quality import held_out_ids

    return held_out_ids(tokenizer, n_tokens, seed).tolist()


def build_requests(
    tokenizer,
    n: int,
    prompt_min: int,
    prompt_max: int,
    adapters: list[str | None],
    seed: int = 0,
    vocab: int | None = None,
) -> list[Request]:
    """``n`` requests: lengths uniform in ``[prompt_min, prompt_max]``, each prompt a window of the
    text stream at a random offset, each adapter uniform over ``adapters``. ``vocab``: fold ids
    into ``range(vocab)`` (a random-weight model whose vocabulary is smaller than the tokenizer's)."""
    if not 1 <= prompt_min <= prompt_max:
        raise ValueError(f"prompt lengths {prompt_min}..{prompt_max}: need 1 <= min <= max")
    stream = text_ids(tokenizer, max(4 * prompt_max, 4096))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(prompt_min, prompt_max)
        start = rng.randrange(len(stream) - length)
        ids = stream[start : start + length]
        if vocab is not None:
            ids = [t % vocab for t in ids]
        out.append(Request(i, ids, rng.choice(adapters)))
    return out


def on_adapter(requests: list[Request], adapter: str | None) -> list[Request]:
    """The same requests (prompts, order) with every one on ``adapter``."""
    return [dataclasses.replace(r, adapter=adapter) for r in requests]


@dataclasses.dataclass
class Trace:
    """What one request saw: its submission time, each token's time and the tokens."""

    request: Request
    submitted: float
    times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


async def closed_loop(
    system: System, requests: list[Request], concurrency: int, new_tokens: int
) -> list[Trace]:
    """Run ``requests`` through ``system`` with ``concurrency`` clients (module docstring); the
    traces come back in request order. A request that returns another number of tokens than
    asked is an error (the throughputs would not compare the same work)."""
    pending = iter(requests)
    traces: list[Trace] = []

    async def client() -> None:
        for req in pending:  # (one shared iterator: each client takes the next request)
            trace = Trace(req, time.perf_counter())
            traces.append(trace)
            async for tokens, t in system.stream(req, new_tokens):
                trace.tokens += tokens
                trace.times += [t] * len(tokens)
            if len(trace.tokens) != new_tokens:
                raise AssertionError(
                    f"{system.name}: request {req.idx} got {len(trace.tokens)} tokens, asked for {new_tokens}"
                )

    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(requests))))))
    return sorted(traces, key=lambda tr: tr.request.idx)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclasses.dataclass
class LoadResult:
    system: str
    requests: int
    tokens: int
    total_s: float
    tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    outputs: list[list[int]] = dataclasses.field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("outputs")
        return d


def summarize(system: str, traces: list[Trace]) -> LoadResult:
    start = min(tr.submitted for tr in traces)
    end = max(tr.times[-1] for tr in traces if tr.times)
    tokens = sum(len(tr.tokens) for tr in traces)
    ttft = [tr.times[0] - tr.submitted for tr in traces if tr.times]
    itl = [b - a for tr in traces for a, b in zip(tr.times, tr.times[1:])]
    total = end - start
    return LoadResult(
        system=system,
        requests=len(traces),
        tokens=tokens,
        total_s=total,
        tok_s=tokens / total if total > 0 else math.nan,
        ttft_p50_ms=1e3 * percentile(ttft, 50),
        ttft_p99_ms=1e3 * percentile(ttft, 99),
        itl_p50_ms=1e3 * percentile(itl, 50),
        itl_p99_ms=1e3 * percentile(itl, 99),
        outputs=[list(tr.tokens) for tr in traces],
    )


def run_load(
    system: System, requests: list[Request], concurrency: int, new_tokens: int, run: Callable = asyncio.run
) -> LoadResult:
    """:func:`closed_loop` summarized; ``run`` runs the coroutine (``asyncio.run``, or an
    ``asyncio.Runner``'s ``run`` to keep one event loop across loads)."""
    traces = run(closed_loop(system, requests, concurrency, new_tokens))
    return summarize(system.name, traces)


def interleaved_loads(
    loads: dict[str, Callable[[], LoadResult]], rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[LoadResult]]:
    """Each round runs every load once, the order rotating from round to round (as
    ``common.interleaved``), so that whatever else the machine does hits all systems alike."""
    names = list(loads)
    out: dict[str, list[LoadResult]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            res = loads[n]()
            out[n].append(res)
            log(
                f"  round {i + 1}/{rounds} {n}: {res.tok_s:,.1f} tok/s, {res.total_s:.1f} s, "
                f"TTFT p50 {res.ttft_p50_ms:.0f} ms, ITL p50 {res.itl_p50_ms:.1f} ms"
            )
    return out


def median_result(results: list[LoadResult]) -> LoadResult:
    """The round whose throughput is the median (the lower middle one for an even count)."""
    ordered = sorted(results, key=lambda r: r.tok_s)
    return ordered[(len(ordered) - 1) // 2]


# --------------------------------------------------------------------------------------------
# The memory-bandwidth bound of batch-1 decoding
# --------------------------------------------------------------------------------------------
def memory_bandwidth(device: str, mbytes: int = 1024, reps: int = 5) -> tuple[float, str]:
    """(bytes / s, how) this process reads memory at: the best of ``reps`` timings of a sum over
    an fp32 tensor of ``mbytes`` MB (bytes read / time) and of a copy into a second one (bytes
    read + written / time), with torch's current thread count. The largest figure is taken: the
    bound it sets is then the most generous one."""
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = (0.0, "")
    for what, traffic in (("sum", 4 * n), ("copy", 8 * n)):
        for i in range(reps + 1):  # (the first call warms up)
            C.sync(device)
            t0 = time.perf_counter()
            src.sum() if what == "sum" else dst.copy_(src)
            C.sync(device)
            rate = traffic / (time.perf_counter() - t0)
            if i and rate > best[0]:
                best = (rate, f"{what} of {mbytes} MB fp32")
    return best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base model's parameters and buffers, each tensor counted once (a tied embedding /
    LM head is one tensor): what one decoding step of the base must read at least once. LoRA
    factors (``lora_`` in the name) are left out: a base request reads none of them."""
    seen: set[int] = set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def decode_rate(trace: Trace) -> float:
    """Decode tokens / s of one request: the tokens after the first over the time they took."""
    if len(trace.times) < 2 or trace.times[-1] <= trace.times[0]:
        return math.nan
    return (len(trace.times) - 1) / (trace.times[-1] - trace.times[0])
