"""``lf.extract_lora`` / ``loraforge extract`` on tiny pairs whose update is known exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import loraforge as lf
from loraforge.kinds import is_conv1d
from loraforge.lowrank.extract import eval_loss, extract_lora, main
from tests.conftest import tiny_gpt2, tiny_llama

P = "base_model.model."


def _linears(model):
    head = model.get_output_embeddings()
    return [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and m is not head
    ]


def _add_updates(model, ranks, seed=1, size=0.05):
    """Add to layer i an exactly rank-``ranks[i]`` update with decaying singular values; returns
    {name: ΔW (out, in)}."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for (name, m), k in zip(_linears(model), ranks):
            w = m.weight.T if is_conv1d(m) else m.weight  # (out, in) view
            out, inn = w.shape
            u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
            v, _ = torch.linalg.qr(torch.randn(inn, k, generator=g))
            s = size * out**0.5 * torch.tensor([0.6**i for i in range(k)])
            d = (u * s) @ v.T
            w += d
            deltas[name] = d
    return deltas


@pytest.fixture
def llama_pair(tmp_path, one_thread):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ranks = [1 + i % 4 for i in range(len(_linears(base)))]
    deltas = _add_updates(base, ranks)
    base.save_pretrained(tmp_path / "tuned")
    return tmp_path, ranks, deltas


def _product(tensors, name):
    return tensors[f"{P}{name}.lora_B.weight"].double() @ tensors[f"{P}{name}.lora_A.weight"].double()


def test_exact_rank_k_updates_are_recovered_with_their_ranks(llama_pair):
    tmp, ranks, deltas = llama_pair
    report = extract_lora(tmp / "base", tmp / "tuned", tmp / "out", energy=1 - 1e-9)
    assert [r.rank for r in report.layers] == ranks
    tensors = load_file(tmp / "out" / "adapter_model.safetensors")
    for name, d in deltas.items():
        torch.testing.assert_close(_product(tensors, name), d.double(), atol=1e-5, rtol=0)
    cfg = json.loads((tmp / "out" / "adapter_config.json").read_text())
    # every layer's scale alpha/r is 1; the most common rank is r, the others in the patterns
    assert cfg["lora_alpha"] == cfg["r"]
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == {k: int(v) for k, v in cfg["alpha_pattern"].items()}
    for row in report.layers:
        assert cfg["rank_pattern"].get(row.name, cfg["r"]) == row.rank
        assert row.energy == pytest.approx(1.0, abs=1e-8)
    assert cfg["base_model_name_or_path"] == str(tmp / "base")
    assert report.adapter_params == sum(t.numel() for t in tensors.values())
    assert not report.other_changes and not report.unchanged


def test_loaded_adapter_gives_the_fine_tune_in_loraforge_and_peft(llama_pair):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _, _ = llama_pair
    extract_lora(tmp / "base", tmp / "tuned", tmp / "out", energy=1 - 1e-9)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    tuned = AutoModelForCausalLM.from_pretrained(tmp / "tuned")
    want = tuned(ids).logits
    model = lf.load_adapter(lf.load_model(tmp / "base"), tmp / "out")
    torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "base"), tmp / "out")
    torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_energy_gives_each_layer_its_own_rank_and_a_fixed_rank_is_the_best_approximation(llama_pair):
    tmp, ranks, deltas = llama_pair
    # (singular values decay as 0.6^i: 0.9 of the energy needs 1, 2, 2, 3 directions for k = 1..4)
    report = extract_lora(tmp / "base", tmp / "tuned", tmp / "e", energy=0.9)
    assert [r.rank for r in report.layers] == [[1, 2, 2, 3][k - 1] for k in ranks]
    assert all(r.energy >= 0.9 for r in report.layers)
    capped = extract_lora(tmp / "base", tmp / "tuned", tmp / "c", energy=1.0, max_rank=2)
    assert {r.rank for r in capped.layers} == {1, 2}
    fixed = extract_lora(tmp / "base", tmp / "tuned", tmp / "r", rank=2, dtype="bfloat16")
    assert {r.rank for r in fixed.layers} == {2}
    tensors = load_file(tmp / "r" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for name, d in deltas.items():  # Eckart–Young: the top-2 part of ΔW
        u, s, vh = torch.linalg.svd(d.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(_product(tensors, name), best, atol=3e-3, rtol=0)


def test_target_modules_narrow_and_other_changes_are_reported_and_saved_on_request(tmp_path, one_thread):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    deltas = _add_updates(base, [2] * len(_linears(base)))
    with torch.no_grad():
        base.model.embed_tokens.weight[3] += 1.0
        base.model.norm.weight.mul_(1.5)
    base.save_pretrained(tmp_path / "tuned")
    report = extract_lora(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "q", rank=2, target_modules=["q_proj", "v_proj"]
    )
    assert {r.name.rsplit(".", 1)[-1] for r in report.layers} == {"q_proj", "v_proj"}
    changed = {c.name: c for c in report.other_changes}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert changed["model.norm.weight"].relative_change == pytest.approx(0.5, rel=1e-5)
    assert "model.layers.0.mlp.up_proj.weight" in changed  # changed but not targeted: said so
    assert all(c.saved == "" for c in changed.values())

    report = extract_lora(
        tmp_path / "base",
        tmp_path / "tuned",
        tmp_path / "all",
        rank=2,
        modules_to_save=["embed_tokens", "norm"],
    )
    assert len(report.layers) == len(deltas)
    saved = {c.name for c in report.other_changes if c.saved == "modules_to_save"}
    assert saved == {"model.embed_tokens.weight", "model.norm.weight"}
    tensors = load_file(tmp_path / "all" / "adapter_model.safetensors")
    torch.testing.assert_close(tensors[P + "model.norm.weight"], base.model.norm.weight)
    ids = torch.tensor([[1, 3, 5, 3, 7]])
    model = lf.load_adapter(lf.load_model(tmp_path / "base"), tmp_path / "all")
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)
    # a regex, as PEFT's str target_modules, matching the whole path
    report = extract_lora(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "re", rank=1, target_modules=r".*\.0\..*_proj"
    )
    assert {r.name.split(".")[2] for r in report.layers} == {"0"}


def test_bf16_fine_tune(tmp_path, one_thread):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    deltas = _add_updates(base, [3] * len(_linears(base)), size=0.3)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "tuned")  # dW also holds bf16 rounding of W
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=3)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    for name, d in deltas.items():
        err = (_product(tensors, name) - d.double()).norm() / d.norm()
        assert err < 0.02, name
    assert all(r.energy > 0.99 for r in report.layers)


