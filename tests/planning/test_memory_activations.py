"""The planner's saved-activation formulas against what autograd really keeps.

Each case builds a small Llama-shaped model with random weights the way the training run does
(4-bit base for qlora, the adapter injected, activation checkpointing, the LoRA compute mode, the
fast kernels, loraforge's chunked loss), runs one forward under
``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of every storage kept for
backward once, parameters excluded. That must equal the estimate's ``activations`` item plus what
the loss keeps (``∂L/∂h``: N x H, and the head's fp32 gradient when the head trains), exactly.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from loraforge.planning.memory import estimate_memory, resolve_dtype
from loraforge.training.config import TrainConfig

SHAPES = {
    # GQA, as builtin:tiny-llama
    "gqa": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
    # MHA, three layers, an explicit head_dim wider than hidden / heads
    "mha": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, head_dim=16),
}  # fmt: skip


def model_config(shape: str, tied: bool = False) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, tie_word_embeddings=tied, **SHAPES[shape]).to_dict()


def config(overrides: list[str]) -> TrainConfig:
    base = {"data": {"train": "unused.jsonl"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return TrainConfig.from_dict(base, overrides)


def real_model(cfg: TrainConfig, mc: dict) -> torch.nn.Module:
    """The run's model with random weights, as training.modeling.prepare_model makes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.adapters import set_compute
    from loraforge.injection import inject
    from loraforge.quant.linear4bit import quantize
    from loraforge.training.fast import patch_model
    from loraforge.training.modeling import adapter_config, enable_activation_checkpointing

    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    data = dict(mc)
    hf = AutoConfig.for_model(data.pop("model_type"), **data)
    if cfg.model.attn_implementation:
        hf._attn_implementation = cfg.model.attn_implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf).to(dtype)
    model.config.use_cache = False
    if cfg.method == "qlora":
        quantize(model, cfg.model.quantization.resolved(dtype))
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject(model, adapter_config(cfg))
        set_compute(model, cfg.train.lora_compute)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.train.fast_kernels:
        patch_model(model)
    return model.train()


def saved_bytes(model: torch.nn.Module, batch: int, seq: int, packed: bool = False) -> int:
    """Bytes autograd keeps for backward at the end of one forward of the loss: every tensor a node
    saved and still holds (a node of a discarded branch frees its tensors), each storage once,
    parameters and buffers not counted."""
    from loraforge.training.loss import CausalLMLoss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    refs: list[weakref.ref] = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, 1)  # every position a target
    positions = torch.arange(seq).expand(batch, seq)
    if packed:  # two examples per sequence: the position ids restart
        positions = torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).expand(batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = CausalLMLoss(model)(ids, labels, positions)
    kept = {}
    for ref in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(kept.values())


CASES = [
    ("gqa", 2, 24, []),
    ("mha", 1, 40, []),
    ("gqa", 3, 16, ["model.attn_implementation=eager"]),
    ("mha", 2, 20, ["model.attn_implementation=eager"]),
    ("gqa", 2, 24, ["method=qlora"]),
    ("mha", 2, 24, ["method=qlora", "model.dtype=bfloat16"]),
    ("gqa", 2, 24, ["method=full"]),
    ("mha", 1, 32, ["method=full", "model.dtype=bfloat16"]),
    ("gqa", 2, 24, ["model.dtype=bfloat16"]),
    ("mha", 2, 24, ["model.dtype=bfloat16", "train.lora_compute=adapter"]),
    ("gqa", 2, 24, ["lora.target_modules=[q_proj,v_proj]"]),
    ("mha", 2, 24, ["lora.r=4", "lora.target_modules=[down_proj,o_proj]"]),
    ("gqa", 2, 24, ["train.fast_kernels=false"]),
    ("mha", 2, 24, ["method=full", "train.fast_kernels=false"]),
    ("gqa", 2, 24, ["train.gradient_checkpointing=true"]),
    ("mha", 2, 24, ["method=full", "train.gradient_checkpointing=true"]),
    ("gqa", 2, 24, ["method=qlora", "train.gradient_checkpointing=true"]),
    ("mha", 2, 24, ["method=dora"]),
    ("gqa", 2, 24, ["lora.dropout=0.1"]),
    ("mha", 2, 24, ["lora.dropout=0.1", "method=qlora", "lora.target_modules=[q_proj,v_proj,down_proj]"]),
    ("gqa", 2, 24, ["data.packing=true"]),
    ("mha", 3, 18, ["data.packing=true", "method=qlora"]),
    ("gqa", 2, 24, ["data.packing=true", "model.attn_implementation=eager"]),
]
# DoRA's rescale is modelled per module as an upper bound (some of what its forward saves belongs to
# branches freed before the forward ends): predicted within [1, 1.25] x measured
APPROXIMATE = {"method=dora"}


@pytest.mark.parametrize("shape,batch,seq,overrides", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-{','.join(c[3])}" for c in CASES])  # noqa: E501
def test_activation_formula_equals_saved_tensor_hooks(shape, batch, seq, overrides, one_thread):
    cfg = config([f"data.max_length={seq}", f"train.batch_size={batch}", *overrides])
    mc = model_config(shape)
    est = estimate_memory(cfg, model_config=mc)
    e = torch.empty((), dtype=resolve_dtype(cfg.model.dtype, "cpu")).element_size()
    head = mc["vocab_size"] * mc["hidden_size"] * 4 if cfg.method == "full" else 0
    predicted = est.bytes_of("activations") + batch * seq * mc["hidden_size"] * e + head
    measured = saved_bytes(real_model(cfg, mc), batch, seq, cfg.data.packing)
    if APPROXIMATE & set(overrides):
        assert measured <= predicted <= 1.25 * measured
    else:
        assert measured == predicted
