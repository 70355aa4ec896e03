"""loraforge command line: a thin shell over the library.

loraforge quickstart                       a short LoRA fine-tune, no download
loraforge train CONFIG.yaml [key=value ...] [--resume]
loraforge merge --base DIR --adapter DIR --out DIR
loraforge generate --base DIR [--adapter NAME=DIR ...] --prompt "..."
loraforge inspect DIR
loraforge export --format gguf --base DIR [--adapter DIR] --out FILE.gguf [--type f16|q8_0|f32] [--lora-only]
loraforge extract | resize | analyze ...   low-rank tools: adapter from a full fine-tune, rank change, spectra
loraforge plan CONFIG.yaml [--memory 24GiB] will it fit: peak memory, time per step, what makes it fit
loraforge demo ... | loraforge compare ... | loraforge lowrank ... | loraforge chat ... | loraforge serve ...
loraforge eval ...
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# 141 = 128 + SIGPIPE: what a shell reports for a command whose reader went away (``| head``)
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141
# command -> (the module whose main(argv) runs it, its one-line help)
DELEGATED = {
    "demo": (
        "loraforge.demo",
        "persona chatbot demo: LoRA, full fine-tune and QLoRA on one base (see loraforge demo --help)",
    ),
    "compare": (
        "loraforge.demo.compare",
        "LoRA, DoRA, IA3, prefix/prompt tuning and bottleneck adapters side by side on the demo task",
    ),
    "chat": (
        "loraforge.demo.chat",
        "interactive chat with a base model and persona adapters (see loraforge chat --help)",
    ),
    "serve": (
        "loraforge.serving.cli",
        "OpenAI-compatible server for a base model and many adapters (see loraforge serve --help)",
    ),
    "eval": (
        "loraforge.evaluation",
        "score a base model and its adapters on lm-evaluation-harness tasks (see loraforge eval --help)",
    ),
    "resize": (
        "loraforge.lowrank.resize",
        "change a LoRA adapter's rank by SVD of each layer's update (see loraforge resize --help)",
    ),
    "analyze": (
        "loraforge.lowrank.analyze",
        "an adapter's spectra, effective rank, subspace similarity, amplification (loraforge analyze --help)",
    ),
    "plan": ("loraforge.planning.cli", "will a fine-tune fit: peak memory, time per step, what makes it fit"),
    "extract": ("loraforge.lowrank.extract", "extract a LoRA adapter from a full fine-tune (SVD of its ΔW)"),
    "lowrank": ("loraforge.demo.lowrank", "the demo's fine-tune extracted, LoRAs resized, φ of two adapters"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the empty ones ("(default: None)", "(default: [])" say nothing)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .training.config import describe_keys

    p = argparse.ArgumentParser(prog="loraforge", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quickstart",
        help="short LoRA fine-tune of a built-in model on bundled data; prints before/after loss",
        description="LoRA fine-tune of builtin:small-llama on bundled Q&A pairs (configs/quickstart.yaml); "
        "prints the eval loss before and after. No download; well under a minute on 2 CPU cores.",
        formatter_class=_Formatter,
    )
    q.add_argument("--output", default="runs/quickstart", help="output directory")
    q.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.max_steps=20",
    )

    t = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        description="Fine-tune a causal LM. Config keys (set in the YAML or as KEY=VALUE):\n\n"
        + describe_keys()
        + "\n\nIn the lora section PEFT's names lora_alpha, lora_dropout and init_lora_weights are "
        "accepted too.",
        formatter_class=_Formatter,
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. lora.r=32 train.lr=1e-4",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint (resume: auto)"
    )

    m = sub.add_parser(
        "merge",
        help="merge an adapter into its base: a plain transformers model directory",
        formatter_class=_Formatter,
    )
    m.add_argument("--base", required=True, help="base model: directory, hub id, .gguf file or builtin:NAME")
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    m.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    m.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype"
    )

    g = sub.add_parser(
        "generate", help="generate text from a base model or its adapters", formatter_class=_Formatter
    )
    g.add_argument("--base", required=True, help="base model: directory, hub id, .gguf file or builtin:NAME")
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter to load (repeatable); NAME defaults to the directory name",
    )
    g.add_argument(
        "--use",
        default=None,
        help="comma-separated adapters to answer with ('base' = no adapter); default: every loaded adapter, "
        "or the base when none",
    )
    g.add_argument(
        "--prompt", required=True, help="the prompt (a user message when the tokenizer has a chat template)"
    )
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template to the prompt")
    g.add_argument(
        "--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="dtype"
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    i = sub.add_parser(
        "inspect",
        help="what an adapter, checkpoint, training output or model directory holds",
        formatter_class=_Formatter,
    )
    i.add_argument("path", help="directory to inspect")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    _add_export_parser(sub)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def _add_export_parser(sub) -> None:
    x = sub.add_parser(
        "export",
        help="export a merged model or a LoRA adapter as GGUF for llama.cpp / Ollama",
        description="Write GGUF (llama.cpp's format, also read by Ollama): the base with the adapter merged "
        "in (or the base alone), or with --lora-only the adapter as llama.cpp's LoRA-adapter GGUF "
        "(llama-cli -m BASE.gguf --lora ADAPTER.gguf). Llama, Mistral and Qwen2 models.",
        formatter_class=_Formatter,
    )
    x.add_argument("--format", default="gguf", choices=["gguf"], help="file format")
    x.add_argument("--base", required=True, help="base model: directory, hub id, .gguf file or builtin:NAME")
    x.add_argument("--adapter", default=None, help="adapter directory (PEFT format) to merge or export")
    x.add_argument("--out", required=True, help="output .gguf file (must not exist)")
    x.add_argument(
        "--type", default="f16", choices=["f16", "q8_0", "f32"], help="tensor type of the weight matrices"
    )
    x.add_argument("--lora-only", action="store_true", help="write the adapter alone (llama.cpp LoRA GGUF)")


def _export(args) -> int:
    from .export_gguf import export_gguf

    out = export_gguf(args.base, args.out, adapter=args.adapter, type=args.type, lora_only=args.lora_only)
    what = "LoRA adapter" if args.lora_only else ("merged model" if args.adapter else "model")
    print(f"{what} written to {out} (GGUF, {args.type})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then reported as one
        return code
    except BrokenPipeError:
        # The reader of our output went away (``loraforge inspect --json | head``): nothing more
        # can be shown, so stop quietly, as a command killed by SIGPIPE would.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C while starting (importing torch, building the parser)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "quickstart"):
        # KEY=VALUE overrides may also follow an option: ``train run.yaml --resume lora.r=4``
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .training import ConfigError, DataError

    try:
        return {
            "quickstart": _quickstart,
            "train": _train,
            "merge": _merge,
            "generate": _generate,
            "inspect": _inspect,
            "export": _export,
        }[args.command](args)
    except BrokenPipeError:
        raise
    except (ConfigError, DataError, OSError, ValueError) as e:  # OSError: missing, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _delegate(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(DELEGATED[name][0])
    except ImportError as e:
        print(f"error: 'loraforge {name}' is not available in this installation ({e})", file=sys.stderr)
        return EXIT_USAGE
    return int(module.main(argv) or 0)


def _train(args) -> int:
    from .training import TrainConfig, train

    overrides = list(args.overrides) + (["resume=auto"] if args.resume else [])
    cfg = TrainConfig.from_yaml(args.config, overrides)
    _, metrics = train(cfg)  # checks the device and data files before it loads the model
    _summary(metrics, cfg)
    return 0


def _quickstart(args) -> int:
    import torch

    from .training import TrainConfig, train
    from .training.builtin import ASSETS

    if "OMP_NUM_THREADS" not in os.environ:
        # The quickstart's matrices are small: a second intra-op thread gains little on an idle
        # machine and, when the other core is busy, makes every matmul wait for it. Set
        # OMP_NUM_THREADS to choose otherwise.
        torch.set_num_threads(1)

    cfg = TrainConfig.from_yaml(
        ASSETS / "quickstart" / "quickstart.yaml", [f"output={args.output}", *args.overrides]
    )
    print(
        f"quickstart: LoRA r={cfg.lora.r} on every linear layer of {cfg.model.path}, "
        f"{cfg.train.max_steps} steps on bundled Q&A pairs (answers only)"
    )
    _, metrics = train(cfg)
    _summary(metrics, cfg)
    return 0


def _summary(metrics: dict, cfg) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    first, last = metrics["initial_eval_loss"], metrics["final_eval_loss"]
    print()
    if first is not None and last is not None:
        print(f"eval loss before: {first:.4f}  (perplexity {_ppl(first):,.1f})")
        print(f"eval loss after:  {last:.4f}  (perplexity {_ppl(last):,.1f})")
    elif metrics.get("final_train_loss") is not None:
        print(f"final train loss: {metrics['final_train_loss']:.4f}")
    print(
        f"{metrics['steps']} steps in {metrics['train_time_s']:.1f} s, "
        f"{metrics['tokens_per_s'] or 0:,.0f} tokens/s; trainable params {metrics['trainable_params']:,} "
        f"of {metrics['total_params']:,}"
    )
    out = Path(metrics["output_dir"])
    kind = "full model" if cfg.method == "full" else "PEFT-format adapter"
    print(f"result:  {metrics['result_dir']}  ({kind})")
    print(f"metrics: {out / 'metrics.jsonl'}   loss curve: {out / 'loss.png'}")
    if cfg.method != "full":
        base, adapter = cfg.model.path, metrics["result_dir"]
        print(f'next:    loraforge generate --base {base} --adapter {adapter} --prompt "..."')


def _ppl(loss: float) -> float:
    import math

    return math.exp(min(loss, 50))


def _merge(args) -> int:
    from .training.inference import merge_to_dir

    out = merge_to_dir(args.base, args.adapter, args.out, args.dtype)
    print(f"merged model written to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def _generate(args) -> int:
    import loraforge as lf

    from .training.inference import generate, load_with_adapters
    from .training.modeling import check_device

    check_device(args.device, "--device")

    adapters = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = Path(item.rstrip("/")).name or "default", item
        if name in adapters or name in ("base", "__base__"):
            raise ValueError(f"--adapter {item}: adapter name {name!r} is taken; use NAME=DIR")
        adapters[name] = directory
    use = args.use.split(",") if args.use else (list(adapters) or ["base"])
    unknown = [u for u in use if u not in adapters and u not in ("base", "__base__")]
    if unknown:
        raise ValueError(
            f"--use {args.use}: unknown adapter(s) {unknown}; loaded: {list(adapters) or 'none'}"
        )
    model, tokenizer = load_with_adapters(args.base, adapters, args.dtype, args.device)
    for name in use:
        kwargs = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            chat=not args.raw,
        )
        if name in ("base", "__base__"):
            if adapters:
                with lf.disable_adapters(model):
                    text = generate(model, tokenizer, args.prompt, **kwargs)
            else:
                text = generate(model, tokenizer, args.prompt, **kwargs)
        else:
            lf.set_adapter(model, name)
            text = generate(model, tokenizer, args.prompt, **kwargs)
        print(f"[{name}] {text}" if len(use) > 1 else text, flush=True)
    return 0


def _inspect(args) -> int:
    from .training.inspection import format_info, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
