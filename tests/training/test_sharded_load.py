"""Issue 19 item 2: under ``train.distributed: fsdp`` the model is loaded layer by layer, each decoder
layer sharded as soon as its tensors are in (``training/sharded_load.py``). In one process (an FSDP
group of one) it must give exactly the model ``prepare_model`` gives: the same adapter values (same
seed, same draws), the same base (4-bit bytes and quantization constants included), the same loss
and gradients. Two processes (slow) gather the same tensors, and each holds about half the model
while loading, measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import loraforge
from loraforge.model_files import save_model
from loraforge.quant import Linear4bit
from loraforge.training import dist as dist_mod
from loraforge.training import fsdp
from loraforge.training.config import ConfigError, TrainConfig
from loraforge.training.loss import CausalLMLoss
from loraforge.training.modeling import load_base_model, prepare_model

from .util import QA_TRAIN, subprocess_env

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (random weights) saved by transformers as safetensors."""
    path = tmp_path_factory.mktemp("tiny-llama-dir")
    tiny_llama(seed=3).save_pretrained(path)
    return path


def make_config(path, method="lora", lora=None, train=None, output="/tmp/unused") -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"path": str(path), "tokenizer": "builtin:tiny-llama"},
            "method": method,
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", **(lora or {})},
            "data": {"train": QA_TRAIN},
            "train": {"distributed": "fsdp", **(train or {})},
            "output": str(output),
        }
    )


@pytest.fixture
def group():
    """An FSDP process group of one (no torchrun), left at the end of the test."""
    info = dist_mod.setup("cpu", "fsdp")
    yield info
    torch.distributed.destroy_process_group()


def load_both(cfg: TrainConfig, info):
    """(single-process model, sharded model, its root loss module), both from seed 1."""
    torch.manual_seed(1)
    single, _ = prepare_model(cfg, CPU)
    torch.manual_seed(1)
    sharded, _ = prepare_model(cfg, CPU, log=lambda *_: None, dist=info)
    layers = fsdp.decoder_layers(sharded)
    assert layers and all(fsdp.is_sharded(layer) for layer in layers)  # sharded while loading
    root = CausalLMLoss(sharded)
    fsdp.shard_model(sharded, root, cfg.train.fsdp, info.mesh, info.device)
    return single, sharded, root


def batch(vocab: int = 96):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.randint(0, vocab, (2, 12), generator=g)
    return ids, labels, torch.arange(12)[None].expand(2, -1)


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: fsdp.full_tensor(p.detach()) for n, p in model.named_parameters()}


