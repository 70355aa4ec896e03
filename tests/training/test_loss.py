"""The chunked LM-head loss equals the plain logits path: values and gradients within 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loraforge as lf
from loraforge.training.builtin import build_model
from loraforge.training.data import IGNORE
from loraforge.training.loss import CausalLMLoss, chunked_head_cross_entropy, linear_cross_entropy


def plain_loss(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float()  # the full (tokens x vocab) tensor
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1, 7, 64, 0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_plain(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = IGNORE
    labels[2, -1] = IGNORE
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    ours, ours_g = grads(lambda: linear_cross_entropy(hidden, weight, labels, bias, chunk), *tensors)
    ref, ref_g = grads(lambda: plain_loss(hidden, weight, bias, labels), *tensors)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_bf16_matches_plain(with_bias):
    """A bf16 head takes the copy-into-the-buffer path: its logits are rounded to bf16 as
    ``lm_head(h).float()`` rounds them, so the loss is the plain path's to fp32 summation order."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=g).bfloat16()
    bias = torch.randn(40, generator=g).bfloat16() if with_bias else None
    labels = torch.randint(0, 40, (2, 9), generator=g)
    ours, (ours_g,) = grads(lambda: linear_cross_entropy(hidden, weight, labels, bias, 4), hidden)
    ref, (ref_g,) = grads(lambda: plain_loss(hidden, weight, bias, labels), hidden)
    assert ours.dtype == torch.float32 and ours_g.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours_g, ref_g, atol=2e-2, rtol=2e-2)


def test_linear_cross_entropy_under_autocast_rounds_as_the_plain_path():
    """Under autocast the head's matmul runs in bf16 as ``lm_head(h).float()`` does there (the
    fp32 out= path would skip autocast and give a different, unrounded loss)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, (ours_g,) = grads(lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=4), hidden)
        ref, (ref_g,) = grads(lambda: plain_loss(hidden, weight, None, labels), hidden)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours_g, ref_g, atol=2e-2, rtol=2e-2)


def test_frozen_head_gets_no_gradient_and_scaling_propagates():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)  # frozen, as under LoRA
    labels = torch.randint(0, 30, (20,), generator=g)
    (linear_cross_entropy(hidden, weight, labels, chunk_size=6) * 0.25).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    (plain_loss(hidden, weight, None, labels) * 0.25).backward()
    torch.testing.assert_close(ours, hidden.grad, atol=1e-6, rtol=1e-5)


def test_all_ignored_is_zero():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_checkpointed_head_path_matches_plain():
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 30)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    labels[1, :3] = IGNORE
    ours, ours_g = grads(lambda: chunked_head_cross_entropy(head, hidden, labels, 4), hidden, head.weight)
    ref, ref_g = grads(lambda: plain_loss(hidden, head.weight, head.bias, labels), hidden, head.weight)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_causal_lm_loss_matches_transformers(method):
    """Mean loss and every trainable gradient equal those of ``model(input_ids, labels=...)``."""
    torch.manual_seed(0)
    model = build_model("builtin:tiny-llama")
    if method == "lora":
        lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    hf_labels = ids.clone()
    hf_labels[0, :5] = IGNORE
    # ours takes shifted labels: position t predicts token t + 1
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    positions = torch.arange(12).expand(2, -1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    core = CausalLMLoss(model, chunk_size=5)
    assert core.fused
    loss_sum, n = core(ids, labels, positions)
    (loss_sum / n).backward()
    ours = [p.grad.clone() for p in trainable]
    model.zero_grad(set_to_none=True)
    ref = model(input_ids=ids, labels=hf_labels, use_cache=False).loss
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)
    for a, p in zip(ours, trainable):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_causal_lm_loss_with_adapted_head_uses_the_generic_path():
    model = build_model("builtin:tiny-llama")
    lf.inject(model, lf.LoraConfig(r=2, alpha=4, target_modules=["lm_head"]))
    core = CausalLMLoss(model)
    assert not core.fused
    ids = torch.randint(3, 512, (1, 8))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], dim=1)
    loss_sum, n = core(ids, labels, torch.arange(8)[None])
    ref = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-5, rtol=1e-5)
