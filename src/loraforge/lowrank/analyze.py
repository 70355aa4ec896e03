"""``loraforge analyze``: what rank an adapter uses, what two adapters share, and what it amplifies.

Per layer, for ΔW = s·B·A (as ``loraforge resize`` reads it; DoRA's directional update too):
its singular values (from the r × r core of ``spectra.factored``, never forming ΔW), effective
rank, stable rank and the Frobenius energy kept by the top k = 1, 2, 4, … , r directions.

``other``: the LoRA paper's subspace similarity (Hu et al. 2021, section 7.2) between the two
adapters' A factors on every layer both have: with V1 (n, r1), V2 (n, r2) the right singular
vectors of A1, A2 (ordered by singular value), φ(i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖_F² / min(i, j).
Summaries: φ(1, 1), the mean over the square top block i, j ≤ min(r1, r2), and the diagonal
φ(i, i); beside them the random baseline, the same numbers for A's with Gaussian entries. Its
expected value is exact: the top-i right singular vectors of a Gaussian matrix span a uniformly
random i-dimensional subspace, and two independent ones give E‖P_i P_j‖_F² = i·j/n, so
E φ(i, j) = max(i, j)/n; one seeded draw is reported too.

``base``: the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (section 7.3; U, V ΔW's top-r singular
vectors, W the base weight read tensor by tensor from the safetensors; computed from the factors,
``spectra.factored_amplification``), and for comparison the same factor for a random rank-r
matrix (Gaussian factors) of the same norm.

``plot``: ``singular_values.png`` (one curve per layer) and ``phi_<layer>.png`` (the φ grid as a
heat map, i down, j across, as the paper's Figures 3-4) for the chosen layers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from ..injection import name_matches
from . import spectra
from .plots import MAX_HEATMAPS  # (heat maps drawn when no layers are chosen)
from .resize import EXIT_USAGE, Factors, read_lora


def analyze_adapter(adapter_dir, *, other=None, base=None, plot=None, layers=None, seed: int = 0) -> dict:
    """Spectra of every LoRA layer of ``adapter_dir`` (and, on request, φ against ``other``, the
    amplification factor over ``base``, PNGs into ``plot``) as a JSON-ready dict:

    {"adapter", "layers": {name: {"shape", "rank", "singular_values", "effective_rank",
    "stable_rank", "energy_at": {k: e}, "amplification"?}}, "similarity"?: {name: {"phi",
    "phi_1_1", "mean", "mean_top", "diag", "random", "random_sampled"}}, "plots"?, "notes"}

    ``layers``: names (a layer matches one equal to its path or to a dotted suffix of it) or
    regexes (full match); the analysis keeps only matching layers. ``seed`` fixes the random
    baselines.
    """
    cfg, _, _, found = read_lora(adapter_dir, "analyze")
    found = _select(found, layers, adapter_dir)
    result: dict = {"adapter": str(adapter_dir), "layers": {}, "notes": []}
    if cfg.use_dora:
        result["notes"].append("DoRA adapter: the spectra are those of its directional update s·B·A")
    for f in found:
        _, core, _ = spectra.factored(f.a, f.b, f.scale)
        s = torch.linalg.svdvals(core)
        result["layers"][f.name] = {
            "shape": list(f.shape),
            "rank": f.rank,
            "singular_values": s.tolist(),
            "effective_rank": spectra.effective_rank(s),
            "stable_rank": spectra.stable_rank(s),
            "energy_at": {k: spectra.energy_at(s, k) for k in _ks(f.rank)},
        }
    if other is not None:
        _, _, _, theirs = read_lora(other, "analyze")
        result["other"] = str(other)
        result["similarity"] = similarity(found, _select(theirs, layers, other), adapter_dir, other, seed)
    if base is not None:
        result["base"] = str(base)
        for name, amp in amplification(found, base, seed).items():
            result["layers"][name]["amplification"] = amp
    if plot is not None:
        from .plots import plot_analysis

        chosen = layers is not None or len(result.get("similarity", {})) <= MAX_HEATMAPS
        result["plots"] = [str(p) for p in plot_analysis(result, Path(plot), all_maps=chosen)]
        if not chosen:
            result["notes"].append(
                f"heat maps for {MAX_HEATMAPS} of {len(result['similarity'])} layers; "
                "choose others with layers="
            )
    return result


def _ks(r: int) -> list[int]:
    """1, 2, 4, … below r, then r."""
    ks = [2**i for i in range(max(1, r).bit_length()) if 2**i < r]
    return ks + [r]


def _select(found: list[Factors], layers, source) -> list[Factors]:
    if layers is None:
        return found
    specs = [layers] if isinstance(layers, str) else list(layers)

    def chosen(name: str) -> bool:
        for spec in specs:
            if name_matches([spec], name):
                return True
            try:
                if re.fullmatch(spec, name):
                    return True
            except re.error:
                pass
        return False

    kept = [f for f in found if chosen(f.name)]
    if not kept:
        names = [f.name for f in found]
        raise ValueError(
            f"{source}: layers {specs} name no LoRA layer; it has {len(names)}, e.g. {names[:3]}"
        )
    return kept


def similarity(mine: list[Factors], theirs: list[Factors], source, other_source, seed: int = 0) -> dict:
    """φ between the A factors of the layers both lists have (see the module docstring)."""
    by_name = {f.name: f for f in theirs}
    common = [f for f in mine if f.name in by_name]
    if not common:
        raise ValueError(
            f"{other_source}: no LoRA layer in common with {source} (e.g. {mine[0].name!r} vs "
            f"{theirs[0].name!r}): adapters over different models or modules"
        )
    g = torch.Generator().manual_seed(seed)
    out = {}
    for f in common:
        o = by_name[f.name]
        if f.in_shape != o.in_shape:
            raise ValueError(
                f"{other_source}: layer {f.name!r} has A over inputs of shape {o.in_shape}, {source} over "
                f"{f.in_shape}: adapters over different models (φ needs the same input space)"
            )
        phi = spectra.subspace_similarity(spectra.right_basis(f.a), spectra.right_basis(o.a))
        n = f.a[0].numel()
        i = torch.arange(1, f.rank + 1, dtype=torch.float64)[:, None]
        j = torch.arange(1, o.rank + 1, dtype=torch.float64)[None, :]
        expected = torch.maximum(i, j).clamp(max=n) / n
        draw = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in (f.rank, o.rank)]
        sampled = spectra.subspace_similarity(*(spectra.right_basis(a) for a in draw))
        out[f.name] = {"phi": phi.tolist(), **_summary(phi)}
        out[f.name]["random"] = _summary(expected)
        out[f.name]["random_sampled"] = _summary(sampled)
    return out


def _summary(phi: torch.Tensor) -> dict:
    k = min(phi.shape)
    return {
        "phi_1_1": float(phi[0, 0]),
        "mean": float(phi.mean()),
        "mean_top": float(phi[:k, :k].mean()),
        "diag": phi.diagonal().tolist(),
    }


def amplification(found: list[Factors], base, seed: int = 0) -> dict:
    """{layer: {"factor", "random", "delta_norm", "weight_norm", "weight"}} over base model ``base``
    (a directory, builtin:NAME or .gguf; 4-bit checkpoints dequantized), reading only the target
    layers' weights, one at a time (``weights.Checkpoint``: linear weights as (out, in))."""
    from .weights import Checkpoint

    ckpt = Checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for f in found:
        key = f"{f.name}.weight"
        if key not in ckpt.params:
            raise ValueError(f"{base}: no weight {key!r}: not this adapter's base model")
        w = ckpt.read(key).to(torch.float64)
        if f.a_key.endswith("lora_embedding_A"):
            w = w.T  # (an Embedding's ΔW = B·A is (dim, num), its weight (num, dim))
        w = spectra.as_matrix(w, torch.float64)
        if tuple(w.shape) != f.shape:
            raise ValueError(
                f"{base}: weight {key!r} is {tuple(w.shape)} as a matrix, the adapter's ΔW for {f.name!r} is "
                f"{f.shape}: an adapter for another model"
            )
        norm = float(spectra.factored(f.a, f.b, f.scale)[1].norm())  # ‖ΔW‖_F = ‖C‖_F
        # a random rank-r update (Gaussian factors) of the same norm
        ra = torch.randn(f.rank, f.shape[1], generator=g, dtype=torch.float64)
        rb = torch.randn(f.shape[0], f.rank, generator=g, dtype=torch.float64)
        rb *= norm / float(spectra.factored(ra, rb, 1.0)[1].norm())
        out[f.name] = {
            "factor": spectra.factored_amplification(f.a, f.b, f.scale, w),
            "random": spectra.factored_amplification(ra, rb, 1.0, w),
            "delta_norm": norm,
            "weight_norm": float(w.norm()),
            "weight": key,
        }
    return out


