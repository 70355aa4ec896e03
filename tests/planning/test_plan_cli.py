"""lf.plan and `loraforge plan`: the breakdown, --json, overrides, world size, memory strings, and
bad input (one line naming it, exit 2)."""

from __future__ import annotations

import json

import pytest

import loraforge as lf
from loraforge.cli import main as loraforge_main
from loraforge.planning import parse_memory, plan
from loraforge.planning.cli import main
from loraforge.planning.memory import estimate_memory
from loraforge.planning.shape import model_config_of
from loraforge.training.config import ConfigError, TrainConfig

RUN = """\
method: lora
model: {path: builtin:small-llama}
lora: {r: 8, alpha: 16, target_modules: all-linear}
data: {max_length: 256}
train: {batch_size: 4, max_steps: 10}
"""


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    return str(path)


# -- memory strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("24GiB", 24 * 2**30),
        ("24GB", 24 * 10**9),  # SI: a GB is 10^9 bytes
        ("24G", 24 * 2**30),  # G alone is binary, as `free -g` and docker's 24g
        ("24000MB", 24 * 10**9),
        ("80 GiB", 80 * 2**30),
        ("1.5TiB", int(1.5 * 2**40)),
        ("512mib", 512 * 2**20),
        ("4096 B", 4096),
    ],
)
def test_memory_strings(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["24", "lots", "24 GiBs", "-1GB", "0GB", "GB", "24 G B"])
def test_a_memory_string_that_does_not_parse_is_named(text):
    with pytest.raises(ConfigError, match="--memory") as e:
        parse_memory(text)
    assert repr(text) in str(e.value) or text in str(e.value)


# -- the plan ---------------------------------------------------------------------------------------


def test_lf_plan_is_public_and_matches_the_memory_estimate(run_yaml):
    p = lf.plan(run_yaml, gemm_flops=1e10)
    cfg = TrainConfig.from_yaml(run_yaml, ["data.train=x"])
    direct = estimate_memory(cfg, model_config=model_config_of("builtin:small-llama"))
    assert p.memory.peak_bytes == direct.peak_bytes
    assert p.fits is None and p.suggestions == []
    from loraforge.training.builtin import build_model

    assert p.params["total"] == sum(t.numel() for t in build_model("builtin:small-llama").parameters())
    d = p.to_dict()
    assert d["memory"]["peak_bytes"] == p.memory.peak_bytes and d["flops_per_step"] == p.flops_per_step
    assert d["seconds_per_step"] == pytest.approx(p.flops_per_step / 1e10)


def test_overrides_reach_the_plan(run_yaml):
    small, big = plan(run_yaml, gemm_flops=1e10), plan(run_yaml, overrides=["lora.r=64"], gemm_flops=1e10)
    assert big.params["trainable"] == 8 * small.params["trainable"]
    assert big.memory.peak_bytes > small.memory.peak_bytes and big.flops_per_step > small.flops_per_step
    as_dict = plan(TrainConfig.from_yaml(run_yaml, ["data.train=x"]).to_dict(), gemm_flops=1e10)
    assert as_dict.memory.peak_bytes == small.memory.peak_bytes


def test_fsdp_world_size_shards_the_weights(run_yaml):
    one = plan(run_yaml, overrides=["train.distributed=fsdp"], gemm_flops=1e10)
    two = plan(run_yaml, overrides=["train.distributed=fsdp"], world_size=2, gemm_flops=1e10)
    assert two.memory.bytes_of("base weights") == one.memory.bytes_of("base weights") // 2
    assert two.flops_per_step == one.flops_per_step  # each process runs its own micro-batches
    assert two.to_dict()["tokens_per_s"] == pytest.approx(2 * one.to_dict()["tokens_per_s"])


def test_the_cli_prints_the_breakdown_and_the_verdict(run_yaml, capsys):
    assert main([run_yaml, "--memory", "64GiB", "--gemm-tflops", "0.05"]) == 0
    out = capsys.readouterr().out
    for line in ("base weights", "trainable parameters", "gradients", "optimizer state", "activations",
                 "logits and loss", "runtime overhead", "peak ", "compute per optimizer step",
                 "time per step", "fits in 64.00 GiB per device"):  # fmt: skip
        assert line in out, line
    # the top-level command delegates to it; overrides may follow options
    assert loraforge_main(["plan", run_yaml, "--json", "--gemm-tflops", "0.05", "train.batch_size=1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["memory"]["peak_bytes"] < plan(run_yaml, gemm_flops=1e10).memory.peak_bytes
    assert d["fits"] is None and d["world_size"] == 1 and d["gemm"]["flops_per_s"] == 0.05e12


def test_a_config_without_data_plans(tmp_path):
    """A plan reads no data: data.train may be left out (loraforge train still requires it)."""
    path = tmp_path / "nodata.yaml"
    path.write_text("method: qlora\nmodel: {path: llama-3-8b, dtype: bfloat16}\n")
    p = plan(str(path), device="cuda", gemm_flops=1e14)
    assert p.memory.bytes_of("4-bit packed weights") > 3 * 2**30


# -- bad input: one line naming it, exit 2 -----------------------------------------------------------


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.path=no-such-model-shape", "no-such-model-shape"),  # no directory, shape or hub id
        ("model.dtype=float8", "model.dtype"),
        ("method=loha", "method"),
        ("lora.rank=8", "lora.rank"),  # an unknown key (with PEFT's name hint)
        ("train.batch_size=0", "train.batch_size"),
    ],
)
def test_bad_config_values_are_named(run_yaml, capsys, monkeypatch, override, named):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(capsys, [run_yaml, override, "--gemm-tflops", "1"])
    assert named in err


def test_a_model_directory_without_config_json(run_yaml, tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    err = _error(capsys, [run_yaml, f"model.path={empty}", "--gemm-tflops", "1"])
    assert "model.path" in err and "config.json" in err


def test_a_config_json_without_model_type(run_yaml, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    err = _error(capsys, [run_yaml, f"model.path={tmp_path / 'm'}", "--gemm-tflops", "1"])
    assert "model_type" in err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--memory", "24"], "--memory"),
        (["--memory", "a lot"], "--memory"),
        (["--world-size", "0"], "--world-size"),
        (["--world-size", "two"], "--world-size"),
        (["--gemm-tflops", "-3"], "--gemm-tflops"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_are_named(run_yaml, capsys, argv, named):
    assert named in _error(capsys, [run_yaml, *argv])


def test_a_missing_config_file(tmp_path, capsys):
    assert "not found" in _error(capsys, [str(tmp_path / "nope.yaml")])


def test_the_api_refuses_a_world_size_below_one(run_yaml):
    with pytest.raises(ConfigError, match="world size"):
        plan(run_yaml, world_size=0)
    with pytest.raises(ConfigError, match="memory"):
        plan(run_yaml, memory="24 parsecs")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        loraforge_main(["plan", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--memory", "--world-size", "--gemm-tflops", "--json", "KEY=VALUE", "GiB",
                   "llama-3-70b"):  # fmt: skip
        assert option in text, option
    assert loraforge_main([]) == 2
    assert "plan" in capsys.readouterr().out
