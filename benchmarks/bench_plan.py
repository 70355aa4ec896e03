"""``loraforge plan``'s memory estimate checked against the measured peak of real training steps.

    python -m benchmarks.bench_plan [--only NAME,...] [--device cpu|cuda] [--json OUT] [--markdown]

Each configuration runs in its own fresh process (``common.run_isolated``), as the training loop
builds it: ``prepare_model`` (the weights loaded as ``model.path`` says, 4-bit for qlora, the
adapter injected, activation checkpointing), the LoRA compute mode and the fast kernels of
``train.fast_kernels``, loraforge's ``CausalLMLoss`` with ``train.loss_chunk_size``, the optimizer
of ``train.optimizer``; then two optimizer steps on a micro-batch of ``batch_size`` x
``max_length`` random tokens, every one a target (the second step has the optimizer state: it is
the steady state). Measured, with the benchmarks' definition (``bench_memory.py``):

* CPU: the peak resident set over the two steps (``VmHWM``, reset after the model is built, with
  freed memory handed back to the OS: ``common.release_free_memory``) minus the resident set once
  the libraries are imported (``before``); the model build's own transient peak is not counted.
* CUDA: ``torch.cuda.max_memory_allocated()`` over the two steps.

Predicted: ``estimate_memory(cfg).training_bytes``, the peak without the runtime overhead (the
imported libraries on CPU, the CUDA context on GPU), which the measurement also leaves out; the
overhead itself is measured here once (``overhead`` row) and compared with ``CPU_OVERHEAD``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import common as C

# A second Llama-shaped model next to SmolLM2 (30 narrow layers, 9 heads over 3 kv heads, 49k
# vocabulary): 6 wider layers, 12 heads over 4 kv heads, a 16k vocabulary; 50 M parameters, random
# weights (seed 0), saved once as a transformers directory so that it loads as any model.path
# does. Tied embeddings, as SmolLM2's: an untied input embedding read from a memory-mapped fp32
# file is resident only for the rows the tokens touch (the estimate counts it whole).
WIDE = dict(
    vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)  # fmt: skip

# name -> (model, overrides); "wide" is the model above, "smollm2" the real SmolLM2-135M.
CONFIGS = {
    "smol-lora-fp32-128": ("smollm2", ["data.max_length=128", "train.batch_size=4"]),
    "smol-lora-fp32-512-ckpt": ("smollm2", ["data.max_length=512", "train.batch_size=1",
                                            "train.gradient_checkpointing=true"]),
    "smol-qlora-fp32-256": ("smollm2", ["method=qlora", "data.max_length=256", "train.batch_size=2"]),
    "smol-full-fp32-128": ("smollm2", ["method=full", "data.max_length=128", "train.batch_size=2"]),
    "smol-lora-bf16-128": ("smollm2", ["model.dtype=bfloat16", "data.max_length=128", "train.batch_size=2"]),
    "smol-qlora-bf16-256-ckpt": ("smollm2", ["method=qlora", "model.dtype=bfloat16", "data.max_length=256",
                                             "train.batch_size=1", "train.gradient_checkpointing=true"]),
    "wide-lora-fp32-2048": ("wide", ["data.max_length=2048", "train.batch_size=1"]),
    "wide-lora-fp32-2048-ckpt": ("wide", ["data.max_length=2048", "train.batch_size=1",
                                          "train.gradient_checkpointing=true"]),
    "wide-qlora-fp32-1024": ("wide", ["method=qlora", "data.max_length=1024", "train.batch_size=1"]),
    "wide-full-bf16-128-ckpt": ("wide", ["method=full", "model.dtype=bfloat16", "data.max_length=128",
                                         "train.batch_size=2", "train.gradient_checkpointing=true"]),
    "wide-full-fp32-256": ("wide", ["method=full", "data.max_length=256", "train.batch_size=2"]),
    "wide-lora-fp32-512-eager": ("wide", ["data.max_length=512", "train.batch_size=2",
                                          "model.attn_implementation=eager"]),
}  # fmt: skip


def wide_model_dir(root: Path | None = None) -> str:
    """The ``WIDE`` model with random weights (seed 0) as a transformers directory (made once)."""
    root = Path(root or tempfile.gettempdir()) / "loraforge-bench-plan-wide"
    if not (root / "model.safetensors").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**WIDE))
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(root)
    return str(root)


def train_config(model: str, overrides: list[str]):
    """The TrainConfig of a benchmark row (the data file is never read: tokens are random)."""
    from loraforge.training.config import TrainConfig

    path = "builtin:smollm2" if model == "smollm2" else wide_model_dir() if model == "wide" else model
    base = {"model": {"path": path, "tokenizer": "builtin:tiny-llama"}, "data": {"train": "unused.jsonl"},
            "train": {"max_steps": 2, "device": "cpu"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return TrainConfig.from_dict(base, overrides)


def measure(cfg_dict: dict, device: str, steps: int = 2) -> dict:
    """Runs in a fresh process: the peak of ``steps`` training steps as the loop runs them (module
    docstring); bytes."""
    from loraforge.adapters import set_compute
    from loraforge.injection import inject
    from loraforge.optim import build_optimizer
    from loraforge.training.config import TrainConfig
    from loraforge.training.fast import patch_model
    from loraforge.training.loss import CausalLMLoss
    from loraforge.training.modeling import adapter_config, enable_activation_checkpointing, load_base_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = TrainConfig.from_dict(cfg_dict)
    t, cuda = cfg.train, device.startswith("cuda")
    dev = torch.device(device)
    lazy_imports(cfg)
    C.release_free_memory()
    imported = C.rss_mb() * 2**20
    # training.modeling.prepare_model without the tokenizer (no tokens are read here)
    model = load_base_model(cfg.model, dev, quantize=cfg.method == "qlora")
    model.config.use_cache = False
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, adapter_config(cfg))
        model.to(dev)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.method in ("lora", "qlora", "dora"):
        set_compute(model, t.lora_compute)
    if t.fast_kernels:
        patch_model(model)
    core = CausalLMLoss(model, t.loss_chunk_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(t.optimizer, trainable, t.lr, t.weight_decay, tuple(t.betas))
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (t.batch_size, cfg.data.max_length), generator=g).to(dev)
    labels = C.shifted_labels(ids)
    labels[:, -1] = ids[:, 0]  # every position a target: the planner's worst case
    positions = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    C.release_free_memory()
    C.sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        built = torch.cuda.memory_allocated()
    else:
        built = C.rss_mb() * 2**20 - imported
        C.reset_peak_rss()
    for _ in range(steps):
        total, n = core(ids, labels, positions)
        (total / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    C.sync(device)
    peak = torch.cuda.max_memory_allocated() if cuda else C.peak_rss_mb() * 2**20 - imported
    C.release_free_memory()
    after = torch.cuda.memory_allocated() if cuda else C.rss_mb() * 2**20 - imported
    return {"imported": imported, "built": built, "peak": peak, "after": after}


def lazy_imports(cfg=None) -> None:
    """What a training run imports before its model: the loop, the 4-bit layers, and the model's
    transformers module (imported on first use); the baseline is taken after these."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    import loraforge.quant.linear4bit  # noqa: F401
    import loraforge.training.fast  # noqa: F401
    import loraforge.training.loop  # noqa: F401


