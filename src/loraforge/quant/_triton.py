"""NF4 / FP4 dequantization on CUDA as one Triton kernel.

PyTorch ops need three passes over a 4-bit weight (gather code pairs by byte, scale per block,
cast), with fp32 temporaries of 8 bytes per element in between, and a few more small kernels for
double-quantized block scales; this kernel reads the packed bytes and the (8-bit) block scales
once and writes the output once: 0.5 + 2 bytes per element for a bf16 weight, one launch.

Per output element ``i`` (flat, row-major, ``0 <= i < n``), with ``b = i // blocksize``::

    byte     = packed[i // 2]
    q        = byte >> 4  if i is even  else  byte & 0xF          # high nibble first, as bitsandbytes
    absmax_b = absmax[b]                                          # plain fp32 scales, or with
             = code2[absmax[b]] * nested_absmax[b // 256] + offset  # double quantization
    out[i]   = cast(code[q] * absmax_b)                           # fp32, one rounding to out's dtype

which is exactly what ``nf4.dequantize_4bit``'s other paths and ``QuantState.dequantize_absmax``
compute: each product and sum is one fp32 operation (the kernel is built without fused
multiply-add, which would round once instead of twice) and the cast rounds to nearest even, so
all paths give the same bits.

Used by ``nf4.dequantize_4bit`` for CUDA tensors when Triton is importable;
``LORAFORGE_TRITON=0`` turns it off (the PyTorch path is then used). On CPU this module is not
used (``_native`` is the CPU kernel); ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors for
testing.
"""

from __future__ import annotations

import functools
import os

import torch

_BLOCK = 4096  # output elements per program: 2 KB of packed bytes in, 8 KB (bf16) out


