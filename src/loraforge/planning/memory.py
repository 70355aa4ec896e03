"""Peak memory of a training step, from the config alone: ``estimate_memory(cfg) -> MemoryEstimate``.

The model is built on the meta device (``shape.meta_model``), quantized (QLoRA: empty 4-bit shells)
and given its adapter there with loraforge's own ``quantize`` and ``inject``, so the parameter
counts, the LoRA targets and the 4-bit storage are the training run's, exactly. On top of those:

* gradients: one per trainable element, in the parameter's dtype;
* optimizer state: AdamW two moments in the parameter's dtype (``torch.optim.AdamW``'s
  ``zeros_like``); bitsandbytes' 8-bit AdamW one byte per moment plus an fp32 scale per 256
  elements (32-bit for tensors under 4096 elements); ``paged_adamw_32bit`` two fp32 moments;
* saved activations (``activations.py``, checked against autograd's saved-tensor hooks);
* the loss: loraforge's chunked linear cross-entropy keeps one ``chunk x vocab`` fp32 logits
  buffer, the selected hidden states and ``∂L/∂h`` (``N·H``), never ``N x vocab`` logits;
* QLoRA: one dequantized weight at a time (the largest 4-bit linear, in the compute dtype);
* runtime overhead: what the process holds before the model (see ``CPU_OVERHEAD``/``CUDA_OVERHEAD``).

The peak is the largest of three moments of a step after the first (the optimizer state exists):
the end of the forward (every saved activation + the loss's buffers), the backward of the last
layer (its working set on top; under full fine-tuning the gradients grow as the activations are
freed) and the optimizer step (gradients + state + AdamW's temporaries). With ``grad_accum`` > 1
the accumulated gradients are there through every later micro-batch's forward and backward.

Per process: ``train.distributed: ddp`` replicates everything (plus DDP's gradient buckets, a copy
of the trainable gradients); ``fsdp`` divides weights, gradients and optimizer state by the world
size and adds the gathered units (two decoder layers, current + prefetched, and the root: the
embeddings, final norm and head, whole for the step; quantization constants stay whole).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..training.config import ConfigError, TrainConfig
from . import activations as A
from .shape import decoder_layers, meta_model, model_config_of

# What a process holds besides the tensors, measured on this project's 2-core VM (Linux, torch 2.x,
# transformers 5.x, 2026-11; benchmarks/bench_plan.py prints what it measures next to these):
# CPU_OVERHEAD: the resident set once torch, transformers, loraforge's training modules and the
# model's transformers module are imported (383 MB in a fresh interpreter). CPU_STEP_RUNTIME: the
# resident set between two training steps minus every tensor (weights, adapter, optimizer state):
# library code paged in by the first forward/backward (~20 MiB), the allocator's and the loaded
# model's Python objects (55-63 MiB over the SmolLM2 rows of the benchmark, 38-63 MiB over the
# 6-layer model's; 58 MiB taken). CUDA: the CUDA context and cuBLAS/cuDNN handles, which
# torch.cuda.max_memory_allocated does not count (stated, ~500 MiB on recent drivers; nvidia-smi
# shows it as the process's memory beyond PyTorch's pool).
CPU_OVERHEAD = 375 * 2**20
CPU_STEP_RUNTIME = 58 * 2**20
CUDA_OVERHEAD = 500 * 2**20
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state: one fp32 absmax per 256 values


@dataclass
class Item:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class MemoryEstimate:
    """``items``: every kind of memory a step holds (not all at once); ``peak_bytes``: the largest
    sum that does coexist, at ``peak_phase``, made of ``peak_items``; ``overhead_bytes`` is part of
    it (``training_bytes`` = the rest, what the benchmarks measure). ``host_bytes``: what
    ``train.fsdp.cpu_offload`` keeps in host memory instead, per process (not in the peak)."""

    items: list[Item]
    peak_bytes: int
    notes: list[str] = field(default_factory=list)
    peak_phase: str = ""
    peak_items: list[str] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    def item(self, name: str) -> Item:
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)

    def bytes_of(self, name: str) -> int:
        return next((it.bytes for it in self.items if it.name == name), 0)

    @property
    def overhead_bytes(self) -> int:
        return self.bytes_of("runtime overhead")

    @property
    def training_bytes(self) -> int:
        return self.peak_bytes - self.overhead_bytes

    def to_dict(self) -> dict:
        return {
            "items": [asdict(i) for i in self.items],
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "peak_items": list(self.peak_items),
            "phases": dict(self.phases),
            "training_bytes": self.training_bytes,
            "host_bytes": self.host_bytes,
            "notes": list(self.notes),
        }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``model.dtype`` as the run resolves it (``auto``: bf16 on a GPU, else fp32)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in _BYTES:
        raise ConfigError(f"model.dtype: unknown dtype {name!r}; expected auto, float32, bfloat16 or float16")
    return getattr(torch, name)


_PLANNED: dict | None = None  # inside planned_model_cache(): key -> the planned meta model


@contextlib.contextmanager
def planned_model_cache():
    """Within it, ``build_planned_model`` builds each distinct model once and hands the same one out
    again (nothing mutates it: the estimate only reads it). ``lf.plan`` wraps one plan in it, so the
    advice's re-estimates, which mostly change ``train``/``data`` only, do not rebuild a 70B model on
    meta (0.3-3.5 s each) for every changed config. Nested uses share the outer cache."""
    global _PLANNED
    outer = _PLANNED
    if outer is None:
        _PLANNED = {}
    try:
        yield
    finally:
        _PLANNED = outer


def cached(key, make):
    """``make()``, computed once per ``key`` inside ``planned_model_cache()`` (else every time): for
    what is derived from a cached model alone (its storage, its parameter counts)."""
    if _PLANNED is None:
        return make()
    if key not in _PLANNED:
        _PLANNED[key] = make()
    return _PLANNED[key]


def planned_key(cfg: TrainConfig, model_config: dict, dtype: torch.dtype) -> str:
    """What the planned model depends on: the shape, the dtype, the method, the model section (with
    its quantization), the method's adapter section and ``output`` (where a prompt's tokenizer is
    written); not ``train`` or ``data``, which the advice changes."""
    from ..training.config import ADAPTER_SECTIONS

    d = cfg.to_dict()
    names = ("method", "model", "output", ADAPTER_SECTIONS.get(cfg.method))  # (full: no adapter section)
    sections = {k: d.get(k) for k in names if k}
    return json.dumps([model_config, str(dtype), sections], sort_keys=True, default=str)


def build_planned_model(cfg: TrainConfig, model_config: dict, dtype: torch.dtype) -> nn.Module:
    """The run's model on the meta device: quantized shells (qlora), the adapter injected (or every
    weight trainable: full), as ``training.modeling.prepare_model`` makes it (inside
    ``planned_model_cache()``: once per distinct model)."""
    key = planned_key(cfg, model_config, dtype) if _PLANNED is not None else None
    return cached(key, lambda: _build_planned_model(cfg, model_config, dtype))


def _build_planned_model(cfg: TrainConfig, model_config: dict, dtype: torch.dtype) -> nn.Module:
    from ..injection import inject
    from ..quant.linear4bit import quantize
    from ..training.modeling import adapter_config

    model = meta_model(model_config, dtype)
    if cfg.method == "qlora":
        quantize(model, cfg.model.quantization.resolved(dtype))
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, adapter_config(cfg))
    return model


# -- model state ---------------------------------------------------------------------------------
def quant_constant_bytes(out_features: int, in_features: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight's own quantization constants as ``quant.state.QuantState`` holds
    them: ``m = ceil(n / blocksize)`` absmax values, fp32, or with double quantization uint8 plus an
    fp32 offset and ``ceil(m / 256)`` fp32 nested absmax. (The 16-entry code and the 256-entry
    nested code are one tensor each for the whole model: ``QUANT_CODES``.)"""
    m = math.ceil(out_features * in_features / blocksize)
    return m + 4 + 4 * math.ceil(m / 256) if double_quant else 4 * m


