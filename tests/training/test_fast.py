"""The fast MLP / RMSNorm forwards (``loraforge.training.fast``) equal the plain path: the loss and
every gradient within 1e-5 (fp32), and they keep fewer bytes for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from torch import nn

import loraforge as lf
from loraforge.training import fast
from loraforge.training.config import ConfigError, TrainConfig
from loraforge.training.data import IGNORE
from loraforge.training.loss import CausalLMLoss

from .util import tiny_config


def batch(rows: int = 3, seq: int = 9, vocab: int = 96):
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(7))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    return ids, labels, torch.arange(seq).expand_as(ids)


def step(model, seed: int | None = None):
    """Summed token loss and every gradient of one forward + backward (CausalLMLoss)."""
    for p in model.parameters():
        p.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    total, _ = CausalLMLoss(model)(*batch())
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_close(ref, got, tol: float = 1e-5) -> None:
    (loss0, grads0), (loss1, grads1) = ref, got
    assert abs(float(loss1 - loss0)) <= tol * max(1.0, abs(float(loss0)))
    assert grads0 and grads0.keys() == grads1.keys()
    for k in grads0:
        rel = (grads1[k] - grads0[k]).abs().max() / grads0[k].abs().max().clamp_min(1e-30)
        assert rel <= tol, f"{k}: relative difference {rel:.2e}"


def check_equal_paths(model, seed: int | None = None, tol: float = 1e-5) -> None:
    """Plain, patched (within tol), unpatched again (bit for bit the plain path)."""
    ref = step(model, seed)
    assert fast.patch_model(model) > 0
    assert_close(ref, step(model, seed), tol)
    fast.unpatch_model(model)
    loss, grads = step(model, seed)
    assert torch.equal(loss, ref[0]) and all(torch.equal(grads[k], ref[1][k]) for k in ref[1])


def lora_model(make=tiny_llama, dropout: float = 0.0, target_modules="all-linear"):
    model = lf.inject(make(), lf.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=target_modules))
    randomize_lora(model)
    return model.train()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_patch_matches_llama_family_modules(make):
    model = lora_model(make)
    assert fast.patch_model(model) == 7
    kinds = fast.patched_modules(model)
    assert sorted(kinds.values()) == ["mlp"] * 2 + ["rmsnorm"] * 5  # 2 layers x (mlp, 2 norms), final norm
    assert kinds["model.layers.1.mlp"] == "mlp" and kinds["model.norm"] == "rmsnorm"
    assert fast.patch_model(model) == 0  # idempotent
    assert fast.unpatch_model(model) == 7 and not fast.is_patched(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert])
def test_other_models_are_left_untouched(make):
    model = make()
    assert fast.patch_model(model) == 0 and not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_lora_loss_and_gradients_equal_plain_path(make):
    check_equal_paths(lora_model(make))


def test_lora_with_dropout_same_seed_equals_plain_path():
    # down_proj's dropout mask cannot be recomputed: its LoRA part takes the wrapper's own path,
    # and the random draws happen in the same order as in the plain forward.
    check_equal_paths(lora_model(dropout=0.1), seed=3)


def test_qlora_equals_plain_path():
    model = lf.quantize(tiny_llama(), lf.QuantConfig(compute_dtype=torch.float32))
    model = lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    assert type(model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    check_equal_paths(model.train())


def test_with_a_merged_adapter_equals_plain_path():
    model = lora_model()
    lf.add_adapter(model, "other", lf.LoraConfig(r=2, alpha=4, target_modules=["down_proj", "q_proj"]))
    randomize_lora(model, seed=5)
    lf.merge(model, "other")  # merged into the base weights; "default" stays live and trains
    assert lf.merged_adapters(model) == ["other"]
    check_equal_paths(model)


def test_untargeted_mlp_and_full_fine_tune_equal_plain_path():
    # LoRA on attention only: the MLP is plain nn.Linear (frozen), gradient flows through it
    check_equal_paths(lora_model(target_modules=["q_proj", "v_proj"]))
    # full fine-tune: every weight trains, norms included (their weight gradient is hand-written)
    model = tiny_llama().train()
    for p in model.parameters():
        p.requires_grad_(True)
    check_equal_paths(model)


def test_mixed_adapter_batch_falls_back_exactly():
    model = lora_model()
    lf.add_adapter(model, "other", lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, seed=9)
    names = ["default", "other", "__base__"]
    with lf.adapter_batch(model, names):
        ref = step(model)
    assert fast.patch_model(model) == 7
    with lf.adapter_batch(model, names):
        got = step(model)
    assert_close(ref, got)


def test_hooks_on_down_proj_still_fire():
    model = lora_model()
    ref = step(model)
    fast.patch_model(model)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    assert_close(ref, step(model))
    assert calls == [(3, 9, 32)]


def test_gradient_checkpointing_with_fast_path_equals_plain_path():
    from loraforge.training.modeling import enable_activation_checkpointing

    model = lora_model()
    enable_activation_checkpointing(model)  # what train.gradient_checkpointing: true does
    check_equal_paths(model)


def rel_norm(got: dict, ref: dict) -> float:
    """‖got − ref‖ / ‖ref‖ over all gradients together."""
    num = sum(float((got[k].float() - ref[k].float()).square().sum()) for k in ref)
    return (num / sum(float(ref[k].float().square().sum()) for k in ref)) ** 0.5


def check_bf16_fast_path(model) -> tuple:
    """bf16 rounds the two paths' different summation orders differently: they must agree to
    2e-2 in relative norm, and the fast one be no further than the plain one (+10%) from the same
    step computed in fp32."""
    exact = step(copy.deepcopy(model).float())
    plain = step(model)
    fast.patch_model(model)
    got = step(model)
    fast.unpatch_model(model)
    assert abs(float(got[0] - plain[0])) <= 2e-2 * abs(float(plain[0]))
    assert rel_norm(got[1], plain[1]) < 2e-2
    assert rel_norm(got[1], exact[1]) <= 1.1 * rel_norm(plain[1], exact[1])
    return got


def test_bfloat16_model_with_fp32_adapters_close_to_plain_path():
    model = lf.inject(
        tiny_llama().to(torch.bfloat16), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    )
    randomize_lora(model)
    assert model.model.layers[0].mlp.down_proj.lora_A["default"].weight.dtype == torch.float32
    check_bf16_fast_path(model.train())


@pytest.mark.parametrize("mode", ["input", "adapter"])
def test_bfloat16_model_fast_path_follows_the_compute_mode(mode):
    """The fused down_proj LoRA computes in the dtype ``lf.set_compute`` chose, like the plain
    layer: with the same kernels in the same order, the forward is bit for bit the plain one."""
    cfg = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    model = lf.inject(tiny_llama().to(torch.bfloat16), cfg)
    randomize_lora(model)
    lf.set_compute(model, mode)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    with torch.enable_grad():
        plain = mlp(x)
        fast.patch_model(model)
        patched = mlp(x)
        fast.unpatch_model(model)
    assert torch.equal(plain, patched)
    got = check_bf16_fast_path(model.train())
    assert all(g.dtype == torch.float32 for g in got[1].values())  # fp32 master factors either way


def test_patched_step_keeps_fewer_bytes_for_backward():
    """Bytes of the tensors autograd keeps for backward (each storage once, parameters not
    counted): the fast MLP drops silu(g) and silu(g)*u, two (tokens x intermediate) tensors per
    layer."""

    def saved_bytes(model) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = CausalLMLoss(model)(*batch())
        total.backward()
        return sum(seen.values())

    model = lora_model()
    plain = saved_bytes(model)
    fast.patch_model(model)
    patched = saved_bytes(model)
    cfg = model.config
    per_tensor = 3 * 9 * cfg.intermediate_size * 4  # tokens x intermediate, fp32
    assert plain - patched >= 2 * cfg.num_hidden_layers * per_tensor, (plain, patched)


def test_inference_uses_the_module_forward():
    model = lora_model()
    ids = batch()[0]
    with torch.no_grad():
        want = model(ids).logits
        with fast.fast_kernels(model):
            assert fast.is_patched(model)
            got = model(ids).logits
    assert torch.equal(got, want) and not fast.is_patched(model)


def test_context_manager_keeps_earlier_patches_and_can_be_disabled():
    model = lora_model()
    fast.patch_model(model)
    with fast.fast_kernels(model):
        pass
    assert len(fast.patched_modules(model)) == 7  # patched before the block: still patched
    fast.unpatch_model(model)
    with fast.fast_kernels(model, enabled=False):
        assert not fast.is_patched(model)


def test_look_alikes_with_another_formula_are_not_patched():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + weight), as Gemma's norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * h.to(x.dtype)

    class ScaledMLP(nn.Module):  # the right parts, another formula
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (
                nn.Linear(8, 16),
                nn.Linear(8, 16),
                nn.Linear(16, 8),
            )
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return 0.5 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class GeluMLP(ScaledMLP):
        def __init__(self):
            super().__init__()
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    model = nn.Sequential(GemmaLikeRMSNorm(), ScaledMLP(), GeluMLP())
    assert fast.patch_model(model) == 0


def test_merged_adapter_that_trains_still_raises():
    model = lora_model()
    lf.merge(model)
    fast.patch_model(model)
    with pytest.raises(RuntimeError, match="merged"):
        step(model)


def test_train_loop_fast_kernels_flag(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "a", lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    assert TrainConfig.from_dict(cfg).train.fast_kernels is True  # on by default
    model, on = lf.train(cfg)
    assert "fast kernels: 7 MLP / RMSNorm modules" in capsys.readouterr().out
    assert not fast.is_patched(model)  # the returned model runs its own forwards again
    off_cfg = tiny_config(tmp_path / "b", lora=cfg["lora"], train={**cfg["train"], "fast_kernels": False})
    _, off = lf.train(off_cfg)
    assert "fast kernels" not in capsys.readouterr().out
    assert on["train_loss"] == pytest.approx(off["train_loss"], abs=1e-5)
    with pytest.raises(ConfigError, match="fast_kernels"):
        TrainConfig.from_dict(cfg, ["train.fast_kernels=sometimes"])


def _inductor_works() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).eq(3).all())
    except Exception:  # no C++ compiler / Python headers: TorchInductor cannot build kernels here
        return False


@pytest.mark.skipif(not _inductor_works(), reason="TorchInductor cannot compile on this machine")
def test_train_loop_compile_flag(tmp_path, capsys):
    """``train.compile``: auto by default, which is off on CPU; true compiles every decoder layer
    for the run (same losses as eager) and the returned model runs eagerly again."""
    cfg = tiny_config(tmp_path / "a", lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    assert TrainConfig.from_dict(cfg).train.compile == "auto"
    _, eager = lf.train(cfg)
    assert "torch.compile" not in capsys.readouterr().out
    compiled_cfg = tiny_config(tmp_path / "b", lora=cfg["lora"], train={**cfg["train"], "compile": True})
    model, compiled = lf.train(compiled_cfg)
    out = capsys.readouterr().out
    layers = model.model.layers
    assert f"torch.compile (train.compile: true): {len(layers)} decoder layers" in out
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-4)
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig.from_dict(cfg, ["train.compile=maybe"])


def test_should_compile_auto_means_cuda_only(monkeypatch):
    """``auto``: CUDA with Triton, and not with activation checkpointing or for short runs (a
    4-bit base compiles like any other: each layer's graph launches the dequantization kernel);
    true and false are obeyed anywhere; anything else is an error."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # as a CUDA build has it
    assert fast.should_compile("auto", "cuda") == (True, "auto: CUDA")
    assert fast.should_compile("auto", torch.device("cuda", 1))[0]
    assert fast.should_compile("auto", "cpu") == (False, "auto: not on CUDA")
    assert not fast.should_compile("auto", "cuda", gradient_checkpointing=True)[0]
    assert fast.should_compile("auto", "cuda", steps=fast.MIN_COMPILE_STEPS)[0]
    assert fast.should_compile("auto", "cuda", steps=80) == (
        False, f"auto: a short run (80 < {fast.MIN_COMPILE_STEPS} forward+backward passes)"
    )
    assert fast.should_compile(True, "cuda", steps=80)[0]
    assert fast.should_compile(True, "cpu") == (True, "train.compile: true")
    assert fast.should_compile(False, "cuda") == (False, "train.compile: false")
    monkeypatch.setitem(sys.modules, "triton", None)  # import fails
    assert fast.should_compile("auto", "cuda") == (False, "auto: Triton is not installed")
    with pytest.raises(ValueError, match="train.compile"):
        fast.should_compile("sometimes", "cuda")


@pytest.mark.skipif(not _inductor_works(), reason="TorchInductor cannot compile on this machine")
def test_compiled_qlora_layers_equal_eager_with_one_graph_each():
    """4-bit layers under torch.compile: their dequantization is one opaque operator, so a
    compiled decoder layer has no graph break, and the step equals the eager one."""
    import torch._dynamo

    from loraforge.quant import QuantConfig, quantize

    model = lf.inject(
        quantize(tiny_llama(), QuantConfig(compute_dtype=torch.float32, skip_modules=["lm_head"])),
        lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    )
    randomize_lora(model)
    model.train()
    ref = step(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast.compile_layers(model)
    try:
        step(model)  # compiles
        got = step(model)
    finally:
        fast.uncompile_layers(model)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert_close(ref, got, tol=1e-5)


def test_compile_layers_finds_the_block_stack():
    model = tiny_llama()
    assert fast.compile_layers(model) == len(model.model.layers)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    fast.uncompile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)

