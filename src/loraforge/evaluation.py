"""``loraforge eval``: score a base model and its adapters with lm-evaluation-harness.

    loraforge eval builtin:smollm2 --adapter runs/x/adapter --tasks hellaswag,arc_easy --limit 100
    loraforge eval BASE --adapter a=DIR --adapter b=DIR --use base,a,b,a+b --tasks my_task \\
        --include-path my_tasks/ --quantize nf4 --output results.json

The model is the one loraforge runs: the base loaded as ``generate`` loads it (with
``--quantize``, as QLoRA training does with the default ``model.quantization``: double
quantization, blocks of 64, lm_head kept, matmuls in ``--dtype``), the adapters in loraforge's
own layers, unmerged. lm-eval's ``HFLM`` is handed that ``nn.Module`` and its tokenizer
(``HFLM(pretrained=model, tokenizer=...)``), and ``lm_eval.simple_evaluate`` runs the tasks. So a
4-bit base, several adapters summed (``a+b``) or a bf16 base with fp32 adapters are scored exactly
as loraforge computes them; with one adapter on a full-precision base the numbers are lm-eval's
``--model hf --model_args pretrained=BASE,peft=DIR`` ones (the same log-likelihoods to rounding).
The results are JSON (``{"evaluations": [...]}``) with ``--output``.

Tasks are lm-eval's names (globs such as ``mmlu_*`` expand), YAML files, or tasks defined under
``--include-path`` directories; a local task is a YAML over a local file, e.g.::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc}, {metric: acc_norm}]

When every task is found under ``--include-path`` (or given as a YAML file) lm-eval's ~15,000
built-in task files are not indexed (that takes 20-45 s on 2 cores), and the local tasks are built
(their files read) before the model loads, so a missing data file is reported at once.

Results: one lm-eval results dict per evaluated setting (its ``results``, ``groups``,
``versions``, ``n-shot``, ``configs``, ...), with a ``loraforge`` entry saying which base,
adapters, quantization, dtype and device were evaluated; printed as lm-eval's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

EXTRA = "pip install 'loraforge[eval]'"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
BASE = "base"  # the setting name for the base model alone

__all__ = ["EvalError", "evaluate", "evaluate_model", "format_results", "resolve_tasks", "write_results"]


class EvalError(ValueError):
    """A bad ``loraforge eval`` argument or task; the message is one line naming it."""


def require_lm_eval():
    """The ``lm_eval`` module, or an :class:`EvalError` naming the extra to install."""
    try:
        import lm_eval
    except ImportError as e:
        raise EvalError(
            f"loraforge eval needs lm-evaluation-harness, which is not installed ({e}): {EXTRA}"
        ) from None
    return lm_eval


def resolve_tasks(tasks: list[str], include_path: list[str] | None = None):
    """(task names, lm-eval ``TaskManager``): ``tasks`` with globs expanded (YAML file paths kept),
    or an :class:`EvalError` naming every task lm-eval does not know. The built-in tasks are
    indexed only when some task is neither under ``include_path`` nor a YAML file."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise EvalError("--tasks: no task given (e.g. --tasks hellaswag,arc_easy)")
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and not Path(t).expanduser().is_file():
            raise EvalError(f"--tasks {t}: no such task file")
    paths = [str(Path(p).expanduser()) for p in include_path or []]
    for p in paths:
        if not Path(p).exists():
            raise EvalError(f"--include-path {p}: no such directory")
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    names, missing = _match(manager, tasks)
    if not missing:
        missing = _unbuildable(manager, names)
    if missing:
        manager = TaskManager(include_path=paths or None)
        names, missing = _match(manager, tasks)
    if missing:
        where = f" nor under {', '.join(paths)}" if paths else ""
        raise EvalError(
            f"--tasks: unknown task(s) {', '.join(missing)}: not among lm-eval's {len(manager.all_tasks)} "
            f"tasks{where}, nor a task YAML file (local tasks: --include-path DIR)"
        )
    return names, manager


def _unbuildable(manager, names: list[str]) -> list[str]:
    """Build each local task now (its YAML and data file are read: cheap, and a missing file is
    an error before the model loads); the names that need lm-eval's built-in tasks (a local group
    over them) are returned, to be resolved with those indexed."""
    need_defaults = []
    for name in names:
        try:
            manager.load([name])
        except OSError as e:  # the data file is missing or unreadable
            raise EvalError(f"--tasks {name}: {' '.join(str(e).split())}") from None
        except Exception:  # a name the local index lacks (lm-eval raises KeyError, TypeError, ...)
            need_defaults.append(name)
    return need_defaults


