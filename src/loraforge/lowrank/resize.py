"""``loraforge resize``: change a LoRA adapter's rank, per layer, by SVD (as kohya's resize_lora.py).

Each adapted layer's update ΔW = s·B·A (s = alpha/r or alpha/√r with rsLoRA, after
``rank_pattern`` / ``alpha_pattern``) is truncated to its best rank-R approximation, to the
smallest rank keeping a fraction E of its Frobenius energy, or to the singular values above
σ_max / X (kohya's sv_ratio), never above the layer's current rank, and written back as
B' = U·√S, A' = √S·Vᵀ with scale 1: the new config gives each layer alpha = r (``rank_pattern``
/ ``alpha_pattern`` for layers whose rank differs from the most common one). The SVD never
forms ΔW: from the QR factors of B and Aᵀ (``spectra.factored``) only an r × r matrix is
decomposed, so R ≥ the current rank reproduces ΔW to float rounding.

Layouts (PEFT's file keys, the module path after ``base_model.model.``):
  Linear / GPT-2 Conv1D  ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r)
  Conv                   ``lora_A.weight`` (r, in, k…), ``lora_B.weight`` (out, r, 1…)
  Embedding              ``lora_embedding_A`` (r, num), ``lora_embedding_B`` (dim, r)
In each case B·A (flattened) is ΔW as an (out, in_flat) matrix, and the new factors take the
old ones' trailing dimensions. ``modules_to_save``, trainable-token rows and biases are copied
unchanged; B's bias (``lora_bias``) is multiplied by s, since the new scale is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LoraConfig
from ..files import format_bytes
from . import spectra

PREFIX = "base_model.model."
# (A's file key suffix, B's): Linear / Conv / Conv1D, then Embedding
PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
EXIT_USAGE = 2


@dataclass
class Factors:
    """One layer's LoRA factors as stored: ΔW = scale · B·A."""

    name: str  # the module path (the file key without ``base_model.model.`` and the suffix)
    a_key: str
    b_key: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's (out, in_flat)."""
        return int(self.b.shape[0]), int(self.a[0].numel())

    @property
    def in_shape(self) -> tuple[int, ...]:
        """A's trailing dimensions: the space its right singular vectors live in."""
        return tuple(self.a.shape[1:])


def read_lora(path, what: str) -> tuple[LoraConfig, dict, dict, list[Factors]]:
    """(config, raw config, tensors, factors per layer) of a LoRA adapter directory.

    ``what`` names the command in messages. Adapters of other methods (IA3, prompt tuning, ...)
    and layouts whose B·A is not ΔW as one matrix (LoRA on bare parameters, grouped
    convolutions, ``nn.MultiheadAttention``) are refused with one line naming the file.
    """
    from ..adapter_files import WEIGHTS_NAME, adapter_dir, read_adapter

    cfg, raw, tensors = read_adapter(path)
    weights = adapter_dir(path) / WEIGHTS_NAME
    if not isinstance(cfg, LoraConfig):
        raise ValueError(
            f"{path}: a {raw.get('peft_type')} adapter; {what} works on LoRA adapters (its B·A factors)"
        )
    if cfg.target_parameters:
        raise ValueError(f"{path}: LoRA on bare parameters (target_parameters) is not supported by {what}")
    found = []
    for key in sorted(tensors):
        for a_suffix, b_suffix in PAIRS:
            if not (key.startswith(PREFIX) and key.endswith("." + a_suffix)):
                continue
            name = key[len(PREFIX) : -len(a_suffix) - 1]
            if ".base_layer." in name or name.endswith(".base_layer"):
                raise ValueError(
                    f"{weights}: {key!r}: nested LoRA factors (nn.MultiheadAttention) are not "
                    f"supported by {what}"
                )
            b_key = f"{PREFIX}{name}.{b_suffix}"
            if b_key not in tensors:
                raise ValueError(f"{weights}: tensor {b_key!r} is missing (the pair of {key!r})")
            a, b = tensors[key], tensors[b_key]
            if a.dim() < 2 or b.dim() != a.dim() or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"{weights}: {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not make one "
                    "matrix B·A (a grouped convolution?); not supported by " + what
                )
            found.append(Factors(name, key, b_key, a, b, cfg.scaling(name)))
    if not found:
        raise ValueError(f"{weights}: no LoRA factors (lora_A / lora_B tensors): not a LoRA adapter")
    return cfg, raw, tensors, found