def quant_code_bytes(double_quant: bool) -> int:
    """The codes every 4-bit layer shares: the fp32[16] 4-bit code, and the fp32[256] dynamic map
    of the absmax with double quantization."""
    return 16 * 4 + (256 * 4 if double_quant else 0)


def model_state(model: nn.Module) -> dict:
    """Bytes of the base weights by storage and of the trainable tensors, counted on the meta model."""
    from ..quant.linear4bit import Linear4bit

    seen, out = set(), {"float": 0, "packed": 0, "constants": 0, "trainable": 0, "n_trainable": 0}
    out.update(n_float=0, n_4bit=0, dtypes=set(), trainable_list=[], quantized=[])
    for m in model.modules():
        if isinstance(m, Linear4bit):
            size = (m.out_features, m.in_features)
            out["constants"] += quant_constant_bytes(*size, m.blocksize, m.double_quant)
            out["n_4bit"] += m.out_features * m.in_features
            out["quantized"].append(m)
    if out["quantized"]:
        out["constants"] += quant_code_bytes(out["quantized"][0].double_quant)
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if p.requires_grad:
            out["trainable"] += nbytes
            out["n_trainable"] += p.numel()
            out["trainable_list"].append(p)
        elif p.dtype == torch.uint8:
            out["packed"] += nbytes
        else:
            out["float"] += nbytes
            out["n_float"] += p.numel()
            out["dtypes"].add(str(p.dtype).removeprefix("torch."))
    return out


