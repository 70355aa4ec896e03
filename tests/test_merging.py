"""TIES / DARE / magnitude-prune merges (``lf.add_weighted_adapter``, ``loraforge.merging``),
pinned against PEFT 0.21's ``add_weighted_adapter`` under the same ``torch.manual_seed``."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from conftest import assert_unchanged, randomize_lora, snapshot, tiny_gpt2, tiny_llama
from torch import nn

import loraforge as lf
from loraforge import merging

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")

NON_SVD = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD = ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
WEIGHTS = [0.7, -0.4, 0.5]  # (a negative weight: the sign goes on A only)


class ConvNet(nn.Module):
    """A 3×3 conv, a 1×1 conv and a linear head: PEFT's Conv2d flattening in the SVD forms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.point(self.conv(x)).mean(dim=(2, 3)))


def _to_peft(model, base, names):
    tmp = tempfile.mkdtemp()
    for n in names:
        lf.save_adapter(model, f"{tmp}/{n}", adapter=n)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{names[0]}", adapter_name=names[0])
    for n in names[1:]:
        theirs.load_adapter(f"{tmp}/{n}", adapter_name=n)
    return theirs.eval()


def _build(kind: str, ranks=(4, 4, 4), with_peft=True):
    """(ours, theirs, inputs): adapters a, b, c (c on fewer layers) with random factors, the same
    in loraforge and in PEFT (through the files)."""
    if kind == "llama":
        base, targets, inputs = (
            tiny_llama(),
            ["q_proj", "v_proj", "embed_tokens"],
            torch.arange(18).view(2, 9),
        )
    elif kind == "gpt2":  # (Conv1D: fan_in_fan_out, and a tied embedding)
        base, targets, inputs = tiny_gpt2(), ["c_attn", "c_fc", "wte"], torch.arange(18).view(2, 9)
    else:
        base, targets = ConvNet().eval(), ["conv", "point", "head"]
        inputs = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    ours = lf.inject(
        copy.deepcopy(base), lf.LoraConfig(r=ranks[0], alpha=8, target_modules=targets), adapter="a"
    )
    lf.add_adapter(ours, "b", lf.LoraConfig(r=ranks[1], alpha=16, target_modules=targets))
    lf.add_adapter(ours, "c", lf.LoraConfig(r=ranks[2], alpha=4, target_modules=targets[:1]))
    randomize_lora(ours)
    return ours, _to_peft(ours, base, ["a", "b", "c"]) if with_peft else None, inputs


@pytest.fixture(scope="module")
def llama():
    return _build("llama")


@pytest.fixture(scope="module")
def gpt2_ranks():
    return _build("gpt2", ranks=(2, 4, 8))


@pytest.fixture(scope="module")
def conv():
    return _build("conv")


def _out(model, inputs):
    with torch.no_grad():
        y = model(inputs)
    return y.logits if hasattr(y, "logits") else y


def _new_factors(ours, theirs, name):
    """{file key: (ours, PEFT's)} for the adapter ``name``'s tensors."""
    mine = {k: v for k, v in ours.state_dict().items() if f".{name}" in k}
    peft_sd = theirs.state_dict()
    assert mine and all(f"base_model.model.{k}" in peft_sd for k in mine)
    return {k: (v, peft_sd[f"base_model.model.{k}"]) for k, v in mine.items()}


def _delta(model, path, name):
    """s·B·A of adapter ``name`` at ``path`` (PEFT's layer or ours), as (out, in_flat)."""
    layer = model.get_submodule(path)
    if hasattr(layer, "lora_embedding_A") and name in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))


def _both(fixture, name, combination, weights=WEIGHTS, names=("a", "b", "c"), seed=3, **kw):
    """The same merge in loraforge and in PEFT, each right after ``torch.manual_seed(seed)``."""
    ours, theirs, inputs = fixture
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(list(names), list(weights), name, combination_type=combination, **kw)
    torch.manual_seed(seed)
    ours_kw = {("combination" if k == "combination_type" else k): v for k, v in kw.items()}
    if "svd_full_matrices" not in ours_kw and combination.endswith("svd"):
        ours_kw["svd_full_matrices"] = False  # (our default; PEFT's is True: the same factors)
    lf.add_weighted_adapter(ours, list(names), list(weights), name, combination=combination, **ours_kw)
    lf.set_adapter(ours, name)
    theirs.set_adapter(name)
    return _out(ours, inputs), _out(theirs, inputs)


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, float(b.detach().abs().max())))


