"""QLoRA: LoRA on top of the 4-bit base trains; only the adapter gets gradients (issue 3, item 3)."""

from __future__ import annotations

import torch

import loraforge as lf
from loraforge.quant import Linear4bit, QuantConfig

from .util import tiny_llama


def test_lora_on_4bit_base_trains_and_only_adapters_get_gradients():
    model = lf.quantize(tiny_llama(seed=0), QuantConfig(compute_dtype=torch.float32))
    n4 = sum(isinstance(m, Linear4bit) for m in model.modules())
    assert n4 == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head skipped
    lf.inject(model, lf.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    wrapped = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base_layer, Linear4bit)  # LoRA wraps Linear4bit unchanged
    packed_before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}

    # tiny task: learn a fixed sequence. (With the random, frozen lm_head and norms of a 64-wide
    # model the reachable loss is about 3.6 nats, from ln(128) = 4.85: the logits' range is capped.)
    ids = ((torch.arange(16) * 7 + 3) % 128).repeat(4, 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\nQLoRA loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:5])

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_A" in n or "lora_B" in n for n in with_grad)
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            assert torch.equal(m.weight, packed_before[n]) and m.weight.grad is None
