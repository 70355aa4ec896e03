"""Quality on the real MiniLM weights (issue 3, item 7): NF4 vs FP4 vs absmax int4, same blocksize.

Run with ``-s`` to see the table (``python -m benchmarks.bench_quant`` prints it too). Measured on
the 36 encoder Linear weights of all-MiniLM-L6-v2, blocksize 64, NF4/FP4 with double quantization:

* relative error (median of ``|w - w_hat| / |w|``): NF4 < FP4 < int4, the QLoRA paper's ordering;
* absolute error (mean and RMS of ``w - w_hat``): NF4 is best, but int4 beats bitsandbytes' FP4.
  FP4 (E2M1, bias 2) spends two of its 16 codes on +-0.0052 and steps by 1/6 to 1/3 near +-1, so
  it is finer than int4 for small weights (relative error) and coarser for large ones (absolute).
"""

from __future__ import annotations

import torch

from loraforge.quant import dequantize_4bit, quantize_4bit


def int4_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Round-to-nearest symmetric int4 with the same per-block absmax: levels k/7 * absmax, k in -7..7."""
    flat = w.flatten().float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38) / 7
    return (torch.round(blocks / scale) * scale).flatten()[: flat.numel()].view_as(w)


def error_table(weights: dict[str, torch.Tensor], blocksize: int = 64) -> dict[str, dict[str, float]]:
    """{method: {"mean_abs", "rms", "median_rel"}} over all weights together."""
    methods = {
        "NF4": lambda w: dequantize_4bit(*quantize_4bit(w, "nf4", blocksize, double_quant=True)),
        "FP4": lambda w: dequantize_4bit(*quantize_4bit(w, "fp4", blocksize, double_quant=True)),
        "int4": lambda w: int4_absmax(w, blocksize),
    }
    table = {}
    for name, method in methods.items():
        abs_sum = sq_sum = 0.0
        rel, count = [], 0
        for w in weights.values():
            err = (method(w) - w).flatten()
            abs_sum += err.abs().sum().item()
            sq_sum += err.pow(2).sum().item()
            nonzero = w.flatten() != 0
            rel.append(err[nonzero].abs() / w.flatten()[nonzero].abs())
            count += w.numel()
        table[name] = {
            "mean_abs": abs_sum / count,
            "rms": (sq_sum / count) ** 0.5,
            "median_rel": torch.cat(rel).median().item(),
        }
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| method | mean abs error | RMS error | median relative error |", "|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['mean_abs']:.3e} | {row['rms']:.3e} | {row['median_rel']:.4f} |")
    return "\n".join(lines)


def test_nf4_is_best_and_relative_error_follows_the_qlora_ordering(minilm):
    table = error_table(minilm)
    print(f"\nMiniLM, {len(minilm)} Linear weights, blocksize 64\n{format_table(table)}")
    nf4, fp4, int4 = table["NF4"], table["FP4"], table["int4"]
    assert nf4["median_rel"] < fp4["median_rel"] < int4["median_rel"]
    for metric in ("mean_abs", "rms"):
        assert nf4[metric] < min(fp4[metric], int4[metric])