# -- pinned against PEFT ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "combination, density", [("linear", None), *((c, d) for c in NON_SVD for d in (0.3, 0.8))]
)
def test_factor_merges_match_peft(llama, combination, density):
    kw = {} if density is None else {"density": density}
    name = f"{combination}_{density}".replace(".", "")
    y, ref = _both(llama, name, combination, **kw)
    factors = _new_factors(llama[0], llama[1], name)
    for mine, theirs in factors.values():
        _close(mine, theirs)
    assert all(mine.any() for mine, _ in factors.values())
    _close(y, ref, 1e-5)


@pytest.mark.parametrize("combination", ["ties", "dare_ties", "ties_svd", "dare_ties_svd"])
def test_majority_sign_frequency_matches_peft(llama, combination):
    name = f"{combination}_freq"
    y, ref = _both(llama, name, combination, density=0.6, majority_sign_method="frequency")
    for _, (mine, theirs) in _new_factors(llama[0], llama[1], name).items():
        _close(mine, theirs, 1e-5)
    _close(y, ref, 1e-5)
    # the vote and the total elect different signs somewhere: the two merges differ
    torch.manual_seed(3)
    lf.add_weighted_adapter(llama[0], ["a", "b", "c"], WEIGHTS, name + "_total", combination, density=0.6)
    q = llama[0].model.layers[0].self_attn.q_proj
    assert not torch.allclose(q.delta_weight(name), q.delta_weight(name + "_total"))


@pytest.mark.parametrize("combination, density", [("svd", None), *((c, d) for c in SVD for d in (0.4, 0.9))])
def test_svd_merges_of_different_ranks_match_peft(gpt2_ranks, combination, density):
    kw = {} if density is None else {"density": density}
    name = f"{combination}_{density}".replace(".", "")
    y, ref = _both(gpt2_ranks, name, combination, svd_rank=6, **kw)
    ours, theirs, _ = gpt2_ranks
    for path in ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.wte"]:
        _close(_delta(ours, path, name), _delta(theirs, f"base_model.model.{path}", name))
    for _, (mine, peft_t) in _new_factors(ours, theirs, name).items():
        _close(mine, peft_t, 1e-5)  # (PEFT's split B = U·S, A = Vᵀ, signs included)
    _close(y, ref, 1e-5)


@pytest.mark.parametrize("combination", ["cat", "linear", "ties", "dare_ties", "dare_linear_svd", "ties_svd"])
def test_conv_layers_match_peft(conv, combination):
    kw = {} if combination in ("cat", "linear") else {"density": 0.5}
    y, ref = _both(conv, f"{combination}_conv", combination, **kw)
    for _, (mine, theirs) in _new_factors(conv[0], conv[1], f"{combination}_conv").items():
        _close(mine, theirs, 1e-5)
    _close(y, ref, 1e-5)


@pytest.mark.parametrize(
    "kw",
    [dict(svd_clamp=0.9), dict(svd_full_matrices=True), dict(svd_rank=2, svd_clamp=0.5)],
    ids=["clamp", "full", "rank2-clamp"],
)
def test_svd_options_match_peft(gpt2_ranks, kw):
    name = "opts_" + "_".join(f"{k}{v}" for k, v in kw.items()).replace(".", "")
    y, ref = _both(gpt2_ranks, name, "dare_ties_svd", density=0.7, **kw)
    for _, (mine, theirs) in _new_factors(gpt2_ranks[0], gpt2_ranks[1], name).items():
        _close(mine, theirs, 1e-5)
    _close(y, ref, 1e-5)


def test_one_adapter_is_combined_linearly_as_in_peft(llama):
    y, ref = _both(llama, "one_ties", "ties", weights=[0.6], names=("b",), density=0.2)
    for _, (mine, theirs) in _new_factors(llama[0], llama[1], "one_ties").items():
        _close(mine, theirs)
    _close(y, ref, 1e-5)


