"""``loraforge eval``: lm-evaluation-harness on the model loraforge runs, local tasks offline.

Parity: the same adapter and tasks through lm-eval's own ``--model hf --model_args
pretrained=DIR,peft=ADAPTER`` (PEFT's layers) give the same log-likelihoods and metrics.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import randomize_lora  # noqa: E402
from training.util import cli, write_jsonl  # noqa: E402

from loraforge.evaluation import EvalError, evaluate, resolve_tasks  # noqa: E402

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a cat have?", ["two", "four", "six"], 1),
    ("What do bees make?", ["milk", "silk", "honey"], 2),
    ("Which is the largest planet?", ["Jupiter", "Mars", "Venus"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
]
TEXTS = ["The cat sat on the mat.", "Bees make honey in the summer.", "The sky is blue and clear."]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""
# loglikelihood_rolling: the whole text's log-likelihood (perplexity-style metrics)
PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity}}
  - {{metric: byte_perplexity}}
  - {{metric: bits_per_byte}}
metadata: {{version: 1.0}}
"""
TASKS = ["tiny_mc", "tiny_ppl"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    mc = write_jsonl(d / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    ppl = write_jsonl(d / "ppl.jsonl", [{"text": t} for t in TEXTS])
    (d / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc))
    (d / "tiny_ppl.yaml").write_text(PPL_YAML.format(data=ppl))
    return d


def _adapter(model, path: Path, seed: int, scale: float = 0.5) -> Path:
    """A LoRA adapter on q/v/o with random A and B (ΔW ≠ 0), saved in PEFT's format."""
    import loraforge as lf

    lf.inject(model, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init=False))
    randomize_lora(model, std=scale, seed=seed)
    lf.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base directory, adapter a, adapter b): builtin:tiny-llama saved with its tokenizer."""
    from loraforge.training.builtin import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    build_model("builtin:tiny-llama").save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")
    a = _adapter(build_model("builtin:tiny-llama"), root / "a", seed=1)
    b = _adapter(build_model("builtin:tiny-llama"), root / "b", seed=2)
    return root / "base", a, b


def _hf(pretrained: Path, tasks_dir: Path, peft: Path | None = None, **kwargs) -> dict:
    """lm-eval's own HF backend: ``--model hf --model_args pretrained=DIR[,peft=DIR]``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(pretrained), "dtype": "float32", "device": "cpu"}
    if peft is not None:
        args["peft"] = str(peft)
    kwargs.setdefault("batch_size", 4)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kwargs,
    )


def _loglikelihoods(results: dict) -> dict[str, list[float]]:
    """Every request's log-likelihood, per task, in document order."""
    out = {}
    for task, samples in results["samples"].items():
        rows = sorted(samples, key=lambda s: s["doc_id"])
        out[task] = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for s in rows for r in s["resps"]]
    return out


def _metrics(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, float) and "stderr" not in k}


def _assert_same(ours: dict, theirs: dict) -> None:
    lo, lt = _loglikelihoods(ours), _loglikelihoods(theirs)
    assert lo.keys() == lt.keys() == set(TASKS)
    for task in TASKS:
        assert len(lo[task]) == len(lt[task]) > 0
        assert lo[task] == pytest.approx(lt[task], abs=1e-6, rel=0), task
        mo, mt = _metrics(ours, task), _metrics(theirs, task)
        assert mo.keys() == mt.keys() and mo
        assert mo == pytest.approx(mt, abs=1e-6, rel=1e-6), task


@pytest.fixture(scope="module")
def ours(tiny, tasks_dir):
    """loraforge's evaluation of base, a, b and a+b on the local tasks (one model load)."""
    base, a, b = tiny
    runs = evaluate(
        str(base),
        {"a": str(a), "b": str(b)},
        TASKS,
        use="base,a,b,a+b",
        include_path=[str(tasks_dir)],
        device="cpu",
        log_samples=True,
        batch_size=4,
    )
    return {r["loraforge"]["name"]: r for r in runs}


def test_adapter_matches_lm_eval_hf_peft(tiny, tasks_dir, ours):
    base, a, _ = tiny
    _assert_same(ours["a"], _hf(base, tasks_dir, peft=a))
    info = ours["a"]["loraforge"]
    assert info["adapters"] == {"a": str(a)} and info["quantize"] is None and info["base"] == str(base)
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    # the adapter counts: its numbers are not the base's
    la, lb = _loglikelihoods(ours["a"]), _loglikelihoods(ours["base"])
    assert all(abs(x - y) > 1e-3 for x, y in zip(la["tiny_mc"], lb["tiny_mc"]))


def test_base_setting_matches_lm_eval_hf(tiny, tasks_dir, ours):
    base, _, _ = tiny
    _assert_same(ours["base"], _hf(base, tasks_dir))