def table(result: dict) -> str:
    """The per-layer numbers as text: spectra, then φ and the amplification factor when present."""
    rows = result["layers"]
    sim = result.get("similarity", {})
    width = max([len("layer")] + [len(n) for n in rows])
    head = f"{'layer':<{width}}  {'r':>3}  {'eff.rank':>8}  {'st.rank':>7}  "
    head += f"{'E@1':>6}  {'E@2':>6}  {'E@4':>6}  {'max sv':>9}"
    if sim:
        head += f"  {'φ(1,1)':>7}  {'φ top':>6}  {'random':>6}"
    if any("amplification" in v for v in rows.values()):
        head += f"  {'amplif.':>8}  {'random':>7}"
    lines = [head]
    for name, v in rows.items():
        sv, e = v["singular_values"], v["energy_at"]
        energies = "  ".join(f"{e[k]:>6.3f}" if k in e else f"{'-':>6}" for k in (1, 2, 4))
        line = (
            f"{name:<{width}}  {v['rank']:>3}  {v['effective_rank']:>8.3f}  {v['stable_rank']:>7.3f}  "
            f"{energies}  {(sv[0] if sv else 0.0):>9.4g}"
        )
        if sim:
            s = sim.get(name)
            line += (
                f"  {s['phi_1_1']:>7.3f}  {s['mean_top']:>6.3f}  {s['random']['mean_top']:>6.3f}"
                if s
                else f"  {'-':>7}  {'-':>6}  {'-':>6}"
            )
        if "amplification" in v:
            line += f"  {v['amplification']['factor']:>8.3f}  {v['amplification']['random']:>7.3f}"
        lines.append(line)
    lines.append(f"{len(rows)} layers; E@k: Frobenius energy of the top k directions of s·B·A")
    if sim:
        lines.append(
            f"φ over {len(sim)} layers against {result['other']}: φ top = mean over i, j <= min(r1, r2); "
            "random = its expected value for Gaussian A's"
        )
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines += [f"plot: {p}" for p in result.get("plots", [])]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraforge analyze",
        description="Per layer of a LoRA adapter: the singular values of s·B·A, effective and stable rank, "
        "energy at k; with --other the LoRA paper's subspace similarity φ between the two adapters' A "
        "factors (with its random-Gaussian baseline); with --base the amplification factor "
        "‖ΔW‖/‖UᵀWV‖. Numbers as a table (and JSON), plots as PNG.",
    )
    p.add_argument("adapter", help="LoRA adapter directory (PEFT format)")
    p.add_argument("--other", help="a second LoRA adapter over the same base, for φ")
    p.add_argument("--base", help="the base model (directory, builtin:NAME or .gguf), for the amplification")
    p.add_argument("--plot", metavar="DIR", help="write singular_values.png and phi_<layer>.png here")
    p.add_argument(
        "--layers", nargs="+", metavar="NAME", help="only these layers (names, suffixes or regexes)"
    )
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON to FILE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``loraforge analyze``: 0, or 2 with one line on stderr for a bad argument or file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.json and Path(args.json).is_dir():
            raise ValueError(f"--json {args.json}: a directory; give a file name (analysis.json)")
        result = analyze_adapter(
            args.adapter, other=args.other, base=args.base, plot=args.plot, layers=args.layers
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(_finite(result), indent=2), encoding="utf-8")
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(table(result))
    if args.json:
        print(f"numbers written to {args.json}")
    return 0


def _finite(x):
    """``x`` with non-finite floats as null (JSON has no NaN / Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