def _match(manager, tasks: list[str]) -> tuple[list[str], list[str]]:
    names, missing = [], []
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and Path(t).expanduser().is_file():
            names.append(str(Path(t).expanduser().resolve()))
            continue
        found = manager.match_tasks([t])
        names += [n for n in found if n not in names]
        if not found:
            missing.append(t)
    return names, missing


class _DropModelObjectWarnings(logging.Filter):
    """HFLM warns that a model object (not a name) makes "many other model arguments" ignored
    and that it assumes a single process: both are the point here (no such argument is passed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "is not of type `str`" not in message and "already-initialized model" not in message


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    *,
    task_manager=None,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    seed: int = 0,
) -> dict:
    """lm-eval's results dict for ``model`` (a transformers causal LM, with or without
    loraforge adapters, in whatever state it is in) on ``tasks``, through lm-eval's own
    ``HFLM`` wrapper and ``simple_evaluate``. The model is scored where it is (its device and
    dtype). ``task_manager``: from :func:`resolve_tasks` (default: lm-eval's built-in tasks)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    log = logging.getLogger("lm_eval.models.huggingface")
    quiet = _DropModelObjectWarnings()
    log.addFilter(quiet)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    finally:
        log.removeFilter(quiet)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results


def load_model_for_eval(base: str, adapters: dict[str, str], quantize: str | None, dtype: str, device: str):
    """(model, tokenizer): ``base`` with ``adapters`` (name -> directory) loaded unmerged, as
    ``loraforge generate`` loads them; with ``quantize`` ("nf4" / "fp4") the base's linear layers
    are 4-bit as in QLoRA training (double quantization, blocks of 64, lm_head kept, matmuls in
    ``dtype``)."""
    from .training.inference import load_with_adapters

    if quantize is None:
        return load_with_adapters(base, adapters, dtype, device)
    from .adapter_files import load_adapter
    from .quant import QuantConfig
    from .training import builtin
    from .training.config import ModelSection
    from .training.dist import pick_device
    from .training.inference import _has_tokenizer
    from .training.modeling import check_causal_lm, load_base_model, load_tokenizer

    if not builtin.is_builtin(base):
        check_causal_lm(base, key="BASE")
    dev = pick_device(device)
    qc = QuantConfig(quant_type=quantize, compute_dtype="auto")  # "auto": the matmuls in ``dtype``
    section = ModelSection(path=base, dtype=dtype, quantization=qc)
    model = load_base_model(section, dev, quantize=True)
    for name, directory in adapters.items():
        load_adapter(model, directory, adapter=name)
    model.to(dev).eval()
    tok_source = next((d for d in adapters.values() if _has_tokenizer(d)), base)
    return model, load_tokenizer(tok_source)


@contextlib.contextmanager
def _active(model, names: list[str], loaded: bool):
    """The model answering as ``names`` (summed adapters) or, for ``[BASE]``, as the base."""
    import loraforge as lf

    if names != [BASE]:
        lf.set_adapter(model, names if len(names) > 1 else names[0])
        yield
    elif loaded:
        with lf.disable_adapters(model):
            yield
    else:
        yield


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``[NAME=]DIR`` items -> {name: directory} (NAME defaults to the directory's name)."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = Path(item.rstrip("/")).name or "default", item
        if name in adapters or name == BASE or "+" in name or "," in name:
            raise EvalError(
                f"--adapter {item}: adapter name {name!r} is taken or has '+' or ','; use NAME=DIR"
            )
        adapters[name] = directory
    return adapters


def parse_use(use: str | None, adapters: dict[str, str]) -> list[list[str]]:
    """``--use base,a,b,a+b`` -> [["base"], ["a"], ["b"], ["a", "b"]]; default: each adapter
    alone, or the base when there is none."""
    if not use:
        return [[n] for n in adapters] or [[BASE]]
    settings = []
    for item in use.split(","):
        names = [n.strip() for n in item.split("+")]
        unknown = [n for n in names if n not in adapters and not (n == BASE and len(names) == 1)]
        if unknown:
            raise EvalError(
                f"--use {use}: unknown adapter(s) {unknown}; loaded: {list(adapters) or 'none'} "
                f"({BASE!r} = no adapter; a+b = both summed)"
            )
        settings.append(names)
    return settings


def evaluate(
    base: str,
    adapters: dict[str, str] | None = None,
    tasks: list[str] = (),
    *,
    use: str | None = None,
    include_path: list[str] | None = None,
    quantize: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    **kwargs,
) -> list[dict]:
    """Score ``base`` with ``adapters`` (name -> directory) on ``tasks``: one lm-eval results dict
    per setting of ``use`` (see :func:`parse_use`), each with a ``loraforge`` entry naming what
    was evaluated. ``kwargs`` go to :func:`evaluate_model` (batch_size, limit, num_fewshot, ...).
    Tasks, adapters and the device are checked before the model is loaded."""
    adapters = dict(adapters or {})
    settings = parse_use(use, adapters)
    for directory in adapters.values():  # before the tasks are indexed and the base is read
        if not (Path(directory) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{directory}: not an adapter directory (no adapter_config.json)")
    names, manager = resolve_tasks(list(tasks), include_path)
    from .training.modeling import check_device  # (torch: imported once the cheap checks passed)

    check_device(device, "--device")
    if quantize not in (None, "nf4", "fp4"):
        raise EvalError(f"--quantize {quantize}: must be nf4 or fp4")
    model, tokenizer = load_model_for_eval(base, adapters, quantize, dtype, device)
    out = []
    for active in settings:
        with _active(model, active, bool(adapters)):
            results = evaluate_model(model, tokenizer, names, task_manager=manager, **kwargs)
        results["loraforge"] = {
            "name": "+".join(active),
            "base": base,
            "adapters": {n: str(adapters[n]) for n in active if n != BASE},
            "quantize": quantize,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device),
            "tasks": names,
        }
        out.append(results)
    return out


def format_results(evaluations: list[dict]) -> str:
    """lm-eval's tables (``make_table``) of each evaluation, under a header naming its setting."""
    from lm_eval.utils import make_table

    parts = []
    for r in evaluations:
        info = r["loraforge"]
        what = ", ".join(f"{n}={d}" for n, d in info["adapters"].items()) or "no adapter"
        quant = f", {info['quantize']} base" if info["quantize"] else ""
        parts.append(f"{info['name']}: {info['base']} with {what}{quant} ({info['dtype']}, {info['device']})")
        parts.append(make_table(r))
        if r.get("groups"):
            parts.append(make_table(r, "groups"))
    return "\n".join(parts)


def write_results(evaluations: list[dict], path: str | Path) -> Path:
    """The evaluations as JSON (``{"evaluations": [...]}``), written atomically."""
    from lm_eval.utils import handle_non_serializable

    from .files import atomic_write_text

    path = Path(path)
    text = json.dumps({"evaluations": evaluations}, indent=2, default=handle_non_serializable)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .cli import _Formatter  # the other commands' help style: defaults shown, empty ones not

    p = argparse.ArgumentParser(
        prog="loraforge eval",
        description="Score a base model and its adapters on lm-evaluation-harness tasks, with the model\n"
        "as loraforge runs it (adapters unmerged, 4-bit bases) through lm-eval's HFLM.\n"
        "Prints lm-eval's tables; --output writes the results as JSON.",
        formatter_class=_Formatter,
    )
    p.add_argument("base", metavar="BASE", help="base model: directory, hub id, .gguf file or builtin:NAME")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter to load (repeatable); NAME defaults to the directory name",
    )
    p.add_argument(
        "--use",
        default=None,
        help="comma-separated settings to evaluate: adapter names, 'base' (no adapter), a+b (summed); "
        "default: each adapter in turn, or the base when none",
    )
    p.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval tasks: names, globs (mmlu_*), task YAML files"
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of local task YAMLs (repeatable)",
    )
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4"], help="load the base in 4 bits (QLoRA)")
    p.add_argument(
        "--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward pass")
    p.add_argument(
        "--limit", type=float, default=None, help="documents per task (a fraction below 1: that share)"
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument(
        "--apply-chat-template", action="store_true", help="put prompts in the tokenizer's chat template"
    )
    p.add_argument("--log-samples", action="store_true", help="keep every document's requests and scores")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's sampling and few-shot choice")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.limit is not None:
        if args.limit <= 0:
            p.error("--limit must be positive")
        if args.limit >= 1:
            args.limit = int(args.limit)
    return args


def main(argv: list[str] | None = None) -> int:
    """``loraforge eval ...``: 0, or 2 with one line on stderr for a bad argument, task or file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.output:  # found out now, not after the evaluation
            if Path(args.output).is_dir():
                raise EvalError(f"--output {args.output}: a directory; give a file name (results.json)")
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        evaluations = evaluate(
            args.base,
            parse_adapters(args.adapter),
            args.tasks.split(","),
            use=args.use,
            include_path=args.include_path,
            quantize=args.quantize,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            apply_chat_template=args.apply_chat_template,
            log_samples=args.log_samples,
            seed=args.seed,
        )
    except (ValueError, OSError) as e:  # ConfigError, EvalError, ModelNotFoundError, a bad adapter file
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_results(evaluations), flush=True)
    if args.output:
        print(f"results written to {write_results(evaluations, args.output)}")
    return 0
