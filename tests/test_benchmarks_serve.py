"""The serving benchmark (``python -m benchmarks.serve``, issue 17 item 8): its load generator and
statistics on their own, the PEFT server's scheduling, and the quick benchmark end to end on the
shipped tiny demo base (the engine, the PEFT server and transformers' continuous batching all
really run; their figures on a tiny model mean nothing and are not checked). A system whose
outputs differ from loraforge's must fail the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder next to `src`, not installed

pytest.importorskip("peft")

from benchmarks import serve  # noqa: E402
from benchmarks import serve_load as L  # noqa: E402
from benchmarks import serve_peers as P  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(serve.model_source("tiny")[1])


def test_requests_are_seeded_windows_of_real_text(tokenizer):
    reqs = L.build_requests(tokenizer, 40, 5, 17, ["a", "b", None], seed=3)
    again = L.build_requests(tokenizer, 40, 5, 17, ["a", "b", None], seed=3)
    assert reqs == again  # every system and every round gets the same load
    assert reqs != L.build_requests(tokenizer, 40, 5, 17, ["a", "b", None], seed=4)
    assert all(5 <= len(r.prompt_ids) <= 17 for r in reqs)
    assert {r.adapter for r in reqs} == {"a", "b", None}
    assert [r.idx for r in reqs] == list(range(40))
    stream = L.text_ids(tokenizer, 4096)
    text = f" {' '.join(map(str, stream))} "
    assert all(
        f" {' '.join(map(str, r.prompt_ids))} " in text for r in reqs
    )  # contiguous windows of the text
    folded = L.build_requests(tokenizer, 10, 5, 17, [None], seed=3, vocab=50)
    assert all(0 <= t < 50 for r in folded for t in r.prompt_ids)
    assert [r.adapter for r in L.on_adapter(reqs, "z")] == ["z"] * 40
    with pytest.raises(ValueError, match="prompt lengths"):
        L.build_requests(tokenizer, 1, 9, 3, [None])


def test_percentile_interpolates_like_numpy():
    import numpy as np

    xs = [random.Random(1).random() for _ in range(37)]
    for q in (0, 1, 50, 90, 99, 100):
        assert L.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(L.percentile([], 50))


def test_summary_of_known_traces():
    req = L.Request(0, [1, 2], None)
    a = L.Trace(req, submitted=10.0, times=[10.5, 10.6, 10.8], tokens=[1, 2, 3])
    b = L.Trace(L.Request(1, [3], "x"), submitted=10.2, times=[11.2, 11.3, 12.0], tokens=[4, 5, 6])
    r = L.summarize("s", [a, b])
    assert (r.requests, r.tokens) == (2, 6)
    assert r.total_s == pytest.approx(2.0) and r.tok_s == pytest.approx(3.0)
    assert r.ttft_p50_ms == pytest.approx(750.0)  # 500 and 1000 ms
    assert r.itl_p50_ms == pytest.approx(150.0)  # gaps 100, 200, 100, 700 ms
    assert r.itl_p99_ms == pytest.approx(1e3 * L.percentile([0.1, 0.2, 0.1, 0.7], 99))
    assert r.outputs == [[1, 2, 3], [4, 5, 6]]
    assert "outputs" not in r.as_dict()
    assert L.decode_rate(b) == pytest.approx(2 / 0.8)


class _Echo:
    """A system that yields its tokens one per ``delay`` seconds and counts requests in flight."""

    name = "echo"

    def __init__(self, delay: float = 0.002, short: bool = False):
        self.delay, self.short = delay, short
        self.inflight = self.most = 0

    async def stream(self, request, new_tokens):
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            for i in range(new_tokens - self.short):
                await asyncio.sleep(self.delay)
                yield [request.idx * 100 + i], time.perf_counter()
        finally:
            self.inflight -= 1


def test_closed_loop_keeps_c_requests_in_flight_and_checks_token_counts():
    reqs = [L.Request(i, [1], None) for i in range(10)]
    system = _Echo()
    traces = asyncio.run(L.closed_loop(system, reqs, 3, 4))
    assert system.most == 3  # never more than C, and C once the loop runs
    assert [t.request.idx for t in traces] == list(range(10))
    assert all(t.tokens == [t.request.idx * 100 + i for i in range(4)] for t in traces)
    assert all(t.times[0] >= t.submitted and t.times == sorted(t.times) for t in traces)
    res = L.run_load(_Echo(), reqs, 20, 2)  # C above N: N clients
    assert res.requests == 10 and res.tokens == 20
    with pytest.raises(AssertionError, match="got 3 tokens, asked for 4"):
        asyncio.run(L.closed_loop(_Echo(short=True), reqs, 2, 4))


def test_interleaved_loads_rotate_and_take_the_median_round():
    order = []

    def fake(name, rates):
        it = iter(rates)

        def go():
            order.append(name)
            return L.LoadResult(name, 1, 1, 1.0, next(it), 0, 0, 0, 0)

        return go

    out = L.interleaved_loads({"a": fake("a", [3, 1, 2]), "b": fake("b", [5, 6, 4])}, 3, log=lambda m: None)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert L.median_result(out["a"]).tok_s == 2 and L.median_result(out["b"]).tok_s == 5


def test_peft_server_batches_one_adapter_oldest_first():
    server = P.PeftServer(peft_model=None, pad_id=0, max_batch=2)
    loop = asyncio.new_event_loop()
    try:
        for i, a in enumerate(["x", "y", "x", "x", "y", None]):
            server._waiting.append(P._Waiting(L.Request(i, [1], a), 4, loop, loop.create_future()))
        server._stopping = True
        batches = []
        while (b := server._next_batch()) is not None:
            batches.append([w.request.idx for w in b])
    finally:
        loop.close()
    assert batches == [[0, 2], [1, 4], [3], [5]]  # at most max_batch, the oldest's adapter first


def test_weight_bytes_counts_a_tied_head_once_and_no_lora():
    from conftest import tiny_llama

    import loraforge as lf

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()]}
    assert L.weight_bytes(model) == sum(unique.values())
    lf.inject(model, lf.LoraConfig(r=4, target_modules="all-linear"))
    assert L.weight_bytes(model) == sum(unique.values())


def test_memory_bandwidth_is_measured():
    rate, how = L.memory_bandwidth("cpu", mbytes=8, reps=2)
    assert 1e8 < rate < 1e13 and "MB fp32" in how


def test_check_equal_names_the_first_difference():
    reqs = [L.Request(0, [1, 2, 3], "r8"), L.Request(1, [4], None)]
    assert "2 requests x 3 tokens identical" in serve.check_equal("w", reqs, [[1, 2, 3], [4, 5, 6]],
                                                                   [[1, 2, 3], [4, 5, 6]])  # fmt: skip
    with pytest.raises(
        AssertionError, match=r"w: request 1 \(adapter None, 1 prompt tokens\) differs at new token 1"
    ):
        serve.check_equal("w", reqs, [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])


# --------------------------------------------------------------------------------------------
# End to end (the real engine and peers on the shipped tiny base)
# --------------------------------------------------------------------------------------------
def test_quick_benchmark_end_to_end(tmp_path, capsys, one_thread):
    pytest.importorskip("loraforge.serving.engine")
    out = tmp_path / "serve.json"
    code = serve.main(["--model", "tiny", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| system" in printed and "| benchmark" in printed and "total runtime" in printed
    assert "--quick" in printed
    result = json.loads(out.read_text())
    s = result["settings"]
    assert s["quick"] and s["model"] == "tiny"
    assert len(result["checks"]) == 2 and all("identical" in c for c in result["checks"])
    assert (
        f"{s['adapters'] * s['checks']} requests x {s['new_tokens']} tokens identical" in result["checks"][0]
    )
    systems = [
        "loraforge mixed",
        "loraforge 1 adapter (r16)",
        "PEFT server",
        "loraforge base",
        "transformers CB",
    ]
    assert list(result["median"]) == systems
    for name in systems:
        m = result["median"][name]
        assert m["requests"] == s["requests"] and m["tokens"] == s["requests"] * s["new_tokens"], m
        assert m["tok_s"] > 0 and m["ttft_p50_ms"] > 0 and m["itl_p99_ms"] >= m["itl_p50_ms"] > 0, m
        assert len(result["systems"][name]) == s["rounds"]
    rows = result["rows"]
    assert [r["target"] for r in rows] == [[">=", 0.8], [">=", 3.0], [">=", 0.8], None, None, None]
    assert all(r["ours"] > 0 and r["peer"] > 0 and math.isfinite(r["ratio"]) for r in rows), rows
    assert rows[3]["peer"] == pytest.approx(result["bandwidth_gb_s"] * 1e9 / (result["weight_mb"] * 1e6))
    assert all("requests token-identical" in a for a in result["agreement"])


def _flip_last(tokens: list[int]) -> list[int]:
    return tokens[:-1] + [tokens[-1] + 1]


def test_a_peft_output_that_differs_fails_the_run(monkeypatch, capsys, one_thread):
    pytest.importorskip("loraforge.serving.engine")
    real = P.peft_generate

    def wrong(model, prompts, adapter, new_tokens, pad):
        outs, times = real(model, prompts, adapter, new_tokens, pad)
        return [_flip_last(o) for o in outs], times

    monkeypatch.setattr(P, "peft_generate", wrong)
    assert serve.main(["--model", "tiny", "--quick"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: AssertionError: loraforge (mixed batch) vs PEFT generate" in printed
    assert "differs at new token 5" in printed


def test_a_transformers_output_that_differs_fails_the_run(monkeypatch, capsys, one_thread):
    pytest.importorskip("loraforge.serving.engine")
    real = P.TransformersCB.stream

    async def wrong(self, request, new_tokens):
        async for tokens, t in real(self, request, new_tokens):
            yield [tok + 1 for tok in tokens], t

    monkeypatch.setattr(P.TransformersCB, "stream", wrong)
    assert serve.main(["--model", "tiny", "--quick"]) == 1
    assert (
        "FAILED: AssertionError: loraforge base vs transformers continuous batching"
        in capsys.readouterr().out
    )


def test_bad_arguments():
    with pytest.raises(SystemExit):
        serve.main(["--model", "nonsense"])
    with pytest.raises(ValueError, match="unknown model"):
        serve.model_source("nonsense")
