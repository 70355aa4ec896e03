"""What autograd keeps for backward in one Llama-family decoder layer, as loraforge trains it.

Counted (with ``torch.autograd.graph.saved_tensors_hooks``, one storage once, parameters not
counted: ``tests/planning/test_memory_activations.py`` checks these formulas against the hooks) for
a decoder layer of hidden size ``H``, query width ``Q = heads·head_dim``, key/value width ``K``,
MLP width ``I``, on ``N = B·T`` tokens in the activation dtype (``e`` bytes), with loraforge's fast
MLP / RMSNorm forwards (``train.fast_kernels``, on by default):

==========================  =====================================================================
RMSNorm (x2)                its input ``N·H·e`` and ``rstd`` ``N·4`` (fp32)
attention input             the normed ``N·H·e``, once for q/k/v, when one of them trains
rotary                      nothing per layer (the shared cos/sin ``2·B·T·head_dim·e``, once)
SDPA / flash                q ``N·Q``, k, v ``N·K`` each, the output ``N·Q`` (``e``), and the
                            log-sum-exp ``N·heads·4``; o_proj's input is that output (no copy)
  packed (data.packing)     the block-diagonal mask ``B·T²·4``, and k, v repeated to all heads
                            (``N·Q`` each instead of ``N·K``)
eager                       q, k, v repeated to all heads ``3·N·Q``, the softmax probabilities
                            ``B·heads·T²``, and o_proj's input ``N·Q`` (all ``e``)
LoRA, per adapted linear    ``x·Aᵀ``: ``N·r`` in the branch dtype; with lora.dropout its dropped
                            input and its mask ``2·N·in`` (branch dtype) instead of the shared
                            input, and the plain MLP path (the fast one has no dropout); in a
                            half-precision model with
                            ``lora_compute: input`` also A and B cast to it ``r·(in+out)·e``; with
                            ``lora_compute: adapter`` the input cast to fp32 ``N·in·4`` instead
MLP input                   the normed ``N·H·e``, once for gate/up, when one of them trains
SwiGLU                      ``g = gate(x)`` and ``u = up(x)``: ``2·N·I·e`` (without the fast
                            kernels also ``silu(g)`` and ``p = silu(g)·u``: ``4·N·I·e``)
down_proj                   full fine-tuning keeps its input ``p`` (``N·I·e``); LoRA keeps only
                            ``p·Aᵀ`` (the fast kernel recomputes ``p``)
==========================  =====================================================================

A frozen linear (the base under LoRA, a 4-bit base) keeps nothing but its weight. With activation
checkpointing (non-reentrant, per decoder layer) a layer keeps only its input ``N·H·e``; its
activations above are recomputed, one layer at a time, in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass
class LayerShape:
    """One decoder layer's widths and what trains in it.

    ``lora``: adapted linear (short name, e.g. ``q_proj``) -> (rank, in_features, out_features);
    ``full``: every weight trains (full fine-tuning)."""

    hidden: int
    q_width: int
    kv_width: int
    heads: int
    head_dim: int
    intermediate: int
    lora: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    full: bool = False
    dora: bool = False


@dataclass
class Run:
    """How the layer runs: micro-batch ``batch`` x ``seq`` tokens, activation bytes per element,
    the LoRA branch's element bytes and whether the factors are cast to the activation dtype."""

    batch: int
    seq: int
    act_bytes: int
    branch_bytes: int
    factor_cast: bool = False
    input_cast: bool = False  # lora_compute: adapter on a half-precision model
    attn: str = "sdpa"
    fast: bool = True
    packed: bool = False  # data.packing: position ids restart inside a sequence
    dropout: bool = False  # lora.dropout > 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _trains(shape: LayerShape, names) -> bool:
    return shape.full or any(n in shape.lora for n in names)


