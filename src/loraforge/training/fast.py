"""Exact fast paths for Llama-family decoder layers in training: fewer tensors kept for backward.

``patch_model(model)`` gives matching module *instances* a new ``forward`` (a bound method in the
instance's ``__dict__``; the transformers classes are not touched) and ``unpatch_model(model)``
removes it again. ``fast_kernels(model)`` does both around a ``with`` block. Two kinds of module
are matched by structure, so Llama, Qwen2, Mistral (and other models built the same way) match:

* the SwiGLU MLP: ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``, computing
  ``down(silu(gate(x)) * up(x))``;
* RMSNorm: a class whose name ends in ``RMSNorm`` with ``weight`` and ``variance_epsilon``,
  computing HF's ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)``.

A candidate is patched only if, on a small random input, the fast forward gives the module's own
output (so a look-alike with another formula, e.g. Gemma's ``(1 + weight)`` norm, is left alone),
and only where no other code has already replaced the instance's ``forward`` (accelerate hooks).
GPT-2, BERT and other models have no such modules and are left untouched.

What it saves (tokens N, intermediate I, fp32; measured with a saved-tensor hook on the
reference Llama, 1024 tokens x 1376: 5.4 MB per N x I tensor). Plain autograd keeps, per MLP,
``g = gate(x)`` (for silu's backward), ``silu(g)`` and ``u = up(x)`` (for the product's backward)
and ``p = silu(g) * u`` (as ``down_proj``'s LoRA input, for dA): four N x I tensors. The fast MLP
keeps ``g`` and ``u`` only and recomputes ``silu(g)`` and ``p`` in backward (two cheap elementwise
passes): 2 x 5.4 MB less per layer. A frozen base layer never keeps its input (its backward only
needs the weight), so ``p`` is only needed by the LoRA factor gradient, which is why the LoRA
part of ``down_proj`` is computed here rather than by the wrapper.

RMSNorm with a frozen weight already keeps only ``x`` and ``rstd`` under autograd; the fast norm
keeps the same (and never the normalised copy, which a *trainable* weight would need), but runs
one autograd node with a short hand-written backward in place of a chain of six. Rotary
embeddings are not patched: autograd keeps only the shared cos/sin for them, and transformers
calls them as a module-level function, which cannot be replaced per instance.

Fallbacks. The module's own forward runs when gradients are off (evaluation, generation), for a
call with extra arguments, and when ``act_fn`` has hooks. ``down_proj`` keeps its own forward
(the SwiGLU function still replaces ``silu(g) * u``) unless it is a ``LoraLinear`` with exactly
one live, unmerged adapter without dropout and no hooks: so plain or 4-bit ``nn.Linear``s,
merged or disabled adapters, several adapters, LoRA dropout (its mask would have to be kept)
and mixed-adapter batches all take the wrapper's usual path. Double backward is not supported
(as for ``layers.linear._FusedLoraLinear``).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LoraLinear, dora

__all__ = [
    "compile_layers",
    "fast_kernels",
    "is_patched",
    "patch_model",
    "patched_modules",
    "should_compile",
    "uncompile_layers",
    "unpatch_model",
]


# --------------------------------------------------------------------------------------------
# The autograd functions
# --------------------------------------------------------------------------------------------
def _swiglu_backward(ctx, dp, g, u, silu, dp_is_ours: bool):
    """(dL/dg, dL/du) for p = silu(g)·u: du = dp·silu(g), dg = silu'(g)·(dp·u), with the kernels
    autograd's mul and silu backward use (so bitwise the plain path's values). ``silu`` (and
    ``dp`` when ``dp_is_ours``) are the caller's temporaries and get overwritten: fewer buffers."""
    du = silu.mul_(dp) if ctx.needs_input_grad[1] else None
    dg = None
    if ctx.needs_input_grad[0]:
        t = dp.mul_(u) if dp_is_ours else dp * u  # autograd may hand the same dp to others
        dg = torch.ops.aten.silu_backward.grad_input(t, g, grad_input=t)
    return dg, du