def linear4bit_layers(model) -> dict[str, Linear4bit]:
    return {n.replace(".base_layer", ""): m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def assert_same_4bit(single, sharded) -> None:
    """Packed bytes (gathered) and quantization constants equal; the shards stay uint8."""
    mine, theirs = linear4bit_layers(sharded), linear4bit_layers(single)
    assert mine.keys() == theirs.keys() and mine
    for name, layer in mine.items():
        assert fsdp.local_tensor(layer.weight).dtype == torch.uint8, name
        assert torch.equal(fsdp.full_tensor(layer.weight.detach()), theirs[name].weight), name
        qs, ref = layer.quant_state.as_tensors(), theirs[name].quant_state.as_tensors()
        assert qs.keys() == ref.keys()
        assert all(torch.equal(qs[k], ref[k]) for k in ref), name


@pytest.mark.parametrize(
    "method, lora, train",
    [
        ("lora", {}, {}),
        ("qlora", {}, {}),
        ("qlora", {"use_dora": True, "dropout": 0.1, "init": "gaussian"}, {}),
        ("lora", {"lora_bias": True, "use_rslora": True}, {"gradient_checkpointing": True}),
        ("lora", {"init": "pissa"}, {}),
        ("dora", {"init": "olora"}, {}),
        ("full", {}, {}),
    ],
    ids=["lora", "qlora", "qdora-gaussian-dropout", "lora-bias-rslora-checkpointed", "pissa", "dora-olora",
         "full"],  # fmt: skip
)
def test_sharded_load_equals_single_process(llama_dir, group, method, lora, train):
    cfg = make_config(llama_dir, method, lora, train)
    single, sharded, root = load_both(cfg, group)
    ours, ref = full_params(sharded), dict(single.named_parameters())
    assert ours.keys() == ref.keys()
    for name, t in ours.items():
        assert t.device == ref[name].device and torch.equal(t, ref[name].detach()), name
        assert sharded.get_parameter(name).requires_grad == ref[name].requires_grad, name
    if method == "qlora":
        assert_same_4bit(single, sharded)
    assert sharded.config.use_cache is False and sharded.config._name_or_path == single.config._name_or_path

    # the same loss and gradients (dropout draws too: same seed before each forward)
    ids, labels, pos = batch()
    single.train(), sharded.train()
    torch.manual_seed(7)
    loss_single = CausalLMLoss(single)(ids, labels, pos)[0]
    loss_single.backward()
    torch.manual_seed(7)
    loss_sharded = root(ids, labels, pos)[0]
    loss_sharded.backward()
    assert loss_sharded.item() == loss_single.item()
    for name, p in sharded.named_parameters():  # (FSDP's gathered weights may sum in another order)
        if p.requires_grad:
            torch.testing.assert_close(fsdp.full_tensor(p.grad), ref[name].grad, rtol=1e-5, atol=1e-6)


def test_packed_bytes_stay_uint8_under_bf16_mixed_precision(llama_dir, group):
    cfg = make_config(llama_dir, "qlora", train={"fsdp": {"mixed_precision": "bfloat16"}})
    single, sharded, root = load_both(cfg, group)
    ids, labels, pos = batch()
    loss = root(ids, labels, pos)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert_same_4bit(single, sharded)  # after a bf16 forward and backward: the same bytes, uint8
    ref = CausalLMLoss(single)(ids, labels, pos)[0].item()
    assert abs(loss.item() - ref) < 0.02 * abs(ref)  # (bf16 compute)


def test_prequantized_directory_loads_as_stored(llama_dir, group, tmp_path):
    """A bitsandbytes 4-bit directory is installed as stored (no second quantization), sharded."""
    quantized = load_base_model(make_config(llama_dir, "qlora").model, CPU, quantize=True)
    save_model(quantized, tmp_path / "q4")
    cfg = make_config(tmp_path / "q4", "qlora")
    single, sharded, _ = load_both(cfg, group)
    assert_same_4bit(single, sharded)
    assert_same_4bit(quantized, sharded)  # the bytes of the first quantization, not requantized
    ours = full_params(sharded)
    assert all(torch.equal(ours[n], p) for n, p in single.named_parameters() if p.requires_grad)


def test_tied_head_stays_tied(group, tmp_path):
    """A checkpoint that stores the embedding once (tie_word_embeddings): the head is tied to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    single, sharded, root = load_both(make_config(tmp_path, "qlora"), group)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    ids, labels, pos = batch()
    assert root(ids, labels, pos)[0].item() == CausalLMLoss(single)(ids, labels, pos)[0].item()


def test_builtin_model_is_sharded_too(group):
    cfg = make_config("builtin:tiny-llama", "qlora")
    single, sharded, _ = load_both(cfg, group)
    ours = full_params(sharded)
    assert all(torch.equal(ours[n], p.detach()) for n, p in single.named_parameters())
    assert_same_4bit(single, sharded)


def test_missing_weight_is_named(llama_dir, group, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    for method in ("lora", "qlora"):
        with pytest.raises(KeyError, match=r"lacks weights for \['model\.layers\.1\.mlp\.up_proj") as e:
            prepare_model(make_config(broken, method), CPU, dist=group)
        assert isinstance(e.value, ValueError) and str(broken) in str(e.value)


def test_unused_and_misshapen_tensors_are_reported(llama_dir, group, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    for f in llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({**tensors, "model.extra.weight": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors unused: \['model\.extra\.weight'\]"):
        prepare_model(make_config(tmp_path, "lora"), CPU, dist=group)
    tensors["model.layers.0.post_attention_layernorm.weight"] = torch.ones(5)
    save_file(tensors, tmp_path / "model.safetensors")
    bad_shape = r"model\.safetensors: model\.layers\.0\.post_attention_layernorm\.weight: .*shape \(5,\)"
    with pytest.raises(ValueError, match=bad_shape + r", model expects \(32,\)"):
        prepare_model(make_config(tmp_path, "lora"), CPU, dist=group)


@pytest.mark.parametrize(
    "lora, key",
    [({"init": "loftq"}, "lora.init"), ({"modules_to_save": ["lm_head"]}, "lora.modules_to_save"),
     ({"trainable_token_indices": [1, 2]}, "lora.trainable_token_indices")],
)  # fmt: skip
def test_options_that_need_the_base_at_injection_are_refused(llama_dir, group, lora, key):
    with pytest.raises(ConfigError, match=rf"^{key}: .*train.distributed: ddp"):
        prepare_model(make_config(llama_dir, "lora", lora), CPU, dist=group)


# -- two processes (slow) ---------------------------------------------------------------------------

CHILD = r"""
import json, sys, torch, transformers
from pathlib import Path
from loraforge.model_files import _build_skeleton, load_model
from safetensors.torch import save_file
from loraforge.quant import Linear4bit
from loraforge.training import dist as D, fsdp
from loraforge.training.config import TrainConfig
from loraforge.training.loss import CausalLMLoss
from loraforge.training.modeling import check_causal_lm, prepare_model
from loraforge.training.report import peak_host_bytes, reset_peak_host

mode, big, small, out = sys.argv[1:5]

def config(path, method, distributed):
    return TrainConfig.from_dict({
        "model": {"path": path, "tokenizer": "builtin:tiny-llama"}, "method": method,
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": "builtin:quickstart/qa_train.jsonl"},
        "train": {"distributed": distributed}, "output": out + "/unused"})

info = D.setup("cpu", "fsdp") if mode == "sharded" else None
device = info.device if info else torch.device("cpu")
cfg = config(big, "lora", "fsdp" if info else "ddp")
# Imports first (transformers' model code alone is ~150 MB): only the load is measured.
check_causal_lm(big)
_build_skeleton(Path(big))
transformers.AutoModelForCausalLM.from_config
torch.manual_seed(1)
reset = reset_peak_host()
before = peak_host_bytes()
model, _ = prepare_model(cfg, device, log=lambda *_: None, dist=info)
load_peak = peak_host_bytes() - before
if info is not None:
    fsdp.shard_model(model, CausalLMLoss(model), cfg.train.fsdp, info.mesh, info.device)
# transformers' load leaves the weights mapped from the file, resident only once read: read them all
# (as the first forward does) so that both hold what they use
touched = sum(float(fsdp.local_tensor(p.detach()).abs().sum()) for p in model.parameters())
result = {"reset": reset, "load_peak": load_peak, "peak": peak_host_bytes() - before}
result["mine"], result["whole"] = fsdp.local_bytes(model)
if info is None and reset:  # load_model (copies every tensor: no mapping) for comparison
    del model
    reset_peak_host()
    before = peak_host_bytes()
    model = load_model(big)
    touched = sum(float(p.detach().abs().sum()) for p in model.parameters())
    result["load_model_peak"] = peak_host_bytes() - before
if info is not None:  # the small qlora model: gathered adapter, 4-bit bytes and constants, loss
    del model
    cfg = config(small, "qlora", "fsdp")
    torch.manual_seed(1)
    model, _ = prepare_model(cfg, info.device, log=lambda *_: None, dist=info)
    root = CausalLMLoss(model)
    fsdp.shard_model(model, root, cfg.train.fsdp, info.mesh, info.device)
    tensors = {}
    for name, p in model.named_parameters():
        full = fsdp.full_tensor(p.detach())
        assert fsdp.local_tensor(p).dtype == full.dtype, name  # uint8 shards for uint8 bytes
        tensors[name] = full.contiguous()
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            for k, v in m.quant_state.as_tensors().items():
                tensors[f"{name}.weight.{k}"] = v.contiguous()
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 96, (2, 12), generator=g), torch.randint(0, 96, (2, 12), generator=g)
    result["loss"] = root(ids, labels, torch.arange(12)[None].expand(2, -1))[0].item()
    if info.rank == 0:
        save_file(tensors, out + "/gathered.safetensors")
    # bf16 mixed precision: after a forward and backward every rank's shards of the 4-bit bytes are
    # still uint8, and gathered they are the same bytes
    cfg = config(small, "qlora", "fsdp")
    cfg.train.fsdp.mixed_precision = "bfloat16"
    torch.manual_seed(1)
    model, _ = prepare_model(cfg, info.device, log=lambda *_: None, dist=info)
    root = CausalLMLoss(model)
    fsdp.shard_model(model, root, cfg.train.fsdp, info.mesh, info.device)
    root(ids, labels, torch.arange(12)[None].expand(2, -1))[0].backward()
    packed = {n + ".weight": m.weight for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    result["bf16_uint8"] = all(fsdp.local_tensor(w).dtype == torch.uint8 for w in packed.values())
    same = [torch.equal(fsdp.full_tensor(w.detach()), tensors[n]) for n, w in packed.items()]
    result["bf16_same_bytes"] = bool(same) and all(same)
    result["rank"] = info.rank
    D.cleanup(info)
rank = info.rank if info is not None else 0
Path(out, f"result-{mode}-{rank}.json").write_text(json.dumps(result))
"""


def write_big_llama(path: Path) -> None:
    """8 layers, hidden 512, intermediate 1536, vocab 1000, fp32: ~110 MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


@pytest.mark.slow
def test_two_processes_hold_half_and_gather_the_single_process_tensors(llama_dir, tmp_path):
    big = tmp_path / "big"
    write_big_llama(big)
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(loraforge.__file__).parents[1]), env.get("PYTHONPATH", "")])
    args = [str(big), str(llama_dir), str(tmp_path)]

    def results(mode, *launcher):
        res = subprocess.run([*launcher, str(child), mode, *args], env=env, capture_output=True, text=True,
                             timeout=400)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return [json.loads(f.read_text()) for f in sorted(tmp_path.glob(f"result-{mode}-*.json"))]

    [whole] = results("whole", sys.executable)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    ranks = results("sharded", sys.executable, *torchrun)
    assert len(ranks) == 2

    mb = 2**20
    print(f"\nload of a {whole['whole'] / mb:.1f} MB fp32 Llama + LoRA, peak RSS increase (load, then every "
          f"weight read): one process, prepare_model +{whole['load_peak'] / mb:.1f} MB, "
          f"+{whole['peak'] / mb:.1f} MB "
          f"(load_model: +{whole.get('load_model_peak', 0) / mb:.1f} MB); "
          "FSDP over 2 processes (sharded_load): "
          + "; ".join(f"rank {r['rank']} +{r['load_peak'] / mb:.1f} MB, +{r['peak'] / mb:.1f} MB, holds "
                      f"{r['mine'] / mb:.1f} MB of parameters" for r in ranks))  # fmt: skip
    for r in ranks:
        assert r["whole"] == whole["whole"]
        assert r["mine"] < 0.5 * whole["whole"] + 2 * mb  # half of each tensor + padding
        if r["reset"] and whole["reset"]:  # (Linux: the peak restarts after the imports)
            assert r["peak"] < 0.75 * whole["peak"]
            assert r["peak"] < 0.75 * whole["whole"]

    # the gathered qlora tensors are the single-process ones; the loss too
    from safetensors.torch import load_file

    torch.manual_seed(1)
    single, _ = prepare_model(make_config(llama_dir, "qlora", train={"distributed": "ddp"}), CPU)
    gathered = load_file(tmp_path / "gathered.safetensors")
    ref = {n: t for n, t in single.state_dict().items()}
    assert gathered.keys() == ref.keys()
    assert all(torch.equal(gathered[n], ref[n]) for n in ref)
    ids, labels, pos = batch()
    loss = CausalLMLoss(single)(ids, labels, pos)[0].item()
    assert all(abs(r["loss"] - loss) <= 1e-6 * abs(loss) for r in ranks)
    assert all(r["bf16_uint8"] and r["bf16_same_bytes"] for r in ranks)
