"""Model directories that cannot be loaded: one clear line naming the path, file and field, at once.

A wrong path, a hub id offline or with the hub unreachable (no ~50 s of retries), a bad
``config.json``, ``model.safetensors.index.json`` or truncated safetensors file, missing weights;
and ``loraforge merge`` of a base that has no tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from quant.util import tiny_llama

import loraforge as lf
from loraforge import model_files as hf
from loraforge.model_files import ModelNotFoundError, check_model_source


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-errors") / "tiny"
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, offline, and a hub probe that fails the test if it is reached."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def probe(source):
        raise AssertionError(f"the hub was asked about {source}")

    monkeypatch.setattr(hf, "_probe_hub", probe)
    return tmp_path / "hub-cache"


def _copy(src, dst, **replace):
    shutil.copytree(src, dst)
    for name, data in replace.items():
        (dst / name.replace("__", ".")).write_bytes(data if isinstance(data, bytes) else data.encode())
    return dst


# -- where the model is --------------------------------------------------------------------------


def test_a_missing_directory_is_one_line(no_hub, tmp_path, monkeypatch):
    """A path that does not exist is named as such, without asking the hub, however it is
    written (absolute, ./relative, ~, under an existing directory, not a valid hub id)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for path in ["/no/such/dir", "./model", "~/no-such-model-dir", "runs/final", "a/b/c", "bad id!"]:
        for check in (lf.load_model, check_model_source):
            with pytest.raises(ModelNotFoundError, match=f"^{path}: no such directory$"):
                check(path)
    assert issubclass(ModelNotFoundError, FileNotFoundError)  # the CLI prints these as one line
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="weights.safetensors: a file, not a model directory"):
        lf.load_model(tmp_path / "weights.safetensors")


def test_a_hub_id_offline_and_not_cached_fails_at_once(no_hub):
    t = time.perf_counter()
    for check in (lf.load_model, check_model_source):
        message = r"^some-org/some-model: no such directory, and not in the Hugging Face cache \(HF_HUB"
        with pytest.raises(ModelNotFoundError, match=message):
            check("some-org/some-model")
    assert time.perf_counter() - t < 5


def test_a_cached_hub_id_loads_offline(no_hub, model_dir):
    """A hub id loads from its snapshot in the Hugging Face cache (the layout huggingface_hub writes)."""
    repo = no_hub / "models--some-org--tiny"
    _copy(model_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    check_model_source("some-org/tiny")
    ours = lf.load_model("some-org/tiny")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, tiny_llama(seed=0)(ids).logits)


