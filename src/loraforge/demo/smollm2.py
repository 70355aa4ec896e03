"""``loraforge demo --base smollm2``: the persona characters on a real pretrained chat model.

The same demo as the default one (``app.py``: one LoRA adapter per character, a QLoRA run for one
character, the table and the quality bars, switching at runtime), on Hugging Face's
SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``, see ``loraforge.pretrained``) instead of
the 1M-parameter base the demo ships. Training and generation use the model's own ChatML template
(the tokenizer's, with its default system prompt), so completion-only masking trains the assistant
turns and ``loraforge chat`` talks to the characters exactly as they were trained.

What changes for a real model, and why:

* **budget** (at most 15 minutes on 2 CPU cores for the whole command): LoRA on the top
  ``LAYERS`` of the 30 blocks only. Nothing below them has a trainable tensor, so backward stops
  there and a step costs about one forward of the model; a full fine-tune costs several times
  that per step plus AdamW over 134.5 M parameters, so it runs only with ``--full-ft``.
* **eval loss**: one phrasing per held-out question (``Settings.eval_phrasings``), measured
  before and after training only: the default demo's 16 phrasings × 5 points would cost minutes.
* **content**: the base answers at length and is cut at ``max_new_tokens``, so a fact it states
  late counts as missed; the characters answer first and then talk. "Content kept" is therefore
  one-sided here: a character may not answer *fewer* held-out questions right than the base.
* **knowledge kept**: ``WORLD`` holds questions of general knowledge that no training file
  contains (none of its keywords occurs in the persona data); the base answers each right. Every
  character must still give the fact, in its voice.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..files import dir_size, format_bytes
from .report import loss_bar, style_bar, trainable_bar
from .runs import DemoError, Settings, data_files, settings_dict, train_or_reuse, write_jsonl

BASE = "builtin:smollm2-135m-instruct"
# what --base accepts for this demo (``loraforge.pretrained`` knows the builtin: ones)
NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
DEFAULT_OUTPUT = "runs/demo-smollm2"
N_LAYERS = 30  # SmolLM2-135M's transformer blocks
LAYERS = 12  # the top blocks LoRA adapts

# The full run. Rank 8 on every linear map of blocks 18-29: 0.72% of the parameters.
SMOLLM2 = Settings(
    lora_r=8,
    lora_alpha=16.0,
    lora_layers=tuple(range(N_LAYERS - LAYERS, N_LAYERS)),
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    steps=40,
    batch_size=8,
    lr_lora=2e-3,
    lr_full=2e-5,
    warmup_steps=4,
    n_train_reading=16,
    n_eval_reading=0,
    max_length=96,
    eval_every=0,
    save_every=20,
    eval_phrasings=1,
    max_new_tokens=24,
    flourish_first=True,
    # NF4 blocks of 32, not QLoRA's usual 64: the weights come from Q4_1, whose blocks are 32 wide,
    # so each NF4 block re-quantizes exactly one source block (one scale, one offset). The NF4 base's
    # eval loss: 3.64 at 32, 3.90 at 64 (fp32 3.27); QLoRA ended 5.4% below LoRA at 32 and 2.8% above
    # it at 64 (one run each, 2026-11-30). 4.25 bits per weight instead of 4.127.
    quant_blocksize=32,
)
# The shortened run (--quick): fewer steps at a larger rate.
SMOLLM2_QUICK = replace(SMOLLM2, steps=24, lr_lora=3e-3)

# Out-of-training questions: (question, keywords a right answer contains). General knowledge the
# base answers right within ``max_new_tokens``; no persona file holds these questions or words.
WORLD = [
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("Who painted the Mona Lisa?", ("leonardo",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("Who was the first person to walk on the Moon?", ("armstrong",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
]
SWITCH_QUESTIONS = ["What colour is snow?", "What is the capital of Italy?"]

# The bars (chosen before the runs; the same numbers as the default demo where they carry over).
STYLE_MIN, BASE_STYLE_MAX = 0.9, 0.1
CONTENT_DROP_MAX = 0.05
WORLD_MIN = 0.75  # share of the out-of-training questions the base gets right: right and in voice


def is_smollm2(name: str | None) -> bool:
    """Whether ``--base`` names this demo's model (``smollm2``, ``builtin:smollm2``, ...)."""
    if not name:
        return False
    return str(name).removeprefix("builtin:") in NAMES


def world_rows() -> list[dict]:
    return [{"question": q, "keywords": list(k)} for q, k in WORLD]


# -- the bars ---------------------------------------------------------------------------------------
def world_summary(s: Settings, scores: dict) -> dict:
    """Per model, its answers to ``WORLD`` and which are right / in character.

    ``{"questions": [...], "answers": {"base": [...], "pirate": [...], ...}, "right": {...},
    "styled": {...}}``, the characters' answers from their LoRA adapters.
    """
    from . import scoring

    rows = world_rows()
    out = {"questions": [r["question"] for r in rows], "answers": {}, "right": {}, "styled": {}}
    models = {"base": f"{s.characters[0]}/base"} | {c: f"{c}/lora" for c in s.characters}
    for name, key in models.items():
        answers = scores[key]["extra"]
        out["answers"][name] = answers
        out["right"][name] = [scoring.is_correct(a, r["keywords"]) for a, r in zip(answers, rows)]
        out["styled"][name] = [name != "base" and scoring.is_styled(name, a) for a in answers]
    return out


