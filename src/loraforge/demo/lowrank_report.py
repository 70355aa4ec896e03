"""``loraforge lowrank``'s numbers into words: φ summaries with their random baseline, the tables,
the heat maps and a plain reading computed from the results.

φ per layer type. ``analyze_adapter`` gives φ(i, j) per adapted layer (i ≤ r_a over adapter a's
right singular vectors of A, j ≤ r_b over b's). We average the grids of one layer type over the
blocks, and summarize:

* φ(1, 1): do the two top directions coincide;
* per direction, d_i = ‖V_bᵀ v_a,i‖² = i·φ(i, r_b) − (i−1)·φ(i−1, r_b) (for i ≤ r_b): how much of
  a's i-th direction lies in b's whole span; "top directions agree, the rest is noise" reads
  d_1 ≫ chance and d_i ≈ chance for the last ones;
* the mean over the grid.

The baseline is the same statistics for random Gaussian A of the same shapes (``draws`` pairs).
For random subspaces E‖V1[:, :i]ᵀ V2[:, :j]‖² = i·j/n, so E φ(i, j) = max(i, j)/n and E d_i = r_b/n:
the measured baseline should sit there (``expected``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .measure import format_table

LOSS_TOL = 0.02  # quality kept: eval loss within 2% of the reference ...
STYLE_TOL = 0.1  # ... and style at most 0.1 (two answers in 22) below it
FAR, ABOVE = 3.0, 1.5  # ratios to the random baseline called "far above" / "above" chance
AGREE = 0.5  # φ(1,1) from which two top directions "agree" (the paper's r=8 vs r=64: above 0.5)


def layer_type(name: str) -> str:
    """``...layers.2.self_attn.v_proj`` -> ``v_proj``."""
    return name.rstrip(".").rsplit(".", 1)[-1]


def in_dims(adapter_dir) -> dict[str, int]:
    """Layer type -> the input width n of its A matrices (A is (r, n))."""
    from safetensors import safe_open

    dims = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            if ".lora_A." in k:
                dims[layer_type(k.split(".lora_A.")[0])] = f.get_slice(k).get_shape()[-1]
    return dims


def stats(grid: torch.Tensor) -> dict:
    """φ(1,1), per-direction overlaps d_i, φ(r_a, r_b) and the mean of one (r_a, r_b) φ grid."""
    ra, rb = grid.shape
    last = grid[:, rb - 1]
    d = [
        float(i * last[i - 1] - (i - 1) * (last[i - 2] if i > 1 else 0.0)) for i in range(1, min(ra, rb) + 1)
    ]
    return {"phi_11": float(grid[0, 0]), "per_direction": d, "phi_all": float(grid[-1, -1]),
            "mean": float(grid.mean())}  # fmt: skip


def random_grid(ra: int, rb: int, n: int, draws: int, seed: int) -> torch.Tensor:
    """Mean φ grid of ``draws`` pairs of random Gaussian A (ra, n) and (rb, n)."""
    from ..lowrank.spectra import right_basis, subspace_similarity

    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(ra, rb, dtype=torch.float64)
    for _ in range(draws):
        a1 = torch.randn(ra, n, generator=g, dtype=torch.float64)
        a2 = torch.randn(rb, n, generator=g, dtype=torch.float64)
        total += subspace_similarity(right_basis(a1), right_basis(a2))
    return total / draws


def expected_grid(ra: int, rb: int, n: int) -> torch.Tensor:
    i = torch.arange(1, ra + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, rb + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j).expand(ra, rb) / n


def summarize_pair(grids: dict[str, list], a_dir, draws: int, seed: int) -> dict:
    """Per layer type: the block-averaged φ grid and its stats, next to the random baseline's."""
    dims = in_dims(a_dir)
    by_type: dict[str, list[torch.Tensor]] = {}
    for name, g in grids.items():
        by_type.setdefault(layer_type(name), []).append(torch.tensor(g, dtype=torch.float64))
    out = {}
    for t, gs in sorted(by_type.items()):
        mean = torch.stack(gs).mean(0)
        ra, rb = mean.shape
        n = dims[t]
        rnd = random_grid(ra, rb, n, draws, seed)
        out[t] = {
            "n": n, "blocks": len(gs), "phi": mean.tolist(), **stats(mean),
            "phi_11_per_block": [float(g[0, 0]) for g in gs],
            "random": {"phi": rnd.tolist(), **stats(rnd)},
            "expected": {"phi": expected_grid(ra, rb, n).tolist(), **stats(expected_grid(ra, rb, n))},
        }  # fmt: skip
    return {"layers": out}