def imported_rss() -> float:
    """Runs in a fresh process: the resident set once torch, transformers and loraforge (and what
    ``lazy_imports`` names) are imported."""
    lazy_imports()
    C.release_free_memory()
    return C.rss_mb() * 2**20


def predict(cfg, device: str):
    from loraforge.planning.memory import estimate_memory

    return estimate_memory(cfg, device=device)


def run(names: list[str], device: str) -> list[dict]:
    rows = []
    for name in names:
        model, overrides = CONFIGS[name]
        cfg = train_config(model, overrides)
        est = predict(cfg, device)
        got = C.run_isolated(measure, cfg.to_dict(), device)
        ratio = est.training_bytes / got["peak"]
        from loraforge.planning.memory import RESIDENT

        resident = sum(est.bytes_of(k) for k in RESIDENT) - est.overhead_bytes
        rows.append(dict(name=name, predicted=est.training_bytes, measured=got["peak"], ratio=ratio,
                         phase=est.peak_phase, resident_predicted=resident, resident_measured=got["after"]))
        mib = 2**20
        print(f"{name:26s} predicted {est.training_bytes / mib:7.1f} MiB  measured {got['peak'] / mib:7.1f}"
              f" MiB  ratio {ratio:5.3f}  (peak at {est.peak_phase}; between steps {resident / mib:.1f} "
              f"predicted, {got['after'] / mib:.1f} measured)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(CONFIGS)}")
    from loraforge.planning.memory import CPU_OVERHEAD

    overhead = C.run_isolated(imported_rss)
    print(f"runtime overhead (RSS after imports): measured {overhead / 2**20:.0f} MiB, "
          f"CPU_OVERHEAD {CPU_OVERHEAD / 2**20:.0f} MiB")
    rows = run(names, args.device)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |predicted/measured - 1| = {worst:.3f}")
    if args.markdown:
        print("\n| configuration | predicted MiB | measured MiB | predicted / measured |\n|---|---|---|---|")
        for r in rows:
            mib = (r["predicted"] / 2**20, r["measured"] / 2**20)
            print(f"| {r['name']} | {mib[0]:.0f} | {mib[1]:.0f} | {r['ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": overhead, "rows": rows}, indent=1))
    return 0 if worst <= 0.10 or args.device != "cpu" else 1


if __name__ == "__main__":
    sys.exit(main())
