"""IA3 and bottleneck adapters on SmolLM2-135M-Instruct, a real pretrained model (skipped where
the model's packages are missing: tests/conftest.py, smollm2_dir). Loaded once; a few tokens."""

from __future__ import annotations

import copy

import pytest
import torch

import loraforge as lf

peft = pytest.importorskip("peft", reason="the peft package pins the reference numbers")


@pytest.fixture(scope="module")
def base(smollm2_dir):
    return lf.load_model("builtin:smollm2-135m-instruct")


@pytest.fixture
def x():
    return torch.randint(0, 49152, (2, 8), generator=torch.Generator().manual_seed(3))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_ia3_files_both_ways_with_peft(base, x, tmp_path):
    ours = lf.inject(copy.deepcopy(base), lf.IA3Config(init_ia3_weights=False))  # PEFT's llama defaults
    expected = _logits(ours, x)
    assert (expected - _logits(base, x)).abs().max() > 1e-2
    lf.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, x), expected, rtol=0, atol=1e-4)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lf.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, x), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_bottleneck_starts_at_the_base_trains_and_round_trips(base, x, tmp_path, placement):
    m = lf.inject(copy.deepcopy(base), lf.BottleneckConfig(placement=placement, reduction_factor=32))
    torch.testing.assert_close(_logits(m, x), _logits(base, x), rtol=0, atol=0)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    first = m(x, labels=x).loss
    first.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    opt.step()
    opt.zero_grad()
    assert m(x, labels=x).loss < first
    m.eval()
    lf.save_adapter(m, tmp_path)
    loaded = lf.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded, x), _logits(m, x), rtol=0, atol=0)