def test_summed_adapters_equal_both_merged(tiny, tasks_dir, ours):
    """``--use a+b`` (both active, unmerged) scores as the base with both merged into its weights."""
    import loraforge as lf
    from loraforge.evaluation import evaluate_model
    from loraforge.training.inference import load_with_adapters

    base, a, b = tiny
    model, tok = load_with_adapters(str(base), {"a": str(a), "b": str(b)}, device="cpu")
    lf.merge(model, ["a", "b"])
    _, manager = resolve_tasks(TASKS, [str(tasks_dir)])
    merged = evaluate_model(model, tok, TASKS, task_manager=manager, log_samples=True)
    got, want = _loglikelihoods(ours["a+b"]), _loglikelihoods(merged)
    for task in TASKS:
        assert got[task] == pytest.approx(want[task], abs=1e-4, rel=1e-5)
    assert got["tiny_mc"] != pytest.approx(_loglikelihoods(ours["a"])["tiny_mc"], abs=1e-3)


def test_prompt_tuning_scores_only_the_input_positions(tiny, tasks_dir, tmp_path):
    """Prompt tuning's virtual tokens initialised from a text's embeddings are that text put before
    the input: the adapter scores as the base does on the same task with the text in front. (The
    logits have n extra rows in front, as PEFT's do; HFLM's causal slicing discards them.)"""
    import loraforge as lf
    from loraforge.training.builtin import build_model, build_tokenizer

    base, _, _ = tiny
    prefix = "Answer the question.\n"
    n = len(build_tokenizer()(prefix, add_special_tokens=False)["input_ids"])
    model = build_model("builtin:tiny-llama")
    cfg = lf.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=prefix, tokenizer=str(base))
    lf.inject(model, cfg)
    lf.save_adapter(model, tmp_path / "prompt")
    d = tmp_path / "prefixed"
    d.mkdir()
    text = MC_YAML.format(data=tasks_dir / "mc.jsonl").replace("tiny_mc", "tiny_mc_prefixed")
    (d / "prefixed.yaml").write_text(
        text.replace('doc_to_text: "', 'doc_to_text: "' + prefix.replace("\n", "\\n"))
    )
    kwargs = dict(include_path=[str(tasks_dir), str(d)], device="cpu", log_samples=True)
    (tuned,) = evaluate(str(base), {"p": str(tmp_path / "prompt")}, ["tiny_mc"], **kwargs)
    (plain,) = evaluate(str(base), {}, ["tiny_mc_prefixed"], **kwargs)
    got, want = _loglikelihoods(tuned)["tiny_mc"], _loglikelihoods(plain)["tiny_mc_prefixed"]
    assert got == pytest.approx(want, abs=1e-5)


def test_4bit_base_is_close_not_equal(tiny, tasks_dir, ours):
    base, a, _ = tiny
    (q,) = evaluate(
        str(base),
        {"a": str(a)},
        ["tiny_mc"],
        include_path=[str(tasks_dir)],
        quantize="nf4",
        device="cpu",
        log_samples=True,
    )
    assert q["loraforge"]["quantize"] == "nf4"
    got, full = _loglikelihoods(q)["tiny_mc"], _loglikelihoods(ours["a"])["tiny_mc"]
    assert got != pytest.approx(full, abs=1e-6)  # the base really is 4-bit
    # NF4 rounding moves each log-likelihood by a few percent at most on this model
    assert got == pytest.approx(full, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_cuda_bf16_close_to_cpu_fp32(tiny, tasks_dir, ours, quantize):
    base, a, _ = tiny
    (r,) = evaluate(
        str(base),
        {"a": str(a)},
        ["tiny_mc"],
        include_path=[str(tasks_dir)],
        quantize=quantize,
        dtype="bfloat16",
        device="cuda",
        log_samples=True,
    )
    assert r["loraforge"]["device"].startswith("cuda") and r["loraforge"]["dtype"] == "bfloat16"
    assert _loglikelihoods(r)["tiny_mc"] == pytest.approx(_loglikelihoods(ours["a"])["tiny_mc"], rel=0.05)


def test_unknown_task_is_one_line(tasks_dir, monkeypatch):
    # lm-eval's ~15,000 built-in task files take 20-45 s to index on 2 busy cores: index only the
    # local directory, so that the error path is what is tested
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        lambda include_path=None, include_defaults=True: real(
            include_path=include_path, include_defaults=False
        ),
    )
    with pytest.raises(
        EvalError, match=r"^--tasks: unknown task\(s\) no_such_task, tiny_\?x: .*--include-path"
    ):
        resolve_tasks(["tiny_mc", "no_such_task", "tiny_?x"], [str(tasks_dir)])
    names, _ = resolve_tasks(["tiny_*"], [str(tasks_dir)])  # globs expand, as lm-eval's CLI does
    assert names == ["tiny_mc", "tiny_ppl"]


