"""Run the benchmarks of issue 6 and print one table: loraforge | peer | ratio | target | met?

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--size ref|1b|smollm2] [--only NAMES]
                             [--dtype fp32|bf16|fp16] [--threads N] [--json OUT] [--markdown]

``ratio`` is always loraforge's figure divided by the peer's, in the row's unit: for tok/s
(throughput) higher is better, for s / ms / MB lower is better; the target column gives issue
6's bound on that ratio, judged on medians. ``ratio of best`` is the same ratio from each side's
fastest sample: other processes' load only adds time, so where it differs much from the median
ratio the machine was too busy for that row.

``--quick`` runs a smaller workload (2 layers, batch 2 x 64) and skips the largest shapes, and
says so in its output; its figures are not the reference ones.

``--size smollm2`` runs the groups on the real SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``,
converted once into loraforge's cache; needs the ``smollm2`` extra) instead of random weights::

    python -m benchmarks.run --size smollm2 --threads 1 --only lora_step,qlora_step,memory,mixed,inference
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch._dynamo

from . import common as C


def _nf4(wl: C.Workload, device: str) -> list[C.Row]:
    """(3) NF4 quantize / dequantize throughput vs bitsandbytes: ``benchmarks/bench_quant.py``
    (written with the QLoRA engine) measures it; we turn its figures into rows."""
    from . import bench_quant

    return bench_quant.rows(wl, device)


def _groups() -> dict:
    from . import bench_bound, bench_compile, bench_dora, bench_lora, bench_memory, bench_qlora

    return {
        "lora_step": bench_lora.training_step,
        "qlora_step": bench_qlora.training_step,
        "nf4": _nf4,
        "linear4bit": bench_qlora.linear4bit,
        "inference": bench_lora.inference,
        "mixed": bench_lora.mixed_batch,
        "switch": bench_lora.adapter_switch,
        "memory": bench_memory.peak_memory,
        "bound": bench_bound.lower_bound,
        "compile": bench_compile.compiled_step,
        "checkpointing": bench_memory.checkpointing,
        "dora_step": bench_dora.training_step,
    }


GROUP_NAMES = (
    "lora_step", "qlora_step", "nf4", "linear4bit", "inference", "mixed", "switch", "memory", "bound",
    "compile", "checkpointing", "dora_step",
)


def table(rows: list[C.Row], errors: dict[str, str]) -> str:
    head = ["benchmark", "loraforge", "peer", "ratio", "target", "met?", "ratio of best"]
    body = []
    for r in rows:
        target = f"{r.target[0]} {r.target[1]:g}" if r.target else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        ratio = "n/a" if math.isnan(r.ratio) else f"{r.ratio:.3f}"
        best = "-" if getattr(r, "best_ratio", None) is None else f"{r.best_ratio:.3f}"
        peer = f"{C.fmt(r.peer, r.unit)} ({r.peer_name})"
        body.append([r.name, C.fmt(r.ours, r.unit), peer, ratio, target, met, best])
    for group, err in errors.items():
        body.append([f"{group}: FAILED", err[:60], "", "", "", "NO", ""])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["notes:"] + notes if notes else []))


def markdown(rows: list[C.Row], machine: str, date: str) -> str:
    """Rows for BENCHMARKS.md: benchmark | loraforge | peer | ratio | machine | date."""
    out = ["| benchmark | loraforge | peer | ratio | machine | date |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.name} | {C.fmt(r.ours, r.unit)} | {C.fmt(r.peer, r.unit)} ({r.peer_name}) | "
            f"{r.ratio:.3f} | {machine} | {date} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller workload, < 3 minutes on 2 cores")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--size",
        default="ref",
        choices=["ref", "1b", "smollm2", "tiny"],
        help="ref: issue 6's workload; 1b: TinyLlama-1.1B shape in bf16 (GPU); smollm2: the real "
        "SmolLM2-135M-Instruct, batch 4 x 128; tiny: smoke test",
    )
    ap.add_argument(
        "--dtype",
        default="",
        choices=["", "fp32", "bf16", "fp16"],
        help="override the size's dtype (ref: fp32, 1b: bf16), e.g. to try the bf16 checks on CPU",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(GROUP_NAMES)}")
    ap.add_argument("--json", default="", help="also write all figures to this JSON file")
    ap.add_argument("--markdown", action="store_true", help="also print rows for BENCHMARKS.md")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(GROUP_NAMES)
    unknown = sorted(set(names) - set(GROUP_NAMES))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(GROUP_NAMES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")

    start = time.perf_counter()
    wl = C.workload(args.quick, args.size, args.threads, args.dtype)
    C.apply_threads(wl)
    machine, date = C.machine(args.device), C.today()
    print(f"machine: {machine}\ndate: {date}\ndevice: {args.device}\nworkload: {wl.describe()}", flush=True)
    groups = _groups()
    rows: list[C.Row] = []
    errors: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        # Each group compiles afresh: Dynamo's per-function recompile limit (8) counts every model
        # earlier groups compiled (floor, PEFT, QLoRA: different guards), and past it the compiled
        # layers silently run eagerly.
        torch._dynamo.reset()
        try:
            got = groups[name](wl, args.device)
        except C.PartialFailure as e:
            got = e.rows
            errors[name] = str(e)
            print(f"[{name}] partly FAILED: {e}", flush=True)
        except Exception as e:  # one failing group must not hide the others' figures
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED after {time.perf_counter() - t0:.0f} s: {errors[name]}", flush=True)
            continue
        rows += got
        for r in got:
            print(
                f"[{name}] {r.name}: {C.fmt(r.ours, r.unit)} vs {C.fmt(r.peer, r.unit)} "
                f"({r.peer_name}), ratio {r.ratio:.3f}",
                flush=True,
            )
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    runtime = time.perf_counter() - start
    print()
    print(table(rows, errors))
    print(f"\ntotal runtime: {runtime:.0f} s{'  (--quick: reduced workload, see above)' if wl.quick else ''}")
    if args.markdown:
        threads = torch.get_num_threads()
        print("\n" + markdown(rows, f"{machine}, {threads} torch thread{'s' * (threads > 1)}", date))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "date": date,
                    "device": args.device,
                    "workload": wl.describe(),
                    "quick": wl.quick,
                    "runtime_s": runtime,
                    "rows": [r.as_dict() for r in rows],
                    "errors": errors,
                },
                f,
                indent=2,
            )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
