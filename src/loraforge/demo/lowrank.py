"""``loraforge lowrank``: LoRA's low-rank claim tested on the demo's own runs (issue 21, item 5).

On the pirate character of ``loraforge demo`` (its base, data, held-out questions, style score
and eval loss), with the demo's training machinery (runs in the output dir are reused):

1. runs: the pirate's full fine-tune, the demo's r = 4 LoRA, an r = 16 LoRA (the demo's run with
   only ``r`` changed: ``lora_alpha`` stays 16, as the LoRA paper keeps α fixed when varying r),
   and an r = 4 LoRA with the next seed (initialisation and batch order; same data);
2. extraction (``lf.extract_lora``): the full fine-tune's ΔW = W_tuned − W_base truncated per
   layer at r = 2, 4, 8, 16 and at 90% of its Frobenius energy, plus references: r = 4 on the
   LoRA's own modules only (the trained LoRA's parameter budget); energy 1, all of ΔW, which must
   reproduce the fine-tune with only its linear layers changed (``linear_only``); and energy 1 with
   the changed norms and embeddings (and the output head tied to them) saved as modules_to_save,
   which must reproduce the full fine-tune;
3. resize (``lf.resize_adapter``): the trained r = 4 and r = 16 adapters truncated to r = 16, 8,
   4, 2, 1 (ranks up to their own), to find where quality drops;
4. subspaces (``lf.analyze_adapter``): φ(i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖²_F / min(i, j) between the
   right singular vectors of the A matrices of r = 4 vs r = 16 and of the two r = 4 seeds, averaged
   per layer type over the blocks, next to the same average for random Gaussian A of the same
   shapes (whose expectation is max(i, j)/n);
5. outputs: ``results.json``, heat maps ``phi_*.png``, the tables and a plain reading of them.

Every model is measured the same way: ``lowrank.extract.eval_loss`` (the trainer's loss on the
pirate's held-out answers) and the demo's greedy style / content scores on its held-out questions.
The tables, φ summaries and the reading are in ``lowrank_report``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..files import atomic_write_text
from .runs import FULL, QUICK, DemoError, Settings, data_files, train_or_reuse

CHARACTER = "pirate"
EXTRACT_RANKS = (2, 4, 8, 16)
EXTRACT_ENERGY = 0.9
RESIZE_RANKS = (16, 8, 4, 2, 1)
R16 = 16  # the second trained rank (the paper compares r = 8 with r = 64; ours are 4 and 16)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="loraforge lowrank",
        description="The demo's pirate full fine-tune extracted to low rank, its LoRA adapters resized "
        "down, and the LoRA paper's subspace similarity between adapters of rank 4 and 16 and of two "
        "seeds, against a random baseline (CPU, no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default="runs/lowrank", help="output directory (finished runs are reused; "
                   "pointing it at a demo's output reuses that demo's pirate runs)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="the demo's shortened runs (90 steps instead of 160)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (overrides --quick's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs; the second r=4 run uses seed+1")
    p.add_argument("--ranks", default=",".join(map(str, EXTRACT_RANKS)), help="extraction ranks")
    p.add_argument("--energy", type=float, default=EXTRACT_ENERGY, help="extraction energy (0 < e <= 1)")
    p.add_argument("--resize-ranks", default=",".join(map(str, RESIZE_RANKS)),
                   help="ranks to resize the trained adapters to (above its own: skipped)")  # fmt: skip
    p.add_argument("--eval-facts", type=int, default=None,
                   help="held-out facts to measure on (default: all 22; fewer: faster, noisier)")  # fmt: skip
    p.add_argument("--baseline-draws", type=int, default=200, help="random Gaussian pairs per layer shape")
    p.add_argument("--overwrite", action="store_true", help="retrain finished runs whose settings differ")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (see loraforge demo --help)")
    return p.parse_args(argv)


def _ranks(text: str, flag: str) -> list[int]:
    try:
        ranks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DemoError(f"{flag} {text!r}: give comma-separated integers, e.g. 2,4,8") from None
    if not ranks or any(r < 1 for r in ranks):
        raise DemoError(f"{flag} {text!r}: ranks must be integers >= 1")
    return sorted(set(ranks), reverse=True)


def settings(args) -> Settings:
    s = replace(QUICK if args.quick else FULL, characters=(CHARACTER,), compare_on=CHARACTER, seed=args.seed)
    # every model is measured afterwards: no eval curve or half-way checkpoint needed while training
    # (neither is part of a run's spec: a demo's finished runs are still reused)
    s = replace(s, eval_every=0, save_every=0)
    if args.eval_facts is not None:
        if args.eval_facts <= 0:
            raise DemoError("--eval-facts must be positive")
        s = replace(s, n_eval_facts=args.eval_facts)
    if args.steps is not None:
        if args.steps <= 0:
            raise DemoError("--steps must be positive")
        s = replace(s, steps=args.steps)
    return s


# -- 1. the runs ------------------------------------------------------------------------------------


def run_plan(s: Settings) -> dict[str, tuple[str, Settings, str]]:
    """name -> (method, settings, run directory under OUTPUT/pirate). ``full`` and ``lora`` have the
    demo's layout, so a demo's output directory is reused as it is."""
    return {
        "full": ("full", s, "full"),
        "lora": ("lora", s, "lora"),
        "lora-r16": ("lora", replace(s, lora_r=R16), f"lora-r{R16}"),
        "lora-seed": ("lora", replace(s, seed=s.seed + 1), f"lora-seed{s.seed + 1}"),
    }


def train_runs(base_dir: Path, files: dict, out: Path, s: Settings, overwrite: bool, say) -> dict[str, dict]:
    runs = {}
    plan = run_plan(s)
    for i, (name, (method, rs, sub)) in enumerate(plan.items(), 1):
        say(f"\n[{i}/{len(plan)}] {CHARACTER}: {name}")
        # the same data files for every run: the second seed changes initialisation and batch order only
        runs[name] = train_or_reuse(
            method, CHARACTER, base_dir, files, out / CHARACTER / sub, rs, overwrite, say
        )
    return runs


# -- measuring one model ----------------------------------------------------------------------------


class Meter:
    """Eval loss and style / content scores of the base, the full fine-tune and any adapter on it."""

    def __init__(self, base_dir: Path, files: dict, s: Settings):
        from .evaluate import eval_rows

        self.base_dir, self.files, self.s = base_dir, files, s
        self.rows = eval_rows(s, CHARACTER)

    def model(self, model, tokenizer) -> dict:
        from ..lowrank.extract import eval_loss
        from .evaluate import score

        # the demo's data section (runs.train_config): chat rows, loss on the answers only (the default)
        loss = eval_loss(model, tokenizer, str(self.files["eval"]), max_length=self.s.max_length)
        sc = score(model, tokenizer, CHARACTER, self.rows, self.s.max_new_tokens)
        return {"eval_loss": float(loss), "style": sc["style"], "content": sc["content"]}

    def base(self) -> dict:
        from .evaluate import load_base

        return self.model(*load_base(self.base_dir))

    def full(self, model_dir) -> dict:
        from transformers import AutoModelForCausalLM

        from .evaluate import load_base

        _, tokenizer = load_base(self.base_dir)
        return self.model(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)

    def adapter(self, adapter_dir) -> dict:
        import loraforge as lf

        from .evaluate import load_base

        model, tokenizer = load_base(self.base_dir)
        lf.load_adapter(model, str(adapter_dir))
        return self.model(model, tokenizer) | adapter_size(adapter_dir)


def adapter_size(adapter_dir) -> dict:
    """Parameters stored in an adapter file and its per-layer ranks (``r`` and ``rank_pattern``)."""
    from ..adapter_files import read_adapter

    cfg, _, tensors = read_adapter(adapter_dir)  # (one read: the config and every tensor)
    ranks = [cfg.r, *cfg.rank_pattern.values()] if cfg.rank_pattern else [cfg.r]
    params = sum(t.numel() for t in tensors.values())
    return {"params": params, "rank_min": min(ranks), "rank_max": max(ranks)}


# -- 2. extraction ----------------------------------------------------------------------------------


def extraction_requests(ranks: list[int], energy: float, target: list[str]) -> list[dict]:
    """The extractions to run: label and the keyword arguments of ``lf.extract_lora``."""
    reqs = [{"label": f"r={r}", "rank": r} for r in sorted(ranks)]
    reqs.append({"label": f"energy {energy:g}", "energy": energy})
    if 4 in ranks:  # the trained LoRA's budget: its rank on its modules only
        reqs.append({"label": "r=4 on the LoRA's modules", "rank": 4, "target_modules": list(target)})
    # all of ΔW (every layer at its numerical rank): what the linear layers' changes are worth; then
    # with the changed norms / embeddings it reports saved as modules_to_save: the whole fine-tune
    reqs.append({"label": "energy 1 (all of ΔW)", "energy": 1.0})
    reqs.append({"label": "energy 1 + other changes", "energy": 1.0, "save_other": True})
    return reqs


def extract_all(
    base_dir: Path, full_dir: Path, out: Path, reqs: list[dict], meter: Meter, say
) -> tuple[list[dict], dict | None]:
    """Each extraction measured; and, after the energy-1 one, the measures of ``linear_only``: the
    model that extraction should reproduce exactly (None if there was none)."""
    import loraforge as lf

    rows, reference, other = [], None, []
    for req in reqs:
        kw = {k: req[k] for k in ("rank", "energy", "target_modules") if k in req}
        if req.get("save_other"):
            kw["modules_to_save"] = saved_modules(full_dir, other)
        dest = out / "extracted" / _slug(req["label"])
        say(f"extracting {req['label']} -> {dest}")
        report = lf.extract_lora(base_dir, full_dir, _fresh(dest), **kw)
        layers = _rows(report.layers)
        row = {"label": req["label"], "request": dict(kw), "adapter": str(dest)}
        row["energy_kept"] = _mean(r["energy"] for r in layers)
        row["other_changes"] = len(_rows(report.other_changes))
        row |= meter.adapter(dest)
        rows.append(row)
        if kw == {"energy": 1.0}:
            other = _rows(report.other_changes)
            ref = linear_only(base_dir, full_dir, {r["name"] for r in layers}, out / "full-linear-only")
            reference = meter.full(ref) | {"model": str(ref)}
    return rows, reference


def saved_modules(full_dir: Path, other: list[dict]) -> list[str]:
    """The modules of the changed non-linear tensors (the extraction's ``other_changes``), and the
    output head when it is tied to a changed input embedding: a modules_to_save copy replaces one
    module, so the head would keep the base's weight (as in PEFT without ``ensure_weight_tying``)."""
    from transformers import AutoModelForCausalLM

    names = {_module_of(o["name"]) for o in other}
    model = AutoModelForCausalLM.from_pretrained(full_dir)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:  # tied
        where = {m: n for n, m in model.named_modules()}
        if where[emb] in names:
            names.add(where[head])
    return sorted(names)


def linear_only(base_dir: Path, full_dir: Path, layers: set[str], dest: Path) -> Path:
    """The full fine-tune with only ``layers`` (the extracted linear layers) changed: every other
    tensor (norms, embeddings and so the tied head) is the base's. Exactly base + all of ΔW, so an
    extraction at each layer's full rank must reproduce its outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    with torch.no_grad():
        for name, t in model.named_parameters():  # (a tied head is the embedding's parameter)
            if name.rsplit(".", 1)[0] not in layers:
                t.copy_(base[name])
    model.save_pretrained(_fresh(dest))
    return dest


# -- 3. resize --------------------------------------------------------------------------------------


def resize_all(
    adapter_dir: Path, own_rank: int, ranks: list[int], out: Path, meter: Meter, say
) -> list[dict]:
    """The adapter resized to each rank up to its own (its own rank always included: exactness)."""
    import loraforge as lf

    rows = []
    for r in sorted({r for r in ranks if r <= own_rank} | {own_rank}, reverse=True):
        dest = out / f"r{r}"
        say(f"resizing {adapter_dir} to r={r}")
        report = lf.resize_adapter(adapter_dir, _fresh(dest), rank=r)
        layers = _rows(report.layers)
        rows.append({"rank": r, "adapter": str(dest), "energy_kept": _mean(x["energy"] for x in layers)}
                    | meter.adapter(dest))  # fmt: skip
    return rows


# -- 4. subspace similarity -------------------------------------------------------------------------


def similarity(a_dir: Path, b_dir: Path, plot: Path) -> dict[str, list[list[float]]]:
    """φ grid per adapted layer between adapters ``a`` and ``b`` (``lf.analyze_adapter``'s, whose
    per-layer heat maps go to ``plot``)."""
    import loraforge as lf

    res = lf.analyze_adapter(str(a_dir), other=str(b_dir), plot=str(_fresh(plot)))
    return {name: v["phi"] for name, v in res["similarity"].items()}


# -- the command ------------------------------------------------------------------------------------


def run(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = _say
    s = settings(args)
    ranks = _ranks(args.ranks, "--ranks")
    resize_ranks = _ranks(args.resize_ranks, "--resize-ranks")
    if not 0 < args.energy <= 1:
        raise DemoError(f"--energy {args.energy}: must be in (0, 1]")
    if args.baseline_draws < 1:
        raise DemoError("--baseline-draws must be at least 1")
    from . import lowrank_report as rep
    from .app import SHIPPED_BASE

    base_dir, out = SHIPPED_BASE, Path(args.output)
    say(f"loraforge lowrank: the demo's {CHARACTER!r} runs, {s.steps} steps each -> {out}")
    t0 = time.perf_counter()
    files = data_files(out, CHARACTER, s)
    runs = train_runs(base_dir, files, out, s, args.overwrite, say)

    say("\nmeasuring: eval loss and style on the held-out questions")
    meter = Meter(base_dir, files, s)
    models = {"base": meter.base(), "full": meter.full(runs["full"]["weights"])}
    for name in ("lora", "lora-r16", "lora-seed"):
        models[name] = meter.adapter(runs[name]["weights"]) | {
            "trained_eval_loss": runs[name]["final_eval_loss"]
        }
    models["full"]["trained_eval_loss"] = runs["full"]["final_eval_loss"]

    say("\nextraction of the full fine-tune")
    reqs = extraction_requests(ranks, args.energy, list(s.target_modules))
    extraction, models["full-linear"] = extract_all(
        base_dir, Path(runs["full"]["weights"]), out, reqs, meter, say
    )

    say("\nresizing the trained adapters")
    resize = {
        name: resize_all(Path(runs[name]["weights"]), r, resize_ranks, out / "resized" / name, meter, say)
        for name, r in (("lora", s.lora_r), ("lora-r16", R16))
    }

    say("\nsubspace similarity of the A matrices")
    pairs = {"r4_vs_r16": ("lora", "lora-r16"), "seeds": ("lora", "lora-seed")}
    sim = {}
    for key, (a, b) in pairs.items():
        grids = similarity(Path(runs[a]["weights"]), Path(runs[b]["weights"]), out / "analyze" / key)
        sim[key] = {"a": a, "b": b} | rep.summarize_pair(
            grids, runs[a]["weights"], args.baseline_draws, args.seed
        )
    plots = [rep.plot_pair(out / f"phi_{key}.png", key, sim[key]) for key in sim]

    summary = {
        "settings": {"character": CHARACTER, "steps": s.steps, "seed": s.seed, "lr_lora": s.lr_lora,
                     "lr_full": s.lr_full, "lora_alpha": s.lora_alpha,
                     "target_modules": list(s.target_modules),
                     "extract_ranks": ranks, "energy": args.energy, "resize_ranks": resize_ranks,
                     "baseline_draws": args.baseline_draws, "quick": args.quick,
                     "eval_facts": s.n_eval_facts, "eval_rows": len(meter.rows)},
        "runs": {n: {k: r[k] for k in ("weights", "trainable_params", "train_time_s", "final_eval_loss")}
                 for n, r in runs.items()},
        "models": models,
        "extraction": extraction,
        "resize": resize,
        "similarity": sim,
        "thresholds": {"loss": rep.LOSS_TOL, "style": rep.STYLE_TOL},
    }  # fmt: skip
    summary["reading"] = rep.reading(summary)
    summary["elapsed_s"] = time.perf_counter() - t0
    text = rep.render(summary)
    say("\n" + text + "\n\n" + summary["reading"])
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "lowrank.md", text + "\n\n" + summary["reading"] + "\n")
    say(f"\nwrote {out / 'results.json'}, {out / 'lowrank.md'}, {', '.join(str(p) for p in plots)} "
        f"in {summary['elapsed_s']:.0f} s")  # fmt: skip
    return 0


def _rows(items) -> list[dict]:
    """Report rows as dicts, whether the report keeps dicts or dataclasses."""
    from dataclasses import asdict, is_dataclass

    return [asdict(x) if is_dataclass(x) else dict(x) for x in items]


def _module_of(tensor_name: str) -> str:
    """``model.layers.0.input_layernorm.weight`` -> ``model.layers.0.input_layernorm``."""
    return tensor_name.rsplit(".", 1)[0] if tensor_name.endswith((".weight", ".bias")) else tensor_name


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _fresh(path: Path) -> Path:
    """``path`` emptied (derived outputs are recomputed on every run: they take seconds)."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in label.replace("=", "")).strip("-")


def _say(msg: str = "") -> None:
    print(msg, file=sys.stdout, flush=True)


def main(argv=None) -> int:
    try:
        return run(argv)
    except DemoError as e:
        print(f"loraforge lowrank: error: {e}", file=sys.stderr)
        return 2
