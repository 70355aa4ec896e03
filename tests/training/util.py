"""Helpers for the training-engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

QA_TRAIN = "builtin:quickstart/qa_train.jsonl"
QA_EVAL = "builtin:quickstart/qa_eval.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_config(output: Path, **sections) -> dict:
    """A config dict for a few fast steps on builtin:tiny-llama (deep-merged with ``sections``)."""
    cfg = {
        "model": {"path": "builtin:tiny-llama"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": QA_TRAIN, "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "progress_bar": False, "seed": 1},
        "output": str(output),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def subprocess_env() -> dict:
    env = dict(os.environ)
    # One thread per process: the machines are small and shared; also makes timings stable.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def cli(*args: str, cwd: Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """``python -m loraforge ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "loraforge", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
