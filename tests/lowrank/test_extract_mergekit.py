"""``extract_lora`` against mergekit's ``mergekit-extract-lora`` on one real (short) full fine-tune.

mergekit keeps ``--max-rank`` directions in every linear layer (no energy criterion), splits the
scale as ours (B = U·√S, A = √S·Vᵀ, alpha = r) and saves embeddings, the LM head and every other
non-linear module (the norms) whole as ``modules_to_save``. Asked for the same rank and the same
saved modules, the two adapters must agree: same layers, same ranks, the same B·A, eval losses
within 1%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.lowrank.extract import eval_loss, extract_lora, main
from tests.conftest import tiny_llama
from tests.lowrank.test_extract import char_tokenizer

pytest.importorskip("mergekit", reason="mergekit is the reference")
MERGEKIT = Path(sys.executable).parent / "mergekit-extract-lora"
TRAIN = ["ahoy matey the sea be wide", "arr the ship sails at dawn", "ye scurvy dog walk the plank"]
EVAL = [{"text": "ahoy the ship be wide"}, {"text": "arr matey walk at dawn"}]
# what mergekit saves whole for a Llama: embeddings, LM head, and the RMSNorms it cannot decompose
SAVED = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]
RANK = 4


def _full_fine_tune(model, tokenizer, steps=30):
    """A real (short) full fine-tune: every parameter moves, ΔW is full rank."""
    batch = tokenizer(TRAIN, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")
    tokenizer = char_tokenizer()
    model = tiny_llama()
    for d in ("base", "tuned"):
        tokenizer.save_pretrained(tmp / d)
    model.save_pretrained(tmp / "base")
    _full_fine_tune(model, tokenizer).save_pretrained(tmp / "tuned")
    return tmp, tokenizer


def _product(tensors, name):
    p = "base_model.model."
    return tensors[f"{p}{name}.lora_B.weight"].double() @ tensors[f"{p}{name}.lora_A.weight"].double()


def test_same_layers_ranks_factors_and_eval_loss_as_mergekit(pair):
    tmp, tokenizer = pair
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [str(MERGEKIT), "--model", str(tmp / "tuned"), "--base-model", str(tmp / "base")]
    run = subprocess.run(
        [*cmd, "--out-path", str(tmp / "mk"), "--max-rank", str(RANK)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ours = extract_lora(tmp / "base", tmp / "tuned", tmp / "ours", rank=RANK, modules_to_save=SAVED)

    mk_cfg = json.loads((tmp / "mk" / "adapter_config.json").read_text())
    assert sorted(mk_cfg["modules_to_save"]) == sorted(SAVED)
    assert mk_cfg["r"] == mk_cfg["lora_alpha"] == RANK and not mk_cfg["rank_pattern"]
    assert {r.rank for r in ours.layers} == {RANK}
    mk, mine = (load_file(tmp / d / "adapter_model.safetensors") for d in ("mk", "ours"))
    assert sorted(mk) == sorted(mine)  # the same LoRA layers and the same saved tensors
    for r in ours.layers:  # float32 SVD (mergekit) against float64 (ours)
        a, b = _product(mk, r.name), _product(mine, r.name)
        assert float((a - b).norm() / b.norm()) < 1e-4, r.name

    losses = {}
    for name in ("mk", "ours"):
        model = lf.load_adapter(lf.load_model(tmp / "base"), tmp / name)
        losses[name] = eval_loss(model, tokenizer, EVAL)
    assert losses["mk"] == pytest.approx(losses["ours"], rel=0.01)
    # and PEFT reads mergekit's adapter as ours does
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "base"), tmp / "mk")
    assert eval_loss(peft_model.base_model.model, tokenizer, EVAL) == pytest.approx(losses["mk"], rel=1e-4)


def test_cli_eval_reports_base_full_and_adapter(pair, capsys):
    tmp, _ = pair
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    args = ["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), "--energy", "0.9"]
    assert main([*args, "--eval", str(tmp / "eval.jsonl"), "--json", str(tmp / "cli")]) == 0
    report = json.loads(capsys.readouterr().out)
    loss = report["eval"]
    # the fine-tune fits its data; the rank-limited adapter without the norms/embeddings is in between
    assert loss["full"] < loss["adapter"] < loss["base"]
    assert len({r["rank"] for r in report["layers"]}) > 1  # the energy asks each layer its own rank
    names = {c["name"] for c in report["other_changes"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
