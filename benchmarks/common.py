"""What every benchmark shares: the workload, the models, how time and memory are measured.

Time. The machines this runs on are small and shared, so absolute timings drift by tens of per
cent from minute to minute. Every comparison therefore runs its contenders *interleaved* in one
process: after ``warmup`` rounds, each round runs every contender once (the order rotating from
round to round) and each call is timed on its own; we report the median over ``reps`` rounds.
Whatever load the machine carries at a moment hits all contenders alike, so the ratio is far
steadier than the absolute figures. On CUDA each call is bracketed by ``torch.cuda.synchronize``.

Memory. Peak memory of a training step is measured in a fresh process per contender (see
``run_isolated``): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak
resident set (``VmHWM`` in ``/proc/self/status``) minus its resident set once the libraries are
imported, i.e. model + gradients + activations + temporaries, as ``max_memory_allocated`` counts
them on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import datetime
import math
import multiprocessing
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*kernels.*")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

import torch  # noqa: E402

IGNORE = -100  # label value that the loss skips (as in transformers and loraforge.training.data)


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """The model, batch and adapter that every benchmark uses (issue 6's reference by default).

    ``pretrained``: a model path or ``builtin:`` name (``loraforge.pretrained``) whose real weights
    replace the random ones; the shape fields then describe that model (``layers`` below its own
    count keeps only the first ``layers`` decoder layers, as ``--quick`` asks)."""

    name: str = "reference"
    vocab: int = 32000
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 8
    heads: int = 8
    kv_heads: int = 0  # 0: as many as ``heads`` (no grouped-query attention)
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: int = 32
    dtype: torch.dtype = torch.float32
    warmup: int = 1
    reps: int = 5
    quick: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    pretrained: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        kv = f" ({self.kv_heads} key/value)" if self.kv_heads else ""
        weights = f" ({self.pretrained}, real weights)" if self.pretrained else ""
        text = (
            f"{self.name}{weights}: Llama vocab {self.vocab}, hidden {self.hidden}, intermediate "
            f"{self.intermediate}, {self.layers} layers, {self.heads} heads{kv}, {dt}; "
            f"batch {self.batch} x {self.seq} tokens; "
            f"LoRA r={self.r} alpha={self.alpha} dropout 0 all-linear; "
            f"median of {self.reps} interleaved reps after {self.warmup} warm-up; "
            f"{self.threads or torch.get_num_threads()} torch threads"
        )
        if self.quick:
            text += "  [--quick: SMALLER than the reference workload; figures not comparable to it]"
        return text


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def workload(quick: bool = False, size: str = "ref", threads: int = 0, dtype: str = "") -> Workload:
    """``ref``: issue 6's reference (fp32). ``1b``: a TinyLlama-1.1B shape in bf16 for a GPU.
    ``smollm2``: the real SmolLM2-135M-Instruct (fp32; 30 thin layers, vocabulary 49,152), batch
    4 x 128 tokens, which a 2-core CPU runs in about 10 minutes for the main groups.
    ``--quick`` keeps the widths but uses 2 layers and a 2 x 64 batch. ``dtype`` (``fp32``,
    ``bf16``, ``fp16``) overrides the size's own."""
    if size == "1b":
        wl = Workload(
            name="1b",
            hidden=2048,
            intermediate=5632,
            layers=22,
            heads=32,
            batch=4,
            seq=1024,
            dtype=torch.bfloat16,
            warmup=2,
            reps=10,
        )
    elif size == "ref":
        wl = Workload(reps=7)
    elif size == "smollm2":
        wl = Workload(
            name="smollm2",
            pretrained="builtin:smollm2-135m-instruct",
            vocab=49152,
            hidden=576,
            intermediate=1536,
            layers=30,
            heads=9,
            kv_heads=3,
            batch=4,
            seq=128,
            reps=5,
        )
    elif size == "tiny":  # the smoke test's shape: seconds, not minutes
        wl = Workload(
            name="tiny",
            vocab=512,
            hidden=64,
            intermediate=128,
            layers=1,
            heads=4,
            batch=2,
            seq=32,
            r=4,
            alpha=8,
            reps=2,
        )
    else:
        raise ValueError(f"unknown size {size!r}; use ref, 1b, smollm2 or tiny")
    if quick and size != "tiny":
        wl = dataclasses.replace(wl, name=wl.name + "-quick", layers=2, batch=2, seq=64, reps=5, quick=True)
    if dtype:
        wl = dataclasses.replace(wl, dtype=DTYPES[dtype])  # (describe() names the dtype)
    return dataclasses.replace(wl, threads=threads)


def apply_threads(wl: Workload) -> None:
    if wl.threads:
        torch.set_num_threads(wl.threads)


def machine(device: str) -> str:
    """CPU model and core count (and the GPU's name on CUDA), for the table and BENCHMARKS.md."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores"
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name()} ({text})"
    return text


def today() -> str:
    return datetime.date.today().isoformat()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One line of the table: loraforge's figure, the peer's, and ``ratio = loraforge / peer``.

    ``unit`` says what the figures are (``s``, ``ms``, ``tok/s``, ``MB``, ``GB/s``); ``target``
    is issue 6's bound on the ratio, as ``(">=", 2.0)`` or ``("<=", 1.2)``, or None. Targets are
    judged on the median ratio; ``best_ratio`` (fastest sample against fastest sample) is shown
    beside it because load from other processes only ever adds time: where the two disagree
    much, the machine was too busy for the median to be trusted.
    """

    group: str
    name: str
    ours: float
    peer: float
    unit: str
    peer_name: str
    target: tuple[str, float] | None = None
    note: str = ""
    best_ratio: float | None = None  # the same ratio from each side's fastest sample (timed rows)

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else math.nan

    @property
    def met(self) -> bool | None:
        if self.target is None or math.isnan(self.ratio):
            return None
        op, bound = self.target
        return self.ratio >= bound if op == ">=" else self.ratio <= bound

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ratio=self.ratio, met=self.met)
        return d


