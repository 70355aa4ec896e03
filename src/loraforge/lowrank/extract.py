"""Extract a LoRA adapter from a full fine-tune: ``loraforge extract`` / ``lf.extract_lora``.

For every targeted linear layer, ΔW = W_tuned − W_base (out, in) and its truncated SVD
(``spectra.truncate``: a fixed rank, or the smallest rank keeping a share of the Frobenius energy)
give B = U_r·√S_r (out, r) and A = √S_r·V_rᵀ (r, in), so that B·A is the best rank-r
approximation of ΔW. The adapter is written in PEFT's format with each layer's rank in
``rank_pattern`` and ``alpha_pattern`` equal to it, so every layer's scale alpha/r is 1: loading it
on the base gives W_base + B·A. GPT-2's Conv1D (weight stored (in, out)) gets the same factors of
its (out, in) map; PEFT's ``fan_in_fan_out`` is set. Where a targeted layer's bias changed too,
the change is stored as PEFT's ``lora_B.bias`` (``lora_bias``), added once as the scale is 1.

Parameters that are not targeted linear weights (embeddings, the LM head, norms, biases of layers
left out) are compared too and their changes reported (relative change ‖ΔW‖_F / ‖W‖_F); the
modules named in ``modules_to_save`` are stored whole from the fine-tune, as PEFT's
``modules_to_save`` copies.

Streaming: the models' module trees are built on the meta device and the two checkpoints read one
tensor pair at a time (``weights.Checkpoint``), so peak memory is about two layers and one ΔW (and
its SVD), plus the adapter being written; never two models.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapter_files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _task_type
from ..config import LoraConfig
from ..files import format_bytes
from ..injection import name_matches
from ..kinds import is_conv1d
from .spectra import check_request, truncate
from .weights import Checkpoint

__all__ = ["ExtractReport", "eval_loss", "extract_lora", "main"]

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    energy: float  # Frobenius energy of ΔW kept
    max_sv: float


@dataclass
class ChangeRow:
    name: str
    shape: tuple[int, ...]
    relative_change: float  # ‖ΔW‖_F / ‖W_base‖_F
    saved: str  # "modules_to_save", "lora_B.bias" or "" (left out of the adapter)


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote: a row per extracted layer and per other changed tensor."""

    out: str
    layers: list[LayerRow] = field(default_factory=list)
    other_changes: list[ChangeRow] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targeted layers whose ΔW is zero (left out)
    adapter_params: int = 0
    adapter_bytes: int = 0
    eval: dict[str, float] = field(default_factory=dict)  # filled by ``--eval``: base, full, adapter

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The per-layer table, the other changes and the totals, as text."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rank':>4}  {'energy':>8}  {'max sv':>9}"]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.rank:>4}  {r.energy:>8.5f}  {r.max_sv:>9.4g}")
        if self.unchanged:
            lines.append(f"unchanged (left out): {len(self.unchanged)} layers, e.g. {self.unchanged[:3]}")
        if self.other_changes:
            lines.append("")
            lines.append("other changed tensors (||dW||/||W||):")
            for c in self.other_changes:
                where = f"  [{c.saved}]" if c.saved else "  [not in the adapter]"
                lines.append(f"  {c.name} {tuple(c.shape)}: {c.relative_change:.3g}{where}")
        lines.append("")
        ranks = [r.rank for r in self.layers]
        lines.append(
            f"total: {len(self.layers)} layers, ranks {min(ranks, default=0)}..{max(ranks, default=0)}, "
            f"{self.adapter_params:,} adapter parameters, {format_bytes(self.adapter_bytes)} -> {self.out}"
        )
        for k, v in self.eval.items():
            lines.append(f"eval loss {k:<8} {v:.4f}")
        return "\n".join(lines)


# -- extraction -------------------------------------------------------------------------------------
def _check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    """Same architecture, same parameters, same shapes; else one line naming the first difference."""
    if base.arch != tuned.arch:
        raise ValueError(
            f"--base {base.source} is a {base.arch}, --tuned {tuned.source} a {tuned.arch}: "
            "not one architecture"
        )
    for name, shape in base.params.items():
        other = tuned.params.get(name)
        if other is None:
            raise ValueError(f"--tuned {tuned.source} has no parameter {name} (the base has {shape})")
        if other != shape:
            raise ValueError(
                f"{name}: shape {list(shape)} in --base {base.source}, "
                f"{list(other)} in --tuned {tuned.source}"
            )
    extra = [n for n in tuned.params if n not in base.params]
    if extra:
        raise ValueError(f"--base {base.source} has no parameter {extra[0]} (--tuned {tuned.source} has)")


