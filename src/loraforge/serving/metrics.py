"""``GET /metrics``: Prometheus text exposition format 0.0.4, written by hand (no client library).

Names follow vLLM's (``vllm:...`` there, ``loraforge:...`` here) so that dashboards carry over:

- ``loraforge:num_requests_running`` / ``_waiting`` (gauges, read from the engine at scrape time)
- ``loraforge:time_to_first_token_seconds``, ``loraforge:inter_token_latency_seconds``,
  ``loraforge:e2e_request_latency_seconds`` (histograms, measured in the server per request;
  label ``model_name``)
- ``loraforge:prompt_tokens_total``, ``loraforge:generation_tokens_total`` (counters)
- ``loraforge:request_success_total{finished_reason=stop|length|abort|error}`` (counter)
- ``loraforge:lora_requests_info{max_lora, running_lora_adapters, resident_lora_adapters}`` (info
  gauge, value 1) and ``loraforge:lora_requests_running{adapter}`` (gauge per adapter in flight)

A histogram's buckets are cumulative: ``_bucket{le="x"}`` counts observations <= x, the ``+Inf``
bucket equals ``_count``; ``_sum`` is the sum of the observations.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable

# Bucket bounds in seconds (vLLM's for the same three histograms, trimmed)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class _Family:
    kind = ""

    def __init__(self, name: str, help: str):  # noqa: A002
        self.name, self.help = name, help
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing count per label set; the name ends in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, help: str):  # noqa: A002
        assert name.endswith("_total"), name
        super().__init__(name, help)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in items]


class Gauge(_Family):
    """Values read at scrape time from ``read()``: ``[(labels dict, value)]``."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], Iterable[tuple[dict, float]]]):  # noqa: A002
        super().__init__(name, help)
        self.read = read

    def lines(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(tuple(labels.items()))} {_number(v)}" for labels, v in self.read()
        ]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):  # noqa: A002
        super().__init__(name, help)
        self.bounds = tuple(sorted(buckets))
        # per label set: [count per bucket (not cumulative; last = above every bound)], sum, count
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            counts, total = self.series.setdefault(key, ([0] * (len(self.bounds) + 1), [0.0]))
            counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
            total[0] += value

    def lines(self) -> list[str]:
        out = self.header()
        with self.lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self.series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts):
                running += n
                out.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {running}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(key)} {running}")
        return out


class ServerMetrics:
    """Every metric of one server; ``engine`` is read at scrape time."""

    def __init__(self, engine_ref: Callable[[], object | None], max_loras: int):
        self.engine_ref, self.max_loras = engine_ref, max_loras
        self.running_by_adapter: dict[str, int] = {}  # adapter (or base id) -> requests in flight
        self.lock = threading.Lock()
        p = "loraforge:"
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Time between two output tokens in seconds.", ITL_BUCKETS
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "End-to-end request latency in seconds (arrival to last token).",
            E2E_BUCKETS,
        )
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Number of generated tokens.")
        self.finished = Counter(
            p + "request_success_total",
            "Finished engine requests by finish reason (stop, length, abort, error).",
        )
        self.families = [
            Gauge(
                p + "num_requests_running",
                "Number of requests running in the engine.",
                lambda: [({}, self._engine("num_running"))],
            ),
            Gauge(
                p + "num_requests_waiting",
                "Number of requests waiting for a slot in the engine.",
                lambda: [({}, self._engine("num_waiting"))],
            ),
            Gauge(
                p + "lora_requests_info",
                "Adapters with requests in flight and adapters resident.",
                self._lora_info,
            ),
            Gauge(
                p + "lora_requests_running",
                "Requests in flight per model (adapter or base).",
                self._by_adapter,
            ),
            self.ttft,
            self.itl,
            self.e2e,
            self.prompt_tokens,
            self.generation_tokens,
            self.finished,
        ]

    def _engine(self, attr: str) -> float:
        engine = self.engine_ref()
        return float(getattr(engine, attr)) if engine is not None else 0.0

    def _lora_info(self):
        engine = self.engine_ref()
        resident = list(engine.resident) if engine is not None else []
        with self.lock:
            running = sorted(k for k, n in self.running_by_adapter.items() if n > 0)
        engine_adapters = engine.adapters if engine is not None else {}
        running = [a for a in running if a in engine_adapters]
        return [
            (
                {
                    "max_lora": str(self.max_loras),
                    "running_lora_adapters": ",".join(running),
                    "resident_lora_adapters": ",".join(resident),
                },
                1.0,
            )
        ]

    def _by_adapter(self):
        with self.lock:
            return [({"adapter": k}, float(n)) for k, n in sorted(self.running_by_adapter.items())]

    def started(self, model: str) -> None:
        with self.lock:
            self.running_by_adapter[model] = self.running_by_adapter.get(model, 0) + 1

    def ended(self, model: str) -> None:
        with self.lock:
            self.running_by_adapter[model] -= 1

    def render(self) -> str:
        lines: list[str] = []
        for family in self.families:
            lines += family.lines()
        return "\n".join(lines) + "\n"


class RequestTimer:
    """Latencies of one engine request, observed into ``metrics`` as its outputs arrive.

    TTFT: arrival -> first output carrying tokens. Inter-token latency: the time between two such
    outputs, split evenly over the tokens of the later one (one observation per token, as vLLM).
    """

    def __init__(self, metrics: ServerMetrics, model: str, now: Callable[[], float]):
        self.metrics, self.model, self.now = metrics, model, now
        self.start = now()
        self.last: float | None = None
        self.done = False
        metrics.started(model)

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = self.now()
        if self.last is None:
            self.metrics.ttft.observe(t - self.start, model_name=self.model)
        else:
            for _ in range(n):
                self.metrics.itl.observe((t - self.last) / n, model_name=self.model)
        self.last = t

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.ended(self.model)
        m.e2e.observe(self.now() - self.start, model_name=self.model)
        m.prompt_tokens.inc(prompt_tokens, model_name=self.model)
        m.generation_tokens.inc(completion_tokens, model_name=self.model)
        m.finished.inc(finished_reason=reason, model_name=self.model)
