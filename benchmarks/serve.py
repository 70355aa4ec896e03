"""Benchmark of the multi-adapter serving engine (issue 17 item 8): one load, five systems.

    python -m benchmarks.serve [--model smollm2|reference|tiny] [--requests 256] [--concurrency 32]
        [--new-tokens 64] [--prompt-min 32] [--prompt-max 256] [--adapters 8] [--rounds 1]
        [--threads N] [--device cpu|cuda] [--dtype fp32|bf16] [--json OUT] [--quick]

Model: ``smollm2`` (default) SmolLM2-135M-Instruct's real weights (``builtin:smollm2``);
``reference`` issue 6's random Llama (hidden 512, 8 layers, vocabulary 32,000; prompt ids folded
into it; SmolLM2's tokenizer for text); ``tiny`` the shipped demo base (4 layers, hidden 128, its
own tokenizer: for tests). ``--adapters K`` LoRA adapters of ranks 8, 16, ..., 8K (alpha = 2r) on
q/k/v/o/gate/up/down, B random (seeded, std 0.02), saved with ``lf.save_adapter``.

Load (``serve_load``): ``--requests`` requests, prompts of ``--prompt-min..--prompt-max`` tokens of
real text, each on a random adapter (seeded), exactly ``--new-tokens`` greedy tokens each (EOS
ignored), driven by a closed loop of ``--concurrency`` clients. Systems (``serve_peers``):

  loraforge mixed      the engine, each request on its own adapter
  loraforge 1 adapter  the same requests all on one adapter (the middle rank: r=40 of 8..64)
  PEFT server          transformers generate + PEFT, batches of one adapter (set_adapter between)
  loraforge base       the same requests on the base (adapter None)
  transformers CB      transformers' continuous batching on the base

Before anything is timed, greedy outputs are checked equal: for each adapter a few prompts served
by the engine together (one mixed batch) against PEFT ``generate`` of each alone, and the base's
against transformers' continuous batching; a difference fails the run. The loads then run
``--rounds`` times, interleaved (the order rotating each round), after a warm-up load per system;
the table gives each system's median round and ratios = loraforge / peer. Last, batch-1 decoding
against the bound of reading every weight once per token at the memory bandwidth measured in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import common as C
from . import serve_load as L
from . import serve_peers as P
from .run import table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class Settings:
    model: str = "smollm2"
    requests: int = 256
    concurrency: int = 32
    new_tokens: int = 64
    prompt_min: int = 32
    prompt_max: int = 256
    adapters: int = 8
    rounds: int = 1
    max_batch_tokens: int = 2048
    checks: int = 2  # prompts per adapter (and for the base) in the equality checks
    bandwidth_mb: int = 1024
    threads: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    quick: bool = False

    @property
    def ranks(self) -> list[int]:
        return [8 * (i + 1) for i in range(self.adapters)]

    def describe(self) -> str:
        text = (
            f"{self.model}, {self.dtype}, {self.adapters} adapters r={','.join(map(str, self.ranks))}; "
            f"{self.requests} requests, closed loop of {self.concurrency} clients, prompts "
            f"{self.prompt_min}-{self.prompt_max} tokens, {self.new_tokens} new tokens each (EOS ignored); "
            f"max batch {self.concurrency} sequences / {self.max_batch_tokens} tokens; {self.rounds} "
            f"interleaved round(s) after a warm-up; {self.threads or torch.get_num_threads()} torch threads"
        )
        if self.quick:
            text += "  [--quick: SMALLER than the issue's load; figures not comparable to it]"
        return text


def quick_settings(s: Settings) -> Settings:
    return dataclasses.replace(
        s,
        requests=12,
        concurrency=4,
        new_tokens=6,
        prompt_min=8,
        prompt_max=24,
        adapters=3,
        checks=1,
        max_batch_tokens=256,
        bandwidth_mb=64,
        quick=True,
    )


# --------------------------------------------------------------------------------------------
# Model, tokenizer, adapters
# --------------------------------------------------------------------------------------------
def model_source(which: str) -> tuple[str, str, int | None]:
    """(model directory or ``""`` for the random reference, tokenizer directory, vocabulary to
    fold prompt ids into or None)."""
    from loraforge.pretrained import resolve

    if which == "smollm2":
        path = str(resolve("builtin:smollm2"))
        return path, path, None
    if which == "tiny":
        import loraforge.demo

        path = str(Path(loraforge.demo.__file__).parent / "assets" / "base")
        return path, path, None
    if which == "reference":
        return "", str(resolve("builtin:smollm2")), C.workload().vocab
    raise ValueError(f"unknown model {which!r}; use smollm2, reference or tiny")


def load_model(path: str, device: str, dtype: str) -> torch.nn.Module:
    """A fresh copy of the model in eval mode (the random reference is seeded: every copy equal)."""
    from transformers import AutoModelForCausalLM

    if not path:
        return C.llama(dataclasses.replace(C.workload(), dtype=C.DTYPES[dtype]), device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=C.DTYPES[dtype])
    return model.to(device).eval()


def make_adapters(model: torch.nn.Module, ranks: list[int], out: Path, seed: int) -> dict[str, Path]:
    """One adapter per rank on ``model`` (consumed), B random, each saved to ``out/<name>``."""
    import loraforge as lf

    names = [f"r{r}" for r in ranks]
    for i, (name, r) in enumerate(zip(names, ranks)):
        cfg = lf.LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=TARGETS)
        if i == 0:
            lf.inject(model, cfg, adapter=name)
        else:
            lf.add_adapter(model, name, cfg)
    C.randomize_lora_b(model, seed=seed)
    return {name: lf.save_adapter(model, out / name, adapter=name) for name in names}


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_equal(what: str, requests: list[L.Request], ours: list[list[int]], peer: list[list[int]]) -> str:
    """Raise AssertionError naming the first request whose tokens differ; else a one-line note."""
    for req, a, b in zip(requests, ours, peer, strict=True):
        if a != b:
            i = first_difference(a, b)
            raise AssertionError(
                f"{what}: request {req.idx} (adapter {req.adapter}, {len(req.prompt_ids)} prompt tokens) "
                f"differs at new token {i}: loraforge {a[i : i + 4]} vs peer {b[i : i + 4]}"
            )
    return f"{what}: {len(requests)} requests x {len(ours[0]) if ours else 0} tokens identical"


def agreement(a: L.LoadResult, b: L.LoadResult) -> str:
    same = sum(x == y for x, y in zip(a.outputs, b.outputs))
    return f"{a.system} vs {b.system}: {same}/{len(a.outputs)} requests token-identical in the timed runs"


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
def benchmark(s: Settings, log=print) -> dict:
    """Run everything; returns the results (rows, per-system metrics, checks) as a dict."""
    from transformers import AutoTokenizer

    from loraforge.serving.engine import Engine

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    path, tok_path, vocab = model_source(s.model)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    n = s.new_tokens
    tmp = tempfile.TemporaryDirectory(prefix="lf-serve-bench-")
    runner = asyncio.Runner()
    engine = peft_server = cb = None
    try:
        dirs = make_adapters(load_model(path, s.device, s.dtype), s.ranks, Path(tmp.name), s.seed + 2)
        names = list(dirs)
        single = names[len(names) // 2]
        requests = L.build_requests(tokenizer, s.requests, s.prompt_min, s.prompt_max, names, s.seed, vocab)
        check_reqs = [
            dataclasses.replace(r, idx=i, adapter=a)
            for i, (r, a) in enumerate(
                zip(
                    L.build_requests(
                        tokenizer,
                        s.checks * (len(names) + 1),
                        s.prompt_min,
                        s.prompt_max,
                        [None],
                        s.seed + 1,
                        vocab,
                    ),
                    [a for a in [*names, None] for _ in range(s.checks)],
                )
            )
        ]

        model = load_model(path, s.device, s.dtype)
        base_bytes = L.weight_bytes(model)
        engine = Engine(
            model,
            tokenizer,
            base_id=s.model,
            base_path=path or None,
            max_loras=len(names),
            max_batch_size=s.concurrency,
            max_batch_tokens=s.max_batch_tokens,
        )
        engine.start()
        for name, d in dirs.items():
            engine.register_adapter(name, d)
        ours = P.Ours(engine, "loraforge")
        ours_mixed, ours_base = P.Ours(engine, "loraforge mixed"), P.Ours(engine, "loraforge base")
        ours_one = P.Ours(engine, f"loraforge 1 adapter ({single})")
        peft_model = P.load_peft(load_model(path, s.device, s.dtype), dirs)
        peft_server = P.PeftServer(peft_model, pad_id(tokenizer), max_batch=s.concurrency)
        max_len = s.prompt_max + n
        cb = P.TransformersCB(load_model(path, s.device, s.dtype), s.concurrency, s.max_batch_tokens, max_len)
        log(f"models and {len(names)} adapters ready in {time.perf_counter() - start:.0f} s")

        def run(system, reqs, concurrency=s.concurrency) -> list[L.Trace]:
            return runner.run(L.closed_loop(system, reqs, concurrency, n))

        def load(system, reqs, started=True):
            """The whole load on ``system`` (started and stopped around it unless ``started``)."""

            def go() -> L.LoadResult:
                if not started:
                    system.start()
                try:
                    return L.summarize(system.name, run(system, reqs))
                finally:
                    if not started:
                        system.stop()

            return go

        # 1. outputs equal before anything is timed
        t0 = time.perf_counter()
        checks = []
        adapter_reqs = [r for r in check_reqs if r.adapter is not None]
        base_reqs = [r for r in check_reqs if r.adapter is None]
        got = run(ours, check_reqs, len(check_reqs))  # one mixed batch
        ours_out = {tr.request.idx: tr.tokens for tr in got}
        pad = pad_id(tokenizer)
        peft_out = [
            P.peft_generate(peft_model, [r.prompt_ids], r.adapter, n, pad)[0][0] for r in adapter_reqs
        ]
        checks.append(
            check_equal(
                "loraforge (mixed batch) vs PEFT generate, per adapter",
                adapter_reqs,
                [ours_out[r.idx] for r in adapter_reqs],
                peft_out,
            )
        )
        cb.start()
        try:
            cb_out = run(cb, base_reqs, len(base_reqs))
        finally:
            cb.stop()
        checks.append(
            check_equal(
                "loraforge base vs transformers continuous batching",
                base_reqs,
                [ours_out[r.idx] for r in base_reqs],
                [tr.tokens for tr in cb_out],
            )
        )
        for c in checks:
            log(f"check: {c}")
        log(f"checks done in {time.perf_counter() - t0:.0f} s")

        # 2. the loads, interleaved
        single_reqs, base_load = L.on_adapter(requests, single), L.on_adapter(requests, None)
        loads = {
            ours_mixed.name: load(ours_mixed, requests),
            ours_one.name: load(ours_one, single_reqs),
            peft_server.name: load(peft_server, requests, started=False),
            ours_base.name: load(ours_base, base_load),
            cb.name: load(cb, base_load, started=False),
        }
        warm = max(1, min(s.concurrency, s.requests))
        log(f"warm-up: {warm} requests per system")
        for system, reqs, started in (
            (ours, requests, True),
            (peft_server, requests, False),
            (cb, base_load, False),
        ):
            load(system, reqs[:warm], started)()
        peft_server.batches.clear()  # (count the timed rounds' generate calls only)
        t0 = time.perf_counter()
        results = L.interleaved_loads(loads, s.rounds, log)
        log(f"loads done in {time.perf_counter() - t0:.0f} s")
        med = {name: L.median_result(rs) for name, rs in results.items()}
        mixed, one, peft_r = med[ours_mixed.name], med[ours_one.name], med[peft_server.name]
        base_r, cb_r = med[ours_base.name], med[cb.name]

        # 3. batch-1 decode against the memory-bandwidth bound (and transformers' generate, for scale)
        b1_req = L.Request(0, requests[0].prompt_ids[: s.prompt_min], None)
        b1_tokens = max(n, 16)
        rates, fast_rates, hf_rates, bws = [], [], [], []
        for _ in range(3):
            bws.append(L.memory_bandwidth(s.device, s.bandwidth_mb))
            trace = runner.run(L.closed_loop(ours, [b1_req], 1, b1_tokens))[0]
            rates.append(L.decode_rate(trace))
            engine.batch_invariant = False  # one sequence, no padding rows (serve --no-batch-invariance)
            try:
                trace = runner.run(L.closed_loop(ours, [b1_req], 1, b1_tokens))[0]
            finally:
                engine.batch_invariant = True
            fast_rates.append(L.decode_rate(trace))
            hf_rates.append(P.generate_decode_rate(cb.model, b1_req.prompt_ids, b1_tokens, pad_id(tokenizer)))
        bw, how = max(bws)
        bound = bw / base_bytes
        rate, fast_rate, hf_rate = sorted(rates)[1], sorted(fast_rates)[1], sorted(hf_rates)[1]
        calls = peft_server.batches

        def best(name: str) -> float:
            return max(r.tok_s for r in results[name])

        rows = [
            C.Row(
                "serve",
                f"mixed {len(names)} adapters vs all on one: generated tok/s",
                mixed.tok_s,
                one.tok_s,
                "tok/s",
                f"loraforge, all on {single}",
                (">=", 0.8),
                best_ratio=best(ours_mixed.name) / best(ours_one.name),
            ),
            C.Row(
                "serve",
                f"mixed {len(names)} adapters: loraforge vs PEFT server",
                mixed.tok_s,
                peft_r.tok_s,
                "tok/s",
                "PEFT server",
                (">=", 3.0),
                note=f"{len(calls)} generate calls in the timed round(s), "
                f"{sum(r for _, r in calls) / max(1, len(calls)):.1f} requests each on average",
                best_ratio=best(ours_mixed.name) / best(peft_server.name),
            ),
            C.Row(
                "serve",
                "base model: loraforge vs transformers continuous batching",
                base_r.tok_s,
                cb_r.tok_s,
                "tok/s",
                "transformers CB",
                (">=", 0.8),
                best_ratio=best(ours_base.name) / best(cb.name),
            ),
            C.Row(
                "serve",
                "batch-1 decode vs weights-once-per-token bound (info)",
                rate,
                bound,
                "tok/s",
                "bound",
                None,
                note=f"{base_bytes / 1e6:.0f} MB of weights at {bw / 1e9:.1f} GB/s ({how}); decode rates "
                f"{', '.join(f'{r:.1f}' for r in rates)} tok/s ({b1_tokens} tokens after a "
                f"{len(b1_req.prompt_ids)}-token prompt); fraction of the bound reached = ratio",
            ),
            C.Row(
                "serve",
                "batch-1 decode, --no-batch-invariance, vs the bound (info)",
                fast_rate,
                bound,
                "tok/s",
                "bound",
                None,
                note=f"rates {', '.join(f'{r:.1f}' for r in fast_rates)} tok/s: steps not padded to 8 rows",
            ),
            C.Row(
                "serve",
                "batch-1 decode: loraforge vs transformers generate (info)",
                rate,
                hf_rate,
                "tok/s",
                "transformers generate",
                None,
                note=f"generate's rates {', '.join(f'{r:.1f}' for r in hf_rates)} tok/s, same prompt, "
                f"interleaved with ours",
            ),
        ]
        return {
            "settings": dataclasses.asdict(s),
            "workload": s.describe(),
            "checks": checks,
            "agreement": [agreement(mixed, peft_r), agreement(base_r, cb_r)],
            "systems": {name: [r.as_dict() for r in rs] for name, rs in results.items()},
            "median": {name: r.as_dict() for name, r in med.items()},
            "rows": rows,
            "bandwidth_gb_s": bw / 1e9,
            "weight_mb": base_bytes / 1e6,
            "runtime_s": time.perf_counter() - start,
        }
    finally:
        for system in (peft_server, cb):
            if system is not None:
                system.stop()
        if engine is not None:
            runner.run(engine.shutdown(drain=False))
        runner.close()
        tmp.cleanup()


def systems_table(median: dict[str, L.LoadResult | dict]) -> str:
    head = [
        "system",
        "requests",
        "tokens",
        "total s",
        "tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
    ]
    body = []
    for name, r in median.items():
        d = r if isinstance(r, dict) else r.as_dict()
        body.append(
            [
                name,
                str(d["requests"]),
                str(d["tokens"]),
                f"{d['total_s']:.1f}",
                f"{d['tok_s']:,.1f}",
                *(f"{d[k]:.1f}" for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")),
            ]
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n")[0])
    d = Settings()
    ap.add_argument("--model", default=d.model, choices=["smollm2", "reference", "tiny"])
    for flag in (
        "requests",
        "concurrency",
        "new_tokens",
        "prompt_min",
        "prompt_max",
        "adapters",
        "rounds",
        "max_batch_tokens",
        "checks",
        "bandwidth_mb",
        "threads",
        "seed",
    ):
        ap.add_argument(
            "--" + flag.replace("_", "-"), type=int, default=None, help=f"default {getattr(d, flag)}"
        )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=sorted(C.DTYPES))
    ap.add_argument("--quick", action="store_true", help="a small load for tests (figures not comparable)")
    ap.add_argument("--json", default="", help="also write all figures to this JSON file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    s = Settings(model=args.model, device=args.device, dtype=args.dtype)
    if args.quick:
        s = quick_settings(s)
    s = dataclasses.replace(
        s,
        **{
            k: v
            for k, v in vars(args).items()
            if k in vars(s) and v is not None and k not in ("model", "device", "dtype", "quick")
        },
    )
    if s.threads:
        torch.set_num_threads(s.threads)
    machine, date = C.machine(s.device), C.today()
    print(f"machine: {machine}\ndate: {date}\ndevice: {s.device}\nworkload: {s.describe()}", flush=True)
    log = lambda msg: print(msg, flush=True)
    try:
        result = benchmark(s, log)
    except Exception as e:  # a failed check or a failed system: one line, exit status 1
        traceback.print_exc()
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": machine,
                        "date": date,
                        "workload": s.describe(),
                        "error": f"{type(e).__name__}: {e}",
                    },
                    indent=2,
                )
            )
        return 1
    rows = result["rows"]
    print("\n" + systems_table(result["median"]))
    print("\n" + table(rows, {}))
    for line in result["checks"] + result["agreement"]:
        print(f"  {line}")
    print(f"\ntotal runtime: {result['runtime_s']:.0f} s{'  (--quick: reduced load)' if s.quick else ''}")
    if args.json:
        out = {
            "machine": machine,
            "date": date,
            "device": s.device,
            "quick": s.quick,
            **result,
            "rows": [r.as_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
