"""Fixtures for the training engine: the built-in tiny model/tokenizer and a finished run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .util import QA_EVAL, QA_TRAIN, tiny_config


@pytest.fixture(autouse=True)
def single_threaded(one_thread):
    """Every test of the training engine runs single-threaded (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="session")
def tokenizer():
    from loraforge.training.builtin import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """builtin:tiny-llama saved as a plain transformers directory (weights + tokenizer)."""
    from loraforge.training.builtin import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("builtin:tiny-llama").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 4-step LoRA run (adapter, checkpoint, metrics) shared by read-only tests."""
    from loraforge.training import train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, data={"train": QA_TRAIN, "eval": QA_EVAL, "max_length": 48})
    train(cfg)
    return out
