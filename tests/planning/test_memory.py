"""The planner's model-state items equal exact counts from the real built model.

For ``builtin:tiny-llama`` (and a tied-embedding GQA variant) built for real the way training
builds it, with random weights: the base weights, the trainable tensors (lf.inject +
count_parameters), the 4-bit packed weights and every quantization constant the real
``Linear4bit`` layers hold, the gradients after a backward and the optimizer state after a real
``optimizer.step()`` — each equal, byte for byte, to the estimate's item computed on the meta device.
"""

from __future__ import annotations

import pytest
import torch

import loraforge as lf
from loraforge.planning.memory import MemoryEstimate, estimate_memory, resolve_dtype
from loraforge.planning.shape import model_config_of
from loraforge.training.config import ConfigError, TrainConfig


def config(overrides: list[str]) -> TrainConfig:
    base = {"data": {"train": "unused.jsonl", "max_length": 16}, "train": {"batch_size": 2},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return TrainConfig.from_dict(base, overrides)


def built(cfg: TrainConfig, mc: dict) -> torch.nn.Module:
    """The run's model with real (random) weights, as training.modeling.prepare_model makes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.quant.linear4bit import quantize
    from loraforge.training.modeling import adapter_config

    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    data = dict(mc)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data)).to(dtype)
    if cfg.method == "qlora":
        quantize(model, cfg.model.quantization.resolved(dtype))
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lf.inject(model, adapter_config(cfg))
    return model


def nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def quant_tensors(model):
    from loraforge.quant.linear4bit import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            s = m.quant_state
            yield from (s.absmax, s.code, s.offset)
            if s.state2 is not None:
                yield from (s.state2.absmax, s.state2.code)


def tied(mc: dict) -> dict:
    return dict(mc, tie_word_embeddings=True, num_key_value_heads=1)


MODELS = {"tiny": model_config_of("builtin:tiny-llama"), "tied": tied(model_config_of("builtin:tiny-llama"))}
METHODS = [
    ["method=lora"], ["method=qlora"], ["method=full"], ["method=dora"],
    ["method=lora", "model.dtype=bfloat16"], ["method=qlora", "model.quantization.double_quant=false"],
    ["method=qlora", "model.quantization.blocksize=128", "model.dtype=bfloat16"],
    ["method=lora", "lora.target_modules=[q_proj,v_proj]", "lora.r=16"],
]  # fmt: skip


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("overrides", METHODS, ids=[",".join(m) for m in METHODS])
def test_model_state_items_equal_the_real_models_bytes(model_name, overrides, one_thread):
    cfg, mc = config(overrides), MODELS[model_name]
    est = estimate_memory(cfg, model_config=mc)
    model = built(cfg, mc)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    buffers = list(model.buffers())
    if cfg.method != "full":
        n_trainable, _ = lf.count_parameters(model)
        assert est.item("trainable parameters").detail.endswith(f"{n_trainable:,} values")
    assert est.bytes_of("trainable parameters") == nbytes(trainable)
    packed = [p for p in frozen if p.dtype == torch.uint8]
    floats = [t for t in frozen + buffers if t.dtype != torch.uint8]
    assert est.bytes_of("base weights") == nbytes(floats)
    assert est.bytes_of("4-bit packed weights") == nbytes(packed)
    assert (cfg.method == "qlora") == bool(packed)
    assert est.bytes_of("quantization constants") == nbytes(quant_tensors(model))

    # gradients after a real backward, optimizer state after a real step
    from loraforge.optim import build_optimizer
    from loraforge.training.loss import CausalLMLoss

    optimizer = build_optimizer(cfg.train.optimizer, trainable, 1e-3)
    ids = torch.randint(0, mc["vocab_size"], (2, 16))
    total, n = CausalLMLoss(model)(ids, torch.roll(ids, -1, 1), torch.arange(16).expand(2, 16))
    total.backward()
    assert est.bytes_of("gradients") == nbytes(p.grad for p in trainable)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert est.bytes_of("optimizer state") == nbytes(state)


def test_8bit_optimizer_state_equals_bitsandbytes():
    """bitsandbytes' AdamW8bit on the CPU: uint8 moments + fp32 absmax per 256 (fp32 state under
    4096 elements), the estimate against its real state tensors (its shared quantization maps not
    counted: one pair per process)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg, mc = config(["train.optimizer=adamw_8bit", "lora.r=64"]), MODELS["tiny"]
    est = estimate_memory(cfg, model_config=mc)
    model = built(cfg, mc)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.randn_like(p)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes build without CPU 8-bit kernels
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run here: {e}")
    state = [v for s in optimizer.state.values() for k, v in s.items()
             if isinstance(v, torch.Tensor) and not k.startswith("qmap") and v.numel() > 1]  # fmt: skip
    assert est.bytes_of("optimizer state") == nbytes(state)