def optimizer_bytes(name: str, trainable: list[torch.Tensor]) -> tuple[int, str]:
    """The optimizer's state for these tensors, and how it is made up."""
    n = sum(p.numel() for p in trainable)
    if name == "adamw":  # (+ a 4-byte step count per tensor)
        total = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
        return total, "AdamW: 2 moments in the parameters' dtype"
    if name == "paged_adamw_32bit":
        return 8 * n, "2 fp32 moments (paged: in CUDA unified memory, not in max_memory_allocated)"
    total = 0
    for p in trainable:
        k = p.numel()
        total += 8 * k if k < BNB_MIN_8BIT else 2 * k + 2 * 4 * math.ceil(k / BNB_BLOCK)
    return total, "8-bit AdamW: 2 uint8 moments + an fp32 scale per 256 (32-bit under 4096 elements)"


# -- the layer shape -------------------------------------------------------------------------------
def layer_shape(model: nn.Module, config) -> A.LayerShape:
    """Widths of the first decoder layer and which of its linears are adapted (all layers alike)."""
    from ..layers import LoraLinear

    layer = decoder_layers(model)[0]
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(config, "intermediate_size", None) or 4 * h
    lora, full = {}, False
    for name, m in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(m, LoraLinear):
            for adapter in m.live_adapters():
                a = m.lora_A[adapter].weight
                lora[short] = (a.shape[0], m.in_features, m.out_features)
    full = any(p.requires_grad for n, p in layer.named_parameters() if "lora_" not in n)
    dora = any(getattr(m, "lora_magnitude_vector", None) for m in layer.modules())
    return A.LayerShape(h, heads * head_dim, kv, heads, head_dim, inter, lora, full, bool(dora))


