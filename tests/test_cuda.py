"""GPU tests: each device path of loraforge against a CPU reference computed in the same test.

On a machine with CUDA: ``python -m pytest tests/test_cuda.py``. To check the tests' own logic
without a GPU: ``LORAFORGE_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py`` (the "device" is
then the CPU, and the comparisons with bitsandbytes' CUDA kernels skip). Without CUDA and without
that variable every test skips. TF32 is off, so fp32 results on the device must match the CPU's to
a relative error norm ‖a−b‖/‖b‖ below 1e-5 (bf16: 2e-2); 4-bit quantization must give its bits.
"""

from __future__ import annotations

import copy
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, randomize_lora
from quant.util import tiny_llama  # hidden 64, vocab 128, 2 layers
from safetensors.torch import load_file
from torch import nn
from training.util import QA_EVAL, losses, tiny_config

import loraforge as lf
from loraforge.injection import lora_layers
from loraforge.layers import linear as lora_linear
from loraforge.quant import Linear4bit, QuantConfig, QuantState, dequantize_4bit, quantize_4bit
from loraforge.training import fast, train
from loraforge.training.builtin import build_model
from loraforge.training.data import IGNORE
from loraforge.training.loss import CausalLMLoss

DEVICE = os.environ.get("LORAFORGE_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason="no CUDA device (LORAFORGE_TEST_DEVICE=cpu runs these tests on the CPU)",
)
QC32 = QuantConfig(compute_dtype=torch.float32)
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls and convolutions in full precision on the GPU (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = before


def assert_close(got, ref, tol: float = 1e-5, what: str = "") -> None:
    """Same shape, and relative error norm ‖got − ref‖ / ‖ref‖ (float64, on the CPU) below ``tol``."""
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, what
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.2e} (limit {tol:.0e})"