def saved_per_layer(shape: LayerShape, run: Run, grad_in: bool = True) -> dict[str, int]:
    """Bytes kept for backward by one decoder layer, by part (the module docstring's table).

    ``grad_in``: whether the layer's input carries a gradient. It does not in the first layer of a
    run whose embeddings are frozen (LoRA, QLoRA): there an op keeps nothing until the first
    trainable module, so the first RMSNorm keeps nothing, nor does attention without a trained
    q/k/v projection."""
    n, e = run.tokens, run.act_bytes
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    fast = run.fast
    norm = n * h * e + n * 4  # x, rstd (fp32)
    if shape.full and not fast:
        norm += n * h * e  # a trained norm weight's plain autograd also keeps the normalised x
    parts = {"norms": norm if grad_in else 0}

    # attention: its input (for the trained projections), the kernel's tensors, o_proj's input
    qkv = _trains(shape, ATTENTION_PROJ)
    live = grad_in or qkv  # whether a gradient reaches the attention kernel
    own_copy = run.input_cast or run.dropout  # the adapted linears keep their own copies of the input
    attn = n * h * e if qkv and not own_copy else 0
    if live and run.attn == "eager":
        probs = run.batch * shape.heads * run.seq * run.seq
        attn += 3 * n * q * e + probs * e + (probs * 4 if e < 4 else 0)  # bf16: the fp32 softmax too
    elif live:
        attn += 2 * n * q * e + 2 * n * kv * e + n * shape.heads * 4
        if run.packed:  # transformers' block-diagonal mask from the position ids (float, per layer);
            # with a mask, k and v reach the kernel repeated to every query head
            attn += run.batch * run.seq * run.seq * 4 + 2 * n * (q - kv) * e
    o_trains = _trains(shape, ("o_proj",))
    if o_trains and not own_copy and (run.attn == "eager" or not live):
        attn += n * q * e  # (sdpa keeps its output, which is o_proj's input, when it is live)
    parts["attention"] = attn
    live = live or o_trains
    parts["norms"] += norm if live else 0

    # MLP: its input (for trained gate / up), the SwiGLU's g and u, down_proj's input p
    gate_up = _trains(shape, MLP_IN)
    down = _trains(shape, ("down_proj",))
    mlp = n * h * e if gate_up and not own_copy else 0
    if live or gate_up:
        # g, u (+ silu(g) on the plain path, but for dropout's, whose g the rest of the forward frees)
        mlp += (2 if fast or run.dropout else 3) * n * i * e
    if shape.full or (down and not fast and not run.dropout):
        mlp += n * i * e  # p, for down_proj's weight or LoRA A gradient
    parts["mlp"] = mlp

    lora = 0
    for name, (r, fan_in, fan_out) in shape.lora.items():
        lora += n * r * run.branch_bytes
        if run.dropout:  # each adapted linear drops its own copy of its input (and keeps the mask
            # where the input carries a gradient)
            lora += (2 if grad_in or name not in ATTENTION_PROJ else 1) * n * fan_in * run.branch_bytes
        elif run.input_cast and not (fast and name == "down_proj"):  # (the fast kernel recomputes p)
            lora += n * fan_in * 4
        if run.factor_cast:  # B cast always; A cast only where the input carries a gradient
            lora += r * fan_out * e + (r * fan_in * e if grad_in or name not in ATTENTION_PROJ else 0)
        if shape.dora:  # the base output before the magnitude's rescale, and two (out,) vectors
            lora += n * fan_out * e + 2 * fan_out * 4
    parts["lora"] = lora
    return parts


def checkpointed_per_layer(shape: LayerShape, run: Run) -> int:
    """Bytes one checkpointed decoder layer keeps: its input hidden state."""
    return run.tokens * shape.hidden * run.act_bytes


def shared_saved(shape: LayerShape, run: Run) -> int:
    """Saved once for all layers: the rotary cos and sin (``B·T·head_dim`` each)."""
    return 2 * run.tokens * shape.head_dim * run.act_bytes


def backward_working(shape: LayerShape, run: Run) -> int:
    """Temporaries alive at the worst moment of one layer's backward (beyond what it keeps).

    The MLP's backward is the largest on a Llama layer: the incoming gradient ``N·H`` turns into
    ``∂L/∂p`` (``N·I``) through down_proj, the SwiGLU backward recomputes ``silu(g)`` (``N·I``)
    and forms ``∂L/∂g``, ``∂L/∂u`` in place of those two; gate and up then give two ``N·H``
    input gradients that are summed. Attention's backward needs ``∂q, ∂k, ∂v`` and ``∂out``
    (``N·(2Q + 2K)``); under eager attention also the probabilities' gradient ``B·heads·T²``
    twice (softmax backward)."""
    n, e = run.tokens, run.act_bytes
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    mlp = (2 * n * i + 3 * n * h) * e
    attn = (2 * q + 2 * kv + 2 * h) * n * e
    if run.attn == "eager":
        attn += 2 * run.batch * shape.heads * run.seq * run.seq * e
    return max(mlp, attn)