def test_saved_merge_loads_in_peft_with_equal_outputs(llama, tmp_path):
    ours, _, inputs = llama
    torch.manual_seed(11)
    lf.add_weighted_adapter(ours, ["a", "b", "c"], WEIGHTS, "saved", "dare_ties", density=0.5)
    lf.set_adapter(ours, "saved")
    lf.save_adapter(ours, tmp_path / "saved", adapter="saved")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved").eval()
    _close(_out(ours, inputs), _out(theirs, inputs), 1e-5)


# -- what the densities mean ------------------------------------------------------------------------
def test_full_density_is_plain_arithmetic_and_draws_nothing(llama):
    ours = llama[0]
    v = ours.model.layers[1].self_attn.v_proj
    for combination, plain in [("dare_linear", "linear"), ("magnitude_prune", "linear"),
                               ("dare_linear_svd", "svd"), ("magnitude_prune_svd", "svd")]:  # fmt: skip
        torch.manual_seed(5)
        lf.add_weighted_adapter(ours, ["a", "b", "c"], WEIGHTS, f"{combination}_1", combination, density=1.0)
        after = torch.rand(3)
        torch.manual_seed(5)
        lf.add_weighted_adapter(ours, ["a", "b", "c"], WEIGHTS, f"{combination}_{plain}", plain)
        assert torch.equal(after, torch.rand(3))  # (only the new adapter's init moved the generator)
        _close(v.delta_weight(f"{combination}_1"), v.delta_weight(f"{combination}_{plain}"))


def test_zero_density_gives_a_zero_adapter_not_nan(llama):
    ours = llama[0]
    for combination in ["dare_linear", "dare_ties", "magnitude_prune", "dare_linear_svd"]:
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], f"{combination}_0", combination, density=0.0)
        for _, layer in lf.injection.lora_layers(ours):
            if f"{combination}_0" in layer.r:
                d = layer.delta_weight(f"{combination}_0")
                assert torch.isfinite(d).all() and not d.any()


def test_magnitude_prune_keeps_the_largest_entries():
    t = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert torch.equal(merging.magnitude_prune(t, 0.5), torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]))
    assert torch.equal(merging.magnitude_prune(t, 0.34), torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 0.0]]))
    assert not merging.magnitude_prune(t, 0.1).any()  # ⌊0.6⌋ = 0 entries kept


def test_dare_keeps_the_expectation():
    t = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    draws = torch.stack([merging.dare_prune(t, 0.25) for _ in range(400)])
    kept = draws != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.equal(draws[kept], (t.expand_as(draws) / 0.25)[kept])  # survivors rescaled by 1/d
    # E[drop(τ)] = τ: over 400 draws each entry's mean is off by |τ|·√(3/400) ≈ 0.09·|τ| (one sd)
    assert (draws.mean(0) - t).abs().mean() < 0.1 * t.abs().mean()
    assert (draws.mean(0) * 0.25 - t).abs().mean() > 0.5 * t.abs().mean()  # (without the 1/d: far)


