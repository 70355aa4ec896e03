"""The layers' per-token path (a serving step): each token gets its own adapter's output.

Checked against the plain path: the same tokens run one at a time with that adapter active.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraforge as lf
from loraforge.adapters import set_token_plan
from loraforge.layers import LoraEmbedding, LoraLinear
from loraforge.layers.tokens import MIN_ROWS, TokenPlan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.conv = Conv1D(12, 24)
        self.head = nn.Linear(12, 7)

    def forward(self, ids):
        return self.head(self.conv(self.lin(self.emb(ids))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = Net().eval()
    targets = {"a": (["lin", "emb"], 2), "b": (["lin", "conv"], 6), "c": (["conv"], 3)}
    for i, (name, (modules, r)) in enumerate(targets.items()):
        saved = ["head"] if i == 2 else None
        cfg = lf.LoraConfig(r=r, alpha=r + 1, target_modules=modules, modules_to_save=saved)
        lf.add_adapter(model, name, cfg) if i else lf.inject(model, cfg, adapter=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}" in pname or f"lora_embedding_B.{name}" in pname:
                    p.copy_(torch.randn(p.shape, generator=g))
                if f"modules_to_save.{name}" in pname:
                    p.add_(torch.randn(p.shape, generator=g))
    return model


def _reference(model, ids, names):
    rows = []
    for t, name in enumerate(names):
        if name is None:
            with lf.disable_adapters(model):
                rows.append(model(ids[:, t : t + 1]))
        else:
            lf.set_adapter(model, name)
            rows.append(model(ids[:, t : t + 1]))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("n_decode", [0, 5, MIN_ROWS])
def test_each_token_gets_its_adapter(net, n_decode):
    decode = ["b", None, "a", "c", "b"][:n_decode] + [None] * max(0, n_decode - 5)
    runs = ["a"] * 3 + ["c"] * 11 + [None] * 2 + ["b"] * 9  # a short run (zero-padded), longer ones
    names = decode + runs
    ids = torch.randint(0, 50, (1, len(names)))
    plan = TokenPlan()
    set_token_plan(net, plan)
    plan.set(names, ["a", "b", "c"], n_decode=n_decode)
    with torch.no_grad():
        got = net(ids)
    plan.clear()
    with torch.no_grad():
        want = _reference(net, ids, names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(net.lin, LoraLinear) and isinstance(net.emb, LoraEmbedding)


def test_plan_off_is_the_ordinary_forward(net):
    ids = torch.randint(0, 50, (2, 6))
    lf.set_adapter(net, "b")
    with torch.no_grad():
        before = net(ids)
    plan = TokenPlan()
    set_token_plan(net, plan)  # attached but not set: nothing changes
    with torch.no_grad():
        after = net(ids)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_rows_do_not_depend_on_the_other_tokens(net):
    """Batch invariance: a token's output is the same bits whatever else is in the step."""
    plan = TokenPlan()
    set_token_plan(net, plan)
    ids = torch.randint(0, 50, (1, 40))
    mine = ["b"] * 12
    plan.set(mine + [None] * 0, ["a", "b", "c"], n_decode=0)
    with torch.no_grad():
        alone = net(ids[:, :12])
    plan.set(mine + ["a"] * 20 + ["c"] * 8, ["a", "b", "c"], n_decode=0)
    with torch.no_grad():
        crowd = net(ids)
    assert torch.equal(alone[:, :12], crowd[:, :12])