def test_a_70b_config_plans_in_seconds_without_weights():
    import time

    mc = dict(model_config_of("builtin:tiny-llama"), hidden_size=8192, intermediate_size=28672,
              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
              head_dim=128, tie_word_embeddings=False, max_position_embeddings=8192)  # fmt: skip
    start = time.perf_counter()
    est = estimate_memory(config(["method=qlora", "model.dtype=bfloat16"]), model_config=mc, device="cuda")
    assert time.perf_counter() - start < 60
    packed = est.bytes_of("4-bit packed weights")
    assert 32e9 < packed < 36e9  # 68.5 B linear weights at 4 bits (the head stays bf16)
    # bf16 embeddings + head, 2 RMSNorms per layer + the final one, the rotary inv_freq and
    # original_inv_freq buffers (64 values each)
    assert est.bytes_of("base weights") == 2 * (2 * 128256 * 8192 + 80 * 2 * 8192 + 8192) + 2 * 64 * 2
    assert est.peak_bytes > packed and est.peak_phase


def test_estimate_to_dict_and_peak_items_add_up():
    est = estimate_memory(config(["method=qlora"]), model_config=MODELS["tiny"])
    assert isinstance(est, MemoryEstimate)
    d = est.to_dict()
    assert d["peak_bytes"] == est.peak_bytes == max(est.phases.values())
    assert {i["name"] for i in d["items"]} >= {
        "base weights", "4-bit packed weights", "quantization constants", "trainable parameters", "gradients",
        "optimizer state", "activations", "logits and loss", "dequantization buffer", "runtime overhead",
    }  # fmt: skip
    assert set(est.peak_items) <= {i.name for i in est.items}


def test_checkpointing_and_shorter_sequences_need_less():
    mc = MODELS["tiny"]
    plain = estimate_memory(config(["data.max_length=1024"]), model_config=mc)
    ckpt = estimate_memory(config(["data.max_length=1024", "train.gradient_checkpointing=true"]),
                           model_config=mc)
    short = estimate_memory(config(["data.max_length=256"]), model_config=mc)
    assert ckpt.bytes_of("activations") < plain.bytes_of("activations") / 3
    assert short.bytes_of("activations") < plain.bytes_of("activations") / 3


def test_world_size_shards_under_fsdp_and_replicates_under_ddp():
    mc = MODELS["tiny"]
    one = estimate_memory(config(["method=full"]), model_config=mc)
    fsdp = estimate_memory(config(["method=full", "train.distributed=fsdp"]), model_config=mc, world_size=4)
    ddp = estimate_memory(config(["method=full"]), model_config=mc, world_size=4)
    assert fsdp.bytes_of("optimizer state") == one.bytes_of("optimizer state") // 4
    assert fsdp.bytes_of("trainable parameters") == one.bytes_of("trainable parameters") // 4
    assert fsdp.bytes_of("FSDP gathered units") > 0
    assert ddp.bytes_of("optimizer state") == one.bytes_of("optimizer state")
    assert ddp.bytes_of("DDP gradient buckets") == one.bytes_of("gradients")


def test_bad_world_size_and_dtype_are_named():
    with pytest.raises(ConfigError, match="world_size"):
        estimate_memory(config([]), model_config=MODELS["tiny"], world_size=0)
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("float8", "cpu")


def test_accumulation_keeps_the_gradients_through_the_next_micro_batch():
    mc = MODELS["tiny"]
    one = estimate_memory(config(["method=full"]), model_config=mc)
    acc = estimate_memory(config(["method=full", "train.grad_accum=4"]), model_config=mc)
    assert acc.phases["forward end"] == one.phases["forward end"] + one.bytes_of("gradients")
    assert acc.bytes_of("activations") == one.bytes_of("activations")  # one micro-batch at a time


def test_fsdp_mixed_precision_gathers_in_bf16():
    mc = MODELS["tiny"]
    plain = estimate_memory(config(["method=full", "train.distributed=fsdp"]), model_config=mc, world_size=2)
    overrides = ["method=full", "train.distributed=fsdp", "train.fsdp.mixed_precision=bfloat16"]
    mixed = estimate_memory(config(overrides), model_config=mc, world_size=2)
    assert 0 < mixed.bytes_of("FSDP gathered units") < plain.bytes_of("FSDP gathered units")


def test_fsdp_cpu_offload_moves_the_shards_to_the_host():
    mc = MODELS["tiny"]
    overrides = ["method=qlora", "train.distributed=fsdp"]
    on_gpu = estimate_memory(config(overrides), model_config=mc, device="cuda", world_size=2)
    offload = estimate_memory(config([*overrides, "train.fsdp.cpu_offload=true"]), model_config=mc,
                              device="cuda", world_size=2)
    moved = sum(on_gpu.bytes_of(k) for k in ("base weights", "4-bit packed weights", "trainable parameters",
                                               "optimizer state"))
    assert offload.bytes_of("4-bit packed weights") == 0 and offload.bytes_of("quantization constants") > 0
    assert offload.phases["forward end"] == on_gpu.phases["forward end"] - moved
    assert any("cpu_offload" in n for n in offload.notes)
