"""FLOPs of one training step, counted from the model's shapes, and the time they take.

The count is the one ``torch.utils.flop_counter.FlopCounterMode`` makes of a real loraforge step
(``benchmarks/bench_bound.py`` counts PEFT's step the same way): matrix products only, 2 FLOPs per
multiply-add; norms, RoPE, SiLU, softmax and the loss's exponentials count as free. For N tokens
(micro-batch B x sequence S) and a linear map ``in -> out``:

* forward ``2·N·in·out``; input gradient ``2·N·in·out`` (skipped where the input needs no
  gradient: the first layer's attention projections read the frozen embeddings); weight gradient
  ``2·N·in·out`` only when the weight trains (``full``): LoRA never forms a frozen weight's gradient.
* LoRA of rank r (layers/linear.py's fused function): forward ``x·Aᵀ``, ``(xA)·Bᵀ`` = ``2·N·r·(in+out)``;
  backward ``G·B``, ``dB``, ``dA`` = ``2·N·r·(2·out+in)``, plus ``2·N·r·in`` for the input gradient.
* attention, per layer: ``Q·Kᵀ`` and ``P·V`` = ``4·B·S²·heads·head_dim`` forward (the full square:
  the counter does not discount the causal mask); backward 2x that for eager attention (four
  matmuls) and 2.5x for the fused kernels (sdpa, flash), which recompute the scores.
* LM head: ``2·N·hidden·vocab`` forward and the same for its input gradient (loraforge's chunked
  loss forms both in the forward); a trained head adds its weight gradient.
* activation checkpointing runs each decoder layer's forward again in the backward.

Other methods (ia3, prefix, prompt, p_tuning, bottleneck) are counted as the frozen model's forward
and input gradients from the first layer on (some need fewer there: ~1/layers too many), their own
small products left out, as are the prompt methods' virtual tokens. DoRA adds one ``B·A`` product
per adapted layer and forward for its weight norm (``2·r·in·out``; the norm's backward is left out).

Tokens: every sequence is taken as ``data.max_length`` long and every token as a target (packing,
or the longest batch); shorter rows and prompt-masked tokens (the head skips them) cost less.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..training.config import TrainConfig

LORA_METHODS = ("lora", "qlora", "dora")
ATTENTION_BACKWARD = {"eager": 2.0}  # anything else (sdpa, flash_attention_2, ...): fused, 2.5

# Dense GEMM peaks (TFLOP/s) a stated utilisation turns into the rate of a --device cuda plan made
# without a GPU. NVIDIA's data sheets (SXM parts, dense, no sparsity): bf16/fp16 tensor cores and
# plain fp32 (PyTorch does not use TF32 for float32 matmuls by default).
GPU_PEAKS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}
DEFAULT_GPU, GPU_UTILISATION = "A100", 0.5


@dataclass
class StepFlops:
    """FLOPs of one optimizer step on one process (``grad_accum`` micro-batches), by term."""

    tokens: int  # tokens per step on this process
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "total": self.total, "terms": dict(self.terms)}


@dataclass
class _Linear:
    name: str
    layer: int  # index of its decoder layer
    fan_in: int
    fan_out: int
    rank: int  # 0: no LoRA
    trains: bool  # the weight itself (full fine-tuning)
    needs_input_grad: bool
    attention_out: bool = False  # the attention block's output projection (reads the attention output)


def _blocks(layer: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """A decoder layer's linear-like modules grouped by their parent (attention, MLP), in order."""
    from ..layers import is_linear_like

    groups: dict[str, list] = {}
    for name, module in layer.named_modules():
        if is_linear_like(module):
            groups.setdefault(name.rpartition(".")[0], []).append((name, module))
    return list(groups.values())


def linears(model: nn.Module, cfg: TrainConfig) -> list[_Linear]:
    """Every linear map of the decoder layers (on the meta device: shapes only), with its LoRA rank
    and whether its input needs a gradient.

    Which inputs need one follows autograd: the residual stream does once any earlier module
    trains. In each block (attention, MLP) the last linear map is the output projection, which
    reads what the block's input maps produced."""
    from ..injection import find_targets
    from ..layers import LoraLinear
    from ..training.fsdp import decoder_layers

    full = cfg.method == "full"
    targets = set(find_targets(model, cfg.lora)) if cfg.method in LORA_METHODS else set()
    rank = {n: cfg.lora.rank_and_alpha(n)[0] for n in targets}
    path = {id(m): n for n, m in model.named_modules()}
    # the embeddings' output needs its gradient when they train, under activation checkpointing
    # (transformers then makes the input embeddings require grad: enable_input_require_grads), and
    # for the other adapters (prompt tokens, prefixes, IA3 vectors from the first layer on)
    stream = full or cfg.train.gradient_checkpointing or cfg.method not in LORA_METHODS
    out: list[_Linear] = []
    for index, layer in enumerate(decoder_layers(model)):
        for nth, block in enumerate(_blocks(layer)):
            *inputs, last = block
            produced = stream
            for _, module in inputs:
                full_name = path[id(module)]
                fin, fout = LoraLinear.features(module)
                out.append(_Linear(full_name, index, fin, fout, rank.get(full_name, 0), full, stream))
                produced = produced or full or full_name in targets
            full_name = path[id(last[1])]
            fin, fout = LoraLinear.features(last[1])
            out.append(_Linear(full_name, index, fin, fout, rank.get(full_name, 0), full, produced, nth == 0))
            stream = stream or produced or full or full_name in targets
    return out


