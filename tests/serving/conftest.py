"""Servers for the HTTP tests: the shipped demo base (a tiny pretrained Llama with a tokenizer and
a chat template) and adapters made here with random low-rank factors, so that each changes the
output; ``loraforge serve``'s app run by uvicorn in a thread, on 127.0.0.1 and a free port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import loraforge as lf
from loraforge.demo.app import SHIPPED_BASE

# name -> (rank, target modules): different ranks and targets, to be batched together
ADAPTERS = {
    "pirate": (4, ["q_proj", "v_proj"]),
    "butler": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "robot": (2, ["o_proj", "down_proj"]),
}
PROMPTS = ["The capital of Italy is", "Once upon a time", "Snow is"]


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_BASE).eval()
    return model, AutoTokenizer.from_pretrained(SHIPPED_BASE)


def make_adapter(directory: Path, name: str, rank: int, targets: list[str], seed: int) -> Path:
    model, _ = load_base()
    lf.inject(model, lf.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets), adapter=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # A and B random (B is zero after init): the adapter changes the output
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "lora_B" in pname else 0.3))
    lf.save_adapter(model, directory, adapter=name)
    return directory


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(root / name, name, rank, targets, seed)
        for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items())
    }


class Running:
    """A server running in this process; ``url`` ends without a slash."""

    def __init__(self, app, server, thread, port):
        self.app, self.server, self.thread, self.port = app, server, thread, port
        self.url = f"http://127.0.0.1:{port}"
        self.state = app.state.serve

    @property
    def engine(self):
        return self.state.engine

    def client(self, key: str = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(adapters: dict[str, Path], make_engine=None, **config) -> Running:
    """The app of ``loraforge serve`` over a fresh engine on the shipped base, started in a thread."""
    import uvicorn

    from loraforge.serving.engine import Engine
    from loraforge.serving.server import ServeConfig, create_app

    limits = {
        k: config.pop(k) for k in ("max_input_tokens", "max_total_tokens", "max_batch_size") if k in config
    }

    def default_engine(cfg):
        model, tok = load_base()
        return Engine(
            model, tok, base_id=cfg.base_id, base_path=cfg.base_path, max_loras=cfg.max_loras, **limits
        )

    cfg = ServeConfig(base_id="tiny-base", base_path=str(SHIPPED_BASE), adapters=dict(adapters), **config)
    app = create_app(make_engine or default_engine, cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {app.state.serve.startup_error}")
        time.sleep(0.01)
    return Running(app, server, thread, sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(adapter_dirs):
    """One server for a module's tests: the base and every adapter, default limits."""
    running = start_server(adapter_dirs)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def reference(adapter_dirs):
    """reference(model, prompt, max_tokens, chat) -> greedy text from transformers ``generate``
    (``loraforge.training.inference.generate``) with that adapter loaded: what the server must say."""
    from loraforge.training.inference import generate

    model, tok = load_base()
    for name, path in adapter_dirs.items():
        lf.load_adapter(model, path, adapter=name)
    cache = {}

    def answer(name: str, prompt: str, max_tokens: int = 16, chat: bool = False) -> str:
        key = (name, prompt, max_tokens, chat)
        if key not in cache:
            kwargs = dict(max_new_tokens=max_tokens, chat=chat)
            if name == "tiny-base":
                with lf.disable_adapters(model):
                    cache[key] = generate(model, tok, prompt, **kwargs)
            else:
                lf.set_adapter(model, name)
                cache[key] = generate(model, tok, prompt, **kwargs)
        return cache[key]

    return answer


@pytest.fixture
def server_factory(adapter_dirs):
    """start(adapters=None, **ServeConfig/engine limits) -> Running; stopped after the test."""
    started = []

    def start(adapters=None, **config):
        running = start_server(adapter_dirs if adapters is None else adapters, **config)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
