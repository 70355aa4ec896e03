"""``loraforge compare``: the parameter-efficient methods side by side on the demo task.

The comparison the LoRA and QLoRA papers make, measured here on one base and one task (the
pirate character of ``loraforge demo``): each method at a comparable budget of trainable
parameters (about 16 k, the demo LoRA's; IA3 has a fixed size, far smaller: see ``METHODS``), trained with
``lf.train`` for the same steps, then

- trainable parameters and the adapter's size on disk;
- held-out loss and the demo's style / content scores (greedy answers to held-out questions);
- training time;
- decoding latency at batch 1 and 32 (ms per generated token, greedy) with the adapter kept
  apart, and merged where the method allows it (``merge_and_unload``: the adapter in the weights,
  the original module classes, as one deploys it), each as a ratio to the base model timed in the
  same loop;
- the context each method consumes (virtual tokens put before every prompt).
- how the seeds differ: a seed changes the initialisation, the batch order and the answers'
  phrasings (``loraforge demo``'s data), not the base or the held-out questions.

Every cell is the mean ± sample standard deviation over the seeds (3 by default). What the
papers claim should be visible: adapters add latency at small batch, merged LoRA adds none,
prefix and prompt tuning take context away.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..files import atomic_write_text, dir_size, format_bytes, sha256_file
from .measure import format_table
from .runs import FULL, QUICK, DemoError, Settings, data_files, train_config

CHARACTER = "pirate"
# method -> what it changes in the demo's LoRA run config. Budgets (the demo base: hidden 128, 4
# blocks, 4 key/value heads of 32, MLP 384): the demo LoRA (r=4 on v_proj, o_proj, down_proj) has 16,384
# parameters; prefix tuning keeps 2 · 4 blocks · 128 (a key and a value of 4 x 32 per block) =
# 1,024 per virtual token (16 -> 16,384); prompt tuning 128 per virtual token (128 -> 16,384,
# half of the 256-position context); P-tuning 16 tokens through an MLP of width 48 (16,864); a
# Pfeiffer bottleneck of width 128/8 = 16 after each block's MLP 4 · (2 · 128 · 16 + 16 + 128) =
# 16,960; DoRA LoRA's + one magnitude per output channel (17,920); IA3 one scale per channel of
# k, v and the MLP's down input (2,560: it has no size knob).
# Learning rates: LoRA's (the demo's) for LoRA, DoRA and the bottleneck; the methods with few or
# input-side parameters the best of a 3-4 point sweep on the quick run, seed 0 (their papers, too,
# train them at rates 10-100x LoRA's): IA3 0.3 (0.01: 1.53, 0.03: 0.78, 0.1: 0.55, 0.3: 0.46 eval
# loss), prefix 0.1 (0.004: 2.45 ... 0.1: 0.50), prompt 0.3 (0.01: 1.95 ... 0.3: 0.73), P-tuning
# 0.01 (0.004: 1.78, 0.01: 1.74, 0.03: 1.81); LoRA at its 8e-3: 0.20.
METHODS: dict[str, dict] = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "ia3": {"method": "ia3", "section": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                         "feedforward_modules": ["down_proj"]}, "lr": 0.3},
    "prefix": {"method": "prefix", "section": {"num_virtual_tokens": 16}, "lr": 0.1},
    "prompt": {"method": "prompt", "section": {"num_virtual_tokens": 128}, "lr": 0.3},
    "p_tuning": {"method": "p_tuning", "section": {"num_virtual_tokens": 16, "encoder_hidden_size": 48},
                 "lr": 1e-2},
    "bottleneck": {"method": "bottleneck", "section": {"placement": "pfeiffer", "reduction_factor": 8}},
}  # fmt: skip
DEFAULT_METHODS = tuple(METHODS)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="loraforge compare",
        description="LoRA, DoRA, IA3, prefix and prompt tuning and bottleneck adapters on the demo task "
        "(one tiny pretrained base, CPU, no download): parameters, size, loss, scores, time, latency, "
        "context.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default="runs/compare", help="output directory (finished runs are reused)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"known: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; each cell is mean ± spread")
    p.add_argument("--quick", action="store_true", help="90 training steps instead of 160")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--latency-tokens", type=int, default=32, help="tokens generated per latency measurement")
    p.add_argument("--latency-reps", type=int, default=11, help="timed repetitions (the median is kept)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (see loraforge demo --help)")
    return p.parse_args(argv)


def run_config(name: str, base_dir: Path, files: dict, run_dir: Path, s: Settings) -> dict:
    """The ``lf.train`` config of one method's run: the demo's LoRA run with the method swapped."""
    m = METHODS[name]
    cfg = train_config("lora", base_dir, files, run_dir, s)
    cfg["method"] = m["method"]
    if "section" in m:
        cfg[m["method"]] = dict(m["section"])
    if "lr" in m:
        cfg["train"]["lr"] = m["lr"]
    cfg["train"]["progress_bar"] = False
    return cfg


def train_run(name: str, base_dir: Path, files: dict, out: Path, s: Settings, say) -> dict:
    """Train one (method, seed) run, or reuse it when ``result.json`` holds the same config."""
    import loraforge as lf

    run_dir = out / f"seed-{s.seed}" / METHODS[name]["method"]
    cfg = run_config(name, base_dir, files, run_dir, s)
    spec = {"config": {**cfg, "resume": None}, "base": sha256_file(base_dir / "model.safetensors")}
    result_path = run_dir / "result.json"
    if result_path.exists():
        old = json.loads(result_path.read_text())
        if old.get("spec") == spec:
            return old
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg["overwrite"] = True  # (a run whose result is stale or missing starts again)
    say(f"training {METHODS[name]['method']} (seed {s.seed}): {s.steps} steps")
    _, metrics = lf.train(cfg)
    result = {
        "spec": spec,
        "trainable_params": metrics["trainable_params"],
        "size_bytes": dir_size(run_dir / "adapter", "*.safetensors"),
        "train_time_s": metrics["train_time_s"],
        "eval_loss": metrics["final_eval_loss"],
        "adapter": str(run_dir / "adapter"),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def measure(name: str, run: dict, base_dir: Path, s: Settings, args) -> dict:
    """Scores, latencies against the base, and context used, for one trained run."""
    import torch

    import loraforge as lf

    from ..adapter_files import read_adapter
    from .evaluate import eval_rows, load_base, score

    model, tokenizer = load_base(base_dir)
    base, _ = load_base(base_dir)  # the reference: the plain base model, no wrappers at all
    lf.load_adapter(model, run["adapter"])
    cfg = read_adapter(run["adapter"])[0]
    rows = eval_rows(s, CHARACTER)
    scores = score(model, tokenizer, CHARACTER, rows, s.max_new_tokens)
    questions = [r["messages"][0]["content"] for r in rows]
    out = {"style": scores["style"], "content": scores["content"]}
    for merged in (False, True):
        if merged:
            try:  # the deployed form: the adapter in the weights, the original module classes
                model = lf.merge_and_unload(model)
            except ValueError:  # prefix / prompt / bottleneck: nothing to merge into (model unchanged)
                break
        for batch in (1, 32):
            prompts = (questions * (batch // len(questions) + 1))[:batch]
            ours, plain = _latency(model, base, tokenizer, prompts, args.latency_tokens, args.latency_reps)
            key = f"b{batch}{'_merged' if merged else ''}"
            out[f"ms_per_token_{key}"] = ours
            out[f"vs_base_{key}"] = ours / plain
    out["context_tokens"] = getattr(cfg, "num_virtual_tokens", 0) or 0
    out["context_window"] = model.config.max_position_embeddings
    del model, base
    torch.set_num_threads(args.threads)
    return out


def _latency(model, base, tokenizer, prompts: list[str], new_tokens: int, reps: int) -> tuple[float, float]:
    """Median ms per generated token, greedy, of the adapted model and of the plain base model,
    timed alternately so both see the same machine load."""
    from .generation import _encode_left_padded, prompt_text

    batch = _encode_left_padded(tokenizer, [prompt_text(tokenizer, q) for q in prompts])
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    kw["pad_token_id"] = tokenizer.pad_token_id

    def timed(m) -> float:
        t0 = time.perf_counter()
        m.generate(**batch, **kw)
        return 1000 * (time.perf_counter() - t0) / new_tokens

    timed(model), timed(base)  # warm-up
    ours, plain = [], []
    for _ in range(reps):
        ours.append(timed(model))
        plain.append(timed(base))
    return statistics.median(ours), statistics.median(plain)


def _cell(values: list[float], digits: int, unit: str = "") -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def render(rows: dict[str, list[dict]]) -> str:
    """The table: one row per method, each measured cell mean ± spread over the seeds; latencies
    as ms per generated token (unmerged) and as ratios to the base, unmerged / merged."""
    headers = ["method", "trainable", "adapter", "eval loss", "style", "content", "train s",
               "b1 ms/tok", "b1 x base", "b1 merged", "b32 ms/tok", "b32 x base", "b32 merged",
               "context used"]  # fmt: skip
    table = []
    for name, per_seed in rows.items():
        first = per_seed[0]

        def col(key: str, digits: int, unit: str = "", per_seed=per_seed) -> str:
            if key not in per_seed[0]:
                return "-"
            return _cell([r[key] for r in per_seed], digits, unit)

        used = first["context_tokens"]
        table.append([
            name, f"{first['trainable_params']:,}", format_bytes(first["size_bytes"]), col("eval_loss", 3),
            col("style", 2), col("content", 2), col("train_time_s", 1),
            col("ms_per_token_b1", 2), col("vs_base_b1", 2, "x"), col("vs_base_b1_merged", 2, "x"),
            col("ms_per_token_b32", 2), col("vs_base_b32", 2, "x"), col("vs_base_b32_merged", 2, "x"),
            f"{used} of {first['context_window']}" if used else "0",
        ])  # fmt: skip
    return format_table(headers, table)


def run(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = _say
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise DemoError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.seeds < 1:
        raise DemoError("--seeds must be at least 1")
    s = replace(QUICK if args.quick else FULL, characters=(CHARACTER,), compare_on=CHARACTER)
    if args.steps is not None:
        if args.steps <= 0:
            raise DemoError("--steps must be positive")
        s = replace(s, steps=args.steps)
    from .app import SHIPPED_BASE

    base_dir, out = SHIPPED_BASE, Path(args.output)
    say(
        f"loraforge compare: {', '.join(names)} on the demo's {CHARACTER!r} task, "
        f"{args.seeds} seed(s) -> {out}"
    )
    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(args.seeds):
        sd = replace(s, seed=seed)
        files = data_files(out / f"seed-{seed}", CHARACTER, sd)
        for name in names:
            run_ = train_run(name, base_dir, files, out, sd, say)
            rows[name].append({**run_, **measure(name, run_, base_dir, sd, args)})
            say(f"  {name} seed {seed}: eval loss {run_['eval_loss']:.3f}")
    table = render(rows)
    say("\n" + table)
    summary = {"settings": {"steps": s.steps, "seeds": args.seeds}, "rows": rows,
               "elapsed_s": time.perf_counter() - t0}  # fmt: skip
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "compare.md", table + "\n")
    say(f"\nwrote {out / 'compare.json'} and {out / 'compare.md'} in {summary['elapsed_s']:.0f} s")
    return 0


def _say(msg: str = "") -> None:
    print(msg, file=sys.stdout, flush=True)


def main(argv=None) -> int:
    try:
        return run(argv)
    except DemoError as e:
        print(f"loraforge compare: error: {e}", file=sys.stderr)
        return 2
