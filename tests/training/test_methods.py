"""Each parameter-efficient method trains from the training config: `method:` and LoRA+."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf

from .util import tiny_config


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