class PartialFailure(Exception):
    """Raised by a benchmark group that measured some rows (``rows``) and failed on others."""

    def __init__(self, rows: list[Row], message: str):
        super().__init__(message)
        self.rows = rows


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "tok/s" or value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timings(dict):
    """``{name: median seconds}``, with every sample kept in ``.samples`` to show the spread."""

    def __init__(self, samples: dict[str, list[float]]):
        super().__init__({n: statistics.median(t) for n, t in samples.items()})
        self.samples = samples

    def best_ratio(self, ours: str, peer: str, throughput: bool = False) -> float:
        """Fastest sample of ``ours`` over fastest of ``peer`` (inverted for throughput rows)."""
        a, b = min(self.samples[ours]), min(self.samples[peer])
        return b / a if throughput else a / b

    def spread(self, *names: str, scale: float = 1.0, unit: str = "s") -> str:
        """``"name min-max unit"`` for each name: how much the samples behind a median vary."""
        return ", ".join(
            f"{n} {min(self.samples[n]) * scale:.3g}-{max(self.samples[n]) * scale:.3g} {unit}" for n in names
        )


def interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, reps: int, device: str, inner: int = 1
) -> Timings:
    """Median seconds per call of each function, timed interleaved (see the module docstring).

    ``inner`` > 1 times that many back-to-back calls per sample and divides: for GPU kernels of
    tens of microseconds, where one synchronisation per call would be a large part of the time."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            sync(device)
            times[n].append((time.perf_counter() - t0) / inner)
    return Timings(times)


# --------------------------------------------------------------------------------------------
# Models, data, steps
# --------------------------------------------------------------------------------------------
def llama(wl: Workload, device: str, seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with random weights in the workload's shape and dtype, eval mode
    (no dropout anywhere; LoRA dropout is 0 too), SDPA attention; or, for a ``pretrained``
    workload, that model's real weights (:func:`pretrained_model`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if wl.pretrained:
        return pretrained_model(wl, device)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=wl.vocab,
        hidden_size=wl.hidden,
        intermediate_size=wl.intermediate,
        num_hidden_layers=wl.layers,
        num_attention_heads=wl.heads,
        num_key_value_heads=wl.heads,
        max_position_embeddings=max(2048, wl.seq),
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(wl.dtype).eval()


def pretrained_model(wl: Workload, device: str) -> torch.nn.Module:
    """``wl.pretrained`` loaded by transformers from loraforge's converted directory, in ``wl.dtype``,
    eval mode, cut to its first ``wl.layers`` decoder layers where that is fewer than its own.

    Every parameter is copied out of the file mapping: transformers leaves the safetensors weights
    memory-mapped, and the mapping stays resident (and counted in RSS) for as long as any tensor of
    the file lives, e.g. the embeddings after the linear layers were quantized; a model built in
    memory is what the random-weight workloads measure."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.pretrained import resolve

    path = resolve(wl.pretrained)
    config = AutoConfig.from_pretrained(path)
    if wl.layers < config.num_hidden_layers:
        config.num_hidden_layers = wl.layers
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=wl.dtype)
    with torch.no_grad():
        for p in model.parameters():  # (tied weights are one parameter: copied once, still tied)
            p.data = p.data.to(device, copy=True)
    return model.to(device).eval()