def step_flops(cfg: TrainConfig, model: nn.Module, model_config) -> StepFlops:
    """The counted FLOPs of one optimizer step of ``cfg`` on one process (module docstring).

    ``model``: the base on the meta device (no adapter injected); ``model_config``: its transformers
    config (heads, head_dim, hidden size, vocabulary)."""
    t, b, s = cfg.train, cfg.train.batch_size, cfg.data.max_length
    n = b * s
    terms: dict[str, int] = {}

    def add(key: str, value: int) -> None:
        terms[key] = terms.get(key, 0) + int(value)

    layer_forward = 0
    last_of_layer = {}  # the layer's last product (down_proj's, or its LoRA's ·Bᵀ): no backward needs it
    lins = linears(model, cfg)
    dora = cfg.method == "dora" or (cfg.method == "qlora" and cfg.lora.use_dora)
    for lin in lins:
        mm = 2 * n * lin.fan_in * lin.fan_out
        add("linear forward", mm)
        layer_forward += mm
        if lin.needs_input_grad:
            add("linear input gradients", mm)
        if lin.trains:
            add("linear weight gradients", mm)
        if lin.rank:
            lora_fwd = 2 * n * lin.rank * (lin.fan_in + lin.fan_out)
            add("LoRA forward", lora_fwd)
            layer_forward += lora_fwd
            backward = 2 * lin.fan_out + lin.fan_in * (1 + lin.needs_input_grad)
            add("LoRA backward", 2 * n * lin.rank * backward)
            if dora:  # the weight norm ||W + s·B·A|| per output row needs B·A once per forward
                add("DoRA weight norm", 2 * lin.rank * lin.fan_in * lin.fan_out)
                layer_forward += 2 * lin.rank * lin.fan_in * lin.fan_out
        last_of_layer[lin.layer] = 2 * n * lin.rank * lin.fan_out if lin.rank else mm

    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    per_layer = 4 * b * s * s * heads * head_dim
    attention = per_layer * model_config.num_hidden_layers
    add("attention forward", attention)
    layer_forward += attention
    impl = cfg.model.attn_implementation or "sdpa"
    # backward only where the attention's output needs a gradient (not the first layers of a run
    # whose adapter starts further up)
    with_grad = sum(1 for lin in lins if lin.attention_out and lin.needs_input_grad)
    add("attention backward", per_layer * with_grad * ATTENTION_BACKWARD.get(impl, 2.5))

    head = 2 * n * model_config.hidden_size * model_config.vocab_size
    add("LM head forward", head)
    add("LM head input gradient", head)
    if cfg.method == "full":
        add("LM head weight gradient", head)
    if t.gradient_checkpointing:
        # non-reentrant checkpointing stops recomputing a layer once it has every tensor the
        # backward needs: the layer's last product is not run again
        add("recompute (activation checkpointing)", layer_forward - sum(last_of_layer.values()))
    steps = t.grad_accum
    return StepFlops(tokens=n * steps, terms={k: v * steps for k, v in terms.items()})


# -- time ---------------------------------------------------------------------------------------


@dataclass
class GemmRate:
    """A matmul rate (FLOP/s) and where it came from."""

    flops_per_s: float
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_gemm_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024) -> GemmRate:
    """The best of a few ``n x n @ n x n`` matmuls here, with the current thread count (~0.1 s)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    bm = torch.randn(n, n, device=device, dtype=dtype)
    a @ bm  # warm-up (thread pool, kernel choice)
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ bm
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    rate = 2 * n**3 / best
    where = f"measured here: {n}x{n} {str(dtype).removeprefix('torch.')} matmul on {device}"
    return GemmRate(rate, f"{where}, {torch.get_num_threads()} threads" if device == "cpu" else where)


def default_gemm_rate(device: str, dtype: str) -> GemmRate:
    """What ``--gemm-tflops`` defaults to: the CPU's rate measured now; a GPU's measured when one is
    here, else ``DEFAULT_GPU``'s stated peak at ``GPU_UTILISATION``."""
    if device == "cpu":
        return measure_gemm_rate("cpu", torch.float32)
    if torch.cuda.is_available():
        return measure_gemm_rate(device, getattr(torch, dtype), n=4096)
    peak = GPU_PEAKS[DEFAULT_GPU][dtype]
    return GemmRate(
        peak * 1e12 * GPU_UTILISATION,
        f"stated: {DEFAULT_GPU} {dtype} peak {peak:g} TFLOP/s x {GPU_UTILISATION:.0%} utilisation "
        "(no GPU here; --gemm-tflops sets it)",
    )