def _find(rows, c, m):
    return next((r for r in rows if r["character"] == c and r["method"] == m), None)


def quality_bars(s: Settings, rows: list[dict], world: dict, base_size: int) -> list[dict]:
    """The default demo's bars, with content kept one-sided (see the module docstring), plus one
    bar per character for the out-of-training questions."""
    bars = []
    known = [i for i, ok in enumerate(world["right"]["base"]) if ok]
    for c in s.characters:
        base, lora = _find(rows, c, "base"), _find(rows, c, "lora")
        bars.append(style_bar(c, lora, base, STYLE_MIN, BASE_STYLE_MAX))
        drop = base["content"] - lora["content"]
        bars.append(
            {
                "name": f"{c}: content kept",
                "ok": drop <= CONTENT_DROP_MAX + 1e-9,
                "slack": CONTENT_DROP_MAX - drop,
                "detail": f"LoRA {lora['content']:.2f} vs base {base['content']:.2f} "
                f"(at most {CONTENT_DROP_MAX:.2f} lower)",
            }
        )
        both = [i for i in known if world["right"][c][i] and world["styled"][c][i]]
        share = len(both) / len(known) if known else 0.0
        bars.append(
            {
                "name": f"{c}: knowledge kept (out-of-training questions)",
                "ok": bool(known) and share >= WORLD_MIN,
                "slack": share - WORLD_MIN,
                "detail": f"{len(both)} of the {len(known)} questions the base answers right are answered "
                f"right and in character ({share:.2f} >= {WORLD_MIN:.2f})",
            }
        )
    c = s.compare_on
    lora, full, qlora = _find(rows, c, "lora"), _find(rows, c, "full"), _find(rows, c, "qlora")
    if full:
        bars.append(loss_bar("LoRA vs full fine-tune eval loss", lora, full, 0.05))
    # without a full fine-tune its checkpoint would be the size of the base's model.safetensors
    ckpt = full["size_bytes"] if full else base_size
    what = "the full fine-tune's checkpoint" if full else "a full checkpoint (the base's model.safetensors)"
    bars.append(
        {
            "name": "adapter file vs full checkpoint",
            "ok": lora["size_bytes"] < 0.05 * ckpt,
            "slack": 0.05 - lora["size_bytes"] / ckpt,
            "detail": f"{format_bytes(lora['size_bytes'])} = {100 * lora['size_bytes'] / ckpt:.2f}% of "
            f"{what}, {format_bytes(ckpt)} (< 5%)",
        }
    )
    if qlora:
        # One-sided, as QLoRA's claim is: the 4-bit base costs no quality. With one seed and 22
        # held-out answers, two runs differ by a few percent either way; a QLoRA run that ends
        # lower is not a loss (block 32: 5.4% lower in our run).
        bars.append(loss_bar("QLoRA vs LoRA eval loss", qlora, lora, 0.02, one_sided=True))
    bars.append(trainable_bar(lora))
    return bars


# -- printing ---------------------------------------------------------------------------------------
def describe(s: Settings, full_ft: bool) -> list[str]:
    """The chosen settings, one line each (printed at the start; also in results.json)."""
    layers = s.lora_layers
    span = f"blocks {layers[0]}-{layers[-1]} of {N_LAYERS}" if layers else f"all {N_LAYERS} blocks"
    return [
        f"LoRA: rank {s.lora_r}, alpha {s.lora_alpha:g}, on {', '.join(s.target_modules)} of {span}",
        f"training: {s.steps} steps x {s.batch_size} chats (max {s.max_length} tokens), AdamW, "
        f"lr {s.lr_lora:g} (full fine-tune {s.lr_full:g}), {s.warmup_steps} warm-up steps, cosine; "
        f"{s.n_train_reading} reading questions + the seen facts twice per character",
        f"QLoRA: NF4 base, double quantization, blocks of {s.quant_blocksize}, float32 compute; "
        f"full fine-tune: {'yes' if full_ft else 'no (--full-ft to add it)'}",
        f"scoring: {s.n_eval_facts or 'all'} held-out facts + {len(WORLD)} out-of-training questions, "
        f"greedy, batched, at most {s.max_new_tokens} new tokens; eval loss over "
        f"{s.eval_phrasings or 'every'} phrasing(s) per held-out question, before and after training",
    ]


def print_world(world: dict, characters, say, width: int = 100) -> None:
    """The out-of-training questions: the base's answer and each character's, side by side."""
    names = ["base", *characters]
    pad = max(len(n) for n in names)
    for qi, q in enumerate(world["questions"]):
        say(f"  Q: {q}")
        for n in names:
            mark = "right" if world["right"][n][qi] else "WRONG"
            if n != "base":
                mark += ", in character" if world["styled"][n][qi] else ", plain"
            text = world["answers"][n][qi].replace("\n", " ")
            text = text if len(text) <= width else text[: width - 3] + "..."
            say(f"    {n:>{pad}}: {text}  [{mark}]")