UNREACHABLE_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from loraforge.model_files import ModelNotFoundError, check_model_source
    import loraforge as lf
    out = {}
    for name, fn in [("check", check_model_source), ("load_model", lf.load_model)]:
        t = time.perf_counter()
        try:
            fn("some-org/some-model")
            out[name] = ["no error", 0]
        except ModelNotFoundError as e:
            out[name] = [str(e), time.perf_counter() - t]
    print(json.dumps(out))
    """
)


def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path):
    """Not offline, but the hub does not answer (here: a closed local port as its address): one
    request, then one line, instead of transformers' ~50 s of retries and a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path), HF_HUB_DISABLE_TELEMETRY="1")
    res = subprocess.run([sys.executable, "-c", UNREACHABLE_CHILD], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, (message, seconds) in json.loads(res.stdout.strip().splitlines()[-1]).items():
        want = "some-org/some-model: no such directory, and the Hugging Face hub cannot be reached"
        assert message.startswith(want), (name, message)
        assert "\n" not in message and seconds < 15, (name, message, seconds)


# -- what the directory holds --------------------------------------------------------------------


def test_bad_config_json_names_the_file(model_dir, tmp_path):
    bad = _copy(model_dir, tmp_path / "m", config__json='{"model_type": "llama",')
    with pytest.raises(ValueError, match=f"^{bad / 'config.json'}: invalid JSON"):
        lf.load_model(bad)


def test_truncated_safetensors_names_the_file(model_dir, tmp_path):
    data = (model_dir / "model.safetensors").read_bytes()
    for cut in (len(data) - 100, 1000, 3):
        bad = _copy(model_dir, tmp_path / f"cut{cut}", model__safetensors=data[:cut])
        with pytest.raises(ValueError, match=f"^{bad / 'model.safetensors'}: not a readable safetensors"):
            lf.load_model(bad)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "m"
    tiny_llama(seed=1).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize(
    "index, error, message",
    [
        ('{"weight_map": {', ValueError, r"invalid JSON \(Expecting property name .* line 1, column 17\)"),
        ("[1, 2]", ValueError, "expected a JSON object, got list"),
        ('{"metadata": {}}', ValueError, "field 'weight_map' must map tensor names to file names"),
        ('{"weight_map": {"lm_head.weight": 3}}', ValueError, "field 'weight_map' must map"),
        ('{"weight_map": {"lm_head.weight": "../../x.safetensors"}}', ValueError,
         r"weight_map names '\.\./\.\./x\.safetensors', not a \.safetensors file in"),
        ('{"weight_map": {"lm_head.weight": "gone.safetensors"}}', FileNotFoundError,
         "weight_map names gone.safetensors, which is missing from"),
    ],
)  # fmt: skip
def test_bad_index_json_names_the_file_and_field(sharded, tmp_path, index, error, message):
    bad = _copy(sharded, tmp_path / "m", model__safetensors__index__json=index)
    with pytest.raises(error, match=f"^{bad / 'model.safetensors.index.json'}: {message}"):
        lf.load_model(bad)


def test_wrong_shapes_and_missing_weights_name_the_file(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(model_dir / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(3)
    bad = _copy(model_dir, tmp_path / "shape")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{bad / 'model.safetensors'}: model\.norm\.weight: checkpoint"):
        lf.load_model(bad)
    del sd["model.norm.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    for kind in (KeyError, ValueError):  # a KeyError as documented; a ValueError for the CLI's one line
        with pytest.raises(kind) as info:
            lf.load_model(bad)
        assert str(info.value) == f"load_model: {bad} lacks weights for ['model.norm.weight']"


# -- the commands that load a base ---------------------------------------------------------------


def test_cli_wrong_base_is_one_line(no_hub, capsys):
    from loraforge.cli import main

    rc = main(["generate", "--base", "/no/such/dir", "--prompt", "hi"])
    assert rc == 2
    assert capsys.readouterr().err == "error: --base: /no/such/dir: no such directory\n"
    rc = main(["generate", "--base", "some-org/some-model", "--prompt", "hi"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: --base: some-org/some-model: no such directory, and not in the Hugging Face cache"
    )
    assert err.count("\n") == 1


def test_training_with_a_wrong_model_path_is_one_line(no_hub):
    from loraforge.training.config import ModelSection
    from loraforge.training.modeling import load_base_model, load_tokenizer

    with pytest.raises(ModelNotFoundError, match="^/no/such/model: no such directory$"):
        load_tokenizer("/no/such/model")
    with pytest.raises(ModelNotFoundError, match="^/no/such/model: no such directory$"):
        load_base_model(ModelSection(path="/no/such/model"), torch.device("cpu"))


def test_merge_of_a_base_without_tokenizer_writes_the_model_alone(model_dir, tmp_path):
    """Neither the base nor the adapter has tokenizer files: the merged model is written, with a
    warning, instead of transformers asking for sentencepiece."""
    from transformers import AutoModelForCausalLM

    from loraforge.training.inference import merge_to_dir

    model = tiny_llama(seed=0)
    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.1)  # a delta that shows in the logits
    lf.save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = merge_to_dir(str(model_dir), str(tmp_path / "adapter"), tmp_path / "merged")
    assert any("no tokenizer files" in str(w.message) for w in caught)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_bad_quantization_config_names_config_json(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "fp")
    lf.save_model(lf.load_model(tmp_path / "fp", quantization=lf.QuantConfig()), tmp_path / "q4")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "int8"
    (tmp_path / "q4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'q4' / 'config.json'}: QuantConfig.compute_dtype"):
        lf.load_model(tmp_path / "q4")
