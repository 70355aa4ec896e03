"""``loraforge extract`` / ``resize`` / ``analyze`` timed, and extraction against mergekit's
``mergekit-extract-lora`` on the same pair of models, in the same run.

    python -m benchmarks.bench_lowrank [--size smollm2|tiny] [--tuned trained|random] [--reps N]
                                       [--no-energy] [--workdir DIR] [--json OUT] [--markdown]

The pair. ``smollm2``: the real SmolLM2-135M-Instruct (``builtin:smollm2``) as the base and, as the
fine-tune, ``--tuned trained`` (default): a short real full fine-tune of it (``lf.train``, method
full, 4 AdamW steps of 4 rows x 64 tokens on the bundled quickstart Q&A data), or ``--tuned
random``: the base plus a random low-rank + noise update on every weight (``lf.save_model``). Both
are made once in ``--workdir`` and reused. ``tiny``: a 2-layer random Llama and its random update,
for the smoke test (seconds; the figures mean nothing).

The work. Every command runs in its own fresh process, so that peaks do not mix: ``loraforge
extract --rank 8`` and ``mergekit-extract-lora --max-rank 8`` (one per layer: a truncated SVD of
W_tuned - W_base), each keeping whole the modules mergekit cannot decompose: mergekit's defaults
save the embeddings, the LM head and the RMSNorms as ``modules_to_save``, and loraforge is given the
same list (``--modules-to-save``, read from mergekit's adapter_config.json), so both write the
same tensors. mergekit runs without copying the tokenizer (``--no-copy-tokenizer``: loraforge
writes none). Before anything is timed, one run of each is checked: the same tensor names, the same
rank in every layer, and s·B·A per layer within 1e-4 relative (mergekit's float32 SVD against
loraforge's float64), the saved modules equal. Also timed, with no peer (kohya's
``extract_lora_from_models.py`` / ``resize_lora.py`` are not installed here and depend on
sd-scripts): ``loraforge extract --energy 0.9`` (per-layer ranks; its peer column is mergekit at
rank 8, which is different work; on SmolLM2's 4-step fine-tune it ran over 8 minutes without
finishing on 2 busy cores, and ``--no-energy`` leaves it out), ``loraforge resize`` (r = 8 -> 4)
and ``loraforge analyze --base`` on the extracted r = 8 adapter.

Measured per command, medians over ``--reps`` rounds (the commands interleaved, the order rotating,
as ``common.interleaved`` does) after the checking round (``--reps 0``: the checking round's figures):

* work: seconds from the call of the command's entry point (``loraforge.cli.main`` /
  mergekit's click command, the console scripts' targets) to its return, the libraries imported
  before: torch, transformers with its Llama modelling module (which loraforge's model loading
  would import lazily, with accelerate and parts of torch: ~3 s and ~130 MB that mergekit, which
  builds no transformers model, does not pay), safetensors and the command's own module;
* process: wall seconds of the whole process, interpreter start and imports included (what a user
  waits for);
* peak: ``VmHWM`` minus ``VmRSS`` once those libraries are imported (the benchmarks' CPU
  definition, ``bench_memory.py``), in MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "BENCH_LOWRANK_RESULT "  # the child's last stdout line: this prefix + JSON
RANK, RESIZED, ENERGY = 8, 4, 0.9


# -- the child: one command in this fresh process ---------------------------------------------------------
def _entry(tool: str, argv: list[str]):
    """Import what ``tool`` needs and return a function running it on ``argv``."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (pulls in accelerate, torch's lazy parts)

    if tool == "loraforge":
        import importlib

        from loraforge import cli

        importlib.import_module(cli.DELEGATED[argv[0]][0])  # the command's module (imported lazily)
        return lambda: cli.main(argv)
    if tool == "mergekit-extract-lora":
        from importlib.metadata import entry_points

        (ep,) = entry_points(group="console_scripts", name=tool)
        command = ep.load()  # a click command
        return lambda: command.main(args=argv, standalone_mode=False) or 0
    raise ValueError(f"unknown tool {tool!r}")


def child(tool: str, argv: list[str]) -> dict:
    """Runs ``tool argv`` after its imports; {"work_s", "peak_mb", "code"} (see the module docstring)."""
    from . import common as C

    run = _entry(tool, argv)
    C.release_free_memory()
    before = C.rss_mb()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    code = run()
    work = time.perf_counter() - t0
    return {"work_s": work, "peak_mb": C.peak_rss_mb() - before, "code": int(code or 0)}