class _SwiGLU(torch.autograd.Function):
    """p = silu(g) · u, with g, u (..., I). Keeps g and u; silu(g) is recomputed in backward."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)  # one (..., I) buffer instead of two

    @staticmethod
    def backward(ctx, dp):
        g, u = ctx.saved_tensors
        return _swiglu_backward(ctx, dp, g, u, F.silu(g), dp_is_ours=False)


class _SwiGLULora(torch.autograd.Function):
    """(g, u, A) -> (p, p·Aᵀ) with p = silu(g)·u: the SwiGLU product and the first LoRA product
    of ``down_proj`` on it. The caller adds ``base_layer(p)`` and s·(p·Aᵀ)·Bᵀ as the plain layer
    does (``LoraLinear.add_low_rank``); neither keeps a copy of p when the base is frozen.

    Shapes: g, u (..., I); A (r × I); outputs p (..., I) and xa (..., r).
    Backward, with P = ∂L/∂p from the base layer and X = ∂L/∂xa (N × r):
        ∂L/∂p = P + X·A      ∂L/∂A = Xᵀ·p
    then ∂L/∂g, ∂L/∂u as in ``_SwiGLU``. Kept: g and u (the rank-r xa is kept by the caller's
    product, for B's gradient); p is recomputed.
    """

    @staticmethod
    def forward(ctx, g, u, a):
        p = F.silu(g).mul_(u)
        xa = F.linear(p.to(a.dtype), a)  # LoRA runs in A's dtype, as LoraLinear does
        ctx.save_for_backward(g, u, a)
        return p, xa

    @staticmethod
    def backward(ctx, dp, dxa):
        g, u, a = ctx.saved_tensors
        width = g.shape[-1]
        grad = dxa.reshape(-1, dxa.shape[-1])  # (N × r)
        silu = F.silu(g)
        da = None
        if ctx.needs_input_grad[2]:
            p = (silu * u).to(a.dtype)  # bitwise the forward's p: the same kernels on the same g, u
            da = grad.t() @ p.reshape(-1, width)
            del p
        dg = du = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dp2 = dp.reshape(-1, width)
            if a.dtype == dp.dtype:
                dp2 = torch.addmm(dp2, grad, a)  # P + X·A in one pass, a new buffer
            else:  # fp32 LoRA on a half-precision model: add in the model's dtype
                dp2 = dp2 + (grad @ a).to(dp.dtype)
            dg, du = _swiglu_backward(ctx, dp2.view(g.shape), g, u, silu, dp_is_ours=True)
        return dg, du, da


class _RMSNorm(torch.autograd.Function):
    """HF's RMSNorm, y = w · (x̂).to(dtype(x)) with x̂ = x32 · rstd, rstd = (mean(x32²) + eps)^-½.

    x (..., H), w (H). Keeps x and rstd (..., 1) only. Backward, with G = ∂L/∂y and
    Ĝ = (G·w).to(dtype(x)) in fp32:
        ∂L/∂x = rstd · (Ĝ − x̂ · mean(Ĝ·x̂))      ∂L/∂w = Σ_tokens G · x̂.to(dtype(x))
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # HF's ops, in HF's order
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gx = (grad * weight).to(x.dtype).to(torch.float32)  # the casts autograd would make
            dot = (gx * xhat).mean(-1, keepdim=True)
            dx = gx.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None


# --------------------------------------------------------------------------------------------
# The patched forwards
# --------------------------------------------------------------------------------------------
def _hooked(module: nn.Module) -> bool:
    """Whether calling the module does more than its class's forward (hooks, a replaced forward)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def _live_lora(down: nn.Module) -> str | None:
    """The one LoRA adapter of ``down`` that ``_SwiGLULora`` can compute, or None (plain path)."""
    if not isinstance(down, LoraLinear) or down.disabled or down.batch_adapters is not None:
        return None
    if _hooked(down):  # we would call its base layer directly and skip its hooks
        return None
    live = down.live_adapters()
    if len(live) != 1 or not isinstance(down.lora_dropout[live[0]], nn.Identity):
        return None  # several adapters, or dropout (its mask would have to be kept): plain path
    return live[0]


def _mlp_fast(self, x: torch.Tensor) -> torch.Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if g.shape != u.shape or g.dtype != u.dtype:
        return down(self.act_fn(g) * u)
    name = _live_lora(down)
    if name is None:  # plain nn.Linear, merged / disabled adapters, dropout, mixed batch, ...
        return down(_SwiGLU.apply(g, u))
    down.check_merged_training()
    a, b = down.compute_factors(name, g.dtype)  # (cast to a half-precision input, as the layer does)
    p, xa = _SwiGLULora.apply(g, u, a)
    return dora.finish(down, down.add_low_rank(down.base_layer(p), xa, b, down.scaling[name]), name)


def _mlp_forward(self, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled() or _hooked(self.act_fn):
        return type(self).forward(self, x, *args, **kwargs)
    return _mlp_fast(self, x)


def _norm_fast(self, x: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _norm_forward(self, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)
    return _norm_fast(self, x)


# --------------------------------------------------------------------------------------------
# Matching and patching
# --------------------------------------------------------------------------------------------
_FORWARDS = {"mlp": (_mlp_forward, _mlp_fast), "rmsnorm": (_norm_forward, _norm_fast)}


def _fast_kind(module: nn.Module) -> str | None:
    """Which fast forward fits this module by its structure, or None."""
    if all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(module, "act_fn", None)
        if type(act).__name__ in ("SiLU", "SiLUActivation"):
            return "mlp"
        return None
    if (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    ):
        return "rmsnorm"
    return None


def _probe_dtypes(module: nn.Module) -> list[torch.dtype]:
    """Input dtypes to try: the module's own floating weights' (not LoRA's, which may be fp32
    on a half-precision model), 4-bit layers' compute dtype, then fp32."""
    found = [p.dtype for n, p in module.named_parameters() if p.is_floating_point() and "lora_" not in n]
    found += [
        m.compute_dtype
        for m in module.modules()
        if isinstance(getattr(m, "compute_dtype", None), torch.dtype)
    ]
    return list(dict.fromkeys([*found, torch.float32]))


@torch.no_grad()
def _probe(module: nn.Module, kind: str) -> bool:
    """True when the fast forward reproduces the module's own forward on a small random input
    (in eval mode, so that dropout draws nothing; the global RNG is not touched)."""
    width = module.weight.shape[-1] if kind == "rmsnorm" else getattr(module.gate_proj, "in_features", None)
    if not isinstance(width, int):
        return False
    fast = _FORWARDS[kind][1]
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        for dtype in _probe_dtypes(module):
            try:
                device = next(t.device for t in [*module.parameters(), *module.buffers()])
                g = torch.Generator().manual_seed(0)
                x = torch.randn(2, 3, width, generator=g).to(device, dtype)
                want = type(module).forward(module, x)
            except Exception:  # wrong dtype for this module, meta device, ...
                continue
            try:
                got = fast(module, x)
            except Exception:
                return False
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            return got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol)
        return False
    finally:
        for m, training in modes:
            m.training = training