def assert_bits(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Bit-identical (-0.0 is not 0.0), whatever the devices."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    if got.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
        got, ref = got.view(as_int), ref.view(as_int)
    assert torch.equal(got, ref), f"{what}: {int((got != ref).sum())} of {got.numel()} values differ"


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


@pytest.fixture
def ids():
    return torch.randint(0, 128, (4, 11), generator=torch.Generator().manual_seed(7))


def lora_llama(cfg: lf.LoraConfig | None = None, base=None, std: float = 0.2) -> nn.Module:
    """The tiny Llama with LoRA (default: r 4 on every linear) and random factors."""
    cfg = cfg or lf.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    model = lf.inject(tiny_llama() if base is None else base, cfg)
    randomize_lora(model, std=std)
    return model


# -- (1) the LoRA layers ---------------------------------------------------------------------------
class Net(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D, each with LoRA."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 64)
        self.lin = nn.Linear(64, 96)
        self.c1d = Conv1D(48, 96)  # weight stored (in=96, out=48)

    def forward(self, ids, x):
        return self.c1d(self.lin(self.emb(ids) + x))


def lora_net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = lf.inject(Net().to(dtype), lf.LoraConfig(r=4, alpha=8, target_modules=["emb", "lin", "c1d"]))
    randomize_lora(net)  # the same fp32 factors whatever the base's dtype
    return net


def forward_backward(fn, x, w):
    """``fn(x)`` and the gradient of ``sum(fn(x) * w)`` with respect to ``x``."""
    x = x.clone().requires_grad_()
    y = fn(x)
    (y.float() * w).sum().backward()
    return y.detach(), x.grad


def run_net(net, device, dtype=torch.float32):
    """Output, input gradient and LoRA gradients of ``sum(net(ids, x) * w)``."""
    g = torch.Generator().manual_seed(3)
    ids, x = torch.randint(0, 100, (3, 7), generator=g), torch.randn(3, 7, 64, generator=g)
    w = torch.randn(3, 7, 48, generator=g)
    y, dx = forward_backward(lambda t: net(ids.to(device), t), x.to(device, dtype), w.to(device))
    return y, dx, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [True, False])
def test_lora_layers_forward_backward_equal_cpu(fused, monkeypatch):
    monkeypatch.setattr(lora_linear, "FUSED", fused)  # the fused autograd function, or plain autograd
    cpu = lora_net()
    dev = copy.deepcopy(cpu).to(DEVICE)
    y0, dx0, g0 = run_net(cpu, "cpu")
    y1, dx1, g1 = run_net(dev, DEVICE)
    assert on_device(y1) and on_device(dx1)
    assert_close(y1, y0, what="output")
    assert_close(dx1, dx0, what="input grad")
    assert len(g0) == 6 and g0.keys() == g1.keys()
    for k in g0:
        assert on_device(g1[k]), k
        assert_close(g1[k], g0[k], what=k)


def test_lora_layers_bf16_base_close_to_fp32_cpu():
    y0, dx0, g0 = run_net(lora_net(), "cpu")
    dev = lora_net(torch.bfloat16).to(DEVICE)
    assert dev.lin.base_layer.weight.dtype == torch.bfloat16
    assert dev.lin.lora_A["default"].weight.dtype == torch.float32  # LoRA stays fp32 on a bf16 base
    y1, dx1, g1 = run_net(dev, DEVICE, torch.bfloat16)
    assert y1.dtype == dx1.dtype == torch.bfloat16
    assert_close(y1, y0, 2e-2, "bf16 output")
    assert_close(dx1, dx0, 3e-2, "bf16 input grad")
    for k in g0:
        assert g1[k].dtype == torch.float32 and torch.isfinite(g1[k]).all(), k
        assert_close(g1[k], g0[k], 3e-2, k)


# -- (2) a tiny Llama: PEFT's numbers, merge / unmerge ---------------------------------------------
def test_llama_equals_peft_and_merge_unmerge_on_device(ids):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    cpu = lora_llama(base=copy.deepcopy(base))
    dev = copy.deepcopy(cpu).to(DEVICE)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = {n: p for n, p in dev.named_parameters() if "lora_" in n}
    lora = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert lora.keys() == ours.keys()
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(ours[n])
    theirs = theirs.to(DEVICE).eval()
    out = logits(dev, ids.to(DEVICE))
    assert on_device(out)
    assert_close(out, logits(cpu, ids), what="device vs CPU")
    assert_close(out, logits(theirs, ids.to(DEVICE)), what="ours vs PEFT")

    wrapped = [m for _, m in lora_layers(dev)]
    w0 = [m.base_layer.weight.detach().clone() for m in wrapped]
    lf.merge(dev)
    lf.merge(cpu)
    assert lf.merged_adapters(dev) == ["default"]
    for m, m_cpu in zip(wrapped, (m for _, m in lora_layers(cpu))):
        assert_close(m.base_layer.weight, m_cpu.base_layer.weight, 1e-6, "merged weight")
    assert_close(logits(dev, ids.to(DEVICE)), out, what="merged vs unmerged")
    lf.unmerge(dev)
    drift = max((m.base_layer.weight - w).abs().max().item() for m, w in zip(wrapped, w0))
    assert drift <= 1e-6, drift
    assert_close(logits(dev, ids.to(DEVICE)), out, what="after unmerge")


# -- (3) adapter files written from the device -----------------------------------------------------
def test_save_on_device_load_on_cpu_and_on_device(tmp_path, ids):
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    dev = lora_llama(cfg, base=tiny_llama().to(DEVICE))
    assert all(on_device(p) for p in dev.parameters())
    out = logits(dev, ids.to(DEVICE))
    lf.save_adapter(dev, tmp_path / "a")

    cpu = lf.load_adapter(tiny_llama(), tmp_path / "a")
    assert_close(logits(cpu, ids), out, what="loaded on the CPU")
    dev2 = lf.load_adapter(tiny_llama().to(DEVICE), tmp_path / "a")
    saved = {n: p for n, p in dev.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in dev2.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys() and len(saved) == 14  # 2 x (q, v, down) x (A, B) + embedding
    for n, p in loaded.items():
        assert on_device(p), n
        assert_bits(p, saved[n], n)
    assert_close(logits(dev2, ids.to(DEVICE)), out, 1e-6, "loaded on the device")


# -- (4) several adapters, one per batch row -------------------------------------------------------
def three_adapters(base) -> nn.Module:
    m = lf.inject(base, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter="pirate")
    lf.add_adapter(m, "formal", lf.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    lf.add_adapter(m, "poet", lf.LoraConfig(r=8, alpha=8, target_modules=["k_proj", "embed_tokens"]))
    randomize_lora(m)
    return m


def test_mixed_adapter_batch_equals_one_at_a_time(ids):
    cpu = three_adapters(tiny_llama())
    dev = copy.deepcopy(cpu).to(DEVICE)
    names = ["pirate", "__base__", "formal", "poet"]
    with lf.adapter_batch(dev, names):
        mixed = logits(dev, ids.to(DEVICE))
    with lf.adapter_batch(cpu, names):
        assert_close(mixed, logits(cpu, ids), what="mixed batch vs CPU")
    for i, name in enumerate(names):
        row = ids[i : i + 1].to(DEVICE)
        if name == "__base__":
            with lf.disable_adapters(dev):
                alone = logits(dev, row)
        else:
            lf.set_adapter(dev, name)
            alone = logits(dev, row)
        assert_close(mixed[i : i + 1], alone, what=f"row {i} ({name})")


# -- (5) NF4 / FP4 quantization: the device's bits are the CPU's -----------------------------------
def check_quantized(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    """Quantize ``w`` (on the CPU) on the CPU and on the device: packed bytes, scales and every
    dequantization (fp32 / bf16 / fp16, fresh and into ``out=``) must be bit-identical."""
    where = f"{tuple(w.shape)} {w.dtype} {quant_type} bs={blocksize} dq={double_quant}"
    pc, sc = quantize_4bit(w, quant_type, blocksize, double_quant)
    pd, sd = quantize_4bit(w.to(DEVICE), quant_type, blocksize, double_quant)
    assert on_device(pd) and on_device(sd.absmax) and on_device(sd.code), where
    assert pd.shape == ((w.numel() + 1) // 2, 1) and sd.shape == w.shape and sd.dtype == w.dtype
    assert_bits(pd, pc, f"packed {where}")
    assert_bits(sd.code, sc.code, f"code {where}")
    if not double_quant:
        assert_bits(sd.absmax, sc.absmax, f"absmax {where}")
    else:
        # offset = mean(absmax) is a reduction: its last bit may depend on the device's summation
        # order (bitsandbytes' CUDA path computes it the same way). Given the device's offset, the
        # 8-bit scale codes and the nested scales must be the CPU's exactly.
        fp32_scales = quantize_4bit(w, quant_type, blocksize, False)[1].absmax
        offset = sd.offset.detach().cpu()
        assert abs(offset.item() - sc.offset.item()) <= 1e-5 * abs(sc.offset.item()), where
        codes, nested = lf.quant.quantize_blockwise_8bit(fp32_scales - offset)
        assert_bits(sd.absmax, codes, f"8-bit absmax {where}")
        assert_bits(sd.state2.absmax, nested, f"nested absmax {where}")
        assert_bits(sd.state2.code, sc.state2.code, f"dynamic map {where}")
    s_cpu = copy.deepcopy(sd).to("cpu")  # the device's state, dequantized on the CPU for reference
    for dtype in (torch.float32, *HALF):
        ref = dequantize_4bit(pd.cpu(), s_cpu, dtype)
        got = dequantize_4bit(pd, sd, dtype)
        assert on_device(got) and got.dtype == dtype and got.shape == w.shape, where
        assert_bits(got, ref, f"dequantize to {dtype}, {where}")
        out = torch.full(w.shape, math.nan, dtype=dtype, device=DEVICE)
        assert dequantize_4bit(pd, sd, dtype, out=out).data_ptr() == out.data_ptr(), where
        assert_bits(out, ref, f"dequantize into out= {dtype}, {where}")
    assert dequantize_4bit(pd, sd).dtype == w.dtype  # default: the weight's dtype


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_bit_identical_to_cpu(quant_type, blocksize, double_quant):
    g = torch.Generator().manual_seed(blocksize + double_quant)
    # whole blocks; blocks spanning rows; an odd count with a partial last block; one element
    for shape in [(64, 96), (40, 96), (33, 17), (1,)]:
        # rows of very different scale, so that the absmax values (and their 8-bit codes) vary
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
        for dtype in (torch.float32, *HALF):
            check_quantized(w.to(dtype), quant_type, blocksize, double_quant)


def test_quantize_more_elements_than_one_device_chunk():
    from loraforge.quant import nf4

    n = getattr(nf4, "_GPU_CHUNK", 1 << 24) + 3 * 64 + 5  # several chunks on the device, odd tail
    check_quantized(torch.randn(n, generator=torch.Generator().manual_seed(0)), "nf4", 64, True)


# -- (6) Linear4bit and QLoRA ----------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_forward_backward(quant_type):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)  # 96 is not a multiple of 64: blocks span rows
    qc = QuantConfig(quant_type=quant_type, compute_dtype=torch.float32)
    q_cpu = Linear4bit.from_linear(copy.deepcopy(lin), qc)
    q_dev = Linear4bit.from_linear(copy.deepcopy(lin).to(DEVICE), qc)  # quantized on the device
    moved = copy.deepcopy(q_cpu).to(DEVICE)  # quantized on the CPU, then moved
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 5, 96, generator=g), torch.randn(4, 5, 40, generator=g)
    y0, dx0 = forward_backward(lambda t: F.linear(t, q_cpu.dequantize(), q_cpu.bias.detach()), x, w)
    xd, wd = x.to(DEVICE), w.to(DEVICE)
    for q in (q_dev, moved):
        assert on_device(q.weight) and on_device(q.quant_state.absmax) and on_device(q.bias)
        assert_bits(q.weight, q_cpu.weight, "packed weight")
        y, dx = forward_backward(q, xd, wd)
        yr, dxr = forward_backward(lambda t, q=q: F.linear(t, q.dequantize(), q.bias.detach()), xd, wd)
        assert_close(y, yr, what="vs F.linear on the device")
        assert_close(dx, dxr, what="input grad vs F.linear on the device")
        assert_close(y, y0, what="vs the CPU")
        assert_close(dx, dx0, what="input grad vs the CPU")
        assert q.weight.grad is None
    bf16 = QuantConfig(quant_type, compute_dtype=torch.bfloat16)
    y, dx = forward_backward(Linear4bit.from_linear(copy.deepcopy(lin).to(DEVICE), bf16), xd, wd)
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, y0, 2e-2, "bf16 compute")
    assert_close(dx, dx0, 2e-2, "bf16 compute, input grad")


def qlora_llama(device, dtype=torch.float32) -> nn.Module:
    """The tiny Llama in ``dtype``, quantized on ``device`` with that compute dtype (lm_head kept),
    LoRA (fp32) on every linear."""
    model = lf.quantize(tiny_llama().to(device, dtype), QuantConfig(compute_dtype=dtype))
    return lora_llama(lf.LoraConfig(r=8, alpha=16, target_modules="all-linear"), base=model, std=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_on_device_matches_cpu_and_trains(dtype):
    bf16 = dtype == torch.bfloat16
    dev, cpu = qlora_llama(DEVICE, dtype), qlora_llama("cpu", dtype)
    packed = {n: m.weight.detach().clone() for n, m in dev.named_modules() if isinstance(m, Linear4bit)}
    assert len(packed) == 14
    for n, m in cpu.named_modules():
        if isinstance(m, Linear4bit):
            assert_bits(packed[n], m.weight, n)  # quantized on the device as on the CPU
    ref = qlora_llama("cpu") if bf16 else cpu  # the numbers' reference: fp32 on the CPU
    ids = ((torch.arange(16) * 7 + 3) % 128).repeat(4, 1)
    ref.train(), dev.train()
    loss0 = ref(input_ids=ids, labels=ids).loss
    loss0.backward()
    opt = torch.optim.AdamW([p for p in dev.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        opt.zero_grad()
        loss = dev(input_ids=ids.to(DEVICE), labels=ids.to(DEVICE)).loss
        loss.backward()
        if step == 0:  # the first loss and gradients are the CPU's (bf16: the whole model is bf16)
            assert_close(loss, loss0, 2e-2 if bf16 else 1e-5, "loss")
            grads = {n: p.grad for n, p in dev.named_parameters() if p.grad is not None}
            assert grads and all("lora_A" in n or "lora_B" in n for n in grads)
            for n, p in ref.named_parameters():
                if p.grad is not None:
                    assert on_device(grads[n]) and torch.isfinite(grads[n]).all(), n
                    assert_close(grads[n], p.grad, 0.15 if bf16 else 1e-4, n)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0], losses
    for n, m in dev.named_modules():
        if isinstance(m, Linear4bit):
            assert torch.equal(m.weight, packed[n]) and m.weight.grad is None
    out = logits(dev.eval(), ids.to(DEVICE))
    plain = lf.merge_and_unload(dev, dequantize=True)  # nn.Linear = dequant(W) + s·B·A, on the device
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    assert_close(logits(plain, ids.to(DEVICE)), out, 2e-2 if bf16 else 1e-5, "merged and unloaded")


# -- (7) the exact fast kernels of the training loop -----------------------------------------------
def fast_step(model, device):
    """Summed token loss and every gradient of one CausalLMLoss forward + backward."""
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(7))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    positions = torch.arange(9).expand_as(ids)
    for p in model.parameters():
        p.grad = None
    total, _ = CausalLMLoss(model)(ids.to(device), labels.to(device), positions.to(device))
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_step(ref, got, tol: float) -> None:
    (loss0, grads0), (loss1, grads1) = ref, got
    assert_close(loss1, loss0, tol, "loss")
    assert len(grads0) == 28 and grads0.keys() == grads1.keys()  # 14 layers x (A, B)
    for k in grads0:
        assert_close(grads1[k], grads0[k], tol, k)


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_fast_kernels_equal_plain_path(qlora):
    def build(device):
        base = tiny_llama().to(device)
        return lora_llama(base=lf.quantize(base, QC32) if qlora else base).train()

    cpu, dev = build("cpu"), build(DEVICE)
    ref, plain = fast_step(cpu, "cpu"), fast_step(dev, DEVICE)
    assert fast.patch_model(dev) == 7  # 2 x (MLP, 2 RMSNorms) + the final norm
    patched = fast_step(dev, DEVICE)
    assert fast.unpatch_model(dev) == 7
    assert all(on_device(g) for g in patched[1].values())
    assert_same_step(plain, patched, 1e-5)  # the fast forwards equal the plain path on the device
    assert_same_step(ref, patched, 1e-4)  # ... and the CPU's


@pytest.mark.parametrize(
    "patched",
    [
        False,
        pytest.param(True, marks=pytest.mark.xfail(
            ON_CUDA, reason="TorchInductor's CUDA backend gave wrong gradients (~1x off for gate_proj's "
            "LoRA) for the fast SwiGLU backward (2026-11-23, torch 2.11): the loop never combines them",
            strict=False,
        )),
    ],
    ids=["as_the_loop_runs_it", "with_fast_forwards"],
)  # fmt: skip
def test_compiled_layers_equal_eager_on_device(patched):
    """``train.compile`` (auto on CUDA): every decoder layer torch.compile'd, without the fast
    forwards, as the training loop runs it: the same loss and gradients as eager."""
    dev = lora_llama(base=tiny_llama().to(DEVICE)).train()
    eager = fast_step(dev, DEVICE)
    if patched:
        fast.patch_model(dev)
    assert_same_step(eager, compiled_step(dev), 1e-4)


def compiled_step(model):
    """``fast_step`` with the decoder layers compiled (the second step, after the one that
    compiles); the model is left uncompiled and unpatched again."""
    fast.compile_layers(model)
    try:
        fast_step(model, DEVICE)  # compiles
        return fast_step(model, DEVICE)
    except Exception as e:  # on CPU without a C++ toolchain TorchInductor cannot build kernels
        if ON_CUDA:
            raise
        pytest.skip(f"TorchInductor cannot compile here: {type(e).__name__}")
    finally:
        fast.uncompile_layers(model)
        fast.unpatch_model(model)


def test_compiled_qlora_layers_equal_eager_on_device():
    """``train.compile`` on a 4-bit base: on CUDA each layer's dequantization is the Triton
    kernel launched by TorchInductor (``_triton.compiled_op``), elsewhere one opaque operator;
    the same loss and gradients as eager either way."""
    import torch._dynamo

    dev = lora_llama(base=lf.quantize(tiny_llama().to(DEVICE), QC32)).train()
    eager = fast_step(dev, DEVICE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compiled_step(dev)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}  # one graph per layer
    assert_same_step(eager, compiled, 1e-4)


# -- (8) the training loop -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_on_device_writes_an_adapter_that_loads_on_cpu(tmp_path, method):
    """``lf.train`` on the device with its defaults (8 steps: too short for ``train.compile: auto``
    to compile; ``test_compiled_layers_equal_eager_on_device`` covers that); then the adapter on a
    CPU base; then a resume."""
    pytest.importorskip("datasets")  # the loop reads JSONL through it (a dependency of loraforge)
    out = tmp_path / "run"
    run = {"device": DEVICE, "max_steps": 8, "batch_size": 8, "save_every": 4, "keep_checkpoints": 3}
    cfg = tiny_config(out, method=method, data={"eval": QA_EVAL}, train=run)
    model, m = train(cfg)
    assert all(on_device(p) for p in model.parameters())
    assert m["steps"] == 8 and all(math.isfinite(v) for v in m["train_loss"])
    assert m["final_eval_loss"] < m["initial_eval_loss"], m
    assert (method == "qlora") == any(isinstance(x, Linear4bit) for x in model.modules())

    base = build_model("builtin:tiny-llama")
    if method == "qlora":  # the run's quantization: NF4, blocksize 64, double quant, lm_head kept
        base = lf.quantize(base, QC32)
    lf.load_adapter(base, out / "adapter")
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    assert_close(logits(base, ids), logits(model.eval(), ids.to(DEVICE)), what="adapter on the CPU")

    if method == "lora":  # resume from the step-4 checkpoint: steps 5-8 again, to the same losses
        again = tmp_path / "resumed"
        shutil.copytree(out, again)
        shutil.rmtree(again / "checkpoints" / "step-000008")
        _, m2 = train({**cfg, "output": str(again), "resume": "auto"})
        assert m2["steps"] == 8
        assert losses(again) == pytest.approx(losses(out), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_of_one_process_equals_the_plain_loop_on_device(tmp_path, method):
    """train.distributed=fsdp on one device (a process group of one: NCCL on CUDA, gloo on the
    CPU) trains as the plain loop: the same losses and adapter (issue 19's one-device check)."""
    pytest.importorskip("datasets")
    run = {"device": DEVICE, "max_steps": 4, "batch_size": 8}
    train(tiny_config(tmp_path / "plain", method=method, data={"eval": QA_EVAL}, train=run))
    cfg = tiny_config(tmp_path / "fsdp", method=method, data={"eval": QA_EVAL}, train=run)
    cfg["train"]["distributed"] = "fsdp"
    train(cfg)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("plain", "fsdp"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert_close(b[key], a[key], what=key)


# -- (9) bitsandbytes' CUDA kernels ----------------------------------------------------------------
@pytest.fixture
def bnb_cuda():
    """bitsandbytes with a working CUDA backend, or skip."""
    if not ON_CUDA:
        pytest.skip("compares with bitsandbytes' CUDA kernels")
    bnb = pytest.importorskip("bitsandbytes")
    try:
        bnb.functional.quantize_4bit(torch.ones(64, device=DEVICE), blocksize=64, quant_type="nf4")
    except Exception as e:  # no CUDA library for this CUDA version, no kernel registered, ...
        pytest.skip(f"bitsandbytes has no working CUDA backend here: {type(e).__name__}: {e}")
    return bnb


def code_values(packed: torch.Tensor, n: int, quant_type: str) -> torch.Tensor:
    """The code value of each of the ``n`` nibbles (high nibble first), without the scales."""
    flat = packed.reshape(-1).long()
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]
    return lf.quant.get_code(quant_type, packed.device)[nibbles]


def assert_within_ulp(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Same dtype and shape, and ``|a - b|`` within one unit in the last place of that dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    eps = torch.finfo(a.dtype).eps
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    assert (diff <= eps * torch.maximum(a.abs(), b.abs())).all(), f"{what}: max diff {diff.max().item():.3g}"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_cuda_interop(bnb_cuda, quant_type, double_quant):
    bnbf = bnb_cuda.functional
    g = torch.Generator().manual_seed(5)
    for shape, dtype in [((64, 96), torch.float32), ((257, 130), torch.float32), ((128, 96), torch.bfloat16)]:
        w = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(DEVICE, dtype)
        where = f"{shape} {dtype} {quant_type} dq={double_quant}"
        pb, sb = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        po, so = quantize_4bit(w, quant_type, 64, double_quant)
        # bnb's CUDA kernel rounds its own way (and puts tiny FP4 values on the other zero):
        # the code values agree but for a few, and never by more than one step
        cb, co = code_values(pb, w.numel(), quant_type), code_values(po, w.numel(), quant_type)
        assert (cb == co).float().mean().item() >= 0.999, where
        assert (cb - co).abs().max().item() <= 0.34, where  # the widest gap between two codes
        theirs = sb.absmax
        if double_quant:
            theirs = bnbf.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset
            # 8-bit codes of the scales: at most one step (< 0.015) of the dynamic map apart
            assert (so.dequantize_absmax() - theirs).abs().max() <= 0.015 * so.state2.absmax.max(), where
        else:
            assert_close(so.absmax, theirs, 1e-6, where)
        # each side's dequantization of the other's packed bytes and state (through the state
        # dict, both ways) gives what the other's gives: code * absmax, within one ulp
        state = QuantState.from_tensors(sb.as_dict(packed=True))
        ours, ref = dequantize_4bit(pb, state), bnbf.dequantize_4bit(pb, sb)
        assert on_device(ours) and ours.dtype == dtype, where
        assert_within_ulp(ours, ref, f"ours on bnb's: {where}")
        theirs = bnbf.dequantize_4bit(po, bnbf.QuantState.from_dict(so.as_tensors(), device=po.device))
        assert_within_ulp(theirs, dequantize_4bit(po, so), f"bnb on ours: {where}")