def _targets(ck: Checkpoint, target_modules, modules_to_save) -> list[str]:
    layers = ck.linear_layers()
    chosen = [n for n in layers if target_modules is None or name_matches(target_modules, n)]
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model has {short}")
    # (as PEFT: a module saved whole is not adapted as well)
    return [n for n in chosen if not (modules_to_save and name_matches(modules_to_save, n))]


def _saved_modules(ck: Checkpoint, modules_to_save) -> list[str]:
    if not modules_to_save:
        return []
    found = [n for n in ck.modules if n and name_matches(modules_to_save, n)]
    for entry in modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n in found):
            raise ValueError(f"modules_to_save entry {entry!r} names no module of the {ck.arch}")
    return [n for n in found if not any(n.startswith(m + ".") for m in found)]  # (outermost ones)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc). Its malloc raises its mmap threshold to
    the size of each large block freed, so the next layers' few-MB blocks come from its heap, and
    their holes pile up: without this, ~3 MB per layer, 0.6 GB over SmolLM2-135M's 210 layers."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _relative_change(b_ck: Checkpoint, t_ck: Checkpoint, name: str, shape, block_bytes=4 << 20) -> float:
    """‖W_tuned − W_base‖_F / ‖W_base‖_F of parameter ``name`` (0: unchanged; inf: W_base = 0),
    from blocks of rows of ~``block_bytes`` (an embedding matrix, often a model's largest tensor,
    is never read whole)."""
    row = 4 * max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 4
    rows = max(1, block_bytes // row)
    dd = ww = 0.0
    if b_ck.plain(name) and t_ck.plain(name):
        pairs = zip(b_ck.blocks(name, rows), t_ck.blocks(name, rows))
    else:  # (a 4-bit weight beside a plain one: both whole, in one layout)
        pairs = [(b_ck.read(name), t_ck.read(name))]
    for w, t in pairs:
        w = w.double()
        dd += float((t.double() - w).square().sum())
        ww += float(w.square().sum())
    if dd == 0:
        return 0.0
    return (dd / ww) ** 0.5 if ww > 0 else float("inf")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory; give a new output directory")


def extract_lora(
    base,
    tuned,
    out,
    *,
    rank: int | None = None,
    energy: float | None = None,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    max_rank: int | None = None,
    dtype: str = "float32",
) -> ExtractReport:
    """Write the LoRA adapter that best approximates ``tuned − base`` into directory ``out``.

    Args:
        base, tuned: models of one architecture (a directory, hub id, ``builtin:NAME``, ``.gguf``);
            fp32, bf16 or bitsandbytes 4-bit.
        rank: every layer's rank (capped at min(out, in)); or
        energy: per layer, the smallest rank keeping this share of ‖ΔW‖_F², in (0, 1].
        target_modules: which linear layers (PEFT-style: a list of names / dotted suffixes, or a
            regex matching the whole path); default every linear layer but the output head.
        modules_to_save: modules stored whole from ``tuned`` (e.g. ``["embed_tokens", "lm_head"]``).
        max_rank: cap on every layer's rank (with ``energy``).
        dtype: the adapter tensors' dtype: float32, bfloat16 or float16.

    Raises ``ValueError`` (one line) for a bad request, two models that differ in architecture or
    shapes, an ``out`` that is not new or empty; ``FileNotFoundError`` for a missing model. Nothing
    is written unless the whole adapter is (it is built beside ``out`` and renamed into place).
    """
    check_request(rank, energy)
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0
    ):
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    out = Path(out)
    _check_out(out)
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    _check_pair(b_ck, t_ck)
    targets = _targets(t_ck, target_modules, modules_to_save)
    saved = _saved_modules(t_ck, modules_to_save)
    report = ExtractReport(out=str(out))
    tensors: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}  # target -> Δbias, for the layers whose bias changed
    with torch.no_grad():
        for name in targets:  # one layer at a time: two weights and one ΔW alive
            # ΔW in float64 (truncate's SVD precision), subtracted in place: the two read
            # weights and one float64 ΔW are the peak, no float32 ΔW or float64 W beside them
            delta = t_ck.read(f"{name}.weight").double()
            delta -= b_ck.read(f"{name}.weight")
            if not torch.any(delta):
                report.unchanged.append(name)
                continue
            cut = truncate(delta, rank=rank, energy=energy, max_rank=max_rank)
            del delta
            _trim_heap()
            report.layers.append(
                LayerRow(name, t_ck.params[f"{name}.weight"], cut.rank, cut.energy, cut.max_sv)
            )
            tensors[f"{PREFIX}{name}.lora_A.weight"] = cut.a.to(DTYPES[dtype]).contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = cut.b.to(DTYPES[dtype]).contiguous()
        extracted = {r.name for r in report.layers}
        # a saved module's parameters by its own names (a tied head's too: PEFT saves its copy)
        saved_params = [
            f"{m}.{p}" for m in saved for p, _ in t_ck.modules[m].named_parameters(remove_duplicate=False)
        ]
        for pname in saved_params:
            tensors[PREFIX + pname] = t_ck.read(pname).to(DTYPES[dtype]).contiguous()
        for pname, shape in t_ck.params.items():
            module_name, _, attr = pname.rpartition(".")
            if (module_name in extracted or module_name in report.unchanged) and attr == "weight":
                continue
            if not (b_ck.has(pname) and t_ck.has(pname)):
                if t_ck.tied(pname):
                    continue  # (the head shares the input embeddings: their change is reported)
                raise ValueError(
                    f"{(b_ck if t_ck.has(pname) else t_ck).path}: no tensor {pname} in its files"
                )
            where = "modules_to_save" if pname in saved_params else ""
            if module_name in extracted and attr == "bias":
                delta = t_ck.read(pname).float() - b_ck.read(pname).float()
                if torch.any(delta):
                    biases[module_name], where = delta.to(DTYPES[dtype]), "lora_B.bias"
            change = _relative_change(b_ck, t_ck, pname, shape)
            _trim_heap()
            if change > 0:
                report.other_changes.append(ChangeRow(pname, shape, change, where))
    if biases:  # PEFT's lora_bias gives every adapted layer a B bias: zero where nothing changed
        for r in report.layers:
            tensors[f"{PREFIX}{r.name}.lora_B.bias"] = biases.get(
                r.name, torch.zeros(r.shape[0], dtype=DTYPES[dtype])
            )
    if not report.layers and not saved:
        raise ValueError(
            f"--tuned {t_ck.source} does not differ from --base {b_ck.source} in the targeted layers"
        )
    cfg = _config(report, saved, modules_to_save, biases, t_ck)
    report.adapter_params = sum(t.numel() for t in tensors.values())
    report.adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    _write(out, cfg, tensors, t_ck, b_ck)
    return report