def plot_pair(path: Path, key: str, pair: dict) -> Path:
    """Heat maps: per layer type the block-averaged φ (top row) and the random baseline (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(pair["layers"])
    fig, axes = plt.subplots(
        2, len(types), figsize=(4.2 * len(types), 5.6), dpi=100, squeeze=False, layout="constrained"
    )
    for col, t in enumerate(types):
        lay = pair["layers"][t]
        for row, (grid, what) in enumerate(
            ((lay["phi"], f"{pair['a']} vs {pair['b']}"), (lay["random"]["phi"], "random"))
        ):
            ax = axes[row][col]
            g = torch.tensor(grid)
            im = ax.imshow(g.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            if g.shape[1] <= 8:  # (values written in the cells while they fit)
                for (i, j), v in zip(
                    ((i, j) for i in range(g.shape[0]) for j in range(g.shape[1])), g.flatten()
                ):
                    ax.text(j, i, f"{float(v):.2f}"[1:] if v < 1 else "1", ha="center", va="center",
                            fontsize=6, color="white" if v < 0.5 else "black")  # fmt: skip
            ax.set_xticks(range(g.shape[1]), [str(j + 1) for j in range(g.shape[1])], fontsize=6)
            ax.set_yticks(range(g.shape[0]), [str(i + 1) for i in range(g.shape[0])], fontsize=6)
            ax.set_title(f"{t} (n={lay['n']}): {what}", fontsize=8)
            ax.set_xlabel(f"j ({pair['b']})", fontsize=7)
            ax.set_ylabel(f"i ({pair['a']})", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"subspace similarity of A's right singular vectors, {key} (mean over blocks)", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- tables ------------------------------------------------------------------------------------------


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _rel(x, ref) -> str:
    return "-" if x is None or not ref else f"{100 * (x / ref - 1):+.1f}%"


def _ranks(m: dict) -> str:
    if "rank_min" not in m:
        return "all"
    lo, hi = m["rank_min"], m["rank_max"]
    return str(lo) if lo == hi else f"{lo}-{hi}"


def kept(m: dict, ref: dict) -> bool:
    """Quality kept against ``ref``: eval loss within LOSS_TOL and style within STYLE_TOL."""
    return m["eval_loss"] <= ref["eval_loss"] * (1 + LOSS_TOL) and m["style"] >= ref["style"] - STYLE_TOL


def render(summary: dict) -> str:
    models, full, seed = summary["models"], summary["models"]["full"], summary["settings"]["seed"]
    named = [("base", "base"), ("full fine-tune", "full"), ("LoRA r=4 (trained)", "lora"),
             ("LoRA r=16 (trained)", "lora-r16"), (f"LoRA r=4 seed {seed + 1} (trained)", "lora-seed"),
             ("full fine-tune, linear layers only", "full-linear")]  # fmt: skip
    head = ["model", "ranks", "params", "energy kept", "eval loss", "vs full", "style", "content"]
    rows = []
    for label, key in named:
        m = models.get(key)
        if m is None:
            continue
        params = f"{m['params']:,}" if "params" in m else ("0" if key == "base" else "all")
        loss = m["eval_loss"]
        rows.append([label, _ranks(m) if "params" in m else "-", params, "-", _f(loss),
                     _rel(loss, full["eval_loss"]), _f(m["style"], 2), _f(m["content"], 2)])  # fmt: skip
    for e in summary["extraction"]:
        rows.append([f"extracted {e['label']}", _ranks(e), f"{e['params']:,}", _f(e["energy_kept"]),
                     _f(e["eval_loss"]), _rel(e["eval_loss"], full["eval_loss"]), _f(e["style"], 2),
                     _f(e["content"], 2)])  # fmt: skip
    parts = ["the full fine-tune extracted to low rank (lf.extract_lora), against the trained adapters",
             format_table(head, rows)]  # fmt: skip

    head = ["adapter", "resized to", "params", "energy kept", "eval loss", "vs original", "style", "content",
            "quality"]  # fmt: skip
    rows = []
    for name, res in summary["resize"].items():
        ref = models[name]
        for r in res:
            rows.append([name, f"r={r['rank']}", f"{r['params']:,}", _f(r["energy_kept"]), _f(r["eval_loss"]),
                         _rel(r["eval_loss"], ref["eval_loss"]), _f(r["style"], 2), _f(r["content"], 2),
                         "kept" if kept(r, ref) else "DROPS"])  # fmt: skip
    parts += ["", "the trained adapters resized down (lf.resize_adapter)", format_table(head, rows)]

    head = ["pair", "layer (n)", "φ(1,1)", "random", "d_i: a's direction i in b's span", "random d_i",
            "φ(r_a,r_b)", "random", "mean φ", "random"]  # fmt: skip
    rows = []
    for pair in summary["similarity"].values():
        for t, lay in pair["layers"].items():
            rnd = lay["random"]
            rows.append([f"{pair['a']} vs {pair['b']}", f"{t} ({lay['n']})", _f(lay["phi_11"]),
                         _f(rnd["phi_11"]), " ".join(_f(d, 2) for d in lay["per_direction"]),
                         _f(_avg(rnd["per_direction"]), 2), _f(lay["phi_all"]), _f(rnd["phi_all"]),
                         _f(lay["mean"]), _f(rnd["mean"])])  # fmt: skip
    title = ("subspace similarity φ of the A matrices' right singular vectors (lf.analyze_adapter; mean over "
             "the blocks; random: Gaussian A of the same shapes)")  # fmt: skip
    parts += ["", title, format_table(head, rows)]
    return "\n".join(parts)


def _avg(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# -- the reading -------------------------------------------------------------------------------------


def _chance(ratio: float) -> str:
    return "far above chance" if ratio >= FAR else "above chance" if ratio >= ABOVE else "at chance level"


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.1f}%"


def _extraction_words(s: dict) -> list[str]:
    m, ex = s["models"], s["extraction"]
    full, lora = m["full"], m["lora"]
    by_rank = [e for e in ex if set(e["request"]) == {"rank"}]
    words = [
        f"The full fine-tune (eval loss {full['eval_loss']:.3f}, style {full['style']:.2f}) extracted at "
        + ", ".join(f"r={e['request']['rank']}" for e in by_rank) + " has eval loss "
        + ", ".join(f"{e['eval_loss']:.3f}" for e in by_rank) + "."
    ]  # fmt: skip
    close = [e for e in by_rank if kept(e, full)]
    if by_rank:
        words.append(
            f"The smallest of these within {LOSS_TOL:.0%} of its loss (and {STYLE_TOL} of its style) is "
            f"r={close[0]['request']['rank']} ({close[0]['params']:,} parameters)."
            if close
            else f"None of them comes within {LOSS_TOL:.0%} of its loss: the fine-tune's update is not "
            f"that low-rank at these ranks."
        )
    energy = next((e for e in ex if set(e["request"]) == {"energy"} and e["request"]["energy"] < 1), None)
    if energy:
        words.append(
            f"Keeping {energy['request']['energy']:.0%} of each layer's energy takes ranks "
            f"{_ranks(energy)} ({energy['params']:,} parameters) for eval loss {energy['eval_loss']:.3f} "
            f"({_pct(energy['eval_loss'], full['eval_loss'])})."
        )
    budget = next((e for e in ex if "target_modules" in e["request"]), None)
    if budget:
        diff = budget["eval_loss"] / lora["eval_loss"] - 1
        verdict = "the two are on par"
        if diff > LOSS_TOL:
            verdict = "training the low-rank update directly does better than truncating a full fine-tune"
        elif diff < -LOSS_TOL:
            verdict = "truncating the full fine-tune does better than training at low rank"
        words.append(
            f"At the trained LoRA's own budget (r=4 on its modules, {budget['params']:,} parameters) the "
            f"extraction reaches {budget['eval_loss']:.3f} against the trained r=4 LoRA's "
            f"{lora['eval_loss']:.3f} (style {budget['style']:.2f} vs {lora['style']:.2f}): {verdict}."
        )
    whole = next((e for e in ex if e["request"] == {"energy": 1.0}), None)
    ref = m.get("full-linear")
    if whole and ref:
        words.append(
            f"All of ΔW (every layer at its full rank) gives {whole['eval_loss']:.3f}, the fine-tune with "
            f"only its linear layers changed {ref['eval_loss']:.3f}: the rest of the gap to "
            f"{full['eval_loss']:.3f} is its {whole['other_changes']} changed norm and embedding tensors."
        )
    saved = next((e for e in ex if "modules_to_save" in e["request"]), None)
    if saved:
        mts = saved["request"]["modules_to_save"]
        words.append(
            f"Saving them as modules_to_save ({len(mts)} modules"
            + (", the output head tied to the embeddings among them" if "lm_head" in mts else "")
            + f") gives {saved['eval_loss']:.3f} ({_pct(saved['eval_loss'], full['eval_loss'])} of the full "
            "fine-tune)."
        )
    return words


def _resize_words(s: dict) -> list[str]:
    words = []
    for name, res in s["resize"].items():
        ref = s["models"][name]
        own = res[0]["rank"]
        lowest, drop = own, None
        for r in res:  # descending ranks: the first that fails ends the run of kept ones
            if not kept(r, ref):
                drop = r
                break
            lowest = r["rank"]
        label = f"The trained r={own} LoRA (eval loss {ref['eval_loss']:.3f}, style {ref['style']:.2f})"
        if drop is None:
            words.append(f"{label} keeps its quality at every rank tried, down to r={lowest}.")
            continue
        at = (
            f"at r={drop['rank']} the eval loss is {drop['eval_loss']:.3f} "
            f"({_pct(drop['eval_loss'], ref['eval_loss'])}), style {drop['style']:.2f}."
        )
        kept_to = (
            "loses quality at the first cut" if lowest == own else f"keeps its quality down to r={lowest}"
        )
        words.append(f"{label} {kept_to}; {at}")
    return words


def _pair_numbers(pair: dict) -> tuple[float, float, float, float]:
    """(top-direction overlap, its random value, last-direction overlap, its random value), means
    over the layer types."""
    lays = pair["layers"].values()
    top = _avg(lay["per_direction"][0] for lay in lays)
    top_r = _avg(lay["random"]["per_direction"][0] for lay in lays)
    last = _avg(lay["per_direction"][-1] for lay in lays)
    last_r = _avg(lay["random"]["per_direction"][-1] for lay in lays)
    return top, top_r, last, last_r


def _similarity_words(s: dict) -> list[str]:
    words, verdicts = [], []
    for key, pair in s["similarity"].items():
        lays = pair["layers"]
        top, top_r, last, last_r = _pair_numbers(pair)
        k = len(next(iter(lays.values()))["per_direction"])
        phi11 = ", ".join(f"{t} {lay['phi_11']:.2f}" for t, lay in lays.items())
        words.append(
            f"Between {pair['a']} and {pair['b']}, φ(1,1) is {phi11} (random "
            f"{_avg(lay['random']['phi_11'] for lay in lays.values()):.3f}); the top direction of "
            f"{pair['a']}'s A lies {top:.2f} inside {pair['b']}'s span ({_chance(top / top_r)}, random "
            f"{top_r:.3f}), its "
            f"direction {k} {last:.2f} ({_chance(last / last_r)}, random {last_r:.3f})."
        )
        phi11 = _avg(lay["phi_11"] for lay in lays.values())
        verdicts.append((key, phi11, _avg(lay["random"]["phi_11"] for lay in lays.values()), last / last_r))
    if verdicts:
        top, top_r, last_ratio = verdicts[0][1:]
        if top >= AGREE and last_ratio < ABOVE:
            v = "holds here: the top directions agree and the last ones are no more alike than random ones"
        elif top >= AGREE:
            v = (
                "partly holds here: the top directions agree, but the last ones also overlap more than "
                "random ones (more than one direction is shared)"
            )
        elif top >= FAR * top_r:
            v = (
                f"holds only in part here: the top directions overlap far more than random ones but do not "
                f"coincide (φ(1,1) below {AGREE})"
            )
        else:
            v = "does not show here: the top directions agree no more than random ones"
        words.append(f"The LoRA paper's finding (the top directions agree, the rest is noise) {v}.")
    return words


def reading(s: dict) -> str:
    """One paragraph from the numbers: extraction, resize, subspaces."""
    return " ".join(_extraction_words(s) + _resize_words(s) + _similarity_words(s))
