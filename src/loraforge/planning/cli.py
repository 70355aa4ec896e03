"""``loraforge plan CONFIG.yaml [key=value ...] [--device cpu|cuda] [--memory 24GiB] [--world-size N]
[--gemm-tflops X] [--json]``: will this fine-tune fit, how long is a step, what would make it fit."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

DESCRIPTION = """\
Plan a training run from its config alone: the model is built on the meta device from its
config.json (no weights read; a 70B plans in seconds), and the peak memory of one device is
broken down (weights by storage, adapter, gradients, optimizer state, activations, loss, 4-bit
dequantization, runtime), with the FLOPs of one optimizer step and its time. With --memory: does
it fit, and if not the cheapest changes that do, each planned again.

model.path may be a shipped shape, no download: {shapes}.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    from ..cli import _Formatter
    from . import MEMORY_HELP
    from .shape import shipped_shapes

    p = argparse.ArgumentParser(
        prog="loraforge plan", description=DESCRIPTION.format(shapes=", ".join(shipped_shapes())),
        formatter_class=_Formatter,
    )  # fmt: skip
    p.add_argument("config", help="training config YAML (what loraforge train takes)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. lora.r=64")
    p.add_argument("--device", default=None,
                   help="cpu | cuda: where it will train (default: train.device when it names one, else cpu)")
    p.add_argument("--memory", default=None, help=f"memory of one device; {MEMORY_HELP}")
    p.add_argument("--world-size", default="1", help="processes (devices) the run uses, one per device")
    p.add_argument("--gemm-tflops", default=None,
                   help="matmul rate the time is computed at, TFLOP/s (default: measured on the CPU; a GPU's "
                   "measured when one is here, else a stated A100 at 50%% of its peak)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, extra = p.parse_known_args(argv)
    # KEY=VALUE overrides may follow an option too: ``plan run.yaml --memory 24GiB lora.r=64``
    args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
    extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _number(text: str, what: str, kind=float):
    from ..training.config import ConfigError

    try:
        return kind(text)
    except (TypeError, ValueError):
        whole = "whole " if kind is int else ""
        raise ConfigError(f"{what}: expected a {whole}number, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``loraforge plan ...``: 0, or 2 with one line on stderr for a bad config, model shape or option."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from ..training.config import ConfigError
        from . import load_config, parse_memory, plan

        world = _number(args.world_size, "--world-size", int)
        if world < 1:
            raise ConfigError(f"--world-size: must be >= 1, got {world}")
        tflops = None if args.gemm_tflops is None else _number(args.gemm_tflops, "--gemm-tflops")
        if tflops is not None and not tflops > 0:
            raise ConfigError(f"--gemm-tflops: must be > 0, got {args.gemm_tflops}")
        device = args.device
        if device is None:
            train_device = load_config(args.config, args.overrides).train.device
            device = train_device if train_device.startswith("cuda") else "cpu"
        elif device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ConfigError(f"--device: expected cpu or cuda, got {device!r}")
        memory = None if args.memory is None else parse_memory(args.memory, "--memory")
        result = plan(args.config, overrides=args.overrides, device=device, memory=memory,
                      world_size=world, gemm_flops=None if tflops is None else tflops * 1e12)  # fmt: skip
    except (ValueError, OSError) as e:  # ConfigError (a ValueError): the key, file or option named
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render(), flush=True)
    return 0
