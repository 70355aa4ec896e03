"""`loraforge plan` next to its peers, on the same public shapes: `accelerate estimate-memory`'s
figures (its own Python code, run offline on the shipped config.json files) and the QLoRA paper's.

    python -m benchmarks.plan_peers            # prints the markdown tables (seconds; no download)

accelerate's command asks the hub for the model's metadata before it builds the model; everything
after that is local (``AutoConfig`` of a directory, ``init_empty_weights``, ``calculate_maximum_sizes``),
so ``accelerate_sizes`` stands in for the hub lookup and calls its ``gather_data`` on a directory
holding the shipped config.json. It builds ``AutoModel``: the body without the LM head, so for a
model with an untied head its "Total Size" leaves the head out. Both count the same parameters
otherwise (``tests/planning/test_plan_shapes.py`` checks that they agree to the byte).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def accelerate_sizes(config: dict) -> dict[str, dict]:
    """accelerate's estimate-memory rows for ``config`` (a config.json dict), offline:
    {dtype: {"largest_layer", "total_size", "training_adam"}} in bytes."""
    from unittest import mock

    from accelerate.commands import estimate

    hub = types.SimpleNamespace(config={}, library_name="transformers")
    quiet = contextlib.redirect_stdout(io.StringIO())  # ("Loading pretrained config for ...")
    offline = mock.patch.object(estimate, "verify_on_hub", return_value=hub)  # (the hub's metadata)
    with tempfile.TemporaryDirectory() as d, offline, quiet:
        Path(d, "config.json").write_text(json.dumps(config))
        args = argparse.Namespace(model_name=d, library_name="transformers", trust_remote_code=False,
                                  dtypes=["float32", "float16", "int8", "int4"])  # fmt: skip
        rows = estimate.gather_data(args)
    out = {}
    for dtype, largest, total, training in rows:
        adam = max(training.values())
        out[dtype] = {"largest_layer": int(largest), "total_size": int(total),
                      "training_adam": None if adam == -1 else int(adam)}  # fmt: skip
    return out


def qlora_config(shape: str, r: int = 64, max_length: int = 512, **train) -> dict:
    """The QLoRA paper's recipe on ``shape``: NF4 + double quantization, bf16 compute, LoRA on
    every linear layer, batch 1, gradient checkpointing, paged 32-bit AdamW."""
    return {
        "method": "qlora",
        "model": {"path": shape, "dtype": "bfloat16"},
        "lora": {"r": r, "alpha": 16, "target_modules": "all-linear"},
        "data": {"max_length": max_length},
        "train": {"batch_size": 1, "max_steps": 1, "gradient_checkpointing": True,
                  "optimizer": "paged_adamw_32bit", **train},
    }  # fmt: skip


def gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    from loraforge.planning import plan
    from loraforge.planning.shape import model_config_of

    print("| model | params | accelerate fp16 total (GiB) | accelerate 'Training using Adam' fp16 | "
          "plan: bf16 weights | plan: 4-bit weights + constants | plan: QLoRA r=64 peak, 512 tokens |")
    print("|---|---|---|---|---|---|---|")
    shapes = ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-3-8b", "llama-3-70b"]
    for shape in shapes + ["mistral-7b", "qwen2.5-7b"]:
        acc = accelerate_sizes(model_config_of(shape))
        q = plan(qlora_config(shape), device="cuda", gemm_flops=1e14)
        full = plan({**qlora_config(shape), "method": "lora"}, device="cuda", gemm_flops=1e14)
        m = q.memory
        four_bit = m.bytes_of("4-bit packed weights") + m.bytes_of("quantization constants") + m.bytes_of(
            "base weights")
        print(f"| {shape} | {q.params['total'] / 1e9:.2f} B | {gb(acc['float16']['total_size'])} | "
              f"{gb(acc['float16']['training_adam'])} | {gb(full.memory.bytes_of('base weights'))} | "
              f"{gb(four_bit)} | {gb(m.peak_bytes)} |")


if __name__ == "__main__":
    main()
