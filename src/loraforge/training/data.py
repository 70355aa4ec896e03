"""Training data: render rows to text, tokenize, mask, pack, batch (files are read by ``datafiles``).

Every example becomes two aligned lists of length T:

* ``input_ids[t]``: the token at position t;
* ``labels[t]``: the token the model must predict at position t (``input_ids[t + 1]`` of the same
  example) or ``IGNORE`` when that next token is not trained (a prompt token, the end of the
  example, padding). Labels are shifted here, once, so the loss never shifts and packed examples
  can never predict across a boundary.

Formats (``data.format``; ``auto`` picks from the columns):

* ``text``: ``{"text": ...}``; every token is trained.
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; with ``completion_only`` the
  prompt tokens are masked. EOS is appended so the model learns to stop.
* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the template
  ``data.chat_template`` names (``loraforge.chat_templates``; ``tokenizer``: the tokenizer's own,
  ``FALLBACK_CHAT_TEMPLATE`` when it has none); with ``completion_only`` only the assistant turns
  are trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .config import ConfigError, DataSection
from .datafiles import DataError, peek_rows, read_rows

IGNORE = -100
FORMATS = ("text", "prompt_completion", "chat")

# Used when the tokenizer has no chat template. Plain-text role markers (no new tokens, so the
# vocabulary and embeddings stay unchanged); every assistant turn ends with EOS so that
# generation stops there.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


# -- validating and rendering ------------------------------------------------------------------------


def detect_format(row: dict, cfg: DataSection, where: str) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in row:
        return "chat"
    if cfg.prompt_field in row and cfg.completion_field in row:
        return "prompt_completion"
    if cfg.text_field in row:
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from the fields {sorted(row)}; expected "
        f"{cfg.messages_field!r} (chat), {cfg.prompt_field!r}+{cfg.completion_field!r} or "
        f"{cfg.text_field!r}, or set data.format and data.*_field"
    )


def _text_problem(row: dict, key: str) -> str | None:
    value = row.get(key)
    if key not in row or value is None:
        return f"missing field {key!r}"
    if not isinstance(value, str):
        return f"field {key!r} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"field {key!r} is empty"
    return None


def row_problem(row: dict, fmt: str, cfg: DataSection) -> str | None:
    """What is wrong with ``row`` for format ``fmt``, or None."""
    if fmt == "text":
        return _text_problem(row, cfg.text_field)
    if fmt == "prompt_completion":
        return _text_problem(row, cfg.prompt_field) or _text_problem(row, cfg.completion_field)
    key = cfg.messages_field
    messages = row.get(key)
    if messages is None:
        return f"missing field {key!r}"
    if not isinstance(messages, list) or not messages:
        return f"field {key!r} must be a non-empty list of {{role, content}} objects"
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{key}[{j}] must be an object with 'role' and 'content', got {type(m).__name__}"
        for part in ("role", "content"):
            if m.get(part) is None:
                return f"{key}[{j}] is missing {part!r}"
            if not isinstance(m[part], str):
                return f"{key}[{j}].{part} must be a string, got {type(m[part]).__name__}"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"{key}[{j}] is an empty assistant message"
    if not any(m["role"] == "assistant" for m in messages):
        return f"field {key!r} has no assistant message to train on"
    return None


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Render a conversation into (text, is_assistant) pieces whose concatenation is the full text.

    The assistant span of turn i is found as the difference between the rendering of
    ``messages[:i]`` with the generation prompt and that of ``messages[:i + 1]``; this needs the
    template to render every conversation prefix as a text prefix, which we check.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs, gen):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:  # e.g. raise_exception: roles that do not alternate (mistral)
            raise DataError(f"the chat template refuses this conversation: {e}") from None

    full = render(messages, False)
    segments, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        end = len(render(messages[: i + 1], False))
        if not (full.startswith(render(messages[: i + 1], False)) and start >= pos and end > start):
            raise DataError(
                "the chat template does not render each conversation prefix as a text prefix, so "
                "assistant turns cannot be located; set data.completion_only: false"
            )
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [(text, trained) for text, trained in segments if text]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the joined text and, per token, whether it lies in a trained segment.

    A fast tokenizer tokenizes the whole text (as at inference) and uses character offsets to
    assign tokens to segments; a slow one tokenizes segment by segment.

    A token whose characters ``[start, end)`` overlap a trained segment ``[a, b)``
    (``start < b and end > a``) is trained, even when it begins before the segment: a prompt
    ending in a space and a completion ``"white"`` give the byte-level BPE token ``"Ġwhite"`` (or
    SentencePiece's ``"▁white"``), which starts in the prompt but carries the answer's first word.
    A token of no characters (offsets ``(s, s)``) belongs to the character before it.
    """
    text = "".join(t for t, _ in segments)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0  # character spans of the trained segments
        for t, trained in segments:
            if trained:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        trained_mask = []
        for start, end in enc["offset_mapping"]:
            if end <= start:
                start, end = max(start - 1, 0), max(start, 1)
            trained_mask.append(any(start < b and end > a for a, b in spans))
        return list(enc["input_ids"]), trained_mask
    ids, mask = [], []
    for t, trained in segments:
        piece = tokenizer(t, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids exactly as training sees the start of a text / prompt_completion example."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_row(tokenizer, row: dict, fmt: str, cfg: DataSection) -> tuple[Example, bool]:
    """(example, truncated) for one valid row; labels are shifted (see module docstring)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        segments = chat_segments(tokenizer, row[cfg.messages_field])
        if not cfg.completion_only:
            segments = [(t, True) for t, _ in segments]
        ids, trained = encode_segments(tokenizer, segments)
        bos = eos = []  # the template decides about BOS and end-of-turn tokens
    elif fmt == "prompt_completion":
        prompt, completion = row[cfg.prompt_field], row[cfg.completion_field]
        ids, trained = encode_segments(tokenizer, [(prompt, not cfg.completion_only), (completion, True)])
    else:
        ids, trained = encode_segments(tokenizer, [(row[cfg.text_field], True)])
    ids = bos + ids + eos
    trained = [False] * len(bos) + trained + [True] * len(eos)
    truncated = len(ids) > cfg.max_length
    ids, trained = ids[: cfg.max_length], trained[: cfg.max_length]
    labels = [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, labels), truncated


def check_data(cfg: DataSection, n: int = 100) -> None:
    """Check, before any model is loaded, that the train (and eval) files exist, can be read,
    and that their first ``n`` rows have a known format and the fields it needs. Raises
    DataError naming ``file:line``; the full check runs again when the data is tokenized."""
    for path in (cfg.train, cfg.eval):
        if not path:
            continue
        rows, where = peek_rows(path, n, cfg.skip_bad_rows)
        if not rows:
            if cfg.skip_bad_rows:
                continue  # every row of the sample was bad; load_examples reports the count
            raise DataError(f"{path}: no rows")
        fmt = detect_format(rows[0], cfg, where[0])
        for row, loc in zip(rows, where):
            problem = row_problem(row, fmt, cfg)
            if problem is not None and not cfg.skip_bad_rows:
                raise DataError(f"{loc}: {problem}")


def load_examples(path: str, cfg: DataSection, tokenizer, log=print) -> list[Example]:
    """Read, validate and tokenize one file. A bad row raises ``DataError("file:line: ...")``
    unless ``cfg.skip_bad_rows``, which skips it and reports the count."""
    rows, where, skipped = read_rows(path, cfg.skip_bad_rows)
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = detect_format(rows[0], cfg, where[0])
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        # Set on the tokenizer so that it is saved with the adapter and used at generation time.
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        log("data: the tokenizer has no chat template; using loraforge's built-in <|role|> template")
    examples, truncated, empty, first_bad = [], 0, 0, None
    for i, row in enumerate(rows):
        problem = row_problem(row, fmt, cfg)
        if problem is None:
            try:
                example, cut = encode_row(tokenizer, row, fmt, cfg)
            except DataError as e:
                problem = str(e)
        if problem is not None:
            if not cfg.skip_bad_rows:
                raise DataError(f"{where[i]}: {problem}")
            skipped += 1
            first_bad = first_bad or f"{where[i]}: {problem}"
            continue
        if example.n_targets == 0:
            empty += 1  # e.g. the completion was cut off by max_length
            continue
        truncated += cut
        examples.append(example)
    notes = [f"{len(examples)} {fmt} examples from {path}"]
    if skipped:
        notes.append(f"skipped {skipped} bad rows (first: {first_bad or 'invalid JSON or UTF-8'})")
    if truncated:
        notes.append(f"{truncated} truncated to {cfg.max_length} tokens")
    if empty:
        notes.append(f"{empty} dropped: no trained tokens within {cfg.max_length} tokens")
    log("data: " + "; ".join(notes))
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


# -- packing and batching ----------------------------------------------------------------------------


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate examples (in order) into rows of at most ``max_length`` tokens.

    Position ids restart at 0 for each example. Given position ids and no attention mask,
    transformers builds a block-diagonal causal mask (flash-attention uses the same ids as
    sequence boundaries), so no token attends across examples; since labels were shifted per
    example, no loss crosses a boundary either.
    """
    rows, current = [], Example([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > max_length:
            rows.append(current)
            current = Example([], [], [])
        current.input_ids += ex.input_ids
        current.labels += ex.labels
        current.position_ids += ex.position_ids
    if current.input_ids:
        rows.append(current)
    return rows


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: ``input_ids``, ``labels``, ``position_ids``, each (B, T).

    Padding sits after every real token, so causal attention never lets a real token see it;
    its positions continue counting so it does not look like a new packed sequence.
    """
    width = max(len(r.input_ids) for r in rows)
    ids, labels, pos = [], [], []
    for r in rows:
        n = width - len(r.input_ids)
        ids.append(r.input_ids + [pad_id] * n)
        labels.append(r.labels + [IGNORE] * n)
        last = r.position_ids[-1] + 1 if r.position_ids else 0
        pos.append(r.position_ids + list(range(last, last + n)))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)
    return {"input_ids": as_tensor(ids), "labels": as_tensor(labels), "position_ids": as_tensor(pos)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (copied asynchronously where the device allows)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def load_datasets(cfg: DataSection, tokenizer, seed: int, log=print) -> tuple[list[Example], list[Example]]:
    """(train rows, eval rows), packed if ``cfg.packing``; eval may be empty. The template
    ``cfg.chat_template`` names is set on the tokenizer first (saved with the adapter from there)."""
    from .. import chat_templates

    try:
        chat_templates.apply_setting(tokenizer, cfg.chat_template, log)
    except ValueError as e:  # the .jinja file changed since the config was checked
        raise ConfigError(f"data.chat_template: {e}") from None
    train = load_examples(cfg.train, cfg, tokenizer, log)
    if cfg.eval:
        evals = load_examples(cfg.eval, cfg, tokenizer, log)
    elif cfg.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        evals = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        log(f"data: held out {n_eval} train examples for eval (data.eval_fraction={cfg.eval_fraction})")
    else:
        evals = []
    if cfg.packing:
        n = len(train)
        train = pack(train, cfg.max_length)
        used = sum(len(r.input_ids) for r in train) / (len(train) * cfg.max_length)
        log(
            f"data: packed {n} examples into {len(train)} rows of <= {cfg.max_length} tokens "
            f"({used:.0%} full)"
        )
        evals = pack(evals, cfg.max_length) if evals else evals
    return train, evals


class BatchPlan:
    """Which rows go into each micro-batch of each optimizer step, on each process.

    One optimizer step consumes a global batch of ``batch_size * grad_accum * world_size`` rows,
    taken in order from a permutation of the training rows drawn from ``seed + epoch``. The plan
    is a pure function of the step number, so resuming at step s needs nothing but s, and every
    process can count the global number of trained tokens without communicating.
    """

    def __init__(self, n_rows: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{n_rows} training rows are fewer than one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} processes)"
            )
        self._order_epoch, self._order = -1, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_rows(self, step: int) -> list[int]:
        """Indices of the whole global batch of ``step``."""
        epoch = self.epoch_of(step)
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order, self._order_epoch = torch.randperm(self.n_rows, generator=g).tolist(), epoch
        i = (step % self.steps_per_epoch) * self.global_batch
        return self._order[i : i + self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches (row indices) for ``step``."""
        rows = self.step_rows(step)
        per_process = self.grad_accum * self.batch_size
        mine = rows[rank * per_process : (rank + 1) * per_process]
        return [mine[j * self.batch_size : (j + 1) * self.batch_size] for j in range(self.grad_accum)]