def test_cli_eval_writes_json_and_table(tiny, tasks_dir, tmp_path):
    base, a, _ = tiny
    out = tmp_path / "res" / "results.json"
    r = cli(
        "eval",
        str(base),
        "--adapter",
        f"a={a}",
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(tasks_dir),
        "--device",
        "cpu",
        "--limit",
        "3",
        "--num-fewshot",
        "1",
        "--output",
        str(out),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "|tiny_mc|" in r.stdout and "acc_norm" in r.stdout
    assert f"results written to {out}" in r.stdout
    (run,) = json.loads(out.read_text())["evaluations"]
    assert run["loraforge"]["adapters"] == {"a": str(a)} and run["loraforge"]["name"] == "a"
    assert run["n-samples"]["tiny_mc"]["effective"] == 3 and run["n-shot"]["tiny_mc"] == 1
    assert 0.0 <= run["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert math.isfinite(run["results"]["tiny_mc"]["acc_stderr,none"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "nowhere", "--tasks", "x"], "error: nowhere: not an adapter directory"),
        (["--tasks", "missing.yaml"], "error: --tasks missing.yaml: no such task file"),
        (["--use", "zzz", "--tasks", "x"], "error: --use zzz: unknown adapter(s) ['zzz']"),
        (["--tasks", "x", "--output", "{tasks}"], "error: --output {tasks}: a directory"),
        (["--adapter", "{a}", "--tasks", "tiny_mc", "--include-path", "nowhere"], "error: --include-path"),
        # a local task whose data file is missing: before the model loads
        (
            ["--tasks", "{broken}"],
            "error: --tasks {broken}: Unable to find",
        ),
        # an adapter trained on another base: named, with the first module whose shape differs
        (["--adapter", "{other}", "--tasks", "tiny_mc", "--include-path", "{tasks}"], "error: {other}"),
    ],
)
def test_cli_errors_are_one_line(tiny, tasks_dir, args, message, capsys):
    from loraforge.cli import main
    from loraforge.training.builtin import build_model

    broken = MC_YAML.format(data=tasks_dir / "nothere.jsonl").replace("tiny_mc", "broken_mc")
    (tasks_dir.parent / "broken").mkdir(exist_ok=True)
    (tasks_dir.parent / "broken" / "broken.yaml").write_text(broken)
    other = tasks_dir.parent / "other-adapter"
    if not other.exists():
        _adapter(build_model("builtin:small-llama"), other, seed=4)
    paths = dict(a=tiny[1], other=other, tasks=tasks_dir, broken=(tasks_dir.parent / "broken/broken.yaml"))
    assert main(["eval", str(tiny[0]), *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    # (progress bars of datasets and transformers may come first)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error")] == lines[-1:] and "Traceback" not in err
    assert lines[-1].startswith(message.format(**paths)), err


def test_help_lists_options_and_eval_is_a_command(capsys):
    from loraforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "BASE",
        "--adapter",
        "--use",
        "--tasks",
        "--include-path",
        "--quantize",
        "--limit",
        "--output",
    ):
        assert option in text, option
    assert "(default: float32)" in text and "(default: None)" not in text and "(default: [])" not in text
    assert main([]) == 2 and "lm-evaluation-harness" in capsys.readouterr().out


def test_cli_without_lm_eval_names_the_extra(monkeypatch, capsys):
    from loraforge.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", "builtin:tiny-llama", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loraforge eval needs lm-evaluation-harness, which is not installed")
    assert err.rstrip().endswith("pip install 'loraforge[eval]'") and err.count("\n") == 1


def test_smollm2_adapter_matches_lm_eval_hf_peft(smollm2_dir, tasks_dir, tmp_path):
    """The real model (tied embeddings, its own tokenizer): the same parity, a handful of documents."""
    from transformers import AutoModelForCausalLM

    adapter = _adapter(
        AutoModelForCausalLM.from_pretrained(smollm2_dir), tmp_path / "adapter", seed=3, scale=0.02
    )
    (ours,) = evaluate(
        "builtin:smollm2",  # the name, resolved to smollm2_dir as everywhere in loraforge
        {"a": str(adapter)},
        TASKS,
        include_path=[str(tasks_dir)],
        device="cpu",
        log_samples=True,
        limit=3,
        batch_size=4,
    )
    theirs = _hf(smollm2_dir, tasks_dir, peft=adapter, limit=3)
    _assert_same(ours, theirs)
    # a real model answers these: the right choice is the likelier one for most questions
    assert ours["results"]["tiny_mc"]["acc,none"] >= 2 / 3
