"""``loraforge demo``: one base model, one LoRA adapter per character, measured against full FT and QLoRA.

Steps (each prints what it does; long ones show a progress bar):

1. base model — the shipped pretrained tiny Llama (``assets/base``, made by
   ``scripts/pretrain_base.py``), or one rebuilt with ``--rebuild-base``;
2. training — ``lf.train`` once per character (LoRA), and for one character also a full
   fine-tune and a QLoRA run (4-bit NF4 base); finished runs in the output dir are reused;
3. scoring — greedy answers to held-out questions; style and content scores (`scoring`);
4. the table and the quality bars;
5. switching at runtime — merge/unmerge with timings, and one mixed batch;
6. outputs — ``results.json``, ``metrics.jsonl``, ``loss.png`` and the next commands.

``--base smollm2`` runs the same demo on the real SmolLM2-135M-Instruct instead (``smollm2.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import data
from .runs import (
    FULL,
    QUICK,
    DemoError,
    Settings,
    data_files,
    settings_dict,
    train_or_reuse,
    write_jsonl,
)

SHIPPED_BASE = Path(__file__).parent / "assets" / "base"
SWITCH_QUESTIONS = [
    "What colour is snow?",
    "How many legs does a spider have?",
    "What is the capital of Italy?",
]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="loraforge demo",
        description="Persona chatbot on one tiny pretrained base: a LoRA adapter per character, compared "
        "with a full fine-tune and QLoRA on real training runs. CPU only, no download.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output",
        default=None,
        help="output directory (finished runs in it are reused); default runs/demo, or runs/demo-smollm2 "
        "with --base smollm2",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="shortened run (90 steps per run instead of 160), as the tests use",
    )
    p.add_argument(
        "--characters",
        default=",".join(FULL.characters),
        help=f"comma-separated characters to train; known: {', '.join(data.PERSONAS)}",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per run (unset: 160, or 90 with --quick)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run the whole demo for N seeds (--seed, --seed + 1, ...; each in OUTPUT/seed-S) and print "
        "one table of mean ± spread; a quality bar passes only if it holds for every seed",
    )
    p.add_argument(
        "--base",
        default=None,
        help="use this base model directory instead of the shipped one; 'smollm2' (or "
        "builtin:smollm2-135m-instruct): the real SmolLM2-135M-Instruct, with its own settings "
        "(demo/smollm2.py; ~15 min on 2 cores)",
    )
    p.add_argument(
        "--full-ft",
        action="store_true",
        help="with --base smollm2: also run the full fine-tune (left out by default: it does not fit "
        "the 15-minute budget)",
    )
    p.add_argument(
        "--rebuild-base",
        action="store_true",
        help="pretrain the base model again (several minutes) into OUTPUT/base instead of the shipped one",
    )
    p.add_argument("--overwrite", action="store_true", help="retrain finished runs whose settings differ")
    p.add_argument("--no-compare", action="store_true", help="skip the full fine-tune and QLoRA runs")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a quality bar is not met")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch. The demo's matrices are 128 wide: a second thread gains little, "
        "and on a busy machine idle-spinning threads made steps 10-40x slower in our runs",
    )
    return p.parse_args(argv)


def settings_from(args, full: Settings = FULL, quick: Settings = QUICK) -> Settings:
    s = quick if args.quick else full
    chars = tuple(c.strip() for c in args.characters.split(",") if c.strip())
    unknown = [c for c in chars if c not in data.PERSONAS]
    if unknown or not chars:
        raise DemoError(f"unknown character(s) {unknown}; known: {', '.join(data.PERSONAS)}")
    s = replace(s, characters=chars, seed=args.seed, compare_on=chars[0])
    if args.seeds < 1:
        raise DemoError("--seeds must be at least 1")
    if args.steps is not None:
        if args.steps <= 0:
            raise DemoError("--steps must be positive")
        s = replace(s, steps=args.steps)
    return s


def resolve_base(args, out: Path, say) -> Path:
    """The base model directory: --base, a rebuilt one, or the shipped one."""
    if args.base:
        base = Path(args.base)
        if not (base / "config.json").exists():
            raise DemoError(f"--base {base}: not a model directory (no config.json)")
        return base
    if not args.rebuild_base and (SHIPPED_BASE / "model.safetensors").exists():
        return SHIPPED_BASE
    from .base import PretrainConfig, build_base

    target = out / "base"
    if (target / "model.safetensors").exists() and (target / "pretrain.json").exists():
        say(f"reusing the base model built earlier in {target}")
        return target
    why = "--rebuild-base" if args.rebuild_base else f"no shipped base model in {SHIPPED_BASE}"
    say(f"pretraining the base model ({why}); this takes a few minutes")
    return build_base(target, PretrainConfig())


def run(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its sub-second "Loading weights" bars would drown ours
    say = _say
    from .smollm2 import is_smollm2

    if is_smollm2(args.base):
        from . import smollm2

        return smollm2.run(args, say)
    t_start = time.perf_counter()
    out = Path(args.output or "runs/demo")
    s = settings_from(args)
    say(f"loraforge demo: {len(s.characters)} characters ({', '.join(s.characters)}) on one base model")
    say(f"output: {out}{'  (quick run)' if args.quick else ''}")

    base_dir = resolve_base(args, out, say)
    meta = (
        json.loads((base_dir / "pretrain.json").read_text()) if (base_dir / "pretrain.json").exists() else {}
    )
    say(
        f"base: {base_dir}  (Llama, {meta.get('parameters', '?'):,} parameters, pretrained on "
        f"{meta.get('corpus_tokens', '?'):,} tokens of the bundled corpus)"
        if meta
        else f"base: {base_dir}"
    )
    if args.seeds > 1:
        return run_seeds(args, s, base_dir, out, say, t_start)

    summary, results = run_one(args, s, base_dir, out, say)
    elapsed = time.perf_counter() - t_start
    say(f"\ndone in {elapsed:.0f} s. Next, try:")
    say(f"  loraforge chat --demo {out}")
    say(f"  loraforge serve --demo {out}     # the characters over an OpenAI-compatible API + a chat page")
    say("  loraforge compare                # DoRA, IA3, prefix/prompt tuning, bottleneck adapters vs LoRA")
    adapter = results[(s.characters[0], "lora")]["weights"]
    first = s.characters[0]
    say(
        f'  loraforge generate --base {base_dir} --adapter {first}={adapter} --prompt "What colour is grass?"'
    )
    failed = [b["name"] for b in summary["quality_bars"] if not b["ok"]]
    if failed:
        say(f"quality bars not met: {', '.join(failed)}")
    return 1 if failed and args.strict else 0


def run_one(args, s: Settings, base_dir: Path, out: Path, say, show: bool = True) -> tuple[dict, dict]:
    """One seed of the demo into ``out``: train (or reuse), score, switch, write the outputs.

    Returns (the ``results.json`` summary, {(character, method): run result}). With ``show``
    false (one seed of several) the table, bars and switching answers are not printed.
    """
    t_start = time.perf_counter()
    show_say = say if show else (lambda msg="": None)
    # -- 1. training ------------------------------------------------------------------------------
    files = {c: data_files(out, c, s) for c in s.characters}
    results: dict[tuple[str, str], dict] = {}
    plan = [(c, "lora") for c in s.characters]
    if not args.no_compare:
        plan += [(s.compare_on, "full"), (s.compare_on, "qlora")]
    for i, (c, method) in enumerate(plan, 1):
        say(f"\n[{i}/{len(plan)}] {c}: {method}")
        results[(c, method)] = train_or_reuse(
            method, c, base_dir, files[c], out / c / method, s, args.overwrite, say
        )

    # -- 2. scoring and switching ---------------------------------------------------------------
    from .evaluate import score_all
    from .report import collect_rows, print_switching, quality_bars, render_table, write_outputs

    say("\nscoring: greedy answers to each character's held-out questions")
    scorer, scores = score_all(base_dir, s, results, say)
    rows = collect_rows(s, base_dir, results, scores, getattr(scorer, "quantized_state_bytes", None))
    show_say("\n" + render_table(rows))
    bars = quality_bars(s, rows)
    show_say("\nquality bars")
    for b in bars:
        show_say(f"  [{'PASS' if b['ok'] else 'FAIL'}] {b['name']}: {b['detail']}")

    show_say("\nswitching characters at runtime (one base model in memory, every adapter loaded)")
    switch = scorer.switching(SWITCH_QUESTIONS)
    print_switching(switch, s, SWITCH_QUESTIONS, show_say)

    # -- 3. outputs --------------------------------------------------------------------------------
    summary = {
        "settings": settings_dict(s),
        "base": str(base_dir),
        "rows": rows,
        "quality_bars": bars,
        "switching": switch,
        "elapsed_s": time.perf_counter() - t_start,
    }
    paths = write_outputs(out, summary, results)
    write_jsonl(out / "answers.jsonl", scores.get("answers_rows", []))
    show_say(f"\nwrote {paths['results']}, {paths['metrics']} and {paths['plot']}")
    show_say("adapters (PEFT format):")
    for c in s.characters:
        show_say(f"  {c:8s} {results[(c, 'lora')]['weights']}")
    return summary, results


def run_seeds(args, s: Settings, base_dir: Path, out: Path, say, t_start: float) -> int:
    """``--seeds N``: the whole demo once per seed (each a complete single-seed output in
    ``OUT/seed-S``), then the table as mean ± spread and every bar checked for every seed."""
    from .report import atomic_write_text
    from .seeds import aggregate_bars, aggregate_rows, render_seeds_table

    seeds = list(range(s.seed, s.seed + args.seeds))
    summaries = []
    for seed in seeds:
        say(f"\n=== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) -> {out / f'seed-{seed}'}")
        summary, _ = run_one(args, replace(s, seed=seed), base_dir, out / f"seed-{seed}", say, show=False)
        missed = [b["name"] for b in summary["quality_bars"] if not b["ok"]]
        say(f"seed {seed}: " + (f"bars NOT met: {', '.join(missed)}" if missed else "every quality bar met"))
        summaries.append(summary)
    rows = aggregate_rows([x["rows"] for x in summaries])
    bars = aggregate_bars([x["quality_bars"] for x in summaries], seeds)
    say("\n" + render_seeds_table(rows, seeds))
    say(f"\nquality bars, each checked for every seed ({len(seeds)} seeds)")
    for b in bars:
        say(f"  [{'PASS' if b['ok'] else 'FAIL'}] {b['name']}: {b['detail']}")
    elapsed = time.perf_counter() - t_start
    result = {
        "settings": settings_dict(s),
        "seeds": seeds,
        "base": str(base_dir),
        "rows": rows,
        "quality_bars": bars,
        "runs": {seed: str(out / f"seed-{seed}") for seed in seeds},
        "elapsed_s": elapsed,
    }
    # not results.json: `loraforge chat --demo OUT` reads that one (a single-seed run's)
    atomic_write_text(out / "seeds.json", json.dumps(result, indent=2) + "\n")
    say(f"\nwrote {out / 'seeds.json'}; each seed's outputs are in {out}/seed-S")
    first = out / f"seed-{seeds[0]}"
    say(f"done in {elapsed:.0f} s. Next, try:")
    say(f"  loraforge chat --demo {first}\n  loraforge serve --demo {first}")
    failed = [b["name"] for b in bars if not b["ok"]]
    if failed:
        say(f"quality bars not met for every seed: {', '.join(failed)}")
    return 1 if failed and args.strict else 0


def _say(msg: str = "") -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        args = parse_args(argv)
        torch.set_num_threads(max(1, args.threads))
        return run(argv)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