def _config(
    report: ExtractReport, saved: list[str], modules_to_save, biases: dict, t_ck: Checkpoint
) -> LoraConfig:
    """Ranks in ``rank_pattern`` and alpha = rank per layer (scale 1); ``r`` the most common rank."""
    ranks = [r.rank for r in report.layers]
    r0 = max(set(ranks), key=ranks.count) if ranks else 1
    conv1d = any(is_conv1d(t_ck.modules[r.name]) for r in report.layers)
    return LoraConfig(
        r=r0,
        alpha=float(r0),
        target_modules=sorted(r.name for r in report.layers),
        modules_to_save=list(modules_to_save) if saved else None,
        rank_pattern={r.name: r.rank for r in report.layers if r.rank != r0},
        alpha_pattern={r.name: float(r.rank) for r in report.layers if r.rank != r0},
        fan_in_fan_out=conv1d,
        lora_bias=bool(biases),
    )


def _write(out: Path, cfg: LoraConfig, tensors: dict, t_ck: Checkpoint, b_ck: Checkpoint) -> None:
    """The adapter directory, built in a temporary one beside ``out`` and renamed onto it."""
    from safetensors.torch import save_file

    from ..pretrained import base_name

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        name = base_name(b_ck.source) or b_ck.source
        peft = cfg.to_peft_dict(task_type=_task_type(t_ck.model), base_model_name_or_path=name)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft, indent=2, sort_keys=True), encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # (checked empty; os.replace needs it gone on some systems)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- eval loss ----------------------------------------------------------------------------------------
