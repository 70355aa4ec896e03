"""Smoke test of ``benchmarks/bench_lowrank.py`` on its tiny pair (a 2-layer random Llama and a random
low-rank + noise update of it): loraforge's and mergekit's extractions run in their own processes, the
benchmark's check finds the same adapter, every command is timed and measured. The figures of a tiny
model mean nothing and are not checked. And the check itself refuses adapters that differ."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder next to `src`, not installed

pytest.importorskip("mergekit", reason="mergekit is the peer")

from benchmarks import bench_lowrank as B  # noqa: E402

SAVED = ["embed_tokens", "input_layernorm", "lm_head", "norm", "post_attention_layernorm"]


def test_lowrank_bench_runs_on_the_tiny_pair(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = B.main(["--size", "tiny", "--reps", "0", "--workdir", str(tmp_path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    # checked first: 2 layers x 7 linear layers, rank 8 on both sides, the modules mergekit keeps whole
    assert result["check"]["layers"] == 14 and result["check"]["ranks"] == [B.RANK]
    assert result["check"]["max_rel_ba"] <= 1e-4 and result["saved"] == SAVED
    assert 1 <= result["energy_ranks"]["min"] <= result["energy_ranks"]["max"] <= 64
    assert set(result["median"]) == {"extract_r8", "mergekit_r8", "extract_e09", "resize", "analyze"}
    for name, m in result["median"].items():
        assert 0 < m["work_s"] < m["process_s"], name
        assert math.isfinite(m["peak_mb"]) and m["peak_mb"] > 0, name
    assert "| extract --rank 8 | peak memory |" in printed and "| analyze --base (no peer) |" in printed
    assert not list(tmp_path.glob("runs-*"))  # the runs' outputs are cleaned up, the pair is kept
    assert (tmp_path / "tiny-base" / "config.json").is_file()


def _adapter(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int) -> Path:
    path.mkdir()
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    tensors["base_model.model.model.norm.weight"] = torch.ones(6)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"r": r, "lora_alpha": r, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": ["norm"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_the_check_refuses_adapters_that_differ(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    ours = _adapter(tmp_path / "ours", {"q": (a, b)}, 2)
    # the same product, factored differently (B·A is what must agree, not the factors)
    same = _adapter(tmp_path / "same", {"q": (2 * a, b / 2)}, 2)
    assert B.compare_adapters(ours, same)["max_rel_ba"] < 1e-12
    off = _adapter(tmp_path / "off", {"q": (a * (1 + 1e-3), b)}, 2)
    with pytest.raises(AssertionError, match="B·A differs"):
        B.compare_adapters(ours, off)
    r3 = _adapter(tmp_path / "r3", {"q": (torch.cat([a, 0 * a[:1]]), torch.cat([b, 0 * b[:, :1]], 1))}, 3)
    with pytest.raises(AssertionError, match="rank 2 .ours. vs 3"):
        B.compare_adapters(ours, r3)
    other = _adapter(tmp_path / "other", {"k": (a, b)}, 2)
    with pytest.raises(AssertionError, match="different tensors"):
        B.compare_adapters(ours, other)
