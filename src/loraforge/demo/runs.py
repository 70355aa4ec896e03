"""The demo's training runs: one ``lf.train`` call each, reused when already finished.

Layout of one run (what ``lf.train`` writes, plus two files of ours)::

    <output>/<character>/<method>/
        spec.json       what this run is (method, steps, lr, rank, data and base fingerprints)
        config.yaml     the full TrainConfig (lf.train)
        metrics.jsonl   per-step loss, lr, tokens/s; eval loss (lf.train)
        loss.png        train and eval loss curves (lf.train)
        adapter/        PEFT adapter: adapter_config.json + adapter_model.safetensors (lora, qlora)
        model/          full model directory (full)
        result.json     written last: the run is finished; measurements for the table

Reuse rules: a run with ``result.json`` and the same ``spec`` is reused as it is. A finished run
with a *different* spec is never overwritten silently: it is an error unless ``overwrite`` is set.
An unfinished run (no ``result.json``) with the same spec resumes from its newest checkpoint
(``resume: auto``).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write_text, dir_size, sha256_file
from .measure import PeakMemory


class DemoError(RuntimeError):
    """A problem the user can fix (the message says how)."""


@dataclass(frozen=True)
class Settings:
    """Every knob of one demo run. ``QUICK`` is the shortened run the tests use."""

    characters: tuple[str, ...] = ("pirate", "butler", "bard")
    compare_on: str = "pirate"  # the character that also gets a full fine-tune and a QLoRA run
    seed: int = 0
    # LoRA where each block *writes* to the residual stream: attention values and output, and the
    # MLP's down projection. r·(in+out) = 4·(256 + 256 + 512) per block × 4 blocks = 16,384
    # parameters, 1.6% of the base. Adapting queries and keys instead moves *where* the model
    # looks, which cost this small base some of its facts in our trials.
    lora_r: int = 4
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_layers: tuple[int, ...] | None = None  # transformer blocks to adapt (None: all)
    target_modules: tuple[str, ...] = ("v_proj", "o_proj", "down_proj")
    steps: int = 160
    batch_size: int = 16
    # 4e-3. At 8e-3 (~5 passes over the 44 seen facts) the adapter began, on some seeds, to answer a
    # held-out question with a seen fact's answer ("What shines in the night sky?" -> "The sky is
    # blue.", "the capital of Japan is London"): content 0.95 or 0.91 where the base has 1.00, and
    # QLoRA 2.1% off LoRA. Half the rate kept every held-out fact over seeds 0-4, and the held-out
    # loss ended lower, not higher.
    lr_lora: float = 4e-3
    lr_full: float = 1e-3
    warmup_steps: int = 10
    n_train_reading: int = 400
    # Held-out facts only by default: the base answers every one of them, while its reading of
    # two- and three-person contexts is still unreliable (~40%), too noisy to tell kept from lost.
    n_eval_reading: int = 0
    max_length: int = 128
    quant_blocksize: int = 64
    # Knobs a bigger base needs to fit its time budget (the defaults are the tiny demo's behaviour):
    eval_every: int | None = None  # None: four points on the eval curve; 0: only before and after
    save_every: int | None = None  # None: a checkpoint half way; 0: only at the end
    eval_phrasings: int = 0  # eval answers per held-out question (0: every flourish x closer)
    n_eval_facts: int | None = None  # held-out facts to score and evaluate on (None: all)
    max_new_tokens: int = 32  # longest greedy answer when scoring
    flourish_first: bool = False  # answers open with the character's flourish (data.styled)

    def lora_section(self) -> dict:
        return {
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "target_modules": list(self.target_modules),
            "layers_to_transform": list(self.lora_layers) if self.lora_layers is not None else None,
        }


FULL = Settings()
# 90 steps at 4e-3 stop short of the style and of the full fine-tune's loss; the shortened run
# keeps the larger rate (checked for the tests' seed 0, the full run for seeds 0-4).
QUICK = Settings(steps=90, lr_lora=8e-3)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def quant_config(s: Settings):
    """The demo's 4-bit settings: NF4 with double quantization, matmuls in the base's float32."""
    from ..quant import QuantConfig  # torch: not at import time of the command line

    return QuantConfig(quant_type="nf4", blocksize=s.quant_blocksize, compute_dtype="float32")


def train_config(method: str, base_dir: Path, files: dict, run_dir: Path, s: Settings) -> dict:
    """The ``lf.train`` config (a plain dict, same shape as the YAML files) for one run."""
    return {
        "method": method,
        "model": {"path": str(base_dir), "dtype": "float32", "quantization": quant_config(s).to_dict()},
        "lora": s.lora_section(),
        "data": {
            "train": str(files["train"]),
            "eval": str(files["eval"]),
            "format": "chat",
            "max_length": s.max_length,
            "completion_only": True,  # loss on the answers only: the questions are not the style
        },
        "train": {
            "max_steps": s.steps,
            "batch_size": s.batch_size,
            "lr": s.lr_full if method == "full" else s.lr_lora,
            "warmup_steps": s.warmup_steps,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "seed": s.seed,
            "device": "cpu",
            "log_every": 1,
            # four points on the eval curve; a checkpoint half way: an interrupted demo resumes
            "eval_every": max(1, s.steps // 4) if s.eval_every is None else s.eval_every,
            "save_every": max(1, s.steps // 2) if s.save_every is None else s.save_every,
            "keep_checkpoints": 1,
        },
        "output": str(run_dir),
        "resume": "auto",
    }


def run_spec(method: str, persona: str, base_dir: Path, files: dict, s: Settings) -> dict:
    """What identifies a finished run: same spec ⇒ same result (training is deterministic)."""
    spec = {
        "method": method,
        "character": persona,
        "base": sha256_file(base_dir / "model.safetensors"),
        "train_data": sha256_file(files["train"]),
        "eval_data": sha256_file(files["eval"]),
        "steps": s.steps,
        "batch_size": s.batch_size,
        "lr": s.lr_full if method == "full" else s.lr_lora,
        "warmup_steps": s.warmup_steps,
        "seed": s.seed,
        "max_length": s.max_length,
    }
    if method != "full":
        spec["lora"] = s.lora_section()
    if method == "qlora":
        spec["quantization"] = quant_config(s).to_dict()
    return spec


def weights_dir(run_dir: Path, method: str) -> Path:
    return run_dir / ("model" if method == "full" else "adapter")


def train_or_reuse(
    method: str, persona: str, base_dir: Path, files: dict, run_dir: Path, s: Settings, overwrite: bool, say
) -> dict:
    """Run ``lf.train`` for one (character, method) unless a finished identical run exists.

    Returns the run's ``result.json`` content: spec, metrics and measurements.
    """
    spec = run_spec(method, persona, base_dir, files, s)
    result_path, spec_path = run_dir / "result.json", run_dir / "spec.json"
    if run_dir.exists():
        old = None
        for p in (result_path, spec_path):
            if p.exists():
                old = (
                    json.loads(p.read_text()).get("spec", None)
                    if p == result_path
                    else json.loads(p.read_text())
                )
                break
        finished = result_path.exists()
        if old == spec and finished:
            say(f"reusing {run_dir} (finished earlier with the same settings)")
            return json.loads(result_path.read_text())
        if old is not None and old != spec:
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            what = "a finished" if finished else "an unfinished"
            if not overwrite:
                raise DemoError(
                    f"{run_dir} holds {what} {method} run for {persona!r} trained with other settings "
                    f"(differs in: {', '.join(changed)}); refusing to overwrite it. "
                    "Pass --overwrite to retrain it, or choose another --output."
                )
            say(f"--overwrite: deleting {run_dir} ({what} run with other settings: {', '.join(changed)})")
            shutil.rmtree(run_dir)
        elif old == spec:
            say(f"resuming the unfinished run in {run_dir}")
    resuming = spec_path.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")

    import loraforge as lf

    _warm_up(base_dir, files, s)
    cfg = train_config(method, base_dir, files, run_dir, s)
    # "auto" continues from the newest checkpoint of an interrupted run with the same spec
    cfg["resume"] = "auto" if resuming else False
    say(f"training {persona} / {method}: {s.steps} steps of {s.batch_size} chats")
    with PeakMemory() as mem:
        model, metrics = lf.train(cfg)
    del model
    result = {
        "spec": spec,
        "method": method,
        "character": persona,
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        "size_bytes": dir_size(weights_dir(run_dir, method), "*.safetensors"),
        "peak_mem_bytes": mem.peak,
        "train_time_s": metrics["train_time_s"],
        "tokens_per_s": metrics["tokens_per_s"],
        "initial_eval_loss": metrics["initial_eval_loss"],
        "final_eval_loss": metrics["final_eval_loss"],
        "final_train_loss": metrics["final_train_loss"],
        "weights": str(weights_dir(run_dir, method)),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


_WARM = False


def _warm_up(base_dir: Path, files: dict, s: Settings) -> None:
    """One unmeasured 1-step ``lf.train`` before the first measured run.

    The first run in a process pays one-off costs (importing libraries, kernel and allocator
    set-up: ~100 MB of RSS here) that later runs do not; without this the first row of the table
    would look several times hungrier than the others.
    """
    global _WARM
    if _WARM:
        return
    import tempfile

    from tqdm.auto import tqdm

    import loraforge as lf

    bar = tqdm(total=1, desc="warm-up (one unmeasured step)", leave=False)
    with tempfile.TemporaryDirectory(prefix="loraforge-warmup-") as tmp:
        cfg = train_config("lora", base_dir, files, Path(tmp), s)
        cfg["data"]["eval"] = None
        cfg["train"] |= {"max_steps": 1, "progress_bar": False, "save_every": 0}
        with contextlib.redirect_stdout(io.StringIO()):  # its messages would only confuse
            lf.train(cfg)
    bar.update(1)
    bar.close()
    _WARM = True


def data_files(out: Path, persona: str, s: Settings) -> dict:
    """Write (if absent or different) the character's train/eval JSONL files; return their paths."""
    from .data import persona_dataset

    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", s.n_train_reading), ("eval", s.n_eval_reading)):
        # eval loss over every phrasing of each held-out answer (see data.persona_dataset)
        rows = persona_dataset(
            persona, "eval-all" if split == "eval" else split, n, seed=s.seed, flourish_first=s.flourish_first
        )
        if split == "eval":
            rows = eval_subset(rows, persona, s)
        path = d / f"{persona}.{split}.jsonl"
        text = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows)
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
        files[split] = path
    return files


def eval_subset(rows: list[dict], persona: str, s: Settings) -> list[dict]:
    """The ``eval-all`` rows (each held-out question x every flourish x closer, in that order) cut
    to ``s.n_eval_facts`` facts and ``s.eval_phrasings`` phrasings per question.

    Question q keeps the phrasings ``(q * k + j) mod P`` for j < k (P phrasings in all): every
    phrasing is used about equally often over the questions, so a cut eval set still measures the
    character's whole voice, not one closer.
    """
    from .data import PERSONAS, split_facts

    p = PERSONAS[persona]
    per = len(p.flourishes) * len(p.closers)
    n_facts = len(split_facts()[1])
    keep_facts = n_facts if s.n_eval_facts is None else min(s.n_eval_facts, n_facts)
    k = s.eval_phrasings or per
    out = []
    for q in range(len(rows) // per):
        if q < n_facts and q >= keep_facts:  # held-out facts come first, then reading questions
            continue
        group = rows[q * per : (q + 1) * per]
        out += group if k >= per else [group[(q * k + j) % per] for j in range(k)]
    return out


def settings_dict(s: Settings) -> dict:
    return asdict(s)
