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


def test_loraplus_groups_match_peft():
    # LoRA+ puts every trainable tensor in the learning-rate group PEFT's create_loraplus_optimizer
    # does: B (and vectors) at ratio x lr, A at lr, LoRA on embeddings at loraplus_lr_embedding
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from loraforge.optim import loraplus_param_groups
    from tests.conftest import tiny_llama

    targets = ["q_proj", "v_proj", "embed_tokens"]
    ours = lf.inject(tiny_llama(), lf.LoraConfig(r=4, target_modules=targets, bias="lora_only"))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=targets, bias="lora_only"))
    groups = loraplus_param_groups(ours, lr=1e-3, ratio=16.0, weight_decay=0.0, embedding_lr=1e-5)
    opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5
    )
    name_of = {id(p): n for n, p in ours.named_parameters()}
    mine = {name_of[id(p)]: g["lr"] for g in groups for p in g["params"]}
    name_of = {id(p): n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()}
    peft_lrs = {name_of[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert mine == peft_lrs
    assert sorted(set(mine.values())) == [1e-5, 1e-3, 16e-3]  # all three groups present


def test_loraplus_from_the_training_config(tmp_path):
    from loraforge.training import TrainConfig
    from loraforge.training.config import ConfigError

    data = {"data": {"train": "x.jsonl"}, "train": {"loraplus_lr_ratio": 8}}
    assert TrainConfig.from_dict(data).train.loraplus_lr_ratio == 8.0
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio: LoRA\\+ scales LoRA's B factors"):
        TrainConfig.from_dict({**data, "method": "full"})
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio: must be >= 0"):
        TrainConfig.from_dict({**data, "train": {"loraplus_lr_ratio": -1}})
