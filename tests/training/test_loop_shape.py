"""The training loop reads top to bottom: set-up and tear-down in named helpers, the step loop on
one screen, and the metrics it writes keep their names."""

from __future__ import annotations

import ast
import inspect
import json

import loraforge as lf
from loraforge.training import loop

from .util import QA_EVAL, tiny_config


def test_the_step_loop_fits_on_a_screen():
    tree = ast.parse(inspect.getsource(loop))
    [train] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_train"]
    [step_loop] = [n for n in ast.walk(train) if isinstance(n, ast.While)]
    assert step_loop.end_lineno - step_loop.lineno + 1 <= 60
    assert train.end_lineno - train.lineno + 1 <= 130


def test_metrics_names(tmp_path):
    cfg = tiny_config(tmp_path / "run", data={"eval": QA_EVAL}, train={"max_steps": 2, "eval_every": 1})
    _, metrics = lf.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [list(r) for r in steps] == [
        ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s"]
    ] * 2
    assert [r["step"] for r in evals] == [0, 1, 2] and all(
        list(r) == ["step", "eval_loss", "eval_ppl"] for r in evals
    )
    assert rows[-1]["event"] == "end"
    assert set(metrics) == {
        "method", "steps", "train_loss", "final_train_loss", "initial_eval_loss", "final_eval_loss",
        "final_eval_ppl", "tokens_per_s", "train_time_s", "trainable_params", "total_params",
        "allreduce_bytes_per_step", "world_size", "peak_host_bytes", "output_dir", "result_dir",
    }  # fmt: skip
    assert metrics["steps"] == 2 and metrics["allreduce_bytes_per_step"] == 0
