"""The serving engine's attention: each sequence attends to its own KV cache.

A step's forward carries the new tokens of every running sequence in one row of T tokens (see
``layers/tokens.py``). transformers computes q, k, v of those tokens (projections, RoPE) and
hands them to the attention function registered here, which

1. writes each sequence's new k, v into that sequence's own cache (``KVCache``: one tensor
   (2, kv_heads, capacity, head_dim) per layer, sized at admission to prompt + max_tokens, so
   it never grows or moves), and
2. runs scaled dot-product attention for each sequence on its own past:
   q (1, heads, n, d) against k, v (1, kv_heads, past + n, d), causal within the n new tokens.

Each sequence's attention has the shapes it would have if it ran alone, so its output does not
depend on the other sequences in the step (padding all sequences to one length would change
the kernels' reduction order). The model runs without transformers' own cache
(``use_cache=False``) and without a mask (transformers builds none for a custom attention).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "loraforge_serve"
_local = threading.local()


class KVCache:
    """One sequence's keys and values, per layer: (2, kv_heads, capacity, head_dim), allocated
    on the layer's first write with that layer's shapes, dtype and device. It starts with room
    for the prompt and ``GROW`` tokens and doubles when full (up to ``limit``, the request's
    prompt + max_tokens): memory follows what a request generates, not what it may ask for;
    the copies cost O(length) per sequence over its life."""

    GROW = 128

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.layers: dict[int, torch.Tensor] = {}

    def buffer(self, layer: int, key: torch.Tensor, length: int) -> torch.Tensor:
        """The layer's buffer, with room for ``length`` tokens."""
        buf = self.layers.get(layer)
        if buf is None or buf.shape[2] < length:
            size = length + self.GROW if buf is None else max(length, 2 * buf.shape[2])
            grown = key.new_empty((2, key.shape[1], min(size, max(self.limit, length)), key.shape[-1]))
            if buf is not None:
                grown[:, :, : buf.shape[2]] = buf
            self.layers[layer] = buf = grown
        return buf

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.layers.values())


@dataclass
class Segment:
    """A sequence's tokens in the step: tokens [start, start + n) of the row, at positions
    [past, past + n) of the sequence."""

    cache: KVCache
    start: int
    n: int
    past: int


class Step:
    """What the attention function needs to know about the step being run."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments


def current_step() -> Step | None:
    return getattr(_local, "step", None)


class running:
    """``with running(step): model(...)``: the step the attention function serves (per thread)."""

    def __init__(self, step: Step) -> None:
        self.step = step

    def __enter__(self):
        _local.step = self.step
        return self.step

    def __exit__(self, *exc):
        _local.step = None


def _mask(n: int, past: int, length: int, window: int | None, device) -> torch.Tensor:
    """(n, length) boolean: new token i (position past + i) sees key j when j <= past + i (and,
    with a sliding window w, j > past + i - w)."""
    q = torch.arange(past, past + n, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    ok = k <= q
    if window:
        ok &= k > q - window
    return ok


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query (1, heads, T, d), key/value
    (1, kv_heads, T, d) for the step's T new tokens -> ((1, T, heads, d), None)."""
    step = current_step()
    if step is None:
        raise RuntimeError(f"attention {NAME!r} runs only inside a loraforge serving step")
    if query.shape[0] != 1:
        raise RuntimeError("a serving step runs all its tokens in one row (batch size 1)")
    layer = module.layer_idx
    window = kwargs.get("sliding_window")
    heads, kv_heads = query.shape[1], key.shape[1]
    outs, covered = [], 0
    for seg in step.segments:
        s, n, p = seg.start, seg.n, seg.past
        buf = seg.cache.buffer(layer, key, p + n)
        buf[0, :, p : p + n] = key[0, :, s : s + n]
        buf[1, :, p : p + n] = value[0, :, s : s + n]
        length = p + n
        lo = max(0, length - window) if (window and n == 1) else 0
        k, v = buf[0, :, lo:length][None], buf[1, :, lo:length][None]
        q = query[:, :, s : s + n]
        if n == 1:
            mask, causal = None, False
        elif p == 0 and not (window and length > window):
            mask, causal = None, True
        else:
            mask, causal = _mask(n, p, length, window, q.device), False
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=heads != kv_heads
        )
        if s > covered:  # padding tokens before this sequence: zeros
            outs.append(query.new_zeros((s - covered, heads, query.shape[3])))
        outs.append(o[0].transpose(0, 1))
        covered = s + n
    if query.shape[2] > covered:
        outs.append(query.new_zeros((query.shape[2] - covered, heads, query.shape[3])))
    return torch.cat(outs)[None], None


def register() -> None:
    """Make ``NAME`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)


def install(model) -> None:
    """Route ``model``'s attention through ``attention`` (the engine owns the model from then on)."""
    register()
    model.config._attn_implementation = NAME
