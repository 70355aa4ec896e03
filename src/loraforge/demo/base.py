"""The demo's base model: a tokenizer and a tiny Llama pretrained on the bundled corpus.

``build_base(out_dir)`` is the whole recipe, deterministic for a seed on CPU:

1. generate the corpus (`data.pretrain_documents`) and train a byte-level BPE tokenizer on it
   with the ``tokenizers`` library (special tokens ``<|user|> <|assistant|> <|system|> <|end|>
   <|pad|>``, and a chat template so ``apply_chat_template`` works everywhere);
2. build a Llama (``PretrainConfig``: hidden 128, 4 layers, 4 heads, SwiGLU 384, tied embeddings,
   about one million parameters) and train it with a plain next-token loop: AdamW, linear warmup
   then cosine decay, on packed sequences of ``seq_len`` tokens, on one CPU thread;
3. save a transformers directory (``config.json``, ``model.safetensors``, tokenizer files) that
   ``AutoModelForCausalLM.from_pretrained``, ``lf.load_model`` and ``lf.train`` all read.

This loop is deliberately not loraforge's training engine: it only exists to make a base that
has learned general text *before* any adapter is trained on it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is "<|role|>content<|end|>"; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the shipped base model (recorded in ``pretrain.json``)."""

    seed: int = 0
    n_docs: int = 30000
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 4000
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def render(tokenizer, doc: dict) -> str:
    """A corpus document as the exact text the model sees (chat rows through the template)."""
    if "messages" in doc:
        return tokenizer.apply_chat_template(doc["messages"], tokenize=False)
    return doc["text"] + tokenizer.eos_token


def make_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(256, cfg.seq_len),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def packed_sequences(tokenizer, docs: list[dict], seq_len: int) -> torch.Tensor:
    """All documents tokenized, concatenated and cut into rows of ``seq_len`` tokens: (N, seq_len)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(render(tokenizer, doc), add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    model, rows: torch.Tensor, cfg: PretrainConfig, progress: bool = True, on_step=None
) -> list[float]:
    """Plain full-parameter next-token training; returns the loss of every step.

    ``on_step(step, model)``, if given, is called after every optimizer step (for experiments).
    """
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretraining base", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = rows[torch.randint(len(rows), (cfg.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if on_step is not None:
            on_step(step, model)
    model.eval()
    return losses


def build_base(
    out_dir: str | os.PathLike, cfg: PretrainConfig | None = None, progress: bool = True, on_step=None
) -> Path:
    """Tokenizer + pretrained tiny Llama written to ``out_dir`` (atomically: temp dir + rename)."""
    cfg = cfg or PretrainConfig()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    # One thread: the result must not depend on the machine's core count (a multi-threaded matmul
    # may sum in another order), and for matrices this small a second thread gains little.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out_dir, cfg, t0, progress, on_step)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, cfg: PretrainConfig, t0: float, progress: bool, on_step) -> Path:
    docs = data.pretrain_documents(cfg.n_docs, seed=cfg.seed)
    # Only the corpus trains the tokenizer (its stories already use the characters' words), so the
    # character datasets can change without changing the base model.
    texts = [d.get("text") or " ".join(m["content"] for m in d["messages"]) for d in docs]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    rows = packed_sequences(tokenizer, docs, cfg.seq_len)
    model = make_model(cfg, tokenizer)
    losses = pretrain(model, rows, cfg, progress=progress, on_step=on_step)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    meta = asdict(cfg) | {
        "parameters": n_params,
        "corpus_tokens": rows.numel(),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    (tmp / "pretrain.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