def lf_config(wl: Workload):
    import loraforge as lf

    return lf.LoraConfig(r=wl.r, alpha=wl.alpha, dropout=0.0, target_modules="all-linear")


def peft_config(wl: Workload):
    import peft

    return peft.LoraConfig(r=wl.r, lora_alpha=wl.alpha, lora_dropout=0.0, target_modules="all-linear")


def tokens(wl: Workload, device: str, batch: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, wl.vocab, (batch or wl.batch, wl.seq), generator=g).to(device)


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """loraforge's labels for next-token prediction: ``labels[t] = ids[t+1]``, last = IGNORE.

    transformers shifts internally (``labels=ids``), so both score the same tokens."""
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return labels


def randomize_lora_b(model: torch.nn.Module, seed: int = 2, std: float = 0.02) -> None:
    """Give every ``lora_B`` (zero at init) random values so that the adapter changes the output
    and the loss check below compares something. Works on loraforge and PEFT models alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def copy_lora(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy adapter factors from a loraforge model into a PEFT model (``base_model.model.`` +
    the same module path); returns how many tensors were copied."""
    ours = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    theirs = dict(dst.state_dict())
    n = 0
    with torch.no_grad():
        for k, v in ours.items():
            theirs["base_model.model." + k].copy_(v)
            n += 1
    return n


