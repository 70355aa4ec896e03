"""One adapter per token: the LoRA layers' path for a serving step.

A serving engine runs every running sequence's new tokens in one forward, as one row of T
tokens: a prompt being read (many tokens) next to sequences decoding (one token each), each
sequence with its own adapter. ``TokenPlan`` says which adapter each token uses; a LoRA layer
then runs its base once on all T tokens and adds, for each adapter present, its low-rank
product on that adapter's tokens (S-LoRA's / Punica's "segmented" product):

    y[t] = base(x)[t] + s_a · B_a · (A_a · x[t])      a = adapter of token t

as two batched matmuls over (adapters used × S tokens) with each adapter's tokens gathered into
its own padded row block (padding rows are zeros and are not added back).

Batch invariance. A token's output must not depend on which other sequences share the step
(a greedy answer is then the same whether the request runs alone or in a crowd). On CPU a
matmul's row results do depend on the number of rows M when M is small (another kernel below
~8 rows) and not above; so each adapter's block has at least ``MIN_ROWS`` rows, and the
engine pads the step to at least ``MIN_ROWS`` tokens. Ranks are zero-padded to the largest
resident rank, which leaves every product unchanged (zeros add nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ROWS = 8


@dataclass
class Groups:
    """How the tokens of one step meet the adapters of one layer."""

    stack_names: list[str]  # the layer's resident adapters in the plan's fixed order
    used: list[str]  # those the step's tokens use, in the same order
    slots: torch.Tensor  # (n_used,) their positions in the stack (1-based: 0 is BASE's zeros)
    all_used: bool  # used == stack_names: the stack is used as it is (no gather of factors)
    gather: torch.Tensor  # (n_used, S) token index per block row; padding rows point at row T
    token_idx: torch.Tensor  # (n_tokens_adapted,) where each kept block row goes
    flat_idx: torch.Tensor  # (n_tokens_adapted,) which rows of the flattened blocks are kept
    rows: dict[str, torch.Tensor]  # adapter -> its token indices


class TokenPlan:
    """The adapter of each token of a step: ``set(names, order)`` before the forward.

    ``names[t]``: token t's adapter, or None / ``"__base__"`` for none. ``order``: every adapter
    that may appear (the resident ones) in a fixed order, so that the layers' stacked factors
    (``LoraLinear._stacks``) stay cached from step to step until the resident set changes.
    """

    def __init__(self) -> None:
        self.names: list[str | None] | None = None
        self.order: list[str] = []
        self._groups: dict[tuple, Groups | None] = {}

    @property
    def active(self) -> bool:
        return self.names is not None

    @property
    def num_tokens(self) -> int:
        return len(self.names or ())

    def set(self, names: list[str | None], order: list[str]) -> None:
        self.names, self.order = list(names), list(order)
        self._groups.clear()

    def clear(self) -> None:
        self.names = None
        self._groups.clear()

    def groups(self, held: tuple[str, ...], device) -> Groups | None:
        """The grouping for a layer that holds adapters ``held`` (None: no token uses one)."""
        key = (held, str(device))
        if key not in self._groups:
            self._groups[key] = self._build(set(held), device)
        return self._groups[key]

    def _build(self, held: set[str], device) -> Groups | None:
        stack = [n for n in self.order if n in held]
        rows: dict[str, list[int]] = {n: [] for n in stack}
        for t, n in enumerate(self.names):
            if n in rows:
                rows[n].append(t)
        used = [n for n in stack if rows[n]]
        if not used:
            return None
        t_pad = len(self.names)  # the zero row appended to the tokens
        s = max(MIN_ROWS, max(len(rows[n]) for n in used))
        gather = torch.full((len(used), s), t_pad, dtype=torch.long)
        token_idx, flat_idx = [], []
        for i, n in enumerate(used):
            gather[i, : len(rows[n])] = torch.tensor(rows[n])
            token_idx += rows[n]
            flat_idx += range(i * s, i * s + len(rows[n]))
        return Groups(
            stack_names=stack,
            used=used,
            slots=torch.tensor([stack.index(n) + 1 for n in used], device=device),
            all_used=used == stack,
            gather=gather.to(device),
            token_idx=torch.tensor(token_idx, device=device),
            flat_idx=torch.tensor(flat_idx, device=device),
            rows={n: torch.tensor(rows[n], device=device) for n in used},
        )


def tokens_first(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``x`` with the step's tokens along dim 0: (1, T, ...) -> (T, ...); (T, ...) as it is."""
    if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == num_tokens:
        return x[0]
    if x.shape[0] != num_tokens:
        raise ValueError(f"a token plan for {num_tokens} tokens met an input of shape {tuple(x.shape)}")
    return x