def run_command(tool: str, argv: list[str], threads: int = 0) -> dict:
    """``tool argv`` in a fresh Python process (see ``child``), plus its wall time as "process_s"."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "benchmarks.bench_lowrank", "--child", tool, "--", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines or json.loads(lines[-1][len(RESULT) :])["code"]:
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise RuntimeError(f"{tool} {' '.join(argv)} failed (exit {proc.returncode}): {tail}")
    return {**json.loads(lines[-1][len(RESULT) :]), "process_s": wall}


# -- the pair of models --------------------------------------------------------------------------------
def _perturb(model, seed: int = 0, rank: int = 12, size: float = 0.02, noise: float = 2e-3) -> None:
    """W += size·|W|·(unit-norm rank-``rank`` product) + noise·|W|·(unit-norm Gaussian) on every
    2-D weight; 1-D weights (norms) += noise. A full fine-tune's update is full rank with a few
    strong directions; this one is too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                m, n = p.shape
                lr = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
                gauss = torch.randn(m, n, generator=g)
                p += p.norm() * (size * lr / lr.norm() + noise * gauss / gauss.norm())
            else:
                p += noise * torch.randn(p.shape, generator=g)


def tiny_base(dest: Path) -> Path:
    """A 2-layer Llama with random weights (seed 0), untied head, saved with ``lf.save_model``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import loraforge as lf

    torch.manual_seed(0)
    # (``architectures``: mergekit picks its layout by this name)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])  # fmt: skip
    lf.save_model(LlamaForCausalLM(cfg).eval(), dest)
    return dest


def random_tuned(base: Path, dest: Path) -> Path:
    import loraforge as lf

    model = lf.load_model(base)
    _perturb(model)
    lf.save_model(model, dest)
    return dest


def trained_tuned(base: Path, out: Path, steps: int = 4) -> Path:
    """A short real full fine-tune of ``base`` (``lf.train``, method full) on the bundled Q&A data."""
    import loraforge as lf

    cfg = {"method": "full", "model": {"path": str(base)}, "output": str(out),
           "data": {"train": "builtin:quickstart/qa_train.jsonl", "max_length": 64},
           "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-4, "warmup_steps": 0,
                     "seed": 0}}  # fmt: skip
    _, metrics = lf.train(cfg)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # (the optimizer state: 1.6 GB, not needed)
    return Path(metrics["result_dir"])


def make_pair(size: str, tuned: str, workdir: Path) -> tuple[Path, Path, str]:
    """(base dir, tuned dir, a description); made once under ``workdir`` and reused."""
    if size == "tiny":
        base = workdir / "tiny-base"
        if not (base / "config.json").is_file():
            tiny_base(base)
        what = "tiny random Llama (2 layers, hidden 64) + a random rank-12 + noise update"
    else:
        from loraforge.pretrained import resolve

        base = Path(resolve("builtin:smollm2"))
        what = "SmolLM2-135M-Instruct (real weights) + " + (
            "a 4-step full fine-tune (lf.train, quickstart Q&A)"
            if tuned == "trained"
            else "a random rank-12 + noise update on every weight"
        )
    dest = workdir / f"tuned-{size}-{tuned}"
    done = dest / "model" if tuned == "trained" else dest
    if not (done / "config.json").is_file():
        done = trained_tuned(base, dest) if tuned == "trained" else random_tuned(base, dest)
    return base, done, what


# -- the check: both extracted the same adapter ----------------------------------------------------------
def compare_adapters(ours: Path, peer: Path) -> dict:
    """Raise unless the two adapters hold the same tensors, ranks and per-layer B·A (1e-4 relative)
    and the same saved modules; returns {"layers", "ranks", "max_rel_ba", "max_rel_saved"}."""
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (ours, peer))
    if sorted(a) != sorted(b):
        raise AssertionError(f"different tensors: only ours {sorted(set(a) - set(b))[:4]}, "
                             f"only mergekit {sorted(set(b) - set(a))[:4]}")  # fmt: skip
    ranks, worst_ba, worst_saved = set(), 0.0, 0.0
    layers = [k.removesuffix(".lora_A.weight") for k in a if k.endswith(".lora_A.weight")]
    for name in layers:
        ra, rb = a[f"{name}.lora_A.weight"].shape[0], b[f"{name}.lora_A.weight"].shape[0]
        if ra != rb:
            raise AssertionError(f"{name}: rank {ra} (ours) vs {rb} (mergekit)")
        ranks.add(ra)
        pa = a[f"{name}.lora_B.weight"].double() @ a[f"{name}.lora_A.weight"].double()
        pb = b[f"{name}.lora_B.weight"].double() @ b[f"{name}.lora_A.weight"].double()
        worst_ba = max(worst_ba, float((pa - pb).norm() / pb.norm().clamp_min(1e-30)))
    scale = [json.loads((d / "adapter_config.json").read_text()) for d in (ours, peer)]
    if any(c["lora_alpha"] != c["r"] or c.get("alpha_pattern", {}) != c.get("rank_pattern", {})
           for c in scale):  # fmt: skip
        raise AssertionError(f"scale alpha/r is not 1: {[(c['r'], c['lora_alpha']) for c in scale]}")
    if worst_ba > 1e-4:
        raise AssertionError(f"B·A differs by {worst_ba:.2e} (relative) in some layer")
    for k in a:
        if ".lora_" not in k:
            worst_saved = max(worst_saved, float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)))
    if worst_saved > 1e-6:
        raise AssertionError(f"saved modules differ by {worst_saved:.2e} (relative)")
    return {"layers": len(layers), "ranks": sorted(ranks), "max_rel_ba": worst_ba,
            "max_rel_saved": worst_saved}  # fmt: skip


def saved_by(adapter: Path) -> list[str]:
    return sorted(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"])


def energy_ranks(adapter: Path) -> list[int]:
    from safetensors.torch import load_file

    t = load_file(adapter / "adapter_model.safetensors")
    return [v.shape[0] for k, v in t.items() if k.endswith(".lora_A.weight")]


# -- the benchmark ------------------------------------------------------------------------------------------
def commands(base: Path, tuned: Path, saved: list[str], adapter: Path) -> dict[str, callable]:
    """name -> function(out_dir) -> (tool, argv), every path absolute."""
    pair = ["--base", str(base), "--tuned", str(tuned), "--modules-to-save", ",".join(saved)]
    mk = [
        "--model",
        str(tuned),
        "--base-model",
        str(base),
        "--no-copy-tokenizer",
        "--quiet",
        "--max-rank",
        f"{RANK}",
    ]
    return {
        "extract_r8": lambda o: ("loraforge", ["extract", *pair, "--rank", str(RANK), str(o)]),
        "mergekit_r8": lambda o: ("mergekit-extract-lora", [*mk, "--out-path", str(o)]),
        "extract_e09": lambda o: ("loraforge", ["extract", *pair, "--energy", str(ENERGY), str(o)]),
        "resize": lambda o: ("loraforge", ["resize", str(adapter), "--rank", str(RESIZED), str(o)]),
        "analyze": lambda o: ("loraforge", ["analyze", str(adapter), "--base", str(base), "--json", str(o)]),
    }


def bench(size: str = "smollm2", tuned: str = "trained", reps: int = 3, workdir: Path | None = None,
          threads: int = 0, energy: bool = True, say=print) -> dict:  # fmt: skip
    workdir = Path(workdir or Path(tempfile.gettempdir()) / "loraforge-bench-lowrank")
    workdir.mkdir(parents=True, exist_ok=True)
    base, tuned_dir, what = make_pair(size, tuned, workdir)
    say(f"pair: {what}\n  base {base}\n  tuned {tuned_dir}")
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))
    try:
        # the checking round (also the warm-up: the page cache holds both models afterwards)
        mk_dir, ours_dir = runs / "mergekit-r8", runs / "ours-r8"
        mergekit = commands(base, tuned_dir, [], ours_dir)["mergekit_r8"](mk_dir)
        checked = {"mergekit_r8": run_command(*mergekit, threads)}
        saved = saved_by(mk_dir)
        cmds = commands(base, tuned_dir, saved, ours_dir)
        checked["extract_r8"] = run_command(*cmds["extract_r8"](ours_dir), threads)
        check = compare_adapters(ours_dir, mk_dir)
        say(f"check: {check['layers']} layers, ranks {check['ranks']} on both sides, s·B·A within "
            f"{check['max_rel_ba']:.1e} (relative), saved modules {saved} equal "
            f"({check['max_rel_saved']:.0e})")  # fmt: skip
        ranks = []
        if energy:
            e_dir = runs / "ours-e09"
            checked["extract_e09"] = run_command(*cmds["extract_e09"](e_dir), threads)
            ranks = energy_ranks(e_dir)
        else:
            del cmds["extract_e09"]
        for name in ("resize", "analyze"):
            checked[name] = run_command(*cmds[name](runs / f"{name}-check"), threads)
        # the timed rounds, interleaved, the order rotating
        names = list(cmds)
        timed: dict[str, list[dict]] = {n: [] for n in names}
        for i in range(reps):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                out = runs / f"{n}-{i}"
                timed[n].append(run_command(*cmds[n](out), threads))
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            say(f"round {i + 1}/{reps} done")
        if not reps:  # (--reps 0: the checking round's figures only, e.g. for the smoke test)
            timed = {n: [checked[n]] for n in names}
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    med = {n: {f: statistics.median(s[f] for s in timed[n]) for f in ("work_s", "process_s", "peak_mb")}
           for n in names}  # fmt: skip
    best = {n: {f: min(s[f] for s in timed[n]) for f in ("work_s", "process_s")} for n in names}
    return {"pair": what, "base": str(base), "tuned": str(tuned_dir), "size": size, "reps": reps,
            "threads": threads or int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count()),
            "check": check, "saved": saved, "energy_ranks": ranks and {"min": min(ranks), "max": max(ranks),
            "mean": sum(ranks) / len(ranks)}, "median": med, "best": best, "samples": timed,
            "checking_round": checked}  # fmt: skip


LABELS = {
    "extract_r8": f"extract --rank {RANK}",
    "extract_e09": f"extract --energy {ENERGY} (info: per-layer ranks, not mergekit's work)",
    "resize": f"resize r={RANK} -> {RESIZED} (no peer)",
    "analyze": "analyze --base (no peer)",
}


def table(result: dict) -> str:
    """Markdown: per command and measure, loraforge, mergekit --max-rank 8, the ratio (median) and
    the ratio of the fastest samples."""
    med, best = result["median"], result["best"]
    peer = med["mergekit_r8"]
    lines = [f"| loraforge command | measure | loraforge | mergekit-extract-lora --max-rank {RANK} | "
             "ratio (median) | ratio (fastest) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for n, label in LABELS.items():
        if n not in med:
            continue
        with_peer = n.startswith("extract")
        for f, what, unit in (("work_s", "work (after imports)", "s"), ("process_s", "process wall", "s"),
                              ("peak_mb", "peak memory", "MB")):  # fmt: skip
            theirs = peer[f] if with_peer else math.nan
            ratio = med[n][f] / theirs if with_peer else math.nan
            fast = best[n][f] / best["mergekit_r8"][f] if with_peer and f in best[n] else math.nan
            lines.append(f"| {label} | {what} | {_fmt(med[n][f], unit)} | {_fmt(theirs, unit)} | "
                         f"{_ratio(ratio)} | {_ratio(fast)} |")  # fmt: skip
    return "\n".join(lines)


def _fmt(v: float, unit: str) -> str:
    return "-" if math.isnan(v) else f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"


def _ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # (run_command's fresh process)
        result = child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        print(RESULT + json.dumps(result), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--tuned", default="trained", choices=["trained", "random"],
                    help="smollm2's fine-tune: 4 lf.train full steps, or a random update")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3, help="timed rounds after the checking round (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every command (0: inherit)")
    ap.add_argument("--workdir", default="", help="where the pair is made once (default: $TMPDIR/...)")
    ap.add_argument("--no-energy", action="store_true", help="skip extract --energy (slow)")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (default too)")
    args = ap.parse_args(argv)
    tuned = "random" if args.size == "tiny" else args.tuned
    workdir = Path(args.workdir) if args.workdir else None
    result = bench(args.size, tuned, args.reps, workdir, args.threads, energy=not args.no_energy)
    from . import common as C

    e = result["energy_ranks"]
    rounds = f"median of {args.reps} rounds after" if args.reps else "figures of"
    ranks = f"; energy {ENERGY} ranks min {e['min']} / mean {e['mean']:.1f} / max {e['max']}" if e else ""
    print(f"\n{result['pair']}; {C.machine('cpu')}; {result['threads']} threads; {rounds} the checking "
          f"round{ranks}\n")  # fmt: skip
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