# -- the estimate ------------------------------------------------------------------------------------
def estimate_memory(
    cfg: TrainConfig, *, model_config: dict | None = None, device: str = "cpu", world_size: int = 1
) -> MemoryEstimate:
    """Per-process peak memory of training ``cfg`` on ``device`` with ``world_size`` processes."""
    t, d = cfg.train, cfg.data
    if world_size < 1:
        raise ConfigError(f"world_size: must be >= 1, got {world_size}")
    cuda = str(device).startswith("cuda")
    config_dict = model_config if model_config is not None else model_config_of(cfg.model.path)
    dtype = resolve_dtype(cfg.model.dtype, device)
    e = torch.empty((), dtype=dtype).element_size()
    model = build_planned_model(cfg, config_dict, dtype)
    config = model.config
    state = cached(("model_state", id(model)), lambda: model_state(model))  # (read, never changed)
    shape = layer_shape(model, config)
    n_layers = len(decoder_layers(model))
    fsdp = cfg.train.distributed == "fsdp"
    shard = world_size if fsdp else 1
    notes: list[str] = []
    items: list[Item] = []

    # weights
    base = state["float"]
    dt = "/".join(sorted(state["dtypes"])) or "none"
    items.append(Item("base weights", base // shard, f"{state['n_float'] / 1e6:,.1f} M values, {dt}"))
    if state["packed"]:
        q = cfg.model.quantization
        items.append(Item("4-bit packed weights", state["packed"] // shard,
                          f"{state['n_4bit'] / 1e6:,.1f} M weights, {q.quant_type}, 2 per byte"))
        dq = "double-quantized (uint8 + nested fp32)" if q.double_quant else "fp32"
        items.append(Item("quantization constants", state["constants"],
                          f"absmax per {q.blocksize}, {dq}; codes (kept whole on every process)"))
    trainable = state["trainable"]
    what = "every weight" if cfg.method == "full" else f"{cfg.method} adapter"
    items.append(Item("trainable parameters", trainable // shard, f"{what}: {state['n_trainable']:,} values"))
    grads = trainable // shard
    items.append(Item("gradients", grads, "one per trainable value, in its dtype"))
    opt, opt_detail = optimizer_bytes(t.optimizer, state["trainable_list"])
    opt //= shard
    if t.optimizer == "paged_adamw_32bit" and cuda:
        notes.append("paged_adamw_32bit state lives in CUDA unified memory: pageable to host RAM")
    items.append(Item("optimizer state", opt, opt_detail))

    # activations
    batch, seq = t.batch_size, d.max_length
    attn = cfg.model.attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        notes.append(f"attention {attn!r}: counted as sdpa")
    half = e < 4
    branch = e if (not half or t.lora_compute == "input") else 4
    # (the fast MLP leaves a DoRA layer, and LoRA with dropout, to their own paths)
    dropout = cfg.method in ("lora", "qlora", "dora") and cfg.lora.dropout > 0
    run = A.Run(batch, seq, e, branch, factor_cast=half and t.lora_compute == "input" and bool(shape.lora),
                input_cast=half and t.lora_compute == "adapter", attn="eager" if attn == "eager" else "sdpa",
                fast=t.fast_kernels and not shape.dora and not dropout, packed=d.packing, dropout=dropout)
    parts = A.saved_per_layer(shape, run)
    per_layer = sum(parts.values())
    first = sum(A.saved_per_layer(shape, run, grad_in=cfg.method == "full").values())
    shared = A.shared_saved(shape, run)
    n = run.tokens
    tail = n * shape.hidden * e + n * 4 + n * 8  # final norm's input and rstd, the loss's kept indices
    if cfg.method == "full":
        tail += n * 8  # the embedding keeps the token ids for its gradient
        tail += 0 if run.fast else n * shape.hidden * e  # the final norm's normalised x (trained weight)
    if t.gradient_checkpointing:
        kept = A.checkpointed_per_layer(shape, run)
        acts = n_layers * kept + tail
        act_detail = f"{n_layers} layers x {_gib(kept)} (checkpointed: layer inputs only)"
    else:
        acts = first + (n_layers - 1) * per_layer + shared + tail
        split = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
        act_detail = f"{n_layers} layers x {_gib(per_layer)} ({split}); {batch} x {seq} tokens, {attn}"
    if shape.dora:
        notes.append("dora: saved activations modelled as an upper bound (measured up to 19% lower)")
    if cuda:
        notes.append("CUDA: the caching allocator's rounding and fragmentation can add a few per cent "
                     "(reserved > max_memory_allocated)")
    elif not config.tie_word_embeddings and e == 4:
        notes.append("CPU: an untied input embedding memory-mapped from an fp32 safetensors file is "
                     "resident only for the rows the tokens use; the estimate counts it whole")
    items.append(Item("activations", acts, act_detail))

    # loss: chunked linear cross-entropy
    vocab = config.vocab_size
    chunk = min(t.loss_chunk_size or max(64, 8 * 2**20 // vocab), n)
    head_trains = cfg.method == "full"
    loss_kept = n * shape.hidden * e + (vocab * shape.hidden * 4 if head_trains else 0)
    loss_peak = loss_kept + chunk * vocab * 4 + n * shape.hidden * e + (chunk * vocab * e if e < 4 else 0)
    items.append(Item("logits and loss", loss_peak,
                      f"{chunk} x {vocab:,} fp32 logits chunk (never {n} x {vocab:,}), dL/dh kept"
                      + (", the head's fp32 gradient" if head_trains else "")))

    # dequantization (QLoRA) and the backward's working set
    dequant = 0
    if state["quantized"]:
        big = max(state["quantized"], key=lambda m: m.out_features * m.in_features)
        cdt = torch.empty((), dtype=big.compute_dtype).element_size()
        dequant = big.out_features * big.in_features * cdt
        what = f"one {big.out_features} x {big.in_features} weight at a time"
        items.append(Item("dequantization buffer", dequant, what))
    work = A.backward_working(shape, run)
    if t.gradient_checkpointing:
        work += per_layer  # the recomputed layer's activations
    items.append(Item("backward working set", work, "one layer's temporaries"
                      + (" + its recomputed activations" if t.gradient_checkpointing else "")))

    # distributed
    extra = 0
    if world_size > 1 and not fsdp:
        extra = state["trainable"]
        what = "a copy of the trainable gradients for the all-reduce"
        items.append(Item("DDP gradient buckets", extra, what))
    if fsdp:
        # gathered in train.fsdp.mixed_precision's dtype (floating tensors only; 4-bit bytes as they are)
        mp = {"bfloat16": 2, "float16": 2}.get(t.fsdp.mixed_precision)

        def gathered_bytes(params) -> int:
            return sum(p.numel() * (mp if mp and p.is_floating_point() else p.element_size()) for p in params)

        def root_of():
            in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
            return [p for p in model.parameters() if id(p) not in in_layers]

        unit = gathered_bytes(decoder_layers(model)[0].parameters())
        root_params = cached(("fsdp root", id(model)), root_of)
        root = sum(p.numel() * p.element_size() for p in root_params)
        extra = 2 * unit + gathered_bytes(root_params) - root // shard
        items.append(Item("FSDP gathered units", extra,
                          f"{world_size} processes: 2 decoder layers gathered (current + prefetched) "
                          "and the root (embeddings, norm, head) whole during the step"))

    host = 0
    if fsdp and t.fsdp.cpu_offload and cuda:
        # CPUOffloadPolicy: the shards (weights, gradients, optimizer state) live in host memory and
        # are copied to the GPU one unit at a time: the gathered units above stay on the device
        for it in items:
            if it.name in OFFLOADED:
                host += it.bytes
                it.detail += f"; {_gib(it.bytes)} on the host (train.fsdp.cpu_offload)"
                it.bytes = 0
        notes.append(f"train.fsdp.cpu_offload: {_gib(host)} of shards per process in host memory")
    if not cuda:
        items.append(Item("step runtime", CPU_STEP_RUNTIME,
                          "library code paged in by a step, allocator and model objects (measured)"))
    overhead = CUDA_OVERHEAD if cuda else CPU_OVERHEAD
    items.append(Item("runtime overhead", overhead,
                      "CUDA context + cuBLAS handles (stated)" if cuda else
                      "process RSS after importing torch, transformers, loraforge (measured)"))

    out_head = model.get_output_embeddings().weight
    tied = out_head is model.get_input_embeddings().weight
    head = (out_head.numel() * out_head.element_size(), tied)
    estimate = _peak(cfg, items, notes, cuda, state["trainable_list"], loss_kept, head)
    estimate.host_bytes = host
    return estimate


OFFLOADED = ("base weights", "4-bit packed weights", "trainable parameters", "gradients", "optimizer state")
RESIDENT = ("base weights", "4-bit packed weights", "quantization constants", "trainable parameters",
            "optimizer state", "step runtime", "runtime overhead", "DDP gradient buckets",
            "FSDP gathered units")
# what coexists, beyond the resident items, at each moment of a step
MOMENTS = {
    "forward end": ("activations", "logits and loss", "dequantization buffer"),
    "backward": ("activations", "backward working set", "dequantization buffer"),
    "optimizer step": ("gradients",),
}


def _peak(cfg: TrainConfig, items: list[Item], notes: list[str], cuda: bool, trainable, loss_kept: int,
          head: tuple[int, bool]) -> MemoryEstimate:
    """The moments of a step (module docstring) and the largest of them. ``loss_kept``: what the
    loss keeps for backward (∂L/∂h, and the head's fp32 gradient when it trains); ``head``: the
    head weight's bytes and whether it is tied to the input embedding."""
    t = cfg.train
    size = {it.name: it.bytes for it in items}
    resident = sum(size.get(k, 0) for k in RESIDENT)
    phases = {k: resident + sum(size.get(n, 0) for n in names) for k, names in MOMENTS.items()}
    grads, work = size["gradients"], size["backward working set"]
    head_bytes, tied = head
    if t.grad_accum > 1:  # from the second micro-batch on, the accumulated gradients exist throughout
        phases["forward end"] += grads
    if cfg.method == "full":
        # Backward's start: the activations, the loss's saved tensors and the head's gradient just
        # formed; its end: every gradient, and (tied embeddings) the embedding's dense gradient
        # being added onto the head's (the incoming V x H and their sum). The gradients grow as
        # the activations are freed, so the largest sum is at one of the two ends.
        start = phases["backward"] + loss_kept + head_bytes + (grads if t.grad_accum > 1 else 0)
        end = resident + grads + (2 * head_bytes if tied else 0) + (work if t.gradient_checkpointing else 0)
        phases["backward"] = max(start, end)
    else:
        phases["backward"] += loss_kept + grads  # adapter gradients: small
    # AdamW's temporaries: foreach (CUDA) makes one of every state tensor at once; CPU one tensor at a time
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    phases["optimizer step"] += sum(p.numel() * p.element_size() for p in trainable) if cuda else largest
    phase = max(phases, key=phases.get)
    extra = {"backward": ("gradients",)}.get(phase, ())
    peak_items = [it.name for it in items if it.name in RESIDENT + MOMENTS[phase] + extra]
    if t.grad_accum > 1:
        notes.append(f"grad_accum {t.grad_accum}: one micro-batch of {t.batch_size} at a time; "
                     "gradients accumulate in place")
    phases = {k: int(v) for k, v in phases.items()}
    return MemoryEstimate(items, phases[phase], notes, phase, peak_items, phases)
