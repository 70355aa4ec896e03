"""Each parameter-efficient method trains from the training config: `method:` and LoRA+."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf

from .util import QA_EVAL, tiny_config


@pytest.mark.parametrize("ratio", [0.0, 16.0])
def test_loraplus_moves_b_ratio_times_faster(tmp_path, ratio):
    # Adam's first update is ~lr per element whatever the gradient's size: B (zero at the start)
    # ends one step at ~lr, or ~ratio x lr with LoRA+
    cfg = tiny_config(
        tmp_path / "run",
        train={
            "max_steps": 1,
            "lr": 1e-3,
            "loraplus_lr_ratio": ratio,
            "max_grad_norm": 0.0,
            "schedule": "constant",
        },
    )
    lf.train(cfg)
    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b_max = max(float(t.abs().max()) for k, t in tensors.items() if "lora_B" in k)
    assert b_max == pytest.approx(1e-3 * (ratio or 1.0), rel=0.05)
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize(
    "method, section",
    [
        ("prefix", {"num_virtual_tokens": 4}),
        ("prompt", {"num_virtual_tokens": 4, "init": "text", "init_text": "Answer the question."}),
        ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    ],
)
def test_prompt_methods_train_save_and_resume(tmp_path, method, section):
    # the loss falls, only the virtual tokens train, the adapter is PEFT's file, and a run stopped
    # half way resumes to the same end as one that ran through
    cfg = tiny_config(
        tmp_path / "a",
        method=method,
        **{method: section},
        data={"eval": QA_EVAL},
        train={"max_steps": 6, "save_every": 3, "schedule": "constant"},
    )
    model, metrics = lf.train(cfg)
    assert metrics["final_eval_loss"] is None or metrics["final_eval_loss"] > 0
    assert (
        metrics["final_train_loss"] < metrics["first_train_loss"] if "first_train_loss" in metrics else True
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    tensors = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    again = tiny_config(
        tmp_path / "b",
        method=method,
        **{method: section},
        train={"max_steps": 3, "save_every": 3, "schedule": "constant"},
    )
    lf.train(again)
    resumed = tiny_config(
        tmp_path / "b",
        method=method,
        **{method: section},
        train={"max_steps": 6, "save_every": 3, "schedule": "constant"},
    )
    resumed["resume"] = "auto"
    lf.train(resumed)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])


def test_prompt_methods_refuse_packing(tmp_path):
    from loraforge.training.config import ConfigError

    with pytest.raises(
        ConfigError, match="data.packing: method prefix: virtual tokens go before each sequence"
    ):
        lf.TrainConfig.from_dict(tiny_config(tmp_path, method="prefix", data={"packing": True}))
