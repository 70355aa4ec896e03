"""``lf.analyze_adapter`` over the real SmolLM2-135M given as ``builtin:smollm2``: the base is found
through the cache, only the target layers' weights are read, and the amplification factor of an
adapter whose update lies along W's own top directions is below that of a random rank-r update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loraforge as lf
from loraforge.lowrank import spectra

Q = "model.layers.0.self_attn.q_proj"


def test_amplification_over_builtin_smollm2(smollm2_dir, tmp_path):
    with safe_open(str(Path(smollm2_dir) / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"{Q}.weight").double()
    # an update along W's top-4 singular directions: ‖UᵀWV‖ is large, the factor small
    u, s, vh = torch.linalg.svd(w)
    a, b = vh[:4].float().contiguous(), (u[:, :4] * 0.1).float().contiguous()
    cfg = lf.LoraConfig(r=4, alpha=4, target_modules=["q_proj"], layers_to_transform=[0])
    (tmp_path / "a").mkdir()
    save_file({f"base_model.model.{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_B.weight": b},
              str(tmp_path / "a" / "adapter_model.safetensors"))  # fmt: skip
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg.to_peft_dict()))
    amp = lf.analyze_adapter(tmp_path / "a", base="builtin:smollm2")["layers"][Q]["amplification"]
    delta = spectra.delta_of(a, b, 1.0)
    assert amp["factor"] == pytest.approx(spectra.amplification_factor(delta, w), rel=1e-5)
    assert amp["factor"] == pytest.approx(0.2 / float(s[:4].square().sum().sqrt()), rel=1e-4)
    assert amp["factor"] < amp["random"]
