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
    "method, section, trained",
    [
        ("prefix", {"num_virtual_tokens": 4}, "prompt_encoder."),
        (
            "prompt",
            {"num_virtual_tokens": 4, "init": "text", "init_text": "Answer the question."},
            "prompt_encoder.",
        ),
        ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, "prompt_encoder."),
        ("ia3", {}, ".ia3_l."),
        ("bottleneck", {"placement": "houlsby", "reduction_factor": 8}, "_adapters.adapter_"),
        ("dora", None, ".lora_"),
    ],
)
def test_every_method_trains_saves_and_resumes(tmp_path, method, section, trained):
    # from the training config alone: the eval loss falls, only the method's parameters train,
    # the adapter is written, and a run stopped half way resumes to the same end bit for bit
    sections = {method: section} if section is not None else {}
    run = {"save_every": 3, "schedule": "constant"}
    cfg = tiny_config(
        tmp_path / "a", method=method, **sections, data={"eval": QA_EVAL}, train={"max_steps": 6, **run}
    )
    model, metrics = lf.train(cfg)
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(trained in n for n in names), names
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    again = tiny_config(tmp_path / "b", method=method, **sections, train={"max_steps": 3, **run})
    lf.train(again)
    resumed = tiny_config(tmp_path / "b", method=method, **sections, train={"max_steps": 6, **run})
    lf.train({**resumed, "resume": "auto"})
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method in ("prefix", "prompt", "p_tuning"):
        assert list(a) == ["prompt_embeddings"]  # PEFT's file, after the reparameterisation


def test_prompt_methods_refuse_packing(tmp_path):
    from loraforge.training.config import ConfigError

    with pytest.raises(
        ConfigError, match="data.packing: method prefix: virtual tokens go before each sequence"
    ):
        lf.TrainConfig.from_dict(tiny_config(tmp_path, method="prefix", data={"packing": True}))
