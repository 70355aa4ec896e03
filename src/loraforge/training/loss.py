"""Causal-LM loss without the (tokens × vocab) logits tensor.

For hidden states ``h`` (N × H), LM head ``W`` (V × H) and targets ``y``, the summed loss is

    L = Σ_t [ logsumexp(W·h_t) − (W·h_t)[y_t] ]

and its gradient wrt the logits of token t is ``softmax(W·h_t) − onehot(y_t)``. So, chunk by
chunk of tokens, we form the logits (chunk × V), reduce them to the loss, turn them into that
gradient and immediately contract it back to ``dL/dh = g·W`` (chunk × H); only one chunk of
logits ever exists. The gradient is computed during the forward pass (the loss is a scalar, so
the backward pass only scales it), which also avoids recomputing the logits. ``dL/dW`` is only
formed when the head trains (full fine-tuning); under LoRA the head is frozen.

Positions whose label is ``IGNORE`` (prompt, padding, example ends) are dropped before the head,
so masked tokens cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one fp32 logits chunk is ~32 MB at most (256 tokens at a 32k vocab:
    large enough for an efficient matmul, small enough not to dominate a step's peak memory)."""
    return max(64, (8 * 1024 * 1024) // max(vocab_size, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        # hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) all valid -> summed loss (fp32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # One logits buffer for every chunk: a fresh (chunk, V) fp32 tensor per chunk (32 MB at a
        # 32k vocab) is, on CPU, often mapped from the OS and page-faulted in anew every time.
        buffer = hidden.new_empty((min(chunk_size, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
        # fp32 straight into the buffer; otherwise (bf16 / fp16, or under autocast, which does not
        # apply to out= calls) F.linear's own rounding, copied in
        autocast = torch.is_autocast_enabled(hidden.device.type)
        direct = weight.dtype == hidden.dtype == torch.float32 and not autocast
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = buffer[: h.shape[0]]  # (n, V): same rounding as lm_head(h).float()
            if direct:
                if bias is None:
                    torch.mm(h, weight.t(), out=logits)
                else:
                    torch.addmm(bias, h, weight.t(), out=logits)
            else:
                logits.copy_(F.linear(h, weight, bias))
            rows = torch.arange(y.shape[0], device=y.device)
            # log-sum-exp in place of the logits (torch.logsumexp would allocate two more (n, V)
            # copies): z = logits - max; loss_t = log Σ exp(z_t) - z_t[y_t]; softmax = exp(z) / Σ.
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target = logits[rows, y]
            sums = logits.exp_().sum(dim=-1)
            total += (sums.log() - target).sum()
            if need_h or need_w or need_b:
                g = logits.div_(sums[:, None])  # softmax, in place of the logits
                g[rows, y] -= 1.0
                if need_h and grad_h.dtype == weight.dtype and not autocast:
                    torch.mm(g.to(weight.dtype), weight, out=grad_h[start : start + chunk_size])
                elif need_h:
                    grad_h[start : start + chunk_size] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += g.t() @ h.float()
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Sum over tokens of ``cross_entropy(hidden @ weight.T + bias, labels)``, ignoring ``IGNORE``.

    hidden (..., H), labels (...) -> fp32 scalar. Equal to the plain path (within rounding) in
    value and in gradients wrt ``hidden`` (and ``weight``/``bias`` when they require grad).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = (labels != IGNORE).nonzero().squeeze(1)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    return _LinearCrossEntropy.apply(
        hidden.index_select(0, keep), weight, bias, labels.index_select(0, keep), chunk_size
    )


def chunked_head_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, postprocess=None
) -> torch.Tensor:
    """The same sum for any head module (LoRA-wrapped, 4-bit, soft-capped logits): each chunk
    runs under activation checkpointing, so its logits are freed after the forward and recomputed
    in the backward; again only one chunk of logits exists at a time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = (labels != IGNORE).nonzero().squeeze(1)
    hidden, labels = hidden.index_select(0, keep), labels.index_select(0, keep)

    def chunk_loss(h, y):
        logits = head(h).float()
        if postprocess is not None:
            logits = postprocess(logits)
        return F.cross_entropy(logits, y, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        total = total + (
            checkpoint(chunk_loss, h, y, use_reentrant=False) if h.requires_grad else chunk_loss(h, y)
        )
    return total


def _logit_postprocess(config):
    """Models whose logits are not just ``lm_head(h)`` (Gemma-2 soft-capping, Cohere scaling)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if not cap and scale in (None, 1, 1.0):
        return None

    def post(logits):
        if scale not in (None, 1, 1.0):
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


class CausalLMLoss(nn.Module):
    """``forward(input_ids, labels, position_ids) -> (summed token loss, number of target tokens)``.

    Runs the model body (``model.base_model``: the stack of transformer blocks) to hidden states
    and applies the chunked head loss above. Labels are already shifted (``labels[t]`` is the
    target at position t). This is the module that DistributedDataParallel wraps.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 0):
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        if model.base_model is model or head is None:
            raise ValueError(
                f"{type(model).__name__} is not a transformers causal LM with a body "
                "(model.base_model) and an output head (model.get_output_embeddings())"
            )
        self.chunk_size = chunk_size or default_chunk_size(model.config.vocab_size)
        self.postprocess = _logit_postprocess(model.config)
        # The fused path needs a plain Linear head; anything else takes the checkpointed path.
        self.fused = type(head) is nn.Linear and self.postprocess is None

    def forward(self, input_ids, labels, position_ids):
        body = self.model.base_model
        out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out[0]
        if hidden.shape[1] != input_ids.shape[1]:  # prompt tuning: virtual tokens come first, no loss on them
            hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]
        head = self.model.get_output_embeddings()
        if self.fused:
            loss = linear_cross_entropy(hidden, head.weight, labels, head.bias, self.chunk_size)
        else:
            loss = chunked_head_cross_entropy(head, hidden, labels, self.chunk_size, self.postprocess)
        return loss, (labels != IGNORE).sum()
