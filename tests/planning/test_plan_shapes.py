"""The shipped public shapes (planning/shapes/*.json): their parameter counts are the published
ones, and accelerate's estimate-memory (its own code, run offline) counts the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loraforge.planning.shape import meta_model, model_config_of, shipped_shapes

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` sits next to `src`

# total parameters as their model cards / safetensors index files give them
PUBLIC = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
}


def test_every_shipped_shape_has_its_published_parameter_count():
    assert set(shipped_shapes()) == set(PUBLIC)
    for name, want in PUBLIC.items():
        model = meta_model(model_config_of(name))
        assert sum(p.numel() for p in model.parameters()) == want, name


@pytest.mark.parametrize("name", ["llama-7b", "llama-3-70b", "qwen2.5-7b", "smollm2-135m"])
def test_accelerate_estimate_memory_counts_the_same_weights(name):
    """accelerate builds AutoModel (no LM head): its fp32 total is our weights less an untied head,
    plus the rotary embedding's inv_freq buffers (2 x head_dim/2 values), which it counts too."""
    from benchmarks.plan_peers import accelerate_sizes

    config = model_config_of(name)
    ours = meta_model(config)
    head = ours.get_output_embeddings().weight
    tied = head is ours.get_input_embeddings().weight
    body = sum(p.numel() for p in ours.parameters()) - (0 if tied else head.numel())
    body += sum(b.numel() for b in ours.buffers())
    sizes = accelerate_sizes(config)
    assert sizes["float32"]["total_size"] == 4 * body
    assert sizes["float16"]["total_size"] == 2 * body