def _patched_kind(module: nn.Module) -> str | None:
    forward = module.__dict__.get("forward")
    for kind, (fn, _) in _FORWARDS.items():
        if getattr(forward, "__func__", None) is fn:
            return kind
    return None


def patch_model(model: nn.Module) -> int:
    """Give every matching SwiGLU MLP and RMSNorm of ``model`` its fast forward (in place).

    Returns the number of modules patched (0 for models without such modules, e.g. GPT-2).
    Calling it again is harmless. Undo with ``unpatch_model``."""
    count = 0
    for module in model.modules():
        if _patched_kind(module) is not None or "forward" in module.__dict__:
            continue  # already ours, or someone else's instance forward (accelerate): leave it
        kind = _fast_kind(module)
        if kind is not None and _probe(module, kind):
            module.forward = types.MethodType(_FORWARDS[kind][0], module)
            count += 1
    return count


def unpatch_model(model: nn.Module) -> int:
    """Restore the class's own forward on every module ``patch_model`` changed; returns how many."""
    count = 0
    for module in model.modules():
        if _patched_kind(module) is not None:
            del module.forward
            count += 1
    return count


def patched_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: "mlp" | "rmsnorm"}`` for the modules that run a fast forward now."""
    return {name: kind for name, m in model.named_modules() if (kind := _patched_kind(m)) is not None}


def is_patched(model: nn.Module) -> bool:
    return bool(patched_modules(model))


@contextlib.contextmanager
def fast_kernels(model: nn.Module, enabled: bool = True):
    """``with fast_kernels(model): ...`` runs the block with the fast forwards (if ``enabled``)
    and removes afterwards exactly the patches it added."""
    before = set(patched_modules(model))
    if enabled:
        patch_model(model)
    try:
        yield model
    finally:
        for name, module in model.named_modules():
            if name not in before and _patched_kind(module) is not None:
                del module.forward


# --------------------------------------------------------------------------------------------
# torch.compile of the decoder layers
# --------------------------------------------------------------------------------------------
def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of blocks: its longest ``nn.ModuleList`` (Llama ``model.layers``, GPT-2
    ``transformer.h``, BERT ``encoder.layer``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else None


def compile_layers(model: nn.Module, **options) -> int:
    """``torch.compile`` every block of the model in place (``nn.Module.compile``: parameter names
    and the state dict do not change); returns how many. Compiling each block, not the whole
    model, keeps one small graph that all blocks of a shape share, and the loss, LoRA bookkeeping
    and Python control flow outside it. ``options`` go to ``torch.compile``."""
    from ..quant import Linear4bit, _triton

    if any(isinstance(m, Linear4bit) and m.weight.is_cuda for m in model.modules()):
        _triton.prepare_compiled()  # the graphs launch the dequantization kernel themselves
    layers = _layer_list(model)
    for layer in layers or ():
        layer.compile(**options)
    return len(layers or ())


# Fewer forward+backward passes than this and ``auto`` stays eager: the first compiled step takes
# seconds of compilation that a shorter run does not earn back (BENCHMARKS.md).
MIN_COMPILE_STEPS = 300


def should_compile(
    setting: bool | str,
    device: torch.device | str,
    gradient_checkpointing: bool = False,
    steps: int | None = None,
) -> tuple[bool, str]:
    """What ``train.compile`` means for this run, and why: ``True`` / ``False`` as given;
    ``"auto"`` compiles on CUDA, where it pays (also with a 4-bit base, whose dequantization
    kernel each layer's graph launches itself), and not on CPU, where the small gain in step
    time costs a larger peak memory over the first steps (figures: BENCHMARKS.md, compile
    rows). ``auto`` also stays eager with activation checkpointing (which
    re-enters the layers in backward), and for runs of fewer than ``MIN_COMPILE_STEPS``
    forward+backward passes (``steps``; the quickstart's 80 would spend longer compiling than
    training); ``true`` still forces it there."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"train.compile: expected true, false or auto, got {setting!r}")
    if setting != "auto":
        return bool(setting), "train.compile: " + str(setting).lower()
    if torch.device(device).type != "cuda":
        return False, "auto: not on CUDA"
    if gradient_checkpointing:
        return False, "auto: activation checkpointing is on"
    if steps is not None and steps < MIN_COMPILE_STEPS:
        return False, f"auto: a short run ({steps} < {MIN_COMPILE_STEPS} forward+backward passes)"
    try:
        import triton  # noqa: F401  (TorchInductor's GPU code generator)
    except ImportError:
        return False, "auto: Triton is not installed"
    return True, "auto: CUDA"


def uncompile_layers(model: nn.Module) -> None:
    """Undo :func:`compile_layers`: the blocks run eagerly again."""
    for layer in _layer_list(model) or ():
        layer._compiled_call_impl = None
