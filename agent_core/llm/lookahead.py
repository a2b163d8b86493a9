"""Steering with lookahead: the user's reward model chooses each sentence of their reply.

Re-scoring the next token alone cannot steer toward what a reader rewards in a whole
reply: a question needs a question's opening long before its "?", a figure needs a
sentence that gives one. So a steered reply is written a *block* at a time (a sentence, a
list item, or at most ``max_block`` tokens): the batching engine decodes the block
``candidates`` times side by side, each row sampling on its own (with its own copy of
the style control), and once every candidate has finished its block the user's reward
model (:class:`~agent_core.llm.base.ReplyScorer`) scores each one as a prefix of the reply
(or, where it ends there, as the whole reply) and keeps one. The kept block is sent on
(the reply streams a sentence at a time), the other rows take its place, and the next
block starts from it. Rows are cheap on a CPU: a decode step reads the weights once for
the whole batch.

How far this moves the reply from the model's own sampling is measured at every block:
keeping the best of K independent samples is at most ``log K - (K - 1) / K`` nats away
from one sample; keeping a candidate drawn with weights ``w`` is about ``sum w log(K w)``.
The per-token sum of those is the steering's KL, which the nightly job keeps within the
adapters' ``max_kl`` when it chooses a user's strength.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agent_core.llm.style_control import StyleVocab, vocab_for

MIN_BLOCK = 4  # tokens: a shorter "sentence" ("Sure!", "1.") joins the next block


class BlockEnds:
    """Which token ends a block: a line break, or a sentence end that does not follow a
    digit (the "." of "1." numbers a list)."""

    def __init__(self, vocab: StyleVocab) -> None:
        self.sentence_end = vocab.sentence_end
        self.newline = vocab.has_newline
        self.digit = vocab.digit
        self.size = vocab.size

    def ends(self, block: Sequence[int]) -> bool:
        if len(block) < MIN_BLOCK or block[-1] >= self.size:
            return False
        last, before = block[-1], block[-2]
        if self.newline[last]:
            return True
        return bool(self.sentence_end[last]) and not (before < self.size and self.digit[before])


@functools.lru_cache(maxsize=8)
def block_ends_for(tokenizer: Any) -> BlockEnds:
    return BlockEnds(vocab_for(tokenizer))


def best_of_k_kl(k: int) -> float:
    """The KL (nats) of keeping the best of ``k`` independent samples, from one sample."""
    return math.log(k) - (k - 1) / k if k > 1 else 0.0


def choose(scores: Sequence[float], strength: float, generator: torch.Generator | None) -> tuple[int, float]:
    """Which candidate to keep, and the KL of that choice (see the module's docstring).

    ``strength`` inf keeps the best; 0 keeps the first (no steering: it is one sample);
    in between, a draw with weights ``softmax(strength * logit(score))``."""
    k = len(scores)
    if k == 1 or strength <= 0:
        return 0, 0.0
    if math.isinf(strength):
        return int(np.argmax(scores)), best_of_k_kl(k)
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    logits = strength * np.log(p / (1 - p))
    w = np.exp(logits - logits.max())
    w /= w.sum()
    u = float(torch.rand(1, generator=generator))
    index = min(int(np.searchsorted(np.cumsum(w), u * w.sum())), k - 1)
    kl = float(np.sum(w * np.log(np.maximum(k * w, 1e-12))))
    return index, max(0.0, min(kl, math.log(k)))
