"""The CPU dequantization kernel in ``_dequant.c``: built once per machine, called through ctypes.

PyTorch has no op that looks up 4-bit codes, and the best eager sequence (gather 8-byte code pairs,
multiply by the block scales, cast) is 3-4x slower than a SIMD loop. So on CPU,
:func:`loraforge.quant.dequantize_4bit` calls this small C function when it can be built: the
first call compiles ``_dequant.c`` with the machine's C compiler (``cc -O3 -march=native``, about
a second) into ``$LORAFORGE_CACHE`` (default ``~/.cache/loraforge``), keyed by the source, the
compiler and the CPU's flags, so a cache shared between different machines never runs code built
for another CPU. The result is bit-identical to the PyTorch path (tested); where no compiler is
found or the build fails, that path is used instead. ``LORAFORGE_NATIVE=0`` turns the kernel off.

The C functions are given the length of every buffer and refuse a range that does not fit them
(an error code, turned into ``ValueError`` here), so even a state that bypassed
``QuantState.validate`` cannot make them read or write past a buffer.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_dequant.c")
# Outputs of this size and more whose memory was written before are written with non-temporal
# stores (bypassing the caches): far larger than a core's L2, they would only evict what is there,
# and the store skips reading each destination line first. Smaller ones stay in the cache for the
# matmul next.
STREAM_BYTES = 8 << 20
_OUT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The LF_E_* codes of _dequant.c
_ERRORS = {
    1: "the code table is too short",
    2: "the block size is not a positive even number",
    3: "unknown output type",
    4: "the block range is negative or reversed",
    5: "the range needs more block scales (absmax) than given",
    6: "the range needs more packed bytes than given",
    7: "the range needs a longer output than given",
    8: "the range needs more nested scales (nested_absmax) than given",
}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the ctypes function, or "error": why there is none


def enabled() -> bool:
    return os.environ.get("LORAFORGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir(cache: Path | None) -> Path:
    """``cache``, else ``$LORAFORGE_CACHE``, else ``~/.cache/loraforge``; where that cannot be
    made (read-only home), a directory of this user's own under the temp dir."""
    tried = []
    for path in (cache, os.environ.get("LORAFORGE_CACHE"), Path.home() / ".cache" / "loraforge"):
        if path:
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
                if os.access(path, os.W_OK):
                    return Path(path)
            except OSError:
                pass
            tried.append(str(path))
    path = Path(tempfile.gettempdir()) / f"loraforge-{os.getuid() if hasattr(os, 'getuid') else 'cache'}"
    path.mkdir(mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        raise RuntimeError(f"no writable cache directory (tried {tried}; {path} is another user's)")
    return path


# no FMA contraction: the C loop must round exactly as the PyTorch path does; not every compiler
# knows -march=native
_FLAGS = (("-O3", "-march=native", "-ffp-contract=off"), ("-O3", "-ffp-contract=off"))


def build(cache: Path | None = None, flag_sets=_FLAGS):
    """Compile ``_dequant.c`` (or reuse the cached build) and return its ctypes function."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc, clang) on PATH")
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), _cpu_flags().encode(), repr(flag_sets).encode()])
    )
    cache = _cache_dir(cache)
    lib = cache / f"dequant-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        errors = []
        for flags in flag_sets:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(_SOURCE)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, lib)  # atomic: processes building at once each install a whole file
                break
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
        else:
            raise RuntimeError("; ".join(errors))
    dll = ctypes.CDLL(str(lib))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn = dll.lf_dequantize_4bit  # (pointer, length) per buffer, then b0, b1, bs, out_type, stream
    fn.restype = i32
    fn.argtypes = [ptr, i64] * 4 + [i64] * 3 + [i32] * 2
    fn.absmax = dll.lf_dequantize_absmax  # q, code, nested (pointer, length); offset; out; i0, i1, bs
    fn.absmax.restype = i32
    fn.absmax.argtypes = [ptr, i64] * 3 + [ctypes.c_float, ptr, i64] + [i64] * 3
    return fn


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"{what}: refused by the C kernel: {_ERRORS.get(rc, f'error {rc}')}")


def _flat(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``t`` as a flat contiguous CPU tensor of ``dtype`` (whose data pointer and element count
    describe the whole buffer the C code may touch), else ``ValueError``."""
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"{what}: the C kernel takes a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}"
        )
    return t.view(-1)