@functools.cache
def _kernel(interpret: bool):
    """Build the kernel on first use (importing Triton costs ~0.5 s; CPU-only users never pay it).

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so each mode has its own build."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant4(
        packed_ptr, absmax_ptr, code_ptr, out_ptr, n,
        code2_ptr, nested_ptr, offset_ptr,  # double quantization only (else unused)
        BS: tl.constexpr, NESTED_BS: tl.constexpr, NESTED: tl.constexpr, BF16: tl.constexpr,
        BLOCK: tl.constexpr, PTX_MUL: tl.constexpr,
    ):  # fmt: skip
        # int64 offsets: an embedding's 4-bit weight can pass 2**31 elements
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
        blk = offs // BS
        if NESTED:  # 8-bit block scales: the 256-entry code and the nested scales stay in cache
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            c2 = tl.load(code2_ptr + qa)
            nest = tl.load(nested_ptr + blk // NESTED_BS, mask=mask, other=0.0)
            if PTX_MUL:  # an explicitly rounded multiply, which no compiler fuses with the add
                scale = tl.inline_asm_elementwise(
                    "mul.rn.f32 $0, $1, $2;", "=r,r,r", [c2, nest], dtype=tl.float32, is_pure=True, pack=1
                )
            else:  # (the interpreter, and builds with enable_fp_fusion=False)
                scale = c2 * nest
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        val = tl.load(code_ptr + q) * scale  # 16-entry table: stays in L1
        if BF16:
            # round to nearest even by hand (what torch's cast does for finite values): Triton's
            # interpreter truncates, and the bits must not depend on where the kernel runs.
            # out_ptr is the output viewed as int16.
            u = val.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            tl.store(out_ptr + offs, (u >> 16).to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, dequant4


@functools.cache
def _importable() -> bool:
    # once per process: a failed import searches sys.path again on every attempt, and
    # dequantize_4bit asks on every call of a CUDA 4-bit layer
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    return os.environ.get("LORAFORGE_TRITON", "1") != "0" and _importable()


def usable(packed: torch.Tensor) -> bool:
    """True where :func:`dequantize` runs: a CUDA tensor (or any, under ``TRITON_INTERPRET=1``)
    and Triton importable and not switched off."""
    on_device = packed.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and enabled()


def _kernel_args(state, device) -> tuple:
    """(absmax, code, code2, nested, offset, nested blocksize) as the kernel takes them."""
    code = state.code.to(device=device, dtype=torch.float32)
    if state.nested:
        s2 = state.state2
        code2, nested = s2.code.float().contiguous(), s2.absmax.float().contiguous()
        offset = state.offset.float().reshape(1)
        return (state.absmax.view(torch.uint8), code, code2, nested, offset, s2.blocksize)
    absmax = state.absmax.float().contiguous()
    return (absmax, code, absmax, absmax, absmax, 1)  # placeholders: NESTED=False never reads them


def _launch_args(state, device) -> tuple:
    """:func:`_kernel_args`, kept on the state while its tensors stay the same objects
    (``QuantState.to`` replaces them): the conversions cost more host time per call than a large
    weight's kernel takes on a fast GPU, where an eager 4-bit layer is bound by its host-side
    launch cost."""
    s2 = state.state2
    key = (state.absmax, state.code, state.offset, s2 and s2.absmax, s2 and s2.code)
    hit = state.__dict__.get("_triton_args")
    if hit is not None and all(a is b for a, b in zip(hit[0], key)):
        return hit[1]
    args = _kernel_args(state, device)
    state.__dict__["_triton_args"] = (key, args)
    return args


def dequantize(packed: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """Write ``cast(code[q_i] * absmax_b)`` for every element of ``out`` (flat); see above.

    ``packed``: uint8, ``(n + 1) // 2`` bytes, contiguous; ``state``: the weight's ``QuantState``
    (fp32 scales, or 8-bit ones with ``state2`` and ``offset``), on ``packed``'s device; ``out``:
    contiguous fp32 / bf16 / fp16 with ``n`` elements. Returns ``out``.
    """
    triton, kernel = _kernel(os.environ.get("TRITON_INTERPRET") == "1")
    absmax, code, code2, nested, offset, nested_bs = _launch_args(state, packed.device)
    n = out.numel()
    bf16 = out.dtype == torch.bfloat16
    kernel[((n + _BLOCK - 1) // _BLOCK,)](
        packed, absmax, code, out.view(torch.int16) if bf16 else out, n, code2, nested, offset,
        BS=state.blocksize, NESTED_BS=nested_bs, NESTED=state.nested, BF16=bf16, BLOCK=_BLOCK,
        PTX_MUL=False, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# The triton_op of compiled_op(), once built: compiled graphs read it here. Building it inside a
# compiled region would make Dynamo trace Triton's decorator (a graph break per layer).
_OPS: dict[bool, object] = {}


def prepare_compiled(interpret: bool = False) -> bool:
    """Build :func:`compiled_op` now, outside any compiled region (``fast.compile_layers`` and
    the first eager CUDA dequantization call it); False where Triton cannot be used."""
    if interpret not in _OPS:
        if not (interpret or enabled()) or torch.version.hip is not None:
            return False
        _OPS[interpret] = compiled_op(interpret)
    return True


def compilable(packed: torch.Tensor) -> bool:
    """True where :func:`compiled_call` serves ``torch.compile``: a CUDA tensor, the operator
    built (:func:`prepare_compiled`; not on ROCm: the kernel's one PTX instruction) and Triton
    not switched off. Safe to call while compiling (no Triton code is traced)."""
    return packed.is_cuda and False in _OPS and os.environ.get("LORAFORGE_TRITON", "1") != "0"


def compiled_op(interpret: bool = False):
    """The kernel as a ``torch.library.triton_op`` for compiled graphs (registered once per
    process, by :func:`prepare_compiled`, which keeps it in ``_OPS``): TorchInductor then
    launches it from its own generated code, like its kernels, instead of calling back into
    Python (a custom op's dispatch, ``dequantize_4bit``'s checks and Triton's Python launcher,
    which made a compiled QLoRA step bound by the host rather than the GPU). Inductor builds
    user kernels with fp fusion on, so the one multiply that an add follows is a PTX ``mul.rn``
    (never fused into an FMA) and the bits stay those of the other paths. ``interpret``: for
    tests on CPU under ``TRITON_INTERPRET=1`` (eager calls only).

    Arguments: packed uint8 ``(n + 1) // 2``; absmax (fp32, or uint8 codes when ``nested``);
    code fp32 (16); code2 fp32 (256), nested fp32, offset fp32 (1) when ``nested`` (any tensor
    otherwise: not read); blocksizes; the output's shape and dtype. Returns a new tensor."""
    from torch.library import triton_op, wrap_triton

    triton, kernel = _kernel(interpret)
    name = "loraforge::dequantize_4bit_triton" + ("_interpret" if interpret else "")

    @triton_op(name, mutates_args={})
    def dequantize_4bit_triton(
        packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, code2: torch.Tensor,
        nested_absmax: torch.Tensor, offset: torch.Tensor, blocksize: int, nested_blocksize: int,
        nested: bool, shape: list[int], dtype: torch.dtype,
    ) -> torch.Tensor:  # fmt: skip
        bf16 = dtype == torch.bfloat16
        out = torch.empty(shape, dtype=torch.int16 if bf16 else dtype, device=packed.device)
        n = out.numel()
        wrap_triton(kernel)[(triton.cdiv(n, _BLOCK),)](
            packed, absmax, code, out, n, code2, nested_absmax, offset,
            BS=blocksize, NESTED_BS=nested_blocksize, NESTED=nested, BF16=bf16, BLOCK=_BLOCK,
            PTX_MUL=not interpret,
        )  # fmt: skip
        return out.view(torch.bfloat16) if bf16 else out

    return dequantize_4bit_triton


def compiled_call(packed: torch.Tensor, state, dtype: torch.dtype, interpret: bool = False) -> torch.Tensor:
    """``dequantize_4bit(packed, state, dtype)`` through :func:`compiled_op`, which
    :func:`prepare_compiled` must have built. (Traced while compiling: no cache on the state.)"""
    absmax, code, code2, nested, offset, nested_bs = _kernel_args(state, packed.device)
    return _OPS[interpret](
        packed.reshape(-1).view(torch.uint8), absmax, code, code2, nested, offset, state.blocksize,
        nested_bs, state.nested, list(state.shape), dtype,
    )  # fmt: skip