def test_4bit_base(tmp_path, one_thread):
    tiny_llama().save_pretrained(tmp_path / "base")
    q = lf.load_model(tmp_path / "base", quantization=lf.QuantConfig())
    lf.save_model(q, tmp_path / "base4")
    tuned = tiny_llama()
    deltas = _add_updates(tuned, [2] * len(_linears(tuned)))
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base4", tmp_path / "tuned", tmp_path / "out", rank=64)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    # at full rank the adapter is exactly W_tuned - dequantize(W_4bit)
    for name in deltas:
        want = (
            tuned.get_submodule(name).weight.double()
            - q.get_submodule(name).dequantize(torch.float32).double()
        )
        torch.testing.assert_close(_product(tensors, name), want, atol=1e-5, rtol=0)
    assert min(r.rank for r in report.layers) > 2  # (the quantization error is not low rank)
    ids = torch.tensor([[1, 3, 5, 3, 7]])
    fp32 = lf.QuantConfig(compute_dtype="float32")  # (bfloat16 matmuls by default: 1e-3 apart)
    model = lf.load_adapter(lf.load_model(tmp_path / "base4", quantization=fp32), tmp_path / "out")
    torch.testing.assert_close(model(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_with_bias_changes_loads_in_loraforge_and_peft(tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    ranks = [1, 2, 3, 2] * 2
    deltas = _add_updates(base, ranks)
    with torch.no_grad():
        base.transformer.h[0].attn.c_attn.bias += 0.1
    base.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", energy=1 - 1e-9)
    assert [r.rank for r in report.layers] == ranks
    assert {c.name: c.saved for c in report.other_changes} == {
        "transformer.h.0.attn.c_attn.bias": "lora_B.bias"
    }
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is True
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name, d in deltas.items():
        torch.testing.assert_close(_product(tensors, name), d.double(), atol=1e-5, rtol=0)
    ids = torch.tensor([[1, 3, 5, 3, 7]])
    want = base(ids).logits
    model = lf.load_adapter(lf.load_model(tmp_path / "base"), tmp_path / "out")
    torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out"
    )
    torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_tied_head_saved_whole(tmp_path, one_thread):
    base = tiny_gpt2()  # (GPT-2 ties lm_head to wte: the files hold wte only)
    base.save_pretrained(tmp_path / "base")
    _add_updates(base, [1] * 8)
    with torch.no_grad():
        base.transformer.wte.weight[5] += 0.5
    base.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "d", rank=1)
    assert {c.name: c.saved for c in report.other_changes} == {"transformer.wte.weight": ""}
    extract_lora(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=1, modules_to_save=["wte", "lm_head"]
    )
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    torch.testing.assert_close(tensors[P + "lm_head.weight"], base.transformer.wte.weight)
    ids = torch.tensor([[1, 5, 5, 3, 7]])
    model = lf.load_adapter(lf.load_model(tmp_path / "base"), tmp_path / "out")
    torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_tensor_missing_from_the_files_is_named(llama_pair, capsys):
    from safetensors.torch import save_file

    tmp, _, _ = llama_pair
    tensors = load_file(tmp / "tuned" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp / "tuned" / "model.safetensors", metadata={"format": "pt"})
    assert (
        main(["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), "--rank", "1", str(tmp / "o")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "no tensor model.layers.1.mlp.up_proj.weight" in err and str(tmp / "tuned") in err
    assert len(err.splitlines()) == 1 and not (tmp / "o").exists()


def char_tokenizer():
    """A character-level tokenizer of a-z and space (ids < 30), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {" ": 26, "<unk>": 27, "<s>": 28, "</s>": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def test_eval_loss_of_rows_and_file_agree_and_see_the_adapter(llama_pair, tmp_path):
    tmp, _, _ = llama_pair
    tokenizer = char_tokenizer()
    rows = [{"text": "hello world"}, {"prompt": "abc", "completion": "def"}][:1] + [{"text": "low rank"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = lf.load_model(tmp / "base")
    a = eval_loss(model, tokenizer, rows, batch_size=1)
    b = eval_loss(model, tokenizer, path, batch_size=2)
    assert a == pytest.approx(b, rel=1e-6) and 0 < a < 10
    extract_lora(tmp / "base", tmp / "tuned", tmp / "out", rank=1)
    lf.load_adapter(model, tmp / "out")
    assert eval_loss(model, tokenizer, rows) != pytest.approx(a, rel=1e-4)


def test_cli_prints_the_table_and_json(llama_pair, capsys):
    tmp, ranks, _ = llama_pair
    assert (
        main(["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), "--energy", "0.9", str(tmp / "o")])
        == 0
    )
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "total: 14 layers" in text
    assert (
        main(
            [
                "--base",
                str(tmp / "base"),
                "--tuned",
                str(tmp / "tuned"),
                "--rank",
                "2",
                "--json",
                str(tmp / "j"),
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in data["layers"]] == [2] * len(ranks)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank must be an integer >= 1"),
        (["--rank", "-3"], "rank must be an integer >= 1"),
        (["--energy", "0"], "energy must be a number in (0, 1]"),
        (["--energy", "1.5"], "energy must be a number in (0, 1]"),
        (["--rank", "2", "--max-rank", "0"], "max_rank must be an integer >= 1"),
        (["--rank", "2", "--target-modules", "nope"], "matched no linear layer"),
        (["--rank", "2", "--modules-to-save", "nope"], "modules_to_save entry 'nope'"),
    ],
)
def test_cli_bad_requests(llama_pair, capsys, args, message):
    tmp, _, _ = llama_pair
    rc = main(["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), *args, str(tmp / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "o").exists()


def test_cli_usage_errors_exit_2(llama_pair, capsys):
    tmp, _, _ = llama_pair
    common = ["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), str(tmp / "o")]
    assert main(common) == 2  # neither --rank nor --energy
    assert "one of the arguments --rank --energy is required" in capsys.readouterr().err
    assert main([*common, "--rank", "2", "--energy", "0.9"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_bad_inputs(llama_pair, tmp_path, capsys):
    tmp, _, _ = llama_pair
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    tiny_llama(vocab=100).save_pretrained(tmp_path / "wide")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp / "base" / "config.json").read_text())
    capsys.readouterr()  # (transformers' progress bars while saving)
    cases = [
        (tmp_path / "gpt2", tmp_path / "o1", "is a LlamaForCausalLM, --tuned"),
        (tmp_path / "wide", tmp_path / "o2", "model.embed_tokens.weight: shape [96, 32] in --base"),
        (tmp_path / "missing", tmp_path / "o3", "no such directory"),
        (tmp_path / "empty", tmp_path / "o4", "no *.safetensors weights"),
        (tmp / "tuned", tmp_path / "full", "exists and is not an empty directory"),
    ]
    for tuned, out, message in cases:
        rc = main(["--base", str(tmp / "base"), "--tuned", str(tuned), "--rank", "2", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert out == tmp_path / "full" or not out.exists()
    assert (
        main(["--base", str(tmp / "base"), "--tuned", str(tmp / "base"), "--rank", "2", str(tmp_path / "o5")])
        == 2
    )
    assert "does not differ" in capsys.readouterr().err
    # an empty OUT directory is fine
    (tmp_path / "o6").mkdir()
    assert (
        main(
            ["--base", str(tmp / "base"), "--tuned", str(tmp / "tuned"), "--rank", "1", str(tmp_path / "o6")]
        )
        == 0
    )
