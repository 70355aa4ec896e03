"""``Linear4bit``: a frozen linear layer stored as packed NF4/FP4, and ``quantize(model, config)``.

``y = x W_hat^T + b`` with ``W_hat = dequantize(packed, state)`` rebuilt in the compute dtype on each
call. Only the input gets a gradient (the base weight is frozen; QLoRA trains adapters on top), so
backward needs ``grad_x = grad_y W_hat``: the autograd function saves the packed weight (0.5 byte
per element) and dequantizes again, instead of keeping a 2- or 4-byte copy alive per layer.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from ..kinds import is_conv1d, replace_module
from . import _triton
from .config import QuantConfig
from .nf4 import dequantize_4bit, quantize_4bit
from .state import QuantState

__all__ = ["Linear4bit", "quantize", "release_buffers"]


# On CPU, glibc serves allocations of 32 MiB and more with a fresh mmap each time, so every call
# would page-fault its whole dequantized weight in again (slower than the dequantization itself).
# Those weights go into a buffer kept per thread, size and dtype.
_REUSE_BYTES = 32 << 20
_buffers = threading.local()


@torch.library.custom_op("loraforge::dequantize_4bit", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dequantize_4bit`` as one opaque operator for ``torch.compile``: traced through, the C
    loop's ctypes call, its thread pool and the scales' ``.item()`` each break the graph (dozens
    of breaks per decoder layer); as an operator with a shape-only fake below, a compiled layer
    keeps one graph. Eager code calls ``dequantize_4bit`` directly (see ``_dequantize``)."""
    state2 = None
    if nested_absmax is not None:
        state2 = QuantState(nested_absmax, nested_code, nested_blocksize, None, torch.float32)
    state = QuantState(absmax, code, blocksize, quant_type, dtype, torch.Size(shape), offset, state2)
    return dequantize_4bit(packed, state, dtype)


@_dequantize_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type,
      shape, dtype):  # fmt: skip
    return packed.new_empty(shape, dtype=dtype)


def _dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_4bit`` for a matmul that uses the result at once and keeps no reference."""
    if torch.compiler.is_compiling() and _triton.compilable(packed):  # launched by Inductor itself
        return _triton.compiled_call(packed, state, dtype)
    if torch.compiler.is_compiling():  # elsewhere (CPU, ROCm, no Triton): one opaque operator
        s2 = state.state2
        return _dequantize_op(
            packed, state.absmax, state.code, s2.absmax if s2 else None, s2.code if s2 else None,
            state.offset, state.blocksize, s2.blocksize if s2 else 0, state.quant_type,
            list(state.shape), dtype,
        )  # fmt: skip
    n = math.prod(state.shape)
    if packed.is_cuda:
        _triton.prepare_compiled()  # (ready for a later torch.compile of the model; once)
    if packed.device.type != "cpu" or n * dtype.itemsize < _REUSE_BYTES:
        return dequantize_4bit(packed, state, dtype)
    cache = getattr(_buffers, "by_size", None)
    if cache is None:
        cache = _buffers.by_size = {}
    if (n, dtype) not in cache:
        cache[(n, dtype)] = torch.empty(n, dtype=dtype)
    return dequantize_4bit(packed, state, dtype, out=cache[(n, dtype)])


def release_buffers() -> None:
    """Free this thread's reused dequantization buffers (they are rebuilt when next needed)."""
    _buffers.by_size = {}


