"""planning/flops.py: the analytic FLOPs of a step against torch's FlopCounterMode on loraforge's
real training step (the trainer's model preparation, fast kernels, chunked loss and _forward_backward)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from loraforge.planning import plan
from loraforge.planning.flops import GemmRate, step_flops
from loraforge.planning.shape import meta_model, model_config_of
from loraforge.training.config import TrainConfig
from loraforge.training.data import Example
from loraforge.training.dist import DistInfo
from loraforge.training.loop import _forward_backward, _speed_up
from loraforge.training.loss import CausalLMLoss
from loraforge.training.modeling import prepare_model

# FlopCounterMode has no formula for the in-place addmm_ that loraforge's fused LoRA linear uses
# (y.addmm_(x·Aᵀ, Bᵀ) and dx.addmm_(G·B, A)): counted here as addmm is.
ADDMM_ = {torch.ops.aten.addmm_: lambda inp, a, b, *args, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}


def config(method="lora", **train) -> TrainConfig:
    data = {"train": "x", "max_length": 24}
    return TrainConfig.from_dict({
        "method": method,
        "model": {"path": "builtin:tiny-llama", "attn_implementation": "eager"},
        "lora": {"r": 8, "alpha": 16, "target_modules": train.pop("targets", "all-linear")},
        "data": data,
        "train": {"batch_size": 2, "max_steps": 1, "compile": False, **train},
    })  # fmt: skip


def counted(cfg: TrainConfig) -> int:
    """FLOPs FlopCounterMode counts in one optimizer step of the trainer on ``cfg``."""
    dist = DistInfo()
    torch.manual_seed(0)
    model, tokenizer = prepare_model(cfg, dist.device, log=lambda *a: None)
    model.set_attn_implementation("eager")  # the CPU's fused SDPA kernel is unknown to the counter
    core = CausalLMLoss(model, cfg.train.loss_chunk_size)
    _speed_up(model, core, cfg, dist, passes=1, say=lambda *a: None)
    model.train()
    rng = random.Random(0)
    s, b = cfg.data.max_length, cfg.train.batch_size
    ids = lambda: [rng.randrange(3, 512) for _ in range(s)]
    micro = [[Example(ids(), ids()) for _ in range(b)] for _ in range(cfg.train.grad_accum)]
    n_targets = s * b * cfg.train.grad_accum
    with FlopCounterMode(display=False, custom_mapping=ADDMM_) as counter:
        _forward_backward(core, micro, n_targets, tokenizer.pad_token_id, dist)
    return counter.get_total_flops()


def analytic(cfg: TrainConfig) -> int:
    mc = model_config_of(cfg.model.path)
    model = meta_model(mc)
    return step_flops(cfg, model, model.config).total


@pytest.mark.parametrize(
    "method, train",
    [
        ("lora", {}),
        ("lora", {"grad_accum": 2}),
        ("lora", {"gradient_checkpointing": True}),
        ("lora", {"targets": ["q_proj", "v_proj"]}),  # the first layer's q/k/v need no input gradient
        # nothing below layer 0's down_proj needs a gradient (no attention backward there); the fast
        # MLP forms down_proj's input gradient even then (fast.py), so that case runs without it
        ("lora", {"targets": ["down_proj"], "fast_kernels": False}),
        ("lora", {"targets": ["o_proj"]}),
        ("lora", {"targets": ["q_proj", "v_proj"], "gradient_checkpointing": True}),
        ("qlora", {}),
        ("full", {}),
        ("full", {"gradient_checkpointing": True}),
        ("lora", {"fast_kernels": False}),
        ("dora", {}),
    ],
)
def test_the_count_is_flop_counter_modes_on_the_real_step(one_thread, method, train):
    cfg = config(method, **dict(train))
    want = counted(cfg)
    got = analytic(cfg)
    assert got == pytest.approx(want, rel=0.01), (got, want)


def test_other_adapters_count_the_frozen_models_forward_and_input_gradients():
    """IA3: its vectors are elementwise; the count takes every input gradient from layer 0 on, one
    layer's q/k/v more than autograd forms here: 1 in 2 layers of this model, ~1/layers in general."""
    cfg = config("ia3")
    assert analytic(cfg) == pytest.approx(counted(cfg), rel=0.05)


def test_lora_skips_the_frozen_weights_gradients_and_checkpointing_adds_a_forward():
    lora, full = analytic(config("lora")), analytic(config("full"))
    ckpt = analytic(config("lora", gradient_checkpointing=True))
    terms = step_flops(config("full"), meta_model(model_config_of("builtin:tiny-llama")), _cfg()).terms
    assert terms["linear weight gradients"] == terms["linear forward"]  # full: dW costs a forward
    assert lora < full and ckpt > lora


def _cfg():
    from loraforge.planning.shape import transformers_config

    return transformers_config(model_config_of("builtin:tiny-llama"))


def test_attention_is_counted_as_torch_counts_the_fused_kernels():
    """sdpa/flash: torch's formulas for the fused forward and backward (which recomputes the scores)."""
    cfg = config("lora", batch_size=3)
    cfg.model.attn_implementation = "sdpa"
    mc = _cfg()
    terms = step_flops(cfg, meta_model(model_config_of("builtin:tiny-llama")), mc).terms
    b, s, h, d = 3, cfg.data.max_length, mc.num_attention_heads, mc.hidden_size // mc.num_attention_heads
    q = (b, h, s, d)
    layers = mc.num_hidden_layers
    assert terms["attention forward"] == layers * sdpa_flop_count(q, q, q)
    assert terms["attention backward"] == layers * sdpa_backward_flop_count(q, q, q, q)


def test_a_70b_counts_6N_for_full_and_about_4N_for_lora_per_token():
    """The rule of thumb (formats.md: a LoRA step ~4N FLOPs per token, full 6N) at short sequences."""
    mc = model_config_of("llama-3-70b")
    model = meta_model(mc)
    n_params = sum(p.numel() for p in model.parameters())
    for method, per_param in (("full", 6), ("qlora", 4)):
        cfg = TrainConfig.from_dict({"method": method, "model": {"path": "llama-3-70b"},
                                     "data": {"train": "x", "max_length": 128}, "train": {"batch_size": 1}})
        f = step_flops(cfg, model, model.config)
        assert f.total / f.tokens / n_params == pytest.approx(per_param, rel=0.03), method


def test_time_is_flops_over_the_given_rate():
    p = plan(config("lora"), gemm_flops=1e9)
    assert p.seconds_per_step == pytest.approx(p.flops_per_step / 1e9)
    assert p.gemm.source.startswith("given")
    measured = plan(config("lora")).gemm
    assert isinstance(measured, GemmRate) and measured.flops_per_s > 1e8 and "measured" in measured.source
    if not torch.cuda.is_available():  # a stated A100 at 50%: bf16 tensor cores, or plain fp32
        auto = plan(config("lora"), overrides=["model.dtype=auto"], device="cuda").gemm
        assert auto.flops_per_s == 0.5 * 312e12 and "A100 bfloat16" in auto.source
        fp32 = plan(config("lora"), device="cuda").gemm
        assert fp32.flops_per_s == 0.5 * 19.5e12 and "A100 float32" in fp32.source