@dataclass
class ResizeReport:
    """What :func:`resize_adapter` did: one row per layer (name, shape, old_rank, new_rank, energy)."""

    out: str
    layers: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        width = max([len("layer")] + [len(r["name"]) for r in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'rank':>4}  {'new':>4}  {'energy':>8}"]
        for r in self.layers:
            shape = "x".join(str(d) for d in r["shape"])
            ranks = f"{r['old_rank']:>4}  {r['new_rank']:>4}"
            lines.append(f"{r['name']:<{width}}  {shape:>11}  {ranks}  {r['energy']:>8.6f}")
        old = sum(r["old_rank"] for r in self.layers)
        new = sum(r["new_rank"] for r in self.layers)
        lines.append(
            f"{len(self.layers)} layers, ranks summed {old} -> {new}; parameters "
            f"{self.params_before:,} -> {self.params_after:,} "
            f"({_ratio(self.params_after, self.params_before)}); "
            f"file {format_bytes(self.bytes_before, si=True)} -> {format_bytes(self.bytes_after, si=True)}; "
            f"written to {self.out}"
        )
        return "\n".join(lines)


def resize_adapter(
    adapter_dir, out, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None
) -> ResizeReport:
    """Write adapter ``adapter_dir`` at rank ``rank`` (capped at each layer's rank), or at each
    layer's smallest rank keeping ``energy`` of ‖ΔW‖_F², or keeping the singular values above
    σ_max / ``sv_ratio`` (kohya's ``sv_ratio``; at least 1), as a PEFT adapter in ``out`` (new or empty).
    kohya's ``--dynamic_method sv_fro --dynamic_param p`` is ``energy=p²``.

    Exact when ``rank`` is at least every layer's rank (or ``energy`` is 1): the model's outputs
    are unchanged up to float rounding. DoRA adapters and PiSSA / OLoRA / LoftQ ones (whose base
    weights depend on the rank) are refused. Returns a :class:`ResizeReport`.
    """
    from ..adapter_files import WEIGHTS_NAME
    from ..adapter_files import adapter_dir as find_dir

    _check_request(rank, energy, sv_ratio)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory; give a new output directory")
    cfg, raw, tensors, layers = read_lora(adapter_dir, "resize")
    if cfg.use_dora:
        raise ValueError(
            f"{adapter_dir}: a DoRA adapter: its magnitude vector is fitted to ‖W0 + ΔW‖, which resizing "
            "changes; merge it (loraforge merge) or resize a plain LoRA adapter"
        )
    if cfg.init in ("pissa", "olora", "loftq"):
        raise ValueError(
            f"{adapter_dir}: init_lora_weights={cfg.init!r}: the base weights it loads over depend on the "
            "rank; convert it to a plain LoRA adapter first (PEFT's path_initial_model_for_weight_conversion)"
        )
    new = dict(tensors)
    report = ResizeReport(out=str(out), bytes_before=(find_dir(adapter_dir) / WEIGHTS_NAME).stat().st_size)
    ranks = {}
    for f in layers:
        qb, core, qa = spectra.factored(f.a, f.b, f.scale)
        if sv_ratio is not None:
            s = torch.linalg.svdvals(core)
            keep = int((s > s[0] / sv_ratio).sum()) if s.numel() else 0
            t = spectra.truncate(core, rank=max(1, keep), max_rank=f.rank)
        else:
            t = spectra.truncate(core, rank=rank, energy=energy, max_rank=f.rank)
        b, a = qb @ t.b, t.a @ qa.T
        if t.rank == 0:  # ΔW = 0 (e.g. B still at its zero init): a rank-1 zero pair
            b, a = b.new_zeros(b.shape[0], 1), a.new_zeros(1, a.shape[1])
        k = a.shape[0]
        new[f.a_key] = a.reshape(k, *f.a.shape[1:]).to(f.a.dtype).contiguous()
        new[f.b_key] = b.reshape(f.b.shape[0], k, *f.b.shape[2:]).to(f.b.dtype).contiguous()
        bias_key = f"{PREFIX}{f.name}.lora_B.bias"
        if bias_key in new:  # (PEFT adds s·bias: the new scale is 1)
            new[bias_key] = (tensors[bias_key].double() * f.scale).to(tensors[bias_key].dtype)
        ranks[f.name] = k
        report.layers.append(
            dict(name=f.name, shape=list(f.shape), old_rank=f.rank, new_rank=k, energy=t.energy)
        )
        report.params_before += f.a.numel() + f.b.numel()
        report.params_after += new[f.a_key].numel() + new[f.b_key].numel()
    new_cfg = _config(cfg, ranks)
    _write(out, new_cfg, raw, new)
    report.bytes_after = (out / WEIGHTS_NAME).stat().st_size
    return report


def _check_request(rank, energy, sv_ratio) -> None:
    if sv_ratio is None:
        spectra.check_request(rank, energy, "resize")
        return
    if rank is not None or energy is not None:
        raise ValueError("resize: give exactly one of rank, energy and sv_ratio")
    ok = isinstance(sv_ratio, (int, float)) and not isinstance(sv_ratio, bool)
    if not ok or not math.isfinite(sv_ratio) or sv_ratio < 1:
        raise ValueError(f"resize: sv_ratio must be a number >= 1, got {sv_ratio!r}")


def _config(cfg: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    r"""``cfg`` with each layer's rank from ``ranks`` and alpha = r (scale 1): the most common rank
    as r, the others in rank_pattern / alpha_pattern keyed by the module path.

    PEFT (and loraforge) read a key as the regex ``(.*\.)?(key)$`` and take the first match in
    file order (sorted): a plain path ``lin`` also matches ``block.lin``. Where that would give
    some layer a wrong rank, the keys are anchored, ``^`` + the escaped path: exactly one layer each.
    """
    common = Counter(ranks.values()).most_common(1)[0][0]
    for anchored in (False, True):
        pattern = {
            ("^" + re.escape(n)) if anchored else n: k for n, k in sorted(ranks.items()) if k != common
        }
        pattern = dict(sorted(pattern.items()))  # (the order the saved JSON has)
        new = dataclasses.replace(
            cfg,
            r=common,
            alpha=common,
            use_rslora=False,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            init="default",
        )
        if all(new.rank_and_alpha(n) == (k, k) for n, k in ranks.items()):
            return new
    raise AssertionError("rank_pattern does not resolve to the new ranks")  # (anchored keys always do)


def _write(out: Path, cfg: LoraConfig, raw: dict, tensors: dict) -> None:
    """The PEFT directory, as ``save_adapter`` writes it (atomic files, sorted JSON)."""
    from safetensors.torch import save_file

    from ..adapter_files import CONFIG_NAME, WEIGHTS_NAME
    from ..files import atomic_write, atomic_write_text

    meta = {k: raw[k] for k in ("task_type", "base_model_name_or_path", "revision") if raw.get(k) is not None}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(cfg.to_peft_dict(**meta), indent=2, sort_keys=True))


def _ratio(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loraforge resize",
        description="Change a LoRA adapter's rank by SVD of each layer's s·B·A (exact when the new rank "
        "is at least the old one), or keep the smallest rank per layer holding a fraction of its energy. "
        "Writes a PEFT adapter (per-layer ranks in rank_pattern, alpha = r) and prints a per-layer table.",
    )
    p.add_argument("adapter", help="LoRA adapter directory (PEFT format)")
    want = p.add_mutually_exclusive_group(required=True)
    want.add_argument("--rank", type=int, help="new rank R (each layer keeps at most its current rank)")
    want.add_argument(
        "--sv-ratio",
        type=float,
        help="keep the singular values above the largest / SV_RATIO (kohya's sv_ratio), per layer",
    )
    want.add_argument(
        "--energy", type=float, help="keep this fraction of each layer's Frobenius energy, in (0, 1]"
    )
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``loraforge resize``: 0, or 2 with one line on stderr for a bad argument or file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.energy is not None and not math.isfinite(args.energy):
            raise ValueError(f"--energy must be a number in (0, 1], got {args.energy}")
        report = resize_adapter(
            args.adapter, args.out, rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio
        )
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