def step_loraforge(
    model: torch.nn.Module, ids: torch.Tensor, fast: bool = True, compile: bool | str = False
) -> Callable[[], float]:
    """One loraforge training step: ``CausalLMLoss`` (chunked linear + cross-entropy, no full
    logits) divided by the number of target tokens, then backward. Gradients are dropped
    (set to None) before each step; no optimizer update is timed (it is the same few hundred
    thousand adapter parameters for every contender). ``fast``: the model first gets the
    training loop's exact fast MLP / RMSNorm forwards (``loraforge.training.fast``, on by
    default there as ``train.fast_kernels``). ``compile``: as ``train.compile`` (``"auto"``: the
    training loop's default, which compiles the decoder layers on CUDA only, and then leaves the
    MLP / RMSNorm forwards to TorchInductor, as the loop does)."""
    from loraforge.training import fast as fast_kernels
    from loraforge.training.loss import CausalLMLoss

    if fast_kernels.should_compile(compile, ids.device)[0]:
        fast_kernels.compile_layers(model)  # (without the fast forwards, as the training loop)
    elif fast:
        fast_kernels.patch_model(model)
    loss_fn = CausalLMLoss(model)
    labels = shifted_labels(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for p in params:
            p.grad = None
        total, n = loss_fn(ids, labels, positions)
        loss = total / n
        loss.backward()
        return float(loss.detach())

    return step


def step_peft(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    """One PEFT training step as its users write it: ``model(input_ids, labels=ids).loss.backward()``."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for p in params:
            p.grad = None
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss.detach())

    return step


def frozen_floor(model: torch.nn.Module) -> torch.nn.Module:
    """The floor a LoRA step cannot beat: the base model with every parameter frozen and the
    input embeddings' *output* made to require grad, so that backward still runs through every
    layer (activation gradients, no weight gradients). It is timed with the same loss and the
    same fast MLP / RMSNorm forwards as loraforge's step (``step_loraforge``), so the two differ
    only by the LoRA work."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    return model


def lora_grads(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        k.removeprefix(prefix): p.grad.detach().clone()
        for k, p in model.named_parameters()
        if "lora_" in k and p.grad is not None
    }


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``|a - b| / max|b|`` over matching tensors (the key sets must agree)."""
    if set(a) != set(b) or not a:
        raise AssertionError(f"gradient sets differ: {len(a)} vs {len(b)} tensors")
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def check_grads(
    ours: dict[str, torch.Tensor],
    peer: dict[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
    reference: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Raise unless two implementations' adapter gradients agree; returns a note saying how well.

    fp32: ``max_rel_diff`` within 1e-3. bf16 / fp16: two exact implementations round differently
    and a deep model amplifies that (5e-2 apart in relative norm after 22 bf16 layers), so each is
    compared with ``reference()`` (the same step in fp32, the gradients of the fp32 adapter): ours
    must be no further from it than twice the peer's distance (plus 1e-3)."""
    if dtype == torch.float32 or reference is None:
        diff = grad_diff(ours, peer, dtype)
        if diff > tol(dtype, 1e-3):
            raise AssertionError(f"{what}: adapter gradients differ by {diff:.2e} (relative)")
        return f"adapter grads differ by {diff:.1e}"
    ref = reference()
    err_ours, err_peer = grad_diff(ours, ref, dtype), grad_diff(peer, ref, dtype)
    note = f"adapter grads' error vs an fp32 step: {err_ours:.1e} (peer {err_peer:.1e})"
    if err_ours > 2 * err_peer + 1e-3:
        raise AssertionError(f"{what}: {note}")
    return note


def fp32_grads(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], dict[str, torch.Tensor]]:
    """``check_grads``' reference: a function running one plain loraforge step of ``model`` (an
    fp32 copy, made before the compared models were compiled or patched) and returning its
    adapter gradients; it drops the copy once run."""
    held = [model]

    def run() -> dict[str, torch.Tensor]:
        m = held.pop()
        step_loraforge(m, ids, fast=False)()
        return lora_grads(m)

    return run


def grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """How far two sets of adapter gradients are apart, for a check against ``tol(dtype, 1e-3)``:
    in fp32 :func:`max_rel_diff`; in bf16 / fp16 the relative norm of all of them together, since
    a low-precision step has a few elements far off in some tensor whatever the implementation."""
    if dtype == torch.float32:
        return max_rel_diff(a, b)
    if set(a) != set(b) or not a:
        raise AssertionError(f"gradient sets differ: {len(a)} vs {len(b)} tensors")
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    den = sum(float(b[k].float().pow(2).sum()) for k in a)
    return (num / max(den, 1e-30)) ** 0.5


# How far two exact implementations of the same step may drift apart only by rounding, as a
# relative error: fp32 keeps 24 mantissa bits, bf16 8 and fp16 11, and a step is thousands of
# roundings deep, so a bf16 check can only tell "same work" from "different work" (errors of
# order 1) at a few per cent.
_LOW_PRECISION_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tol(dtype: torch.dtype, fp32: float) -> float:
    """A check's tolerance in ``dtype``: ``fp32`` as given for float32, looser for bf16 / fp16."""
    return max(fp32, _LOW_PRECISION_TOL.get(dtype, fp32))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms, computed in fp32)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def close(a: torch.Tensor, b: torch.Tensor, fp32_tol: float) -> bool:
    """``a`` equals ``b`` up to rounding: elementwise ``allclose`` (atol = rtol = ``fp32_tol``) in
    fp32; in bf16 / fp16, whose elementwise errors are large near zero, the relative error norm
    ``|a - b| / |b|`` within ``tol(dtype, fp32_tol)``."""
    if a.dtype == torch.float32:
        return torch.allclose(a, b, atol=fp32_tol, rtol=fp32_tol)
    return rel_err(a, b) <= tol(a.dtype, fp32_tol)


def check_same_loss(ours: float, peer: float, what: str, tol: float = 1e-4) -> None:
    """The contenders must compute the same thing before we compare their speed."""
    if not abs(ours - peer) <= tol * max(1.0, abs(peer)):
        raise AssertionError(f"{what}: loraforge loss {ours:.6f} != peer loss {peer:.6f} (tol {tol})")


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS and make large blocks come from mmap, so that the
    resident set tracks live tensors (glibc otherwise keeps freed memory resident)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so it no longer grows on free
        libc.malloc_trim(0)


_PRELOAD = ["torch", "transformers", "peft", "loraforge", "benchmarks.common"]


def run_isolated(fn: Callable, *args):
    """Run ``fn(*args)`` in a fresh process and return its result.

    Processes come from a ``forkserver`` that has only imported the libraries (never built a
    model or run an op), so each child starts clean, without paying the ~10-20 s import again;
    where CUDA is available they are spawned (see below).
    """
    if torch.cuda.is_available():
        # a forkserver that imported the libraries may have initialised CUDA already (bitsandbytes
        # does on import), and CUDA cannot be used in a process forked after that
        ctx = multiprocessing.get_context("spawn")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)