# -- the run ----------------------------------------------------------------------------------------
def settings_for(args) -> Settings:
    """SMOLLM2 (or SMOLLM2_QUICK) with --characters/--seed/--steps applied."""
    from .app import settings_from

    if args.seeds != 1:
        raise DemoError("--seeds is not available with --base smollm2 (one seed takes the whole budget)")
    if args.rebuild_base:
        raise DemoError("--rebuild-base builds the tiny base; it does not apply to --base smollm2")
    return settings_from(args, full=SMOLLM2, quick=SMOLLM2_QUICK)


def run(args, say, s: Settings | None = None) -> int:
    """``loraforge demo --base smollm2``: train (or reuse), score, print, write; returns the exit code.

    ``s`` overrides the settings (the tests' reduced configuration).
    """
    from ..model_files import ModelNotFoundError
    from ..pretrained import resolve

    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    s = s or settings_for(args)
    out = Path(args.output or DEFAULT_OUTPUT)
    full_ft = bool(getattr(args, "full_ft", False)) and not args.no_compare
    say(f"loraforge demo on {BASE}: {len(s.characters)} characters ({', '.join(s.characters)})")
    say(f"output: {out}{'  (quick run)' if args.quick else ''}")
    t = time.perf_counter()
    try:
        base_dir = Path(resolve(BASE))  # converted from the package's GGUF once, then cached
    except (ModelNotFoundError, ValueError, OSError) as e:  # missing package, bad file: one line
        raise DemoError(str(e)) from None
    phases["base model"] = time.perf_counter() - t
    say(f"base: {BASE} -> {base_dir}")
    for line in describe(s, full_ft):
        say(f"  {line}")

    # -- training ----------------------------------------------------------------------------------
    files = {c: data_files(out, c, s) for c in s.characters}
    plan = [(c, "lora") for c in s.characters]
    if not args.no_compare:
        plan.append((s.compare_on, "qlora"))
    if full_ft:
        plan.append((s.compare_on, "full"))
    results: dict[tuple[str, str], dict] = {}
    for i, (c, method) in enumerate(plan, 1):
        say(f"\n[{i}/{len(plan)}] {c}: {method}")
        t = time.perf_counter()
        results[(c, method)] = train_or_reuse(
            method, c, base_dir, files[c], out / c / method, s, args.overwrite, say
        )
        phases[f"train {c}/{method}"] = time.perf_counter() - t

    # -- scoring -----------------------------------------------------------------------------------
    from .evaluate import score_all
    from .report import collect_rows, print_switching, render_table, write_outputs

    say("\nscoring: greedy answers to the held-out facts and the out-of-training questions")
    t = time.perf_counter()
    scorer, scores = score_all(base_dir, s, results, say, extra=[q for q, _ in WORLD])
    phases["scoring"] = time.perf_counter() - t
    rows = collect_rows(s, base_dir, results, scores, getattr(scorer, "quantized_state_bytes", None))
    world = world_summary(s, scores)
    bars = quality_bars(s, rows, world, dir_size(base_dir, "*.safetensors"))
    say("\n" + render_table(rows))
    say("\nthe model's knowledge, kept while its voice changes (questions no training file contains)")
    print_world(world, s.characters, say)
    say("\nquality bars")
    for b in bars:
        say(f"  [{'PASS' if b['ok'] else 'FAIL'}] {b['name']}: {b['detail']}")

    say("\nswitching characters at runtime (one base model in memory, every adapter loaded)")
    t = time.perf_counter()
    switch = scorer.switching(SWITCH_QUESTIONS)
    phases["switching"] = time.perf_counter() - t
    print_switching(switch, s, SWITCH_QUESTIONS, say)

    # -- outputs -----------------------------------------------------------------------------------
    summary = {
        "settings": settings_dict(s) | {"full_ft": full_ft, "world": world_rows()},
        "base": BASE,  # `loraforge chat` resolves it (the cache directory may move)
        "base_dir": str(base_dir),
        "rows": rows,
        "quality_bars": bars,
        "world": world,
        "switching": switch,
        "phases_s": phases,
        "elapsed_s": time.perf_counter() - t_start,  # up to the outputs (a second or two)
    }
    paths = write_outputs(out, summary, results)
    write_jsonl(out / "answers.jsonl", scores.get("answers_rows", []))
    elapsed = time.perf_counter() - t_start
    say(f"\nwrote {paths['results']}, {paths['metrics']}, {paths['plot']} and {out / 'answers.jsonl'}")
    say("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    say(f"done in {elapsed:.0f} s. Next, try:")
    where = "" if out == Path(DEFAULT_OUTPUT) else f" --demo {out}"
    say(f"  loraforge chat --base smollm2{where}")
    say(f"  loraforge serve --base smollm2{where or ' --demo'}     # OpenAI-compatible API + a chat page")
    failed = [b["name"] for b in bars if not b["ok"]]
    if failed:
        say(f"quality bars not met: {', '.join(failed)}")
    return 1 if failed and args.strict else 0
