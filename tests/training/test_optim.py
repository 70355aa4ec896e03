"""Optimizers by name."""

from __future__ import annotations

import pytest
import torch

import loraforge as lf
from loraforge.optim import OPTIMIZERS


def params():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(torch.zeros(64))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    return [w, b, frozen]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps(name):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    w, b, frozen = params()
    opt = lf.build_optimizer(name, [w, b, frozen], lr=1e-2, weight_decay=0.1)
    before = w.detach().clone()
    for _ in range(2):
        loss = ((w.sum(1) + b) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(w, before)
    groups = opt.param_groups
    assert [len(g["params"]) for g in groups] == [1, 1]  # frozen dropped; bias not decayed
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        lf.build_optimizer("sgd", params(), lr=1e-3)
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lf.build_optimizer("adamw", [frozen], lr=1e-3)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        lf.build_optimizer("adamw_8bit", params(), lr=1e-3)