def test_sign_election_and_disjoint_mean_by_hand():
    # entry 0: total 3-1-1 = 1 > 0 elects +, the vote (1 for, 2 against) elects -;
    # entry 1: all zero: + elected, nobody agrees, the mean divides by max(1, 0)
    tasks = [torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([-1.0, 0.0])]
    stacked = torch.stack(tasks)
    assert merging.majority_sign(stacked, "total").tolist() == [[True, False], [False, False], [False, False]]
    assert merging.majority_sign(stacked, "frequency").tolist() == [
        [False, False],
        [True, False],
        [True, False],
    ]
    w = [1.0, 2.0, 4.0]
    assert merging.merge_tasks(tasks, w, "ties", density=1.0).tolist() == [3.0, 0.0]
    assert merging.merge_tasks(tasks, w, "ties", 1.0, "frequency").tolist() == [(-2.0 - 4.0) / 2, 0.0]
    assert merging.merge_tasks(tasks, w, "linear").tolist() == [3.0 - 2.0 - 4.0, 0.0]


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "combination, kw, match",
    [
        ("ties", {}, r"combination='ties' needs density.*in \[0, 1\]; it is missing"),
        ("dare_linear_svd", {"density": 1.5}, r"combination='dare_linear_svd' needs density.*got 1.5"),
        ("magnitude_prune", {"density": -0.1}, r"needs density.*got -0.1"),
        ("dare_ties", {"density": "0.5"}, r"needs density.*got '0.5'"),
        ("ties", {"density": float("nan")}, r"needs density.*got nan"),
        ("linear", {"density": 0.5}, r"density applies to ties.*not to combination='linear'"),
        ("ties_sv", {"density": 0.5}, r"combination must be one of \[.*'dare_ties_svd'.*\], got 'ties_sv'"),
        ("ties", {"density": 0.5, "majority_sign_method": "sum"}, r"'total' or 'frequency', got 'sum'"),
        ("svd", {"svd_clamp": 2}, r"svd_clamp must be a quantile in \[0, 1\], got 2"),
        ("svd", {"svd_driver": "lapack"}, r"svd_driver must be one of \[None, 'gesvd'.*got 'lapack'"),
        ("svd", {"svd_rank": 0}, r"svd_rank must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_refused_clearly_and_change_nothing(combination, kw, match):
    ours, _, _ = _build("llama", with_peft=False)
    snap = snapshot(ours)
    with pytest.raises(ValueError, match=match):
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", combination, **kw)
    assert_unchanged(ours, snap)
    assert "mix" not in lf.list_adapters(ours)


@pytest.mark.parametrize("combination", ["linear", *NON_SVD])
def test_different_ranks_are_refused_where_factors_are_stacked(gpt2_ranks, combination):
    ours = gpt2_ranks[0]
    snap = snapshot(ours)
    kw = {} if combination == "linear" else {"density": 0.5}
    with pytest.raises(
        ValueError, match=rf"'{combination}' needs adapters of equal rank, got \{{'a': 2, 'b': 4"
    ):
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "bad", combination, **kw)
    assert_unchanged(ours, snap)


def test_rank_pattern_that_differs_in_one_layer_is_refused():
    base = tiny_llama()
    ours = lf.inject(base, lf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter="a")
    cfg = lf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    lf.add_adapter(ours, "b", cfg)
    snap = snapshot(ours)
    with pytest.raises(
        ValueError, match=r"needs equal ranks in every layer; at 'model.layers.0.self_attn.v_proj'"
    ):
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "bad", "ties", density=0.5)
    assert_unchanged(ours, snap)
    lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "fine", "ties_svd", density=0.5)  # (any ranks)


def test_svd_driver_on_cpu_is_ignored_with_a_warning(llama):
    ours = llama[0]
    with pytest.warns(UserWarning, match="svd_driver='gesvdj' applies to CUDA tensors only; ignored on cpu"):
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "driver", "svd", svd_driver="gesvdj")
    lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "no_driver", "svd")
    for _, layer in lf.injection.lora_layers(ours):
        if "driver" in layer.r:
            assert torch.equal(layer.delta_weight("driver"), layer.delta_weight("no_driver"))


def test_embedding_init_draws_as_peft_does():
    """DARE's seeded draws follow PEFT's only if creating the merged adapter moves the global
    generator as PEFT's does: an embedding adapter draws A and B ~ N(0, 1) on creation there."""
    base = tiny_llama()
    torch.manual_seed(4)
    ours = lf.inject(copy.deepcopy(base), lf.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    after_ours = torch.rand(4)
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    assert torch.equal(after_ours, torch.rand(4))
    for key, (mine, peft_t) in _new_factors(ours, theirs, "default").items():
        assert torch.equal(mine, peft_t), key


def test_ia3_adapters_refuse_the_pruning_merges():
    cfg = lf.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    m = lf.inject(tiny_llama(), cfg, adapter="one")
    lf.add_adapter(m, "two", cfg)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"\['one', 'two'\] combine linearly only.*got combination='ties'"):
        lf.add_weighted_adapter(m, ["one", "two"], [0.5, 0.5], "mix", "ties", density=0.5)
    assert_unchanged(m, snap)


def test_a_failure_while_combining_leaves_no_half_made_adapter(monkeypatch):
    ours, _, _ = _build("llama", with_peft=False)
    snap = snapshot(ours)
    real, calls = merging.combine_layer, []

    def fail_on_third(layer, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(merging, "combine_layer", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        lf.add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", "ties_svd", density=0.5)
    assert lf.list_adapters(ours) == ["a", "b", "c"]
    assert_unchanged(ours, snap)
