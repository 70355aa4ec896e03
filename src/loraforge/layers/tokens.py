"""One adapter per token: the LoRA layers' path for a serving step.

A serving engine runs every running sequence's new tokens in one forward, as one row of T
tokens: one token of each sequence that is decoding, then the prompts of the sequences just
admitted, each sequence with its own adapter. ``TokenPlan`` says which adapter each token uses;
a LoRA layer runs its base once on all T tokens and adds each token's own low-rank product

    y[t] = base(x)[t] + s_a · B_a · (A_a · x[t])      a = adapter of token t

in two ways, both reading each adapter's factors once per step:

* decoding tokens (the first ``n_decode``, a handful per adapter): all the layer's resident
  adapters at once, their factors concatenated along the rank (A_cat (R × in), B_cat
  (out × R), R = Σ r): H = X·A_catᵀ (n_decode × R), each row masked to its adapter's
  columns, Y += H·B_catᵀ. Two matmuls whatever the number of adapters; no factor is copied
  or padded to a common rank (the batched-gather alternative reads every token's factors).
* prompt tokens, grouped by adapter into contiguous runs (S-LoRA's / Punica's segments):
  Y[run] += s·(X[run]·Aᵀ)·Bᵀ per run, with the adapter's own rank.

Batch invariance. A token's output must not depend on which other sequences share the step
(a greedy answer is then the same whether the request runs alone or in a crowd). On CPU a
matmul's row results depend on the number of rows M below ~8 rows (another kernel) and not
above; so the engine gives the decoding part at least ``MIN_ROWS`` rows (padding tokens) and
a run shorter than that is computed on a zero-padded copy. The concatenation depends only on
the resident adapters, not on the step. (``TokenPlan(min_rows=1)`` turns the padding off: small
steps are then faster, up to ~3x at one sequence on a CPU, and a token's output may differ in the
last bits with the company it keeps.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ROWS = 8


@dataclass
class Groups:
    """How the tokens of one step meet the adapters of one layer."""

    stack_names: list[str]  # the layer's resident adapters in the plan's fixed order
    n_decode: int  # the first n_decode tokens take the concatenated path
    decode_mask: torch.Tensor | None  # (n_decode, R) 1 where column belongs to the token's adapter
    runs: list[tuple[str, int, int]]  # (adapter, start, end) of prompt tokens, contiguous
    rows: dict[str, torch.Tensor]  # adapter -> all its token indices (the general path)


class TokenPlan:
    """The adapter of each token of a step: ``set(names, order, n_decode)`` before the forward.

    ``names[t]``: token t's adapter, or None for none. ``order``: every adapter that may appear
    (the resident ones) in a fixed order, so that the layers' concatenated factors stay cached
    from step to step until the resident set changes. Tokens from ``n_decode`` on must come in
    contiguous runs per adapter.
    """

    def __init__(self, min_rows: int = MIN_ROWS) -> None:
        self.min_rows = min_rows  # 1: no padding (faster small steps, not batch invariant)
        self.names: list[str | None] | None = None
        self.order: list[str] = []
        self.n_decode = 0
        self._groups: dict[tuple, Groups | None] = {}

    @property
    def active(self) -> bool:
        return self.names is not None

    @property
    def num_tokens(self) -> int:
        return len(self.names or ())

    def set(self, names: list[str | None], order: list[str], n_decode: int = 0) -> None:
        self.names, self.order, self.n_decode = list(names), list(order), n_decode
        self._groups.clear()

    def clear(self) -> None:
        self.names = None
        self._groups.clear()

    def groups(self, held: dict[str, int], device) -> Groups | None:
        """The grouping for a layer holding adapters ``held`` (name -> rank); None: no token
        uses one of them."""
        key = (tuple(held.items()), str(device))
        if key not in self._groups:
            self._groups[key] = self._build(held, device)
        return self._groups[key]

    def _build(self, held: dict[str, int], device) -> Groups | None:
        stack = [n for n in self.order if n in held]
        rows: dict[str, list[int]] = {n: [] for n in stack}
        for t, n in enumerate(self.names):
            if n in rows:
                rows[n].append(t)
        if not any(rows.values()):
            return None
        nd = self.n_decode
        offsets, col = {}, 0
        for n in stack:
            offsets[n], col = col, col + held[n]
        mask = None
        if any(n in rows for n in self.names[:nd]):
            mask = torch.zeros((nd, col))
            for t, n in enumerate(self.names[:nd]):
                if n in rows:
                    mask[t, offsets[n] : offsets[n] + held[n]] = 1
            mask = mask.to(device)
        runs: list[tuple[str, int, int]] = []
        for t in range(nd, len(self.names)):
            n = self.names[t]
            if n not in rows:
                continue
            if runs and runs[-1][0] == n and runs[-1][2] == t:
                runs[-1] = (n, runs[-1][1], t + 1)
            else:
                runs.append((n, t, t + 1))
        return Groups(
            stack_names=stack,
            n_decode=nd,
            decode_mask=mask,
            runs=runs,
            rows={n: torch.tensor(r, device=device) for n, r in rows.items() if r},
        )


def tokens_first(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``x`` with the step's tokens along dim 0: (1, T, ...) -> (T, ...); (T, ...) as it is."""
    if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == num_tokens:
        return x[0]
    if x.shape[0] != num_tokens:
        raise ValueError(f"a token plan for {num_tokens} tokens met an input of shape {tuple(x.shape)}")
    return x
