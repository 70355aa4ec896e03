"""``loraforge serve``: an OpenAI-compatible server for a base model and many LoRA adapters.

    loraforge serve BASE_DIR --adapter pirate=DIR --adapter butler=DIR
    loraforge serve builtin:smollm2 --adapter-root runs/   # adapters loadable at runtime from runs/
    loraforge serve --demo [DIR]                           # what `loraforge demo` trained
    loraforge serve --demo --base smollm2                  # what `loraforge demo --base smollm2` trained

Flag names follow vLLM's where it has one (its spellings are accepted too: --lora-modules,
--max-num-seqs, --max-model-len, --served-model-name, --quantization). Bad flags or paths: one
line on stderr and exit code 2; a failure while starting (a model or adapter that does not load, a
port in use): exit code 1. SIGTERM or Ctrl-C: stop accepting, finish the running requests, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

EXIT_USAGE, EXIT_FAILED = 2, 1


class ServeError(RuntimeError):
    """A bad flag or path: one line, exit code 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="loraforge serve",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) for one "
        "base model and many LoRA adapters, batched together. See the module docstring for examples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "base_pos",
        nargs="?",
        default=None,
        metavar="BASE",
        help="base model: directory, hub id, .gguf file or builtin:NAME ('smollm2' for SmolLM2)",
    )
    p.add_argument("--base", default=None, help="the base model, as BASE (with --demo: which demo's base)")
    p.add_argument(
        "--adapter",
        "--lora-modules",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter served as model NAME (repeatable; a bare DIR is named after it)",
    )
    p.add_argument(
        "--demo",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="serve what `loraforge demo` wrote to DIR (default runs/demo, runs/demo-smollm2 with "
        "--base smollm2): its base and one adapter per character",
    )
    p.add_argument(
        "--adapter-root",
        default=None,
        metavar="DIR",
        help="allow POST /v1/load_lora_adapter for adapters inside DIR (off without it)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start-up)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on the API and /metrics (/health and the chat page's "
        "own files stay open; the page sends the key on its calls) (default: $LORAFORGE_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's id in the API (default: its hub id, or its directory's name)",
    )
    p.add_argument("--max-loras", type=int, default=8, help="adapters loaded in the model at once (LRU)")
    p.add_argument(
        "--max-batch-size", "--max-num-seqs", type=int, default=32, help="sequences running at once"
    )
    p.add_argument(
        "--max-batch-tokens",
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens in one forward (prompts joining a step)",
    )
    p.add_argument(
        "--no-batch-invariance",
        action="store_true",
        help="let small steps skip the padding that makes a request's tokens independent of the other "
        "requests in its batch (faster with few requests on a CPU; rare near-ties may then differ)",
    )
    p.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="longest prompt, in tokens (default: --max-total-tokens)",
    )
    p.add_argument(
        "--max-total-tokens",
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + max_tokens of one request (default and upper bound: the model's context)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=256,
        help="HTTP requests in flight; more get 429 at once",
    )
    p.add_argument(
        "--quantize",
        "--quantization",
        default=None,
        choices=["nf4", "fp4"],
        help="load the base in 4 bits (QLoRA's storage; adapters stay in full precision)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: bfloat16 on a GPU that has it, else float32)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level (info shows one line per request)",
    )
    args = p.parse_args(argv)
    for flag in (
        "max_loras",
        "max_batch_size",
        "max_batch_tokens",
        "max_concurrent_requests",
        "max_input_tokens",
        "max_total_tokens",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    return args


def _adapters(items: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if not name or not path:
            raise ServeError(f"--adapter {item!r}: expected NAME=DIR")
        if name in adapters:
            raise ServeError(f"--adapter {item!r}: the name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def resolve(args) -> tuple[Path, str, dict[str, Path]]:
    """(base directory, base id, {name: adapter directory}) from the flags; ServeError when bad."""
    from ..demo.chat import ChatError
    from ..demo.chat import resolve as resolve_demo
    from ..demo.smollm2 import BASE as SMOLLM2
    from ..demo.smollm2 import is_smollm2
    from ..pretrained import base_name, is_pretrained
    from ..pretrained import resolve as resolve_pretrained

    if args.base_pos and args.base and args.base_pos != args.base:
        raise ServeError(f"two base models: {args.base_pos} and --base {args.base}")
    source = args.base_pos or args.base
    adapters = _adapters(args.adapter)
    try:
        if args.demo is not None:
            demo = argparse.Namespace(
                demo=args.demo or None, base=source, adapter=[f"{k}={v}" for k, v in adapters.items()]
            )
            base, adapters = resolve_demo(demo)
            source = SMOLLM2 if is_smollm2(source) else base
        else:
            if not source:
                raise ServeError(
                    "no base model: loraforge serve BASE [--adapter NAME=DIR ...], or --demo [DIR]"
                )
            source = SMOLLM2 if is_smollm2(source) else source
            for name, path in adapters.items():
                if not (path / "adapter_config.json").is_file():
                    raise ServeError(
                        f"--adapter {name}={path}: not an adapter directory (no adapter_config.json)"
                    )
            base = Path(resolve_pretrained(str(source))) if is_pretrained(source) else source
            from ..training.modeling import check_causal_lm

            check_causal_lm(str(base), key="BASE")
    except ChatError as e:
        raise ServeError(str(e)) from None
    except (ValueError, OSError) as e:  # ConfigError is a ValueError: no such model, not a causal LM
        raise ServeError(str(e)) from None
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise ServeError(f"--adapter-root {args.adapter_root}: no such directory")
    base_id = args.served_model_name or base_name(str(source)) or Path(str(source)).name or str(source)
    if base_id in adapters:
        raise ServeError(f"--adapter {base_id}: the name is the base model's id; choose another")
    return Path(base), base_id, adapters


def load(base: Path, args):
    """(model, tokenizer) on the chosen device, in eval mode."""
    from transformers import AutoModelForCausalLM

    from ..training.dist import pick_device
    from ..training.modeling import check_device, load_tokenizer, resolve_dtype

    check_device(args.device, "--device")
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(str(base))
    if args.quantize:
        from ..model_files import load_model
        from ..quant import QuantConfig

        qc = QuantConfig(quant_type=args.quantize, compute_dtype=dtype)
        model = load_model(base, quantization=qc, dtype=dtype, device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    # (no torch.set_grad_enabled(False) here: grad mode is per thread; the engine's thread turns it off)
    return model.eval(), tokenizer


def banner(url: str, base_id: str, adapters, api_key: bool) -> list[str]:
    models = ", ".join([f"{base_id} (base)", *adapters])
    first = next(iter(adapters), base_id)
    auth = ' -H "Authorization: Bearer $LORAFORGE_API_KEY"' if api_key else ""
    return [
        f"loraforge serve: listening on {url}  (OpenAI API under {url}/v1; chat page at {url}/)",
        f"models: {models}",
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d "
        f'\'{{"model": "{first}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
    ]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies of the
        signal; here a server that stopped accepting and finished its requests exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in original.items():
                    signal.signal(s, handler)

    return Server


class _HideStartupTraceback(logging.Filter):
    """A start-up failure we report in one line ourselves need not be logged again as a traceback."""

    def __init__(self, failed):
        super().__init__()
        self.failed = failed

    def filter(self, record):
        return not self.failed()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        base, base_id, adapters = resolve(args)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import uvicorn

        from .engine import Engine
        from .server import ServeConfig, create_app
    except ImportError as e:
        print(
            f"error: loraforge serve needs fastapi and uvicorn (pip install fastapi uvicorn): {e}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    api_key = args.api_key or os.environ.get("LORAFORGE_API_KEY") or None
    try:
        sock = _bind(args.host, args.port)
        model, tokenizer = load(base, args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = ServeConfig(
        base_id=base_id,
        base_path=str(base),
        adapters=adapters,
        adapter_root=Path(args.adapter_root).resolve() if args.adapter_root else None,
        api_key=api_key,
        max_loras=args.max_loras,
        max_concurrent_requests=args.max_concurrent_requests,
    )

    def make_engine(cfg):
        return Engine(
            model,
            tokenizer,
            base_id=base_id,
            base_path=base,
            max_loras=args.max_loras,
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
            batch_invariant=not args.no_batch_invariance,
        )

    def ready():
        for line in banner(url, base_id, adapters, api_key is not None):
            print(line, flush=True)

    app = create_app(make_engine, config, on_ready=ready)
    failed = lambda: app.state.serve.startup_error is not None
    logging.getLogger("uvicorn.error").addFilter(_HideStartupTraceback(failed))
    server = _server_class()(
        uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=None)
    )
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit on a failed start-up (code 3): ours is 1, with one line
        pass
    if failed():
        print(f"error: {app.state.serve.startup_error}", file=sys.stderr)
        return EXIT_FAILED
    return 0 if server.started else EXIT_FAILED