class _Dequantize4bitMatmul(torch.autograd.Function):
    """``x (..., in) -> x @ dequantize(packed).T (..., out)``; gradient for ``x`` only."""

    @staticmethod
    def forward(ctx, x, packed, state, compute_dtype):
        ctx.state, ctx.compute_dtype = state, compute_dtype
        ctx.save_for_backward(packed)  # the packed uint8 weight, not a dequantized copy
        return x @ _dequantize(packed, state, compute_dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (packed,) = ctx.saved_tensors
        return (
            grad_out.to(ctx.compute_dtype) @ _dequantize(packed, ctx.state, ctx.compute_dtype),
            None,
            None,
            None,
        )


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def is_quantizable(module: nn.Module) -> bool:
    """A linear map whose weight ``quantize`` stores in 4-bit: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight, state-dict compatible with ``bitsandbytes.nn.Linear4bit``.

    Attributes:
        in_features, out_features: the layer's dimensions.
        weight: ``nn.Parameter`` (``requires_grad=False``) holding the packed uint8 tensor of shape
            ``((out * in + 1) // 2, 1)``.
        bias: floating ``nn.Parameter`` of shape ``(out,)``, or ``None``.
        quant_state: :class:`QuantState` (absmax, code, blocksize, quant_type, dtype, shape, nested
            state); ``None`` until the layer is quantized or loaded.
        compute_dtype: dtype of the per-call dequantized weight and of the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_config: QuantConfig | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        qc = quant_config or QuantConfig()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = qc.quant_type, qc.blocksize, qc.double_quant
        self.compute_dtype = qc.resolved(dtype or torch.float32).compute_dtype  # "auto": the weights'
        n = in_features * out_features
        self.weight = nn.Parameter(
            torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False
        )
        b = torch.empty(out_features, dtype=dtype or torch.float32, device=device) if bias else None
        self.bias = nn.Parameter(b) if bias else None
        self.quant_state: QuantState | None = None
        self.from_conv1d = False

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module, quant_config: QuantConfig | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear`` (or transformers ``Conv1D``) on its own device.

        The bias keeps its dtype and ``requires_grad``. A layer on the meta device gives an empty shell
        (no ``quant_state``) to be filled by :meth:`quantize_weight_` or ``load_state_dict``.
        """
        weight = _linear_weight(linear)
        out_features, in_features = weight.shape
        has_bias = getattr(linear, "bias", None) is not None
        bias_dtype = linear.bias.dtype if has_bias else None
        qc = (quant_config or QuantConfig()).resolved(weight.dtype)  # "auto": the weight's dtype
        new = cls(in_features, out_features, has_bias, qc, device=weight.device, dtype=bias_dtype)
        new.from_conv1d = not isinstance(linear, nn.Linear)  # its checkpoints store the weight (in, out)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        if weight.device.type != "meta":
            new.quantize_weight_(weight)
        return new

    def quantize_weight_(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``(out, in)`` weight into this layer (in place)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Linear4bit: weight of shape {tuple(weight.shape)} for a layer of shape "
                f"({self.out_features}, {self.in_features})"
            )
        if not weight.is_floating_point():
            raise TypeError(f"Linear4bit: cannot quantize a non-floating weight ({weight.dtype})")
        packed, state = quantize_4bit(weight.detach(), self.quant_type, self.blocksize, self.double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    def load_quantized_(self, packed: torch.Tensor, state: QuantState, name: str = "weight") -> None:
        """Install an already-quantized weight (e.g. from a bitsandbytes checkpoint), checking shapes.

        Raises ``ValueError`` naming ``name`` when the packed tensor does not match the quant state or
        the layer.
        """
        expected = (self.out_features, self.in_features)
        if state.shape is None or tuple(state.shape) != expected:
            raise ValueError(
                f"{name}: quant state shape {state.shape and list(state.shape)}, layer is {list(expected)}"
            )
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)  # bitsandbytes' quant_storage may be another dtype
        n_bytes = (expected[0] * expected[1] + 1) // 2
        if packed.numel() != n_bytes:
            raise ValueError(f"{name}: {packed.numel()} packed bytes, shape {list(expected)} needs {n_bytes}")
        device = packed.device
        self.weight = nn.Parameter(packed.reshape(n_bytes, 1), requires_grad=False)
        self.quant_state = state.to(device)
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested

    # ----------------------------------------------------------------------------- compute
    def _check_ready(self) -> QuantState:
        if self.quant_state is None:
            raise RuntimeError("Linear4bit has no quantized weight yet (quantize or load a state dict first)")
        return self.quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._check_ready()
        cdt = self.compute_dtype
        y = _Dequantize4bitMatmul.apply(x.to(cdt), self.weight, state, cdt)
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight ``W_hat`` of shape ``(out, in)``, in ``dtype`` (default: the original dtype)."""
        state = self._check_ready()
        return dequantize_4bit(self.weight, state, dtype or state.dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> float:
        """Replace the stored weight by ``quantize(weight)`` with this layer's settings, in place.

        Used to merge an adapter into the 4-bit base. Returns the mean absolute rounding error
        ``mean |weight - dequantize(quantize(weight))|``.
        """
        state = self._check_ready()
        self.quantize_weight_(weight.to(self.weight.device))
        self.quant_state.dtype = state.dtype  # keep the model's dtype, whatever the merged weight's
        return (weight.float() - self.dequantize(torch.float32)).abs().mean().item()

    # ----------------------------------------------------------------------------- serialisation
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes order: weight, bias, then the quant state entries under "weight."
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self.quant_state is not None:
            for key, value in self.quant_state.as_tensors().items():
                destination[prefix + "weight." + key] = value

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight" not in ours:
            missing_keys.append(prefix + "weight")
        if self.bias is not None and "bias" not in ours:
            missing_keys.append(prefix + "bias")
        known = {"weight", "bias"} | {k for k in ours if k.startswith("weight.")}
        unexpected_keys.extend(prefix + k for k in ours if k not in known and "." not in k)
        try:
            self.load_tensors_(ours, name=prefix + "weight")
        except (ValueError, TypeError) as e:
            error_msgs.append(str(e))

    def load_tensors_(self, tensors: dict[str, torch.Tensor], name: str = "weight") -> None:
        """Load ``weight`` (+ ``weight.*`` quant state, ``bias``) given relative to this module.

        A floating ``weight`` is a full-precision checkpoint and gets quantized; a uint8 one needs its
        quant state.
        """
        weight = tensors.get("weight")
        qs = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
        if weight is not None:
            if weight.is_floating_point() and not qs:
                self.quantize_weight_(weight.t() if self.from_conv1d else weight)
            elif not qs:
                raise ValueError(
                    f"{name}: packed {weight.dtype} weight without its quant state ({name}.absmax, ...)"
                )
            else:
                self.load_quantized_(weight, QuantState.from_tensors(qs, name), name)
        elif qs:
            raise ValueError(f"{name}: quant state present but the packed tensor {name} is missing")
        bias = tensors.get("bias")
        if bias is not None and self.bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                bias_name = name.removesuffix("weight") + "bias"
                raise ValueError(f"{bias_name}: shape {tuple(bias.shape)}, expected ({self.out_features},)")
            if self.bias.device.type == "meta":  # an empty shell takes the checkpoint's tensor as is
                self.bias = nn.Parameter(bias.detach(), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)

    def _apply(self, fn, recurse=True):
        # Moves follow the packed weight; the quant state (plain tensors, fp32 scales) moves with it
        # but is never cast: .half() must not round the absmax values.
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.weight.device.type != "meta":
            self.quant_state.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )


def quantize(model: nn.Module, quant_config: QuantConfig | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` not in
    ``quant_config.skip_modules`` by a :class:`Linear4bit`, in place; returns ``model``."""
    qc = quant_config or QuantConfig()
    targets = [(n, m) for n, m in model.named_modules() if n and is_quantizable(m) and not qc.skips(n)]
    for name, module in targets:
        replace_module(model, name, Linear4bit.from_linear(module, qc))
    return model