def eval_loss(model, tokenizer, rows_or_path, *, max_length: int = 512, batch_size: int = 8) -> float:
    """Mean token loss of causal LM ``model`` on rows in the training data format (a JSONL/JSON/CSV/
    Parquet path, or a list of row dicts: text, prompt/completion or chat; loss on completions /
    assistant turns only, as training computes it), through the trainer's loss (``CausalLMLoss``)."""
    from ..training.config import DataSection
    from ..training.data import collate, detect_format, encode_row, load_examples, row_problem, to_device
    from ..training.datafiles import DataError
    from ..training.loss import CausalLMLoss

    cfg = DataSection(max_length=max_length)
    if isinstance(rows_or_path, (str, os.PathLike)):
        examples = load_examples(str(rows_or_path), cfg, tokenizer, log=lambda *_: None)
    else:
        rows = list(rows_or_path)
        if not rows:
            raise DataError("eval_loss: no rows")
        fmt = detect_format(rows[0], cfg, "row 0")
        examples = []
        for i, row in enumerate(rows):
            problem = row_problem(row, fmt, cfg)
            if problem is not None:
                raise DataError(f"row {i}: {problem}")
            examples.append(encode_row(tokenizer, row, fmt, cfg)[0])
        examples = [e for e in examples if e.n_targets]
    core = CausalLMLoss(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[i : i + batch_size], tokenizer.pad_token_id), device)
            loss_sum, n = core(**batch)
            total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def _evaluate(base: str, tuned: str, adapter: Path, data: str, max_length: int) -> dict[str, float]:
    """Eval loss of the base, the base + extracted adapter and the full fine-tune (one model loaded
    at a time). The tokenizer is the fine-tune's, else the base's."""
    from ..adapter_files import load_adapter
    from ..model_files import load_model, model_dir
    from ..training.modeling import load_tokenizer

    sources = [str(model_dir(s)) for s in (tuned, base)]
    tok_dir = next((s for s in sources if any(Path(s).glob("tokenizer*"))), None)
    if tok_dir is None:
        raise ValueError(f"--eval: neither --tuned {tuned} nor --base {base} has a tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    model = load_model(base)
    losses = {"base": eval_loss(model, tokenizer, data, max_length=max_length)}
    load_adapter(model, adapter)
    losses["adapter"] = eval_loss(model, tokenizer, data, max_length=max_length)
    del model
    losses["full"] = eval_loss(load_model(tuned), tokenizer, data, max_length=max_length)
    return losses


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraforge extract",
        description="Extract a LoRA adapter (PEFT format) from a full fine-tune: per linear layer, the "
        "truncated SVD of W_tuned - W_base at a fixed rank or a share of its energy.",
    )
    p.add_argument("out", metavar="OUT", help="output adapter directory (new or empty)")
    p.add_argument("--base", required=True, help="base model: directory, hub id, .gguf file or builtin:NAME")
    p.add_argument("--tuned", required=True, help="the full fine-tune of --base (same forms)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="every layer's rank")
    how.add_argument(
        "--energy", type=float, help="per layer, the smallest rank keeping this share of ||dW||^2"
    )
    p.add_argument("--max-rank", type=int, help="cap on every layer's rank (with --energy)")
    p.add_argument(
        "--target-modules",
        action="append",
        help="linear layers to extract: names / dotted suffixes (q_proj,v_proj; repeatable), or one regex "
        "matching the whole path ('.*\\.0\\..*_proj'); default: every linear layer but the LM head",
    )
    p.add_argument(
        "--modules-to-save",
        action="append",
        help="modules stored whole from --tuned (embed_tokens,lm_head; repeatable)",
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the adapter tensors' dtype")
    p.add_argument(
        "--eval", metavar="DATA", help="JSONL (training data format): eval loss of base, full, adapter"
    )
    p.add_argument("--max-length", type=int, default=512, help="tokens per eval row (with --eval)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def _names(values: list[str] | None, regex: bool = False) -> list[str] | str | None:
    """Comma-separated, repeatable names; with ``regex``, one value with regex characters is a
    regex (PEFT's str form of target_modules)."""
    if not values:
        return None
    if regex and len(values) == 1 and any(c in values[0] for c in "*+?[]()|^$\\{}"):
        return values[0]
    return [n for v in values for n in v.split(",") if n]


def main(argv: list[str] | None = None) -> int:
    """``loraforge extract ...``: 0, or 2 with one line on stderr for a bad argument or input."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # (argparse has printed its usage line)
        return int(e.code or 0)
    try:
        if args.eval and not Path(args.eval).is_file():
            raise FileNotFoundError(f"--eval {args.eval}: no such file")
        report = extract_lora(
            args.base,
            args.tuned,
            args.out,
            rank=args.rank,
            energy=args.energy,
            target_modules=_names(args.target_modules, regex=True),
            modules_to_save=_names(args.modules_to_save),
            max_rank=args.max_rank,
            dtype=args.dtype,
        )
        if args.eval:
            report.eval = _evaluate(args.base, args.tuned, Path(args.out), args.eval, args.max_length)
    except (ValueError, OSError) as e:  # bad request or files, ModelNotFoundError, DataError
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table(), flush=True)
    return 0
