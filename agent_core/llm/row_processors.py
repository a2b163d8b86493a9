"""The logits processors of the batching engine's rows, applied to all its rows at once.

A row's :class:`RowProcessors` does what ``logits_processors(..., warpers=False)`` does
for plain ``generate`` (transformers' repetition penalty, then the style control and loop
guard), to the same scores, at a fraction of the cost per step:

- each row keeps the distinct tokens it has seen as they come, instead of reading its
  whole sequence into a new tensor every step;
- the repetition penalty is one gather and one scatter for all rows (transformers'
  ``RepetitionPenaltyLogitsProcessor`` arithmetic: a score below 0 is multiplied by the
  penalty, any other divided by it);
- each row's style control changes its own row of scores in place
  (:meth:`StyleControl.apply`, a few vectorised operations).

The sampling warpers and the draw follow in :mod:`agent_core.llm.warpers`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from agent_core.llm.style_control import StyleControl


class RowProcessors:
    """One row's processors: the repetition ``penalty`` (1.0: none) over every token of the
    row's sequence (prompt included, as ``generate`` has it), then its ``control`` (None:
    no style control). ``capacity`` bounds the distinct tokens a row can hold (its
    context length); ``vocab`` is the scores' width (a token past it is not penalised)."""

    def __init__(self, penalty: float, control: StyleControl | None, *, vocab: int, capacity: int) -> None:
        self.penalty = penalty
        self.control = control
        self.vocab = vocab
        self._seen: set[int] = set()
        self._distinct = torch.zeros(max(1, min(capacity, vocab)), dtype=torch.long)  # past ``count``: the first one
        self.count = 0
        self._followed = 0  # tokens of the sequence read so far

    def fork(self) -> RowProcessors:
        """A copy that follows its own row from here (a steered reply's candidate)."""
        twin = copy.copy(self)
        twin._seen = set(self._seen)
        twin._distinct = self._distinct.clone()
        twin.control = self.control.fork() if self.control is not None else None
        return twin

    def follow(self, ids: Sequence[int]) -> None:
        """Take in the row's tokens after those already read (``ids``: its whole sequence)."""
        new = []
        for token in ids[self._followed :]:
            if token < self.vocab and token not in self._seen:
                self._seen.add(token)
                new.append(token)
        self._followed = len(ids)
        if new:
            if self.count == 0:
                self._distinct.fill_(new[0])  # the padding past ``count``: a token penalised anyway
            self._distinct[self.count : self.count + len(new)] = torch.tensor(new)
            self.count += len(new)

    def distinct(self, width: int) -> torch.Tensor:
        """The row's distinct tokens, padded to ``width`` with one of them."""
        return self._distinct[:width]


def apply(processors: Sequence[RowProcessors], sequences: Sequence[Sequence[int]], scores: torch.Tensor) -> None:
    """Each row's processors on its row of ``scores`` (rows x vocabulary, changed in place);
    ``sequences[i]`` is row i's prompt and reply so far."""
    for p, ids in zip(processors, sequences, strict=True):
        p.follow(ids)
    penalised = [i for i, p in enumerate(processors) if p.penalty != 1.0 and p.count]
    if penalised:
        width = max(processors[i].count for i in penalised)
        index = torch.stack([processors[i].distinct(width) for i in penalised])
        penalty: float | torch.Tensor = torch.tensor([processors[i].penalty for i in penalised])[:, None]
        if len(same := {processors[i].penalty for i in penalised}) == 1:
            penalty = same.pop()  # as transformers' processor has it: a number
        every = len(penalised) == scores.shape[0]
        rows = scores if every else scores[penalised]
        picked = rows.gather(1, index)
        rows.scatter_(1, index, torch.where(picked < 0, picked * penalty, picked / penalty))
        if not every:
            scores[penalised] = rows
    for i, (p, ids) in enumerate(zip(processors, sequences, strict=True)):
        if p.control is not None:
            p.control.apply(ids, scores[i])