def kernel():
    """The ctypes function, or ``None`` (disabled, or it could not be built: see :func:`error`)."""
    if not enabled():
        return None
    if "fn" not in _state and "error" not in _state:
        with _lock:
            if "fn" not in _state and "error" not in _state:
                try:
                    _state["fn"] = build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["error"] = f"{type(e).__name__}: {e}"
    return _state.get("fn")


def error() -> str | None:
    """Why the kernel is not in use, if it was asked for and could not be built."""
    return _state.get("error")  # type: ignore[return-value]


_PAGE = mmap.PAGESIZE  # (mincore wants page-aligned addresses; 16 or 64 KiB on some arm64)


def _libc():
    if "libc" not in _state:
        libc = None
        if os.name == "posix" and os.uname().sysname == "Linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            except (OSError, AttributeError):
                libc = None
        _state["libc"] = libc
    return _state["libc"]


def written_before(out: torch.Tensor) -> bool:
    """Whether the middle page of ``out`` is already in memory (Linux ``mincore``).

    A fresh multi-MB tensor is usually a new mapping whose pages fault in as they are first
    written, each fault bringing its page into the cache, so ordinary stores suit it; memory
    that was written before (the allocator's heap, a reused buffer) is better streamed past the
    cache. Where it cannot be told, ``False``.
    """
    libc = _libc()
    if libc is None:
        return False
    page = (out.data_ptr() + out.numel() * out.element_size() // 2) // _PAGE * _PAGE
    vec = (ctypes.c_ubyte * 1)()
    if libc.mincore(page, _PAGE, vec) != 0:
        return False
    return bool(vec[0] & 1)


def usable(packed: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> bool:
    return (
        packed.device.type == "cpu"
        and out.device.type == "cpu"
        and absmax.device.type == "cpu"
        and packed.dtype == torch.uint8
        and out.dtype in _OUT_TYPES
        and packed.is_contiguous()
        and out.is_contiguous()
        and absmax.dtype == torch.float32
        and absmax.is_contiguous()
        and blocksize % 32 == 0
        and kernel() is not None
    )


def dequantize_blocks(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    b0: int,
    b1: int,
    blocksize: int,
    fn=None,
    stream: bool = False,
) -> None:
    """Writes blocks ``[b0, b1)`` of ``out`` (flat, contiguous) from ``packed`` (flat uint8).

    ``stream``: ``out``'s memory was written before (a reused buffer, heap memory: see
    :func:`written_before`), so an output of ``STREAM_BYTES`` or more goes out with non-temporal
    stores (a fresh mapping is better written normally: each page fault has just brought its page in).

    ctypes releases the GIL for the call, so pieces run in parallel from a thread pool.
    Raises ``ValueError`` where the blocks do not fit the tensors (checked in C, O(1)).
    """
    fn = fn or kernel()
    code = code.to("cpu", torch.float32).contiguous()
    packed, absmax = _flat(packed, torch.uint8, "packed"), _flat(absmax, torch.float32, "absmax")
    if out.dtype not in _OUT_TYPES:
        raise ValueError(f"out: the C kernel writes {list(_OUT_TYPES)}, not {out.dtype}")
    out = _flat(out, out.dtype, "out")
    stream = stream and out.numel() * out.element_size() >= STREAM_BYTES
    rc = fn(
        packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(), code.data_ptr(), code.numel(),
        out.data_ptr(), out.numel(), b0, b1, blocksize, _OUT_TYPES[out.dtype], int(stream),
    )  # fmt: skip
    _check(rc, f"dequantize blocks [{b0}, {b1}) of {blocksize}")


def dequantize_absmax(
    q: torch.Tensor, code: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor, nested_blocksize: int
) -> torch.Tensor | None:
    """``code[q] * nested[i // nested_blocksize] + offset`` (fp32) for CPU tensors, or ``None``
    where the kernel is not available (the caller computes it with PyTorch)."""
    fn = kernel()
    on_cpu = all(t.device.type == "cpu" for t in (q, code, nested, offset))
    if fn is None or not on_cpu or q.dtype != torch.uint8:
        return None
    q = q.contiguous().view(-1)
    code = code.to(torch.float32).contiguous()
    nested = nested.to(torch.float32).contiguous()
    out = torch.empty(q.numel(), dtype=torch.float32)
    rc = fn.absmax(
        q.data_ptr(), q.numel(), code.data_ptr(), code.numel(), nested.data_ptr(), nested.numel(),
        float(offset), out.data_ptr(), out.numel(), 0, q.numel(), nested_blocksize,
    )  # fmt: skip
    _check(rc, f"dequantize {q.numel()} double-quantized scales in nested blocks of {nested_blocksize}")
    return out
